"""The aggregator's one SQLite database: global model versions, rounds and device check-ins.

A new global model and the round that produced it are written in one transaction,
so after a crash either both are there or neither is.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from keyboard_model.errors import UserFacingError


class Storage:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's worker threads, serialised by `_lock`. In
        # autocommit mode; `_transaction` groups the writes that must land together.
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self.db = sqlite_utils.Database(self._connection)
        try:
            self.db.enable_wal()
            self._create_tables()
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise UserFacingError(f"{path} is not a usable aggregator database: {error}") from error

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _create_tables(self) -> None:
        self.db["models"].create(
            {"version": int, "round": int, "created_at": float, "weights": bytes}, pk="version", if_not_exists=True
        )
        self.db["rounds"].create(
            {
                "round": int, "status": str, "started_at": float, "closed_at": float, "goal": int,
                "selected": int, "reported": int, "examples": int, "base_version": int,
                "new_version": int, "update_norm": float,
            },
            pk="round",
            if_not_exists=True,
        )
        self.db["checkins"].create(
            {"id": int, "device_id": str, "ts": float, "round": int, "action": str}, pk="id", if_not_exists=True
        )

    def latest_model(self) -> tuple[int, bytes] | None:
        with self._lock:
            rows = list(self.db.query("select version, weights from models order by version desc limit 1"))
        return (rows[0]["version"], rows[0]["weights"]) if rows else None

    def model(self, version: int) -> bytes | None:
        with self._lock:
            rows = list(self.db.query("select weights from models where version = ?", [version]))
        return rows[0]["weights"] if rows else None

    def save_initial_model(self, weights: bytes) -> None:
        with self._transaction():
            self.db["models"].insert({"version": 0, "round": 0, "created_at": time.time(), "weights": weights})

    def record_round(self, summary: dict, new_weights: bytes | None) -> None:
        """Store a finished round, and the model it produced if it succeeded, atomically."""
        with self._transaction():
            if new_weights is not None:
                self.db["models"].insert(
                    {"version": summary["new_version"], "round": summary["round"],
                     "created_at": summary["closed_at"], "weights": new_weights}
                )
            self.db["rounds"].upsert(summary, pk="round")

    def last_round_number(self) -> int:
        with self._lock:
            rows = list(self.db.query("select max(round) as last from rounds"))
        return rows[0]["last"] or 0

    def recent_rounds(self, limit: int) -> list[dict]:
        with self._lock:
            rows = self.db.query("select * from rounds order by round desc limit ?", [limit])
            return list(reversed(list(rows)))

    def log_checkin(self, device_id: str, round_number: int, action: str) -> None:
        with self._lock:
            self.db["checkins"].insert({"device_id": device_id, "ts": time.time(), "round": round_number, "action": action})

    def close(self) -> None:
        with self._lock:
            self._connection.close()
