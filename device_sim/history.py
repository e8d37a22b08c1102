"""A phone's typing history: one SQLite file, written and read through sqlite-utils.

The newest 20% of a phone's messages are its held-out evaluation set: they score the
model and are never trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import sqlite_utils

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

    def texts(self) -> list[str]:
        return [row["text"] for row in self.db.query("select text from messages order by ts, id")]

    def split(self) -> tuple[list[str], list[str]]:
        """(training messages, held-out messages): the newest 20% are held out."""
        return split_held_out(self.texts())

    def close(self) -> None:
        self.db.close()


def split_held_out(texts: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) of messages oldest first: the newest 20% are held out."""
    held_out = math.ceil(len(texts) * HELD_OUT_FRACTION)
    return texts[: len(texts) - held_out], texts[len(texts) - held_out :]
