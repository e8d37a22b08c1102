"""FastAPI dependencies: the round manager and storage live on the app's state; devices authenticate."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aggregator.rounds import RoundManager, UnauthorizedError
from aggregator.storage import Storage

bearer = HTTPBearer(auto_error=False, description="A device token from enrolment, or an upload token from check-in")


def get_rounds(request: Request) -> RoundManager:
    return request.app.state.rounds


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_tokenizer_json(request: Request) -> str:
    return request.app.state.tokenizer_json


def get_bearer_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    if credentials is None or not credentials.credentials:
        raise HTTPException(401, "this request needs the header 'Authorization: Bearer <token>'")
    return credentials.credentials


def get_device_id(token: str = Depends(get_bearer_token), rounds: RoundManager = Depends(get_rounds)) -> str:
    """The enrolled device whose token the request carries."""
    try:
        return rounds.authenticate(token)
    except UnauthorizedError as error:
        raise HTTPException(error.status_code, str(error)) from error
