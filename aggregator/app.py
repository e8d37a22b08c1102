"""The aggregator's FastAPI application."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundManager
from aggregator.routes import devices, models, secagg, status
from aggregator.routes import rounds as rounds_routes
from aggregator.storage import Storage

logger = logging.getLogger(__name__)

# How often the deadline of the open round is checked.
TICK_SECONDS = 0.5


def create_app(config: AggregatorConfig) -> FastAPI:
    """The service, its database opened and its model loaded (so bad configuration fails here, clearly)."""
    storage = Storage(config.db_path)
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
    app.state.storage = storage
    app.state.rounds = rounds
    app.state.tokenizer_json = config.tokenizer_path.read_text(encoding="utf-8")
    for module in (devices, models, rounds_routes, secagg, status):
        app.include_router(module.router)
    return app


def _tick_until(manager: RoundManager, stop: threading.Event) -> None:
    while not stop.wait(TICK_SECONDS):
        try:
            manager.tick()
        except Exception:
            # Keep ticking: without this thread no round would ever close at its deadline again.
            logger.exception("closing a round at its deadline failed; will try again")
