"""Request bodies, read only after the request's credential has been checked, and never past a size limit.

FastAPI reads a declared body before it runs any dependency, so a body declared the
usual way would be read, whole, before the bearer token is looked at. Routes here
take their JSON body through `json_body`, a dependency declared after the
credential's, and document it with `documented`. Validation errors never echo the
input back: a NaN or a lone surrogate in it could not be written as JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

Model = TypeVar("Model", bound=BaseModel)


async def read_limited(request: Request, limit: int) -> bytes:
    """Read the body, refusing it (413) as soon as it is declared or grows past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"this request's body may be at most {limit} bytes; it declares {declared}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"this request's body may be at most {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went, or its body missed its deadline (keyboard_model/serving.py logs that in one line): not a
        # fault of ours, so no traceback, and nobody is left to read the answer.
        raise HTTPException(400, "the client went away before its request body arrived") from None
    return b"".join(chunks)


def json_body(model: type[Model]) -> Callable[[Request], Awaitable[Model]]:
    """A dependency that reads a JSON body of at most the aggregator's `max_json_bytes` and validates it."""

    async def read(request: Request) -> Model:
        data = await read_limited(request, request.app.state.max_json_bytes)
        try:
            return model.model_validate_json(data)
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False, include_input=False,
                                                      include_context=False)) from error

    return read


def documented(model: type[BaseModel]) -> dict:
    """The OpenAPI `requestBody` of a route whose body `json_body(model)` reads (pass as `openapi_extra`)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def body_schemas(models: list[type[BaseModel]]) -> dict[str, dict]:
    """The component schemas `documented` refers to, with the models they use."""
    schemas = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's list of errors, without the input or context that may hold what JSON cannot carry."""
    details = [{"type": item["type"], "loc": [_text(part) for part in item["loc"]], "msg": _text(item["msg"])}
               for item in error.errors()]
    return JSONResponse({"detail": details}, status_code=422)


def _text(value: object) -> object:
    # A name from the request (a dict key, a path segment) can hold a lone surrogate, which UTF-8 cannot encode.
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value
