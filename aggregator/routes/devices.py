"""Device check-in: a device that is eligible asks whether to train now."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from aggregator.dependencies import get_rounds
from aggregator.rounds import RoundManager
from aggregator.schemas import CheckinRequest, CheckinResponse

router = APIRouter(tags=["devices"])


@router.post("/checkin", response_model=CheckinResponse)
def checkin(request: CheckinRequest, rounds: RoundManager = Depends(get_rounds)) -> CheckinResponse:
    decision = rounds.checkin(request.device_id)
    return CheckinResponse(**decision.__dict__)
