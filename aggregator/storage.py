"""Storage: what the aggregator keeps across restarts, as an interface, and the store a configuration opens.

Rounds, devices and routes use only `Storage`; `SqliteStorage` (aggregator/sqlite_storage.py)
is the one implementation. Another (PostgreSQL, say) implements these methods with the
same guarantees and is chosen in `open_storage`, and nothing else changes. The
guarantee every implementation keeps: `record_round` writes a round, the model,
optimiser state and DP-FTRL noise state it produced, and which of its devices reported or
aborted, atomically, so after a crash either all are there or none.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from aggregator.sqlite_storage import SqliteStorage


class Storage(Protocol):
    def latest_model(self) -> tuple[int, bytes] | None:
        """(version, safetensors bytes) of the newest global model, or None in a new store."""

    def model(self, version: int) -> bytes | None: ...

    def optimizer_state(self, version: int) -> bytes | None:
        """The server optimiser's state committed with that model version."""

    def save_initial_model(self, weights: bytes) -> None: ...

    def noise_state(self) -> tuple[int, bytes] | None:
        """(model version, DP-FTRL noise state committed with that version), or None."""

    def record_round(self, summary: dict, new_weights: bytes | None, optimizer_state: bytes | None,
                     noise_state: bytes | None = None, statuses: Mapping[str, str] | None = None,
                     tokenizer: str | None = None) -> None:
        """A finished round, with the model, optimiser state, DP-FTRL noise state and (when the round grew the
        vocabulary) tokenizer it produced if it succeeded, and the new status of its selected devices that reported
        or aborted (device id -> status), atomically; in the same transaction, the model versions no longer kept are
        deleted. `summary["excluded"]`, if any, maps the
        devices the round proved to lie to how: from then on `excluded_devices` holds them."""

    def tokenizer(self, version: int) -> str | None:
        """The tokenizer JSON of model `version` (the newest committed at or before it), or None while the
        vocabulary is the one the aggregator was started with."""

    def enrol_device(self, device_id: str, token_sha256: str) -> None: ...

    def device_tokens(self) -> dict[str, str]:
        """Every enrolled device, as token hash -> device id."""

    def record_selection(self, round_number: int, device_id: str, token_sha256: str) -> None: ...

    def selection_for_token(self, token_sha256: str) -> dict | None: ...

    def record_late(self, round_number: int, device_id: str) -> None: ...

    def discard_selections(self, round_number: int) -> None:
        """Forget the selections of this round and later ones: a round open at a crash is run again."""

    def last_round_number(self) -> int: ...

    def privacy_events(self) -> list[tuple[float, float]]:
        """(sampling rate, noise multiplier) of every round that released a differentially private model."""

    def dp_mechanisms(self) -> set[str]:
        """The differential privacy mechanisms the closed rounds were released with."""

    def last_participations(self) -> dict[str, int]:
        """Device id -> the DP-FTRL step of the last released round it reported in (for the minimum separation)."""

    def last_release(self) -> dict | None:
        """The record of the newest round that released a differentially private model (its clip norm for the next
        round, its noise settings), or None."""

    def excluded_devices(self) -> dict[str, str]:
        """Device id -> how the protocol proved it lied, for every device a recorded round excluded."""

    def recent_rounds(self, limit: int) -> list[dict]: ...

    def last_round_with(self, field: str) -> dict | None:
        """The newest round record that has `field` (one a mechanism recorded beyond the columns), or None."""

    def amend_round(self, round_number: int, fields: dict) -> None:
        """Add `fields` to a recorded round's record (a measurement of the model it made), atomically."""

    def close(self) -> None: ...


def open_storage(path: Path, keep_models: int = 0, keep_every: int = 0) -> Storage:
    """The store at `path`, keeping the newest `keep_models` model versions, version 0 and every `keep_every`-th
    (0: every version)."""
    return SqliteStorage(path, keep_models, keep_every)
