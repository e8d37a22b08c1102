"""Devices: enrolment, and check-in of an eligible device that asks whether to train now."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status
from fastapi.concurrency import run_in_threadpool

from aggregator.api.schemas import CheckinResponse, EnrolmentResponse
from aggregator.dependencies import admitted, attested, get_device_id, get_rounds
from aggregator.rounds import RoundManager
from aggregator.routes.responses import UNAUTHORIZED, refusals

router = APIRouter(tags=["devices"])

# Where a device goes with what check-in answered: the round's number is in the path of every round route.
ROUND_LINKS = {
    f"{operation}": {"operationId": operation, "parameters": {"round_number": "$response.body#/round"},
                     "description": "The round this device was selected for, with the upload token as bearer"}
    for operation in ("upload_update", "report_evaluation", "abort", "secagg_state", "secagg_keys", "secagg_shares",
                      "secagg_confirm", "secagg_reveal")
}


@router.post(
    "/devices", response_model=EnrolmentResponse, status_code=status.HTTP_201_CREATED, operation_id="enrol",
    dependencies=[Depends(admitted("enrol")), Depends(attested)],
    responses=refusals(status_403="Enrolment refused: outside the trusted networks without the enrolment secret",
                       status_429="Too many enrolments from this address"),
)
def enrol(rounds: RoundManager = Depends(get_rounds)) -> EnrolmentResponse:
    device_id, device_token = rounds.enrol()
    return EnrolmentResponse(device_id=device_id, device_token=device_token)


@router.post(
    "/checkin", response_model=CheckinResponse, operation_id="checkin",
    dependencies=[Depends(admitted("checkin"))],
    responses={200: {"description": "Train now, or when to ask again (always again, saying why, for a device that "
                                    "secure aggregation proved to lie)", "links": ROUND_LINKS},
               **refusals(status_401=UNAUTHORIZED, status_429="Too many check-ins from this address")},
)
async def checkin(
    device_id: str = Depends(get_device_id), rounds: RoundManager = Depends(get_rounds)
) -> CheckinResponse:
    # Selecting commits to SQLite under the round lock; keep it off the event loop.
    decision = await run_in_threadpool(rounds.checkin, device_id)
    return CheckinResponse(**decision.__dict__)
