"""The web demo's FastAPI application: the keyboard page and the suggestions behind it, and the training
dashboard and the aggregator status behind it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import pydantic_core
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from aggregator.api.schemas import StatusResponse
from keyboard_model.casing import shown_words
from web_demo.browser_phone import BrowserPhone, NewMessage, PhoneSettings, PhoneState, PhoneSwitchedOffError
from web_demo.config import DemoConfig
from web_demo.model_source import ModelSource
from web_demo.personal_model import NoPersonalModelError
from web_demo.run_folder import RunFolder
from web_demo.schemas import ErrorResponse, ModelInfo, ModelScore, RunResponse, SuggestResponse, TrainingResponse

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = Path(str(files("plotly") / "package_data" / "plotly.min.js"))  # an installed package: a real file
# The page sends the sentence being typed, at most this much of it, which keeps the query
# string well inside uvicorn's limit and the suggester's remembered state short.
MAX_TEXT_CHARS = 1000
# The largest body the page sends is a message of MAX_MESSAGE_CHARS characters, at most 12 bytes each when
# written as JSON escapes (a surrogate pair), and the whole app refuses anything larger with 413.
MAX_BODY_BYTES = 16 * 1024


class StrictJSONRequest(Request):
    """A request whose JSON body is read as JSON is written: Python's json module also takes NaN, Infinity and
    -Infinity, and lone surrogates like "\\ud800", none of which a response (or SQLite) can hold."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=False)
            except ValueError as error:
                # FastAPI answers a JSONDecodeError with a 422 of type json_invalid. The parser gives the place as
                # a line and column in its message, not as the offset the error wants, hence offset 0.
                raise json.JSONDecodeError(str(error), body.decode(errors="replace"), 0) from error
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_json_handler


async def validation_failed(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, less what each error quotes of the request: a number that overflows to infinity (1e999)
    cannot be written back as JSON, and what a person typed has no business in an error message."""
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


router = APIRouter(route_class=StrictJSONRoute)


def get_model_source(request: Request) -> ModelSource:
    return request.app.state.model_source


def get_phone(request: Request) -> BrowserPhone:
    return request.app.state.phone


def get_run_folder(request: Request) -> RunFolder:
    return request.app.state.run_folder


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/dashboard", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/vendor/plotly.min.js", include_in_schema=False)
def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript")


@router.get("/api/training", response_model=TrainingResponse)
def training(source: ModelSource = Depends(get_model_source)) -> TrainingResponse:
    _, error = source.state()
    return TrainingResponse(aggregator=source.url, error=error, refresh_seconds=source.refresh_seconds,
                            status=source.training())


@router.get("/api/run", response_model=RunResponse)
def run_folder(run: RunFolder = Depends(get_run_folder)) -> RunResponse:
    """What the run folder (--run) records beside the aggregator: loss, central evaluation, reference models."""
    return run.read()


@router.get("/api/phone", response_model=PhoneState)
def phone_state(phone: BrowserPhone = Depends(get_phone)) -> PhoneState:
    return phone.state()


@router.put("/api/phone", response_model=PhoneState)
def configure_phone(settings: PhoneSettings, phone: BrowserPhone = Depends(get_phone)) -> PhoneState:
    """Switch "this browser is a phone" on or off, and set its charging, idle and Wi-Fi conditions."""
    return phone.configure(settings)


@router.post(
    "/api/phone/messages", response_model=PhoneState, status_code=201,
    responses={409: {"model": ErrorResponse, "description": "The switch is off: nothing is kept"}},
)
def send_message(message: NewMessage, phone: BrowserPhone = Depends(get_phone)) -> PhoneState:
    """A message the person sent: appended to this phone's history on this machine, never sent to the aggregator."""
    try:
        return phone.add_message(message)
    except PhoneSwitchedOffError as error:
        raise HTTPException(409, str(error)) from error


@router.get(
    "/api/suggest",
    response_model=SuggestResponse,
    responses={
        409: {"model": ErrorResponse,
              "description": "Personal suggestions asked for with the switch off, or before any message to learn from"},
        503: {"model": ErrorResponse, "description": "No model has been loaded from the aggregator yet"},
    },
)
def suggest(
    text: str = Query("", max_length=MAX_TEXT_CHARS, description="The message up to the caret"),
    personal: bool = Query(False, description="Suggest from this browser phone's personal model, fine-tuned on this "
                                              "machine on its own history (the switch must be on)"),
    source: ModelSource = Depends(get_model_source),
    phone: BrowserPhone = Depends(get_phone),
) -> SuggestResponse:
    model, error = source.state()
    if model is None:
        raise HTTPException(503, f"no model yet: {error or f'still fetching it from the aggregator at {source.url}'}")
    suggester, personal_messages = model.suggester, None
    if personal:
        try:
            mine = phone.personal_model(model)
        except (PhoneSwitchedOffError, NoPersonalModelError) as refused:
            raise HTTPException(409, str(refused)) from refused
        suggester, personal_messages = mine.suggester, mine.messages
    # Cased here, not in the page, so that every client of the API gets the words as the person should see them,
    # and the page inserts what it shows.
    return SuggestResponse(suggestions=shown_words(text, suggester.suggest(text)),
                           model="personal" if personal else "global", model_version=model.version,
                           personal_messages=personal_messages)


@router.get("/api/model", response_model=ModelInfo)
def model_info(source: ModelSource = Depends(get_model_source),
               run: RunFolder = Depends(get_run_folder)) -> ModelInfo:
    model, error = source.state()
    privacy = source.privacy()
    return ModelInfo(
        model_version=None if model is None else model.version, aggregator=source.url, error=error,
        refresh_seconds=source.refresh_seconds, differential_privacy=privacy is not None,
        epsilon=privacy.epsilon if privacy else None, dp_delta=privacy.delta if privacy else None,
        score=latest_score(run.read(), source.training()),
    )


def latest_score(run: RunResponse, status: StatusResponse | None) -> ModelScore | None:
    """The run's final score on every phone once it has ended; else the newest round's federated evaluation, the
    counts its phones reported on the global model the round started from."""
    if run.finished and run.final is not None:
        return run.final
    scored = [(r.round, r.base_version, r.eval_devices, r.recall_at_1, r.recall_at_3)
              for r in (status.recent_rounds if status else []) if r.recall_at_1 is not None]
    if not scored:
        return None
    _, version, devices, top1, top3 = max(scored)
    # Both recalls come from the same counts: a round with a top-1 figure has a top-3 one.
    return ModelScore(recall_at_1=top1, recall_at_3=top3 or 0.0, model_version=version,
                      scored_on=f"{devices} phones' own")


def create_app(config: DemoConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert config.phone_dir is not None  # DemoConfig fills it in
        with ModelSource(config.aggregator_url, config.refresh_seconds) as source, \
                BrowserPhone(config.phone_dir, config.aggregator_url, config.phone_check_in_s) as phone:
            app.state.model_source, app.state.phone = source, phone
            app.state.run_folder = RunFolder(config.run_dir)
            yield

    app = FastAPI(
        title="fedkeyboard web demo",
        description="A keyboard suggestion strip driven by the aggregator's latest global model.",
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
        exception_handlers={RequestValidationError: validation_failed},
    )
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # A page on another site whose name is made to resolve to this machine (DNS rebinding) reaches the demo with
    # that site's name in the Host header.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.host_patterns(), www_redirect=False)
    return app
