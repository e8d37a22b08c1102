"""The aggregator's configuration: one object, filled from the command line or by code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keyboard_model.model import ModelConfig


@dataclass(frozen=True)
class AggregatorConfig:
    db_path: Path
    # The public tokenizer, served to phones and the web demo with the model.
    tokenizer_path: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    clients_per_round: int = 10
    # A round closes early when its goal is met, otherwise at this deadline.
    round_deadline_s: float = 300.0
    # At the deadline, a round with fewer reports than this is abandoned and recorded as failed.
    min_reports: int = 1
    # fedavg, fedavgm (server momentum) or fedadam; see aggregator/strategy.py.
    server_optimizer: str = "fedavgm"
    # None: the optimiser's own default (FedAvg 1.0, FedAvgM 0.5, FedAdam 0.01).
    server_learning_rate: float | None = None
    # Most examples one update may claim. Weighting trusts this count, so it is capped: a
    # device cannot outweigh more than this many honest examples. Phones train on at most
    # 400 messages a round by default.
    max_examples_per_update: int = 1_000
    # Largest L2 norm an update may have; larger ones are refused, so one device cannot drag
    # the model far. Honest phones with the default training measured 0.3 to 6.0.
    max_update_norm: float = 20.0
    # How long a device that was not selected should wait before checking in again.
    retry_after_s: float = 5.0
    seed: int = 0
    # Start from this saved model (e.g. one trained on the server's proxy data) instead of a
    # fresh one; used only when the database is new.
    initial_model: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8600

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError("clients_per_round must be at least 1")
        if not 1 <= self.min_reports <= self.clients_per_round:
            raise ValueError("min_reports must be between 1 and clients_per_round")
        if self.max_examples_per_update < 1:
            raise ValueError("max_examples_per_update must be at least 1")
        if not self.round_deadline_s > 0 or not self.retry_after_s > 0 or not self.max_update_norm > 0:
            raise ValueError("round_deadline_s, retry_after_s and max_update_norm must be positive")
