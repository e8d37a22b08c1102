"""A phone's typing history: one SQLite file, written and read through sqlite-utils.

The newest 20% of a phone's messages are its held-out evaluation set: they score the
model and are never trained on. A message's `ts` is when it was typed; in the
simulator that is simulated time, so the history a phone can train on grows as the
simulated days pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import sqlite_utils

T = TypeVar("T")

HELD_OUT_FRACTION = 0.2


class TypingHistory:
    """The `messages` table of a phone's `history.sqlite`: (id, ts, text), oldest first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite_utils.Database(path)
        # WAL keeps readers (evaluation) and the writer (typing) from blocking each other.
        self.db.enable_wal()
        self.table = self.db.table("messages")
        if not self.table.exists():
            self.table.create({"id": int, "ts": float, "text": str}, pk="id")
            self.table.create_index(["ts"])

    def add(self, messages: Iterable[tuple[float, str]]) -> None:
        """Append messages in one transaction, so a crash leaves all of them or none."""
        with self.db.conn:
            self.table.insert_all(({"ts": ts, "text": text} for ts, text in messages), batch_size=1000)

    def __len__(self) -> int:
        return self.table.count

    def rows(self) -> list[tuple[float, str]]:
        """Every (ts, text), oldest first."""
        return [(row["ts"], row["text"]) for row in self.db.query("select ts, text from messages order by ts, id")]

    def texts(self) -> list[str]:
        return [text for _, text in self.rows()]

    def split(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """(training messages typed by `now`, held-out messages): the newest 20% of all are held out.
        `now` None means every message."""
        rows = self.rows()
        train, held_out = split_held_out(rows)
        return [text for ts, text in train if now is None or ts <= now], [text for _, text in held_out]

    def close(self) -> None:
        self.db.close()


def split_held_out(texts: list[T]) -> tuple[list[T], list[T]]:
    """(training, held-out) of messages oldest first: the newest 20% are held out."""
    held_out = math.ceil(len(texts) * HELD_OUT_FRACTION)
    return texts[: len(texts) - held_out], texts[len(texts) - held_out :]
