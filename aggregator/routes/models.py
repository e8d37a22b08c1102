"""The current global model and the public tokenizer, as devices and the web demo fetch them."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Response

from aggregator.dependencies import PathInteger, get_rounds, get_storage, get_tokenizer_json
from aggregator.rounds import RoundManager
from aggregator.routes.responses import MALFORMED, refusals
from aggregator.storage import Storage

router = APIRouter(tags=["models"])

SAFETENSORS = "application/octet-stream"


@router.get("/model", response_class=Response, operation_id="current_model",
            responses={200: {"content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}}})
def current_model(encoding: Literal["float32", "int8"] = "float32",
                  rounds: RoundManager = Depends(get_rounds)) -> Response:
    """The current global model; `encoding=int8` is the smaller download a check-in may ask for."""
    version, data = rounds.current_model(encoding)
    return Response(data, media_type=SAFETENSORS, headers={"X-Model-Version": str(version)})


@router.get("/model/served", response_class=Response, operation_id="served_model",
            responses={200: {"content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}}})
def served_model(rounds: RoundManager = Depends(get_rounds)) -> Response:
    """The model keyboards should suggest with: the average of the recent global models (`--serving-average`), of
    the current version; phones train from `/model`."""
    version, data = rounds.served_model()
    return Response(data, media_type=SAFETENSORS, headers={"X-Model-Version": str(version)})


@router.get("/models/{version}", response_class=Response, operation_id="model_version",
            responses={200: {"content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}},
                       **refusals(status_404="No such version", status_422=MALFORMED)})
def model_version(version: PathInteger, storage: Storage = Depends(get_storage)) -> Response:
    data = storage.model(version)
    if data is None:
        raise HTTPException(404, f"there is no model version {version}")
    return Response(data, media_type=SAFETENSORS, headers={"X-Model-Version": str(version)})


@router.get("/tokenizer", response_class=Response, operation_id="tokenizer",
            responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
def tokenizer(tokenizer_json: str = Depends(get_tokenizer_json)) -> Response:
    return Response(tokenizer_json, media_type="application/json")
