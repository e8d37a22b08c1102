"""Response bodies of the web demo's HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aggregator.api.schemas import StatusResponse


class SuggestResponse(BaseModel):
    suggestions: list[str] = Field(description="Up to three words, best first, cased as the strip shows them.")
    model: Literal["global", "personal"] = Field(
        description="Which model suggested: the aggregator's global model, or the browser phone's personal copy of "
                    "it, fine-tuned on the machine serving the page on the person's own messages.")
    model_version: int = Field(
        description="Version of the global model that made the suggestions, or that the personal model was "
                    "fine-tuned from.")
    personal_messages: int | None = Field(
        None, description="How many of the phone's messages the personal model was fine-tuned on; null for the "
                          "global model.")


class ModelScore(BaseModel):
    """How often a model's first suggestion, and any of its three, was the word typed next."""

    recall_at_1: float
    recall_at_3: float
    model_version: int
    scored_on: str = Field(description="Whose held-out messages, e.g. \"every phone's\" (the run's final score).")


class ModelInfo(BaseModel):
    model_version: int | None = Field(description="The loaded model's version; null until one has been loaded.")
    aggregator: str = Field(description="URL of the aggregator the model comes from.")
    error: str | None = Field(description="Why the last refresh failed; null when it succeeded.")
    refresh_seconds: float = Field(description="How often the demo asks the aggregator for a newer model.")
    differential_privacy: bool = Field(False, description="The aggregator trains with differential privacy.")
    epsilon: float | None = Field(None, description="Privacy spent so far, at dp_delta; null before the first round.")
    dp_delta: float | None = None
    score: ModelScore | None = Field(
        None, description="The latest score of the model: the run's final one on every phone (--run, once it has "
                          "ended), else the phones' own of the newest global model that they scored; null before any.")


class TrainingResponse(BaseModel):
    aggregator: str = Field(description="URL of the aggregator being watched.")
    error: str | None = Field(description="Why the last refresh failed; null when it succeeded.")
    refresh_seconds: float
    status: StatusResponse | None = Field(description="The aggregator's last status; null until it has answered.")


class ErrorResponse(BaseModel):
    detail: str


class RunRound(BaseModel):
    """What the run folder's metrics.jsonl says of one round; round 0 is the initial model."""

    # Strict: a line written by something else ("round": "3", "eligible": true) is dropped rather than guessed at.
    model_config = ConfigDict(strict=True)

    round: int
    model_version: int | None = Field(None, description="The global model version after the round.")
    train_loss: float | None = Field(None, description="The reporting phones' mean local training loss.")
    recall_at_1: float | None = Field(
        None, description="Central evaluation of the model the round made (model_version); null on rounds not scored.")
    recall_at_3: float | None = None
    eligible: int | None = Field(None, description="Phones eligible to train when the round began, as simulated.")
    sim_hour_utc: float | None = Field(None, description="Hour of the simulated UTC day the round began at.")


class ReferenceModel(BaseModel):
    """A row of the run's comparison table (table.json), scored on the same held-out positions as the others."""

    model_config = ConfigDict(strict=True)

    model: str
    recall_at_1: float
    recall_at_3: float


class RunResponse(BaseModel):
    run_dir: str | None = Field(description="The run folder the demo reads (--run); null when it has none.")
    finished: bool = Field(description="The run's summary.json exists: its simulation has ended.")
    rounds: list[RunRound] = Field(description="The run's rounds, oldest first, one per round number.")
    n_gram: ReferenceModel | None = Field(
        description="The n-gram's row: the comparison table's (table.json), else the one the run ended with.")
    oracle: ReferenceModel | None = Field(description="The comparison table's centralised oracle row.")
    final: ModelScore | None = Field(
        None, description="The model the run ended with, scored on every phone's held-out messages (summary.json).")
