"""Secure aggregation's messages: a selected device's keys, sealed shares and revealed shares, and the state of
the round's protocol as that device may see it. The masked input itself goes to /rounds/{round}/updates."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool

from aggregator.dependencies import get_bearer_token, get_rounds
from aggregator.rounds import RoundManager, UploadRefusedError
from aggregator.schemas import ErrorResponse, SecAggKeys, SecAggReveal, SecAggShares, SecAggState
from keyboard_model.secagg import PublicKeys, SecAggError, Share

router = APIRouter(tags=["secure aggregation"])
REFUSALS = {
    401: {"model": ErrorResponse, "description": "Missing upload token, or not one of this round"},
    409: {"model": ErrorResponse, "description": "Not what the round's phase or cohort expects; the detail says why"},
    422: {"model": ErrorResponse, "description": "Malformed"},
}


async def _call(method, *args):
    # Every call takes the round lock, and may close a round (unmasking is CPU work): off the event loop.
    try:
        return await run_in_threadpool(method, *args)
    except UploadRefusedError as error:
        raise HTTPException(error.status_code, str(error)) from error


@router.get("/rounds/{round_number}/secagg", response_model=SecAggState, responses=REFUSALS)
async def state(round_number: int, token: str = Depends(get_bearer_token),
                rounds: RoundManager = Depends(get_rounds)) -> SecAggState:
    return await _call(rounds.secagg_state, round_number, token)


@router.post("/rounds/{round_number}/secagg/keys", status_code=204, responses=REFUSALS)
async def keys(round_number: int, body: SecAggKeys, token: str = Depends(get_bearer_token),
               rounds: RoundManager = Depends(get_rounds)) -> None:
    try:
        public = PublicKeys(cipher=body.cipher, masking=body.masking)
    except SecAggError as error:
        raise HTTPException(422, str(error)) from error
    await _call(rounds.secagg_keys, round_number, token, public)


@router.post("/rounds/{round_number}/secagg/shares", status_code=204, responses=REFUSALS)
async def shares(round_number: int, body: SecAggShares, token: str = Depends(get_bearer_token),
                 rounds: RoundManager = Depends(get_rounds)) -> None:
    await _call(rounds.secagg_shares, round_number, token, dict(body.sealed))


@router.post("/rounds/{round_number}/secagg/reveal", status_code=204, responses=REFUSALS)
async def reveal(round_number: int, body: SecAggReveal, token: str = Depends(get_bearer_token),
                 rounds: RoundManager = Depends(get_rounds)) -> None:
    revealed = {owner: Share(share.x, share.value) for owner, share in body.shares.items()}
    await _call(rounds.secagg_reveal, round_number, token, revealed)
