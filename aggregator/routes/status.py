"""What the aggregator is doing: the open round, the model version and recent rounds."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from aggregator.dependencies import get_rounds, get_storage
from aggregator.rounds import RoundManager
from aggregator.schemas import RoundSummary, StatusResponse
from aggregator.storage import Storage

router = APIRouter(tags=["status"])


@router.get("/status", response_model=StatusResponse)
def status(
    recent: int = Query(20, ge=0, le=1000, description="How many finished rounds to include"),
    rounds: RoundManager = Depends(get_rounds),
    storage: Storage = Depends(get_storage),
) -> StatusResponse:
    return StatusResponse(
        **rounds.snapshot(), recent_rounds=[RoundSummary(**row) for row in storage.recent_rounds(recent)]
    )
