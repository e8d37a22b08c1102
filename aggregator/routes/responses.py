"""Refusals: the round manager's, answered over HTTP, and as routes document them, so that the OpenAPI document
says what the service really answers."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from aggregator.api.schemas import ErrorResponse
from aggregator.refusals import UploadRefusedError


def refusals(**descriptions: str) -> dict[int | str, dict]:
    """`responses=` for a route: status code (as `status_401=...`) -> what it means, all with an ErrorResponse."""
    return {int(code.removeprefix("status_")): {"model": ErrorResponse, "description": text}
            for code, text in descriptions.items()}


UNAUTHORIZED = "Missing token, or not one this aggregator issued for this"
TOO_LARGE = "Body too large"
MALFORMED = "Malformed parameters or body: the detail lists what is wrong"


async def call_manager(method, *args):
    """Call the round manager off the event loop (it takes the round lock, and closing a round is CPU work),
    answering its refusals over HTTP."""
    try:
        return await run_in_threadpool(method, *args)
    except UploadRefusedError as error:
        raise HTTPException(error.status_code, str(error)) from error
