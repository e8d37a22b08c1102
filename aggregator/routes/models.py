"""The current global model and the public tokenizer, as devices and the web demo fetch them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Response

from aggregator.dependencies import get_rounds, get_storage, get_tokenizer_json
from aggregator.rounds import RoundManager
from aggregator.storage import Storage

router = APIRouter(tags=["models"])

SAFETENSORS = "application/octet-stream"


@router.get("/model", response_class=Response, responses={200: {"content": {SAFETENSORS: {}}}})
def current_model(rounds: RoundManager = Depends(get_rounds)) -> Response:
    version, data = rounds.current_model()
    return Response(data, media_type=SAFETENSORS, headers={"X-Model-Version": str(version)})


@router.get("/models/{version}", response_class=Response, responses={404: {"description": "No such version"}})
def model_version(version: int, storage: Storage = Depends(get_storage)) -> Response:
    data = storage.model(version)
    if data is None:
        raise HTTPException(404, f"there is no model version {version}")
    return Response(data, media_type=SAFETENSORS, headers={"X-Model-Version": str(version)})


@router.get("/tokenizer", response_class=Response)
def tokenizer(tokenizer_json: str = Depends(get_tokenizer_json)) -> Response:
    return Response(tokenizer_json, media_type="application/json")
