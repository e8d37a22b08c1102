"""What a selected device sends for the round it trained in: its update, its evaluation, or that it gave up.

An update's body is safetensors bytes: one tensor per model parameter (int8 with a
scale per row, or float32) and the example count in the header metadata. They are
parsed by safetensors, never unpickled. An evaluation is three counts, as JSON. The
upload token is checked before any body is read.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from aggregator.api.schemas import AbortResponse, EvaluationReport, EvaluationResponse, UploadResponse, Vote
from aggregator.dependencies import PathInteger, get_rounds, get_upload_token
from aggregator.request_body import documented, json_body, read_limited
from aggregator.rounds import RoundManager
from aggregator.routes.responses import MALFORMED, TOO_LARGE, UNAUTHORIZED, call_manager, refusals

router = APIRouter(tags=["rounds"])
CLOSED = "The round is closed, or not in a phase that takes this; the detail says why. It was not counted"

UPDATE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
    "type": "string", "format": "binary",
    "description": "safetensors: one tensor per model parameter (int8 with a float32 scale per row, or float32), "
                   "metadata num_examples and compression; in a secure round the masked arrays 'update' and "
                   "'counts' instead",
}}}}}


@router.post(
    "/rounds/{round_number}/updates", response_model=UploadResponse, operation_id="upload_update",
    openapi_extra=UPDATE_BODY,
    responses=refusals(status_401=UNAUTHORIZED, status_409=CLOSED, status_413=TOO_LARGE,
                       status_422="Not a valid update for this model, or malformed parameters"),
)
async def upload_update(
    round_number: PathInteger, request: Request, token: str = Depends(get_upload_token),
    rounds: RoundManager = Depends(get_rounds),
) -> UploadResponse:
    """The body is the update; the bearer token is the upload token this device got at check-in."""
    body = await read_limited(request, rounds.max_upload_bytes)
    # Checking and summing the tensors is CPU work; keep it off the event loop.
    result = await call_manager(rounds.submit, round_number, token, body)
    return UploadResponse(**result.__dict__)


@router.post(
    "/rounds/{round_number}/evaluations", response_model=EvaluationResponse, operation_id="report_evaluation",
    openapi_extra=documented(EvaluationReport),
    responses=refusals(status_401=UNAUTHORIZED, status_409=CLOSED, status_413=TOO_LARGE,
                       status_422="Counts out of range, for another model version, or malformed"),
)
async def report_evaluation(
    round_number: PathInteger, token: str = Depends(get_upload_token),
    report: EvaluationReport = Depends(json_body(EvaluationReport)), rounds: RoundManager = Depends(get_rounds),
) -> EvaluationResponse:
    """Federated evaluation: how the model this device downloaded scored on its own held-out messages."""
    evaluations, duplicate = await call_manager(rounds.submit_evaluation, round_number, token, report)
    return EvaluationResponse(round=round_number, evaluations=evaluations, duplicate=duplicate)


@router.post(
    "/rounds/{round_number}/votes", response_model=UploadResponse, operation_id="vote",
    openapi_extra=documented(Vote),
    responses=refusals(status_401=UNAUTHORIZED, status_409=CLOSED, status_413=TOO_LARGE,
                       status_422="Not a vote this round asked for, or malformed"),
)
async def vote(
    round_number: PathInteger, token: str = Depends(get_upload_token),
    body: Vote = Depends(json_body(Vote)), rounds: RoundManager = Depends(get_rounds),
) -> UploadResponse:
    """Word discovery: this device's one vote in a discovery round (its upload token from check-in)."""
    return UploadResponse(**(await call_manager(rounds.submit_vote, round_number, token, body.prefix)).__dict__)


@router.post(
    "/rounds/{round_number}/abort", response_model=AbortResponse, operation_id="abort",
    responses=refusals(status_401=UNAUTHORIZED, status_409=CLOSED, status_422=MALFORMED),
)
async def abort(
    round_number: PathInteger, token: str = Depends(get_upload_token), rounds: RoundManager = Depends(get_rounds)
) -> AbortResponse:
    """A selected device says it stopped training (its conditions changed) and will not report."""
    return AbortResponse(round=round_number, aborted=await call_manager(rounds.abort, round_number, token))
