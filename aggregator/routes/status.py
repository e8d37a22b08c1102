"""What the aggregator is doing (the open round, the model version, recent rounds), and a simulator's clock."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query

from aggregator.dependencies import get_rounds, get_storage
from aggregator.rounds import ClockError, RoundManager
from aggregator.schemas import ClockUpdate, RoundSummary, StatusResponse
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


@router.put("/clock", status_code=204, responses={409: {"description": "Not a simulated clock, or time going back"}})
def set_clock(update: ClockUpdate, rounds: RoundManager = Depends(get_rounds)) -> None:
    """A simulator moves the aggregator's simulated clock forward (only with --simulated-clock)."""
    try:
        rounds.set_simulated_time(update.now_s)
    except ClockError as error:
        raise HTTPException(error.status_code, str(error)) from error
