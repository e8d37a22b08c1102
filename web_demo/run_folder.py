"""What a training run's folder (`fedkb simulate --out RUN`) adds to the dashboard: the training loss and the
central evaluation per round (metrics.jsonl), the n-gram and oracle rows of its comparison table (table.json), and
whether it has ended (summary.json, which the simulation writes when it ends, with the final model's score on every
phone and the n-gram's beside it).

The simulation may be writing these files while they are read, and they may come from another version: each file,
line or table row that cannot be read is left out, and the rest is still shown.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from web_demo.schemas import ModelScore, ReferenceModel, RunResponse, RunRound

# A table row is matched by how its model's name starts.
N_GRAM, ORACLE = "n-gram", "centralised oracle"
Row = TypeVar("Row", bound=BaseModel)


def finite_or_none(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None


def parse_json(text: str) -> Any:
    """JSON with NaN, Infinity and overflowing numbers read as null: a response cannot hold them."""
    return json.loads(text, parse_constant=lambda _: None, parse_float=finite_or_none)


def read_text(path: Path) -> str | None:
    """The text of a regular file, or None. Anything else named like a run's file is not read: opening a FIFO waits
    for a writer, and a device such as /dev/zero never ends; either would hold the request, and a thread, forever."""
    try:
        # Without O_NONBLOCK the open itself would wait for a FIFO's writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:  # missing, unreadable
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a folder, FIFO, socket or device
            return None
        with open(descriptor, "rb", closefd=False) as file:
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    finally:
        os.close(descriptor)


def valid(model: type[Row], value: object) -> Row | None:
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def read_rounds(text: str) -> list[RunRound]:
    """The rounds of metrics.jsonl, oldest first; a round number written twice (a run restarted into the same
    folder) counts as its last line says."""
    rounds: dict[int, RunRound] = {}
    # A last line without its newline is still being written.
    for line in text.split("\n")[:-1]:
        try:
            record = parse_json(line)
        except (ValueError, RecursionError):
            continue
        if (row := valid(RunRound, record)) is not None:
            rounds[row.round] = row
    return sorted(rounds.values(), key=lambda row: row.round)


def read_references(text: str, key: str = "rows") -> dict[str, ReferenceModel]:
    """The first n-gram and oracle rows that can be read of table.json ({"rows": [...]}), or of summary.json's
    reference rows (key "baselines")."""
    try:
        table = parse_json(text)
    except (ValueError, RecursionError):
        return {}
    rows = table.get(key) if isinstance(table, dict) else None
    found: dict[str, ReferenceModel] = {}
    for row in rows if isinstance(rows, list) else []:
        if (reference := valid(ReferenceModel, row)) is None:
            continue
        for prefix in (N_GRAM, ORACLE):
            if reference.model.startswith(prefix):
                found.setdefault(prefix, reference)
    return found


def read_final(text: str) -> ModelScore | None:
    """summary.json's score of the model the run ended with, on every phone's held-out messages."""
    try:
        summary = parse_json(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("final"), dict):
        return None
    return valid(ModelScore, {**summary["final"], "model_version": summary.get("model_version"),
                              "scored_on": "every phone's"})


class RunFolder:
    """Reads a run folder, again only when one of its files has changed (a long run's metrics.jsonl is megabytes,
    and every open dashboard asks for it every few seconds)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._seen: tuple[object, ...] | None = None
        self._response: RunResponse | None = None

    def read(self) -> RunResponse:
        if self.run_dir is None:
            return RunResponse(run_dir=None, finished=False, rounds=[], n_gram=None, oracle=None, final=None)
        paths = [self.run_dir / name for name in ("metrics.jsonl", "table.json", "summary.json")]
        signature = tuple(self._signature(path) for path in paths)
        with self._lock:
            if signature != self._seen or self._response is None:
                metrics, table, summary = paths
                references = read_references(read_text(table) or "")
                summary_text = read_text(summary) or ""
                ended_with = read_references(summary_text, key="baselines")
                self._response = RunResponse(
                    run_dir=str(self.run_dir), finished=summary.is_file(),
                    rounds=read_rounds(read_text(metrics) or ""),
                    n_gram=references.get(N_GRAM) or ended_with.get(N_GRAM), oracle=references.get(ORACLE),
                    final=read_final(summary_text),
                )
                self._seen = signature
            return self._response

    @staticmethod
    def _signature(path: Path) -> tuple[int, int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size
