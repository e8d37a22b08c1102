"""FastAPI dependencies: the round manager and storage live on the app's state."""

from __future__ import annotations

from fastapi import Request

from aggregator.rounds import RoundManager
from aggregator.storage import Storage


def get_rounds(request: Request) -> RoundManager:
    return request.app.state.rounds


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_tokenizer_json(request: Request) -> str:
    return request.app.state.tokenizer_json
