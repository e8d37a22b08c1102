"""The aggregator's FastAPI application."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from aggregator.admission import EnrolmentAttestation, RateLimits, TrustedNetworkOrSecret
from aggregator.api.schemas import (
    ClockUpdate,
    EvaluationReport,
    SecAggConfirm,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
)
from aggregator.config import AggregatorConfig
from aggregator.request_body import body_schemas, validation_error
from aggregator.rounds import RoundManager
from aggregator.routes import devices, models, secagg, status
from aggregator.routes import rounds as rounds_routes
from aggregator.storage import open_storage

logger = logging.getLogger(__name__)

# How often the deadline of the open round is checked.
TICK_SECONDS = 0.5
# The JSON bodies that routes read themselves (aggregator/request_body.py), for the OpenAPI document.
JSON_BODIES: list[type[BaseModel]] = [
    ClockUpdate, EvaluationReport, SecAggKeys, SecAggShares, SecAggConfirm, SecAggReveal]


def create_app(config: AggregatorConfig, attestation: EnrolmentAttestation | None = None) -> FastAPI:
    """The service, its database opened and its model loaded (so bad configuration fails here, clearly).
    `attestation` decides who may enrol (default: the trusted networks, or the enrolment secret)."""
    storage = open_storage(config.db_path, config.keep_models, config.keep_every)
    rounds = RoundManager(config, storage)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        ticker = threading.Thread(target=_tick_until, args=(rounds, stop), daemon=True, name="round-deadlines")
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            storage.close()

    app = FastAPI(
        title="fedkeyboard aggregator",
        description="Federated Averaging for a next-word keyboard model. Devices upload model deltas only.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.storage = storage
    app.state.rounds = rounds
    app.state.max_json_bytes = config.max_json_bytes
    app.state.rate_limits = RateLimits(config)
    app.state.attestation = attestation or TrustedNetworkOrSecret(config.trusted_networks, config.enrolment_secret)
    # Starlette types a handler as taking any Exception; this one is registered for RequestValidationError only.
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    for module in (devices, models, rounds_routes, secagg, status):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app, config)  # type: ignore[method-assign]  # FastAPI's documented way
    return app


def _openapi(app: FastAPI, config: AggregatorConfig) -> dict:
    """FastAPI's document, with the bodies routes read themselves and the limits this configuration enforces."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(body_schemas(JSON_BODIES))
        for count in ("positions", "hits_at_1", "hits_at_3"):
            schemas["EvaluationReport"]["properties"][count]["maximum"] = config.max_eval_positions
        app.openapi_schema = document
    return app.openapi_schema


def _tick_until(manager: RoundManager, stop: threading.Event) -> None:
    while not stop.wait(TICK_SECONDS):
        try:
            manager.tick()
        except Exception:
            # Keep ticking: without this thread no round would ever close at its deadline again.
            logger.exception("closing a round at its deadline failed; will try again")
