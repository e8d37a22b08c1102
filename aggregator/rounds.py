"""Rounds: which devices train, which updates count, and when a new global model is made.

A round selects the first `clients_per_round` devices that check in, and closes as
soon as all of them have reported or when its deadline passes. Closing averages the
reported deltas (FedAvg), stores the new model version and opens the next round.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aggregator.config import AggregatorConfig
from aggregator.storage import Storage
from aggregator.strategy import UpdateSum, make_strategy
from keyboard_model.errors import UserFacingError
from keyboard_model.model import build_model
from keyboard_model.weights import (
    Tensors,
    WeightsError,
    l2_norm,
    model_from_bytes,
    model_to_bytes,
    parameter_shapes,
    read_tensors,
)


class UploadRefusedError(Exception):
    """An upload the aggregator will not count; `status_code` is its HTTP answer."""

    status_code = 400


class UnauthorizedError(UploadRefusedError):
    """The upload token does not belong to a device selected for this round."""

    status_code = 401


class RoundClosedError(UploadRefusedError):
    """The update is for a round that is no longer open."""

    status_code = 409


class TooLargeError(UploadRefusedError):
    """The update is larger than any valid update of this model."""

    status_code = 413


class BadUpdateError(UploadRefusedError):
    """The update's bytes or example count are not acceptable; the message says why."""

    status_code = 422


@dataclass
class CheckinDecision:
    action: str  # "train" or "retry"
    round: int
    model_version: int
    upload_token: str | None = None
    retry_after_s: float | None = None


@dataclass
class SubmitResult:
    round: int
    reported: int
    duplicate: bool
    round_closed: bool = False


@dataclass
class OpenRound:
    number: int
    base_version: int
    started_at: float
    deadline: float
    device_by_token: dict[str, str] = field(default_factory=dict)
    token_by_device: dict[str, str] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    examples: int = 0


class RoundManager:
    """The round state machine. Thread-safe: HTTP handlers and the deadline timer share it."""

    def __init__(
        self, config: AggregatorConfig, storage: Storage, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock = clock
        self.strategy = make_strategy(config.server_optimizer, config.server_learning_rate)
        self._lock = threading.Lock()
        latest = storage.latest_model()
        if latest is None:
            storage.save_initial_model(model_to_bytes(self._initial_state(), 0, config.model))
            latest = storage.latest_model()
        self.model_version, self.model_bytes = latest
        self.shapes = parameter_shapes(build_model(config.model).state_dict())
        try:
            self.global_state, _ = read_tensors(self.model_bytes, self.shapes)
        except WeightsError as error:
            raise UserFacingError(
                f"the database {config.db_path} holds a model that does not fit this configuration ({error}); "
                "use the sizes and tokenizer it was created with, or another --db"
            ) from error
        self.round = self._open_round(storage.last_round_number() + 1)
        self._sum = UpdateSum(self.shapes)

    def _initial_state(self) -> Tensors:
        if self.config.initial_model is None:
            return build_model(self.config.model, seed=self.config.seed).state_dict()
        try:
            model, _ = model_from_bytes(self.config.initial_model.read_bytes())
        except (OSError, WeightsError) as error:
            raise UserFacingError(f"cannot start from {self.config.initial_model}: {error}") from error
        if model.config != self.config.model:
            raise UserFacingError(
                f"{self.config.initial_model} has sizes {model.config}, but this aggregator is set up for "
                f"{self.config.model}"
            )
        return model.state_dict()

    def _open_round(self, number: int) -> OpenRound:
        now = self.clock()
        return OpenRound(number, self.model_version, time.time(), now + self.config.round_deadline_s)

    @property
    def max_upload_bytes(self) -> int:
        """A float32 delta of this model plus room for the safetensors header."""
        return 4 * sum(math.prod(shape) for shape in self.shapes.values()) + 64 * 1024

    def current_model(self) -> tuple[int, bytes]:
        with self._lock:
            return self.model_version, self.model_bytes

    def checkin(self, device_id: str) -> CheckinDecision:
        with self._lock:
            current = self.round
            token = current.token_by_device.get(device_id)
            has_room = len(current.token_by_device) < self.config.clients_per_round
            if token is None and device_id not in current.reported and has_room:
                token = secrets.token_urlsafe(24)
                current.token_by_device[device_id] = token
                current.device_by_token[token] = device_id
            if token is not None and device_id not in current.reported:
                decision = CheckinDecision("train", current.number, self.model_version, upload_token=token)
            else:
                decision = CheckinDecision("retry", current.number, self.model_version, retry_after_s=self.config.retry_after_s)
        self.storage.log_checkin(device_id, decision.round, decision.action)
        return decision

    def authorize(self, round_number: int, token: str) -> None:
        """Refuse an upload before its body is read if its token is not valid for this round."""
        with self._lock:
            self._authorize(round_number, token)

    def submit(self, round_number: int, token: str, data: bytes) -> SubmitResult:
        """Validate an uploaded delta and add it to the round's running sum."""
        if len(data) > self.max_upload_bytes:
            raise TooLargeError(f"an update may be at most {self.max_upload_bytes} bytes; this one has {len(data)}")
        with self._lock:
            device_id = self._authorize(round_number, token)
            if device_id in self.round.reported:
                return SubmitResult(round_number, len(self.round.reported), duplicate=True)
        # Parsing and checking the bytes is the expensive part; do it outside the lock.
        try:
            delta, metadata = read_tensors(data, self.shapes)
        except WeightsError as error:
            raise BadUpdateError(str(error)) from error
        num_examples = _parse_example_count(metadata, self.config.max_examples_per_update)
        norm = l2_norm(delta)
        if norm > self.config.max_update_norm:
            raise BadUpdateError(f"the update's L2 norm is {norm:.2f}, above this aggregator's bound of "
                                 f"{self.config.max_update_norm}")
        with self._lock:
            device_id = self._authorize(round_number, token)
            if device_id in self.round.reported:
                return SubmitResult(round_number, len(self.round.reported), duplicate=True)
            self._sum.add(delta, num_examples)
            self.round.reported.add(device_id)
            self.round.examples += num_examples
            reported = len(self.round.reported)
            closed = reported >= self.config.clients_per_round
            if closed:
                self._close_round()
        return SubmitResult(round_number, reported, duplicate=False, round_closed=closed)

    def _authorize(self, round_number: int, token: str) -> str:
        if round_number != self.round.number:
            raise RoundClosedError(f"round {round_number} is closed; the current round is {self.round.number}")
        device_id = self.round.device_by_token.get(token)
        if device_id is None:
            raise UnauthorizedError(f"this upload token was not issued for round {round_number}")
        return device_id

    def tick(self) -> None:
        """Close the round if its deadline has passed (called periodically)."""
        with self._lock:
            if self.clock() >= self.round.deadline:
                self._close_round()

    def _close_round(self) -> None:
        current, now = self.round, time.time()
        summary = {
            "round": current.number, "started_at": current.started_at, "closed_at": now,
            "goal": self.config.clients_per_round, "selected": len(current.token_by_device),
            "reported": len(current.reported), "examples": current.examples,
            "base_version": current.base_version, "new_version": None, "update_norm": None,
        }
        if len(current.reported) >= self.config.min_reports:
            mean_delta = self._sum.mean()
            new_state = self.strategy.apply(self.global_state, mean_delta)
            new_bytes = model_to_bytes(new_state, self.model_version + 1, self.config.model)
            summary.update(status="closed", new_version=self.model_version + 1, update_norm=l2_norm(mean_delta))
            self.storage.record_round(summary, new_bytes)
            self.model_version, self.model_bytes, self.global_state = self.model_version + 1, new_bytes, new_state
        else:
            summary["status"] = "failed"
            self.storage.record_round(summary, None)
        self.round = self._open_round(current.number + 1)
        self._sum = UpdateSum(self.shapes)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "round": self.round.number, "model_version": self.model_version,
                "selected": len(self.round.token_by_device), "reported": len(self.round.reported),
                "goal": self.config.clients_per_round,
                "deadline_in_s": max(0.0, self.round.deadline - self.clock()),
            }


def _parse_example_count(metadata: dict[str, str], limit: int) -> int:
    # The example count is the only thing besides the tensors an update may carry.
    if set(metadata) != {"num_examples"}:
        raise BadUpdateError(f'the update metadata must hold exactly "num_examples", got {sorted(metadata)}')
    raw = metadata["num_examples"]
    try:
        count = int(raw)
    except ValueError as error:
        raise BadUpdateError(f"num_examples must be a whole number, got {raw!r}") from error
    if not 1 <= count <= limit:
        raise BadUpdateError(f"num_examples must be between 1 and {limit}, got {count}")
    return count
