"""Request and response bodies of the aggregator's HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CheckinRequest(BaseModel):
    device_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._/:-]+$")


class CheckinResponse(BaseModel):
    action: Literal["train", "retry"]
    round: int
    model_version: int
    upload_token: str | None = Field(None, description="Present when action is 'train'; authorises one upload.")
    retry_after_s: float | None = Field(None, description="Present when action is 'retry'.")


class UploadResponse(BaseModel):
    round: int
    reported: int = Field(description="Updates accepted in this round so far, this one included.")
    duplicate: bool = Field(description="True when this device had already reported; the update was not counted again.")
    round_closed: bool = Field(False, description="True when this update completed the round.")


class RoundSummary(BaseModel):
    round: int
    status: Literal["closed", "failed"]
    started_at: float
    closed_at: float
    goal: int
    selected: int
    reported: int
    examples: int
    base_version: int
    new_version: int | None
    update_norm: float | None


class StatusResponse(BaseModel):
    round: int = Field(description="The round now open.")
    model_version: int
    goal: int
    selected: int
    reported: int
    deadline_in_s: float
    recent_rounds: list[RoundSummary]


class ErrorResponse(BaseModel):
    detail: str
