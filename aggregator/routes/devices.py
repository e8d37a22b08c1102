"""Devices: enrolment, and check-in of an eligible device that asks whether to train now."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status
from fastapi.concurrency import run_in_threadpool

from aggregator.dependencies import get_device_id, get_rounds
from aggregator.rounds import RoundManager
from aggregator.schemas import CheckinResponse, EnrolmentResponse, ErrorResponse

router = APIRouter(tags=["devices"])


@router.post("/devices", response_model=EnrolmentResponse, status_code=status.HTTP_201_CREATED)
def enrol(rounds: RoundManager = Depends(get_rounds)) -> EnrolmentResponse:
    device_id, device_token = rounds.enrol()
    return EnrolmentResponse(device_id=device_id, device_token=device_token)


@router.post(
    "/checkin", response_model=CheckinResponse,
    responses={401: {"model": ErrorResponse, "description": "Missing or unknown device token"}},
)
async def checkin(
    device_id: str = Depends(get_device_id), rounds: RoundManager = Depends(get_rounds)
) -> CheckinResponse:
    # Selecting commits to SQLite under the round lock; keep it off the event loop.
    decision = await run_in_threadpool(rounds.checkin, device_id)
    return CheckinResponse(**decision.__dict__)
