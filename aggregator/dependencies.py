"""FastAPI dependencies: the round manager and storage live on the app's state; devices authenticate, and the
credential is checked before any body is read (aggregator/request_body.py)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aggregator.admission import AdmissionError, EnrolmentAttestation, RateLimits
from aggregator.config import AggregatorConfig
from aggregator.refusals import UnauthorizedError, UploadRefusedError
from aggregator.rounds import RoundManager
from aggregator.storage import Storage

bearer = HTTPBearer(auto_error=False, description="A device token from enrolment, an upload token from check-in, "
                                                  "or the operator's token")

# Round numbers and model versions: SQLite integers, which a larger number would overflow.
PathInteger = Annotated[int, Path(ge=0, le=2**63 - 1)]


def get_rounds(request: Request) -> RoundManager:
    return request.app.state.rounds


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_config(request: Request) -> AggregatorConfig:
    return request.app.state.config


def get_tokenizer_json(request: Request) -> str:
    """The current model's tokenizer: the one the aggregator started with until word discovery grows it."""
    return request.app.state.rounds.tokenizer_json()


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


async def get_upload_token(round_number: PathInteger, token: str = Depends(get_bearer_token),
                           rounds: RoundManager = Depends(get_rounds)) -> str:
    """The upload token of a device selected in this round; declared before a body, so none is read otherwise."""
    try:
        # It may wait on the round lock while a round closes: off the event loop.
        await run_in_threadpool(rounds.authorize, round_number, token)
    except UploadRefusedError as error:
        raise HTTPException(error.status_code, str(error)) from error
    return token


def require_operator(token: str = Depends(get_bearer_token), config: AggregatorConfig = Depends(get_config)) -> None:
    """Only whoever started the aggregator (the simulator) holds the operator's token."""
    if config.operator_token is None:
        raise HTTPException(403, "this aggregator has no operator credential, so nobody may do this")
    if not hmac.compare_digest(token.encode(), config.operator_token.encode()):
        raise HTTPException(401, "this request needs the operator's token")


def admitted(action: str) -> Callable[[Request], None]:
    """A dependency that counts the request against its client address's rate limit for `action`."""

    def check(request: Request) -> None:
        limits: RateLimits = request.app.state.rate_limits
        try:
            limits.hit(action, _client_host(request))
        except AdmissionError as error:
            raise HTTPException(error.status_code, str(error), headers={"Retry-After": "60"}) from error

    return check


def attested(request: Request) -> None:
    attestation: EnrolmentAttestation = request.app.state.attestation
    try:
        attestation.check(_client_host(request), dict(request.headers))
    except AdmissionError as error:
        raise HTTPException(error.status_code, str(error)) from error


def _client_host(request: Request) -> str:
    return request.client.host if request.client is not None else ""
