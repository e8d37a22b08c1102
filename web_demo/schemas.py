"""Response bodies of the web demo's HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, Field

from aggregator.api.schemas import StatusResponse


class SuggestResponse(BaseModel):
    suggestions: list[str] = Field(description="Up to three words, best first.")
    model_version: int = Field(description="Version of the global model that made the suggestions.")


class ModelInfo(BaseModel):
    model_version: int | None = Field(description="The loaded model's version; null until one has been loaded.")
    aggregator: str = Field(description="URL of the aggregator the model comes from.")
    error: str | None = Field(description="Why the last refresh failed; null when it succeeded.")
    refresh_seconds: float = Field(description="How often the demo asks the aggregator for a newer model.")
    differential_privacy: bool = Field(False, description="The aggregator trains with differential privacy.")
    epsilon: float | None = Field(None, description="Privacy spent so far, at dp_delta; null before the first round.")
    dp_delta: float | None = None


class TrainingResponse(BaseModel):
    aggregator: str = Field(description="URL of the aggregator being watched.")
    error: str | None = Field(description="Why the last refresh failed; null when it succeeded.")
    refresh_seconds: float
    status: StatusResponse | None = Field(description="The aggregator's last status; null until it has answered.")


class ErrorResponse(BaseModel):
    detail: str
