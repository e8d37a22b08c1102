"""What the aggregator is doing (the open round, the model version, recent rounds), and a simulator's clock."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from aggregator.api.schemas import ClockUpdate, RoundSummary, StatusResponse
from aggregator.dependencies import get_rounds, get_storage, require_operator
from aggregator.request_body import documented, json_body
from aggregator.rounds import RoundManager
from aggregator.routes.responses import MALFORMED, TOO_LARGE, call_manager, refusals
from aggregator.storage import Storage

router = APIRouter(tags=["status"])


@router.get("/status", response_model=StatusResponse, operation_id="status",
            responses=refusals(status_422=MALFORMED))
def status(
    recent: int = Query(20, ge=0, le=1000, description="How many finished rounds to include"),
    rounds: RoundManager = Depends(get_rounds),
    storage: Storage = Depends(get_storage),
) -> StatusResponse:
    return StatusResponse(
        **rounds.snapshot(), recent_rounds=[RoundSummary(**row) for row in storage.recent_rounds(recent)]
    )


@router.put(
    "/clock", status_code=204, operation_id="set_clock", openapi_extra=documented(ClockUpdate),
    dependencies=[Depends(require_operator)],
    responses=refusals(status_401="Missing token, or not the operator's", status_403="No operator credential set",
                       status_409="Not a simulated clock, or time going back", status_413=TOO_LARGE,
                       status_422=MALFORMED),
)
async def set_clock(update: ClockUpdate = Depends(json_body(ClockUpdate)),
                    rounds: RoundManager = Depends(get_rounds)) -> None:
    """A simulator moves the aggregator's simulated clock forward (only with --simulated-clock, and only with the
    operator's token: the simulator that started the aggregator holds it)."""
    await call_manager(rounds.set_simulated_time, update.now_s)


@router.post(
    "/audit", response_model=RoundSummary, operation_id="audit", dependencies=[Depends(require_operator)],
    responses=refusals(status_401="Missing token, or not the operator's", status_403="No operator credential set",
                       status_409="No canary clients, or no recent round made the current model"),
)
async def audit(rounds: RoundManager = Depends(get_rounds)) -> RoundSummary:
    """The operator audits the current model with the canary clients now, whatever --audit-every says (a simulation
    does at its end): the figures are added to the record of the round that made the model, which is returned."""
    return RoundSummary(**await call_manager(rounds.audit_now))
