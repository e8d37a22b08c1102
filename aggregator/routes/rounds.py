"""What a selected device sends for the round it trained in: its update, its evaluation, or that it gave up.

An update's body is safetensors bytes: one tensor per model parameter (int8 with a
scale per row, or float32) and the example count in the header metadata. They are
parsed by safetensors, never unpickled. An evaluation is three counts, as JSON.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from aggregator.dependencies import get_bearer_token, get_rounds
from aggregator.rounds import RoundManager, UploadRefusedError
from aggregator.schemas import AbortResponse, ErrorResponse, EvaluationReport, EvaluationResponse, UploadResponse

router = APIRouter(tags=["rounds"])


@router.post(
    "/rounds/{round_number}/updates",
    response_model=UploadResponse,
    responses={
        401: {"model": ErrorResponse, "description": "Missing or unknown upload token"},
        409: {"model": ErrorResponse, "description": "The round is closed; the update was late and not counted"},
        413: {"model": ErrorResponse, "description": "Body too large"},
        422: {"model": ErrorResponse, "description": "Not a valid update for this model"},
    },
)
async def upload_update(
    round_number: int,
    request: Request,
    token: str = Depends(get_bearer_token),
    rounds: RoundManager = Depends(get_rounds),
) -> UploadResponse:
    """The body is the update; the bearer token is the upload token this device got at check-in."""
    try:
        # The token first: a body is read only for a device selected in this round. Like the
        # submit below, it may wait on the round lock while a round closes, so off the event loop.
        await run_in_threadpool(rounds.authorize, round_number, token)
        body = await _read_limited(request, rounds.max_upload_bytes)
        # Checking and summing the tensors is CPU work; keep it off the event loop.
        result = await run_in_threadpool(rounds.submit, round_number, token, body)
    except UploadRefusedError as error:
        raise HTTPException(error.status_code, str(error)) from error
    return UploadResponse(**result.__dict__)


@router.post(
    "/rounds/{round_number}/evaluations",
    response_model=EvaluationResponse,
    responses={
        401: {"model": ErrorResponse, "description": "Missing or unknown upload token"},
        409: {"model": ErrorResponse, "description": "The round is closed; the evaluation was not counted"},
        422: {"model": ErrorResponse, "description": "Counts out of range, or for another model version"},
    },
)
async def report_evaluation(
    round_number: int,
    report: EvaluationReport,
    token: str = Depends(get_bearer_token),
    rounds: RoundManager = Depends(get_rounds),
) -> EvaluationResponse:
    """Federated evaluation: how the model this device downloaded scored on its own held-out messages."""
    try:
        evaluations, duplicate = await run_in_threadpool(rounds.submit_evaluation, round_number, token, report)
    except UploadRefusedError as error:
        raise HTTPException(error.status_code, str(error)) from error
    return EvaluationResponse(round=round_number, evaluations=evaluations, duplicate=duplicate)


@router.post(
    "/rounds/{round_number}/abort",
    response_model=AbortResponse,
    responses={401: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def abort(
    round_number: int, token: str = Depends(get_bearer_token), rounds: RoundManager = Depends(get_rounds)
) -> AbortResponse:
    """A selected device says it stopped training (its conditions changed) and will not report."""
    try:
        aborted = await run_in_threadpool(rounds.abort, round_number, token)
    except UploadRefusedError as error:
        raise HTTPException(error.status_code, str(error)) from error
    return AbortResponse(round=round_number, aborted=aborted)


async def _read_limited(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it grows past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"an update may be at most {limit} bytes; this one declares {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"an update may be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
