"""Secure aggregation's messages: a selected device's signed keys, sealed shares with their commitments,
survivor-set signature and revealed shares, and the state of the round's protocol as that device may see it. The
masked input itself goes to /rounds/{round}/updates. The upload token is checked before any body is read."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from aggregator.api.schemas import SecAggConfirm, SecAggKeys, SecAggReveal, SecAggShares, SecAggState
from aggregator.dependencies import PathInteger, get_rounds, get_upload_token
from aggregator.request_body import documented, json_body
from aggregator.rounds import RoundManager
from aggregator.routes.responses import MALFORMED, TOO_LARGE, UNAUTHORIZED, call_manager, refusals
from aggregator.secure_round import dealing_of
from keyboard_model.secagg import PublicKeys, Share

router = APIRouter(tags=["secure aggregation"])
REFUSALS = refusals(
    status_401=UNAUTHORIZED, status_409="Not what the round's phase or cohort expects; the detail says why",
    status_413=TOO_LARGE, status_422=MALFORMED,
)


@router.get("/rounds/{round_number}/secagg", response_model=SecAggState, operation_id="secagg_state",
            responses=REFUSALS)
async def state(round_number: PathInteger, token: str = Depends(get_upload_token),
                rounds: RoundManager = Depends(get_rounds)) -> SecAggState:
    return await call_manager(rounds.secagg_state, round_number, token)


@router.post("/rounds/{round_number}/secagg/keys", status_code=204, operation_id="secagg_keys",
             openapi_extra=documented(SecAggKeys), responses=REFUSALS)
async def keys(round_number: PathInteger, token: str = Depends(get_upload_token),
               body: SecAggKeys = Depends(json_body(SecAggKeys)), rounds: RoundManager = Depends(get_rounds)) -> None:
    await call_manager(rounds.secagg_keys, round_number, token, PublicKeys(cipher=body.cipher, masking=body.masking),
                       body.signature)


@router.post("/rounds/{round_number}/secagg/confirm", status_code=204, operation_id="secagg_confirm",
             openapi_extra=documented(SecAggConfirm), responses=REFUSALS)
async def confirm(round_number: PathInteger, token: str = Depends(get_upload_token),
                  body: SecAggConfirm = Depends(json_body(SecAggConfirm)),
                  rounds: RoundManager = Depends(get_rounds)) -> None:
    await call_manager(rounds.secagg_confirm, round_number, token, body.signature)


@router.post("/rounds/{round_number}/secagg/shares", status_code=204, operation_id="secagg_shares",
             openapi_extra=documented(SecAggShares), responses=REFUSALS)
async def shares(round_number: PathInteger, token: str = Depends(get_upload_token),
                 body: SecAggShares = Depends(json_body(SecAggShares)),
                 rounds: RoundManager = Depends(get_rounds)) -> None:
    await call_manager(rounds.secagg_shares, round_number, token, dealing_of(body))


@router.post("/rounds/{round_number}/secagg/reveal", status_code=204, operation_id="secagg_reveal",
             openapi_extra=documented(SecAggReveal), responses=REFUSALS)
async def reveal(round_number: PathInteger, token: str = Depends(get_upload_token),
                 body: SecAggReveal = Depends(json_body(SecAggReveal)),
                 rounds: RoundManager = Depends(get_rounds)) -> None:
    revealed = {owner: Share(share.x, share.value) for owner, share in body.shares.items()}
    await call_manager(rounds.secagg_reveal, round_number, token, revealed)
