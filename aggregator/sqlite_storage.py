"""The aggregator's SQLite database (the default `Storage`): devices, global model versions, rounds, selections.

A new global model, the server optimiser's state that goes with it (and DP-FTRL's noise
state, `aggregator/ftrl.py`) and the round that produced them are written in one transaction, so after a crash
either all are
there or none is. Selections are committed as they happen, and who reported or aborted
with the round, in the same transaction; the selections of a round that was still open
at a crash are discarded on restart and the round is run again from the last committed
model.

Model versions are kept as `keep_models` and `keep_every` say (`AggregatorConfig`): the
versions no longer kept are deleted in the transaction that commits a new one. SQLite puts
their pages on its free list and writes the next versions into them, so the file stops
growing once it holds the kept versions (it does not shrink; `VACUUM` would rewrite it).

Device tokens are stored only as SHA-256 hashes: a copy of the database does not let
anyone act as a device.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from keyboard_model.errors import UserFacingError

# A round's row. What a privacy mechanism records beyond these goes, as JSON, into `mechanism_record`, and comes
# back merged into the row: a new mechanism adds no column.
ROUND_COLUMNS: dict[str, type] = {
    "round": int, "status": str, "started_at": float, "closed_at": float, "duration_s": float,
    "goal": int, "selected": int, "reported": int, "aborted": int, "dropped": int, "late": int,
    "examples": int, "bytes_up": int, "bytes_down": int, "base_version": int, "new_version": int,
    "update_norm": float, "eval_devices": int, "eval_positions": int, "eval_hits_at_1": int,
    "eval_hits_at_3": int, "personal_devices": int, "personal_helped": float, "personal_hurt": float,
    "personal_median_gain": float, "personal_positions": int, "personal_hits_at_1": int, "personal_hits_at_3": int,
    "dp_noise_multiplier": float, "dp_sampling_rate": float, "dp_delta": float,
    "epsilon": float, "failure": str, "checked_in": int, "clock_started_s": float,
    "dp_mechanism": str, "rho": float, "dp_min_separation": int, "dp_step": int,
    "dp_clip_norm": float, "dp_update_noise_multiplier": float, "dp_count_stddev": float,
    "dp_fraction_within": float, "dp_next_clip_norm": float, "excluded": str, "mechanism_record": str,
}

class SqliteStorage:
    def __init__(self, path: Path, keep_models: int = 0, keep_every: int = 0) -> None:
        """`keep_models`: the newest model versions to keep, besides version 0 and every `keep_every`-th
        version (when `keep_every` is positive); 0 keeps every version."""
        if keep_models < 0 or keep_every < 0:
            raise ValueError(f"keep_models and keep_every must be 0 or more, got {keep_models} and {keep_every}")
        self._keep_models, self._keep_every = keep_models, keep_every
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's worker threads, serialised by `_lock`. In
        # autocommit mode; `_transaction` groups the writes that must land together.
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self.db = sqlite_utils.Database(self._connection)
        try:
            # Most of what is written is model blobs (two of 5 MB a round with server momentum): 64 KiB pages, set
            # while the file is new (later it keeps its own), hold them in a sixteenth of the pages 4 KiB ones
            # need, and a round's commit took 35 ms instead of 54 (benchmarks/upload_cost.py, 2 cores).
            self._connection.execute("PRAGMA page_size=65536")
            self.db.enable_wal()
            # With WAL, NORMAL still survives a crash of the process (SIGKILL); only a power cut can lose
            # the last commits. FULL would wait for the disk at every upload's commit.
            self._connection.execute("PRAGMA synchronous=NORMAL")
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
        self._table("devices", {"device_id": str, "token_sha256": str, "enrolled_at": float}, pk="device_id")
        self._table(
            "models",
            {"version": int, "round": int, "created_at": float, "weights": bytes, "optimizer_state": bytes},
            pk="version",
        )
        self._table("rounds", ROUND_COLUMNS, pk="round")
        # status: selected, then reported, aborted or (after the round closed) late.
        self._table(
            "selections",
            {"round": int, "device_id": str, "token_sha256": str, "status": str, "ts": float},
            pk=("round", "device_id"),
        )
        self.db["selections"].create_index(["token_sha256"], unique=True, if_not_exists=True)
        # DP-FTRL's noise state (aggregator/ftrl.py) after the newest model version: one row, replaced in the
        # transaction that commits each new version.
        self._table("noise_state", {"id": int, "version": int, "state": bytes}, pk="id")
        # The tokenizer of every model version whose vocabulary grew (aggregator/discovery.py): a version's tokenizer
        # is the newest one at or before it, or the one the aggregator was started with if there is none.
        self._table("tokenizers", {"version": int, "tokenizer": str}, pk="version")

    def _table(self, name: str, columns: dict[str, type], pk: str | tuple[str, ...]) -> None:
        """Create a table, or add the columns a database made by an older version lacks."""
        table = self.db[name]
        table.create(columns, pk=pk, if_not_exists=True)
        for column, kind in columns.items():
            if column not in table.columns_dict:
                table.add_column(column, kind)

    def latest_model(self) -> tuple[int, bytes] | None:
        with self._lock:
            rows = list(self.db.query("select version, weights from models order by version desc limit 1"))
        return (rows[0]["version"], rows[0]["weights"]) if rows else None

    def model(self, version: int) -> bytes | None:
        with self._lock:
            rows = list(self.db.query("select weights from models where version = ?", [version]))
        return rows[0]["weights"] if rows else None

    def optimizer_state(self, version: int) -> bytes | None:
        with self._lock:
            rows = list(self.db.query("select optimizer_state from models where version = ?", [version]))
        return rows[0]["optimizer_state"] if rows else None

    def save_initial_model(self, weights: bytes) -> None:
        with self._transaction():
            self.db["models"].insert({"version": 0, "round": 0, "created_at": time.time(), "weights": weights})

    def noise_state(self) -> tuple[int, bytes] | None:
        """(model version, DP-FTRL noise state committed with it), or None."""
        with self._lock:
            rows = list(self.db.query("select version, state from noise_state where id = 0"))
        return (rows[0]["version"], rows[0]["state"]) if rows else None

    def record_round(self, summary: dict, new_weights: bytes | None, optimizer_state: bytes | None,
                     noise_state: bytes | None = None, statuses: Mapping[str, str] | None = None,
                     tokenizer: str | None = None) -> None:
        """Store a finished round, the model, optimiser state, noise state and (if its vocabulary grew) tokenizer it
        produced if it succeeded, and the new status of its devices that reported or aborted, atomically. The
        devices the round proved to lie, `summary["excluded"]`, are kept in its row as JSON (`excluded_devices`)."""
        with self._transaction():
            now = time.time()
            if tokenizer is not None:
                self.db["tokenizers"].insert({"version": summary["new_version"], "tokenizer": tokenizer})
            for device_id, status in (statuses or {}).items():
                self.db["selections"].update((summary["round"], device_id), {"status": status, "ts": now})
            if noise_state is not None:
                self.db["noise_state"].upsert({"id": 0, "version": summary["new_version"], "state": noise_state},
                                              pk="id")
            if new_weights is not None:
                self._drop_models_before(summary["new_version"])
                self.db["models"].insert(
                    {"version": summary["new_version"], "round": summary["round"],
                     "created_at": summary["closed_at"], "weights": new_weights, "optimizer_state": optimizer_state}
                )
            extra = {key: value for key, value in summary.items() if key not in ROUND_COLUMNS}
            row = {key: value for key, value in summary.items() if key in ROUND_COLUMNS}
            self.db["rounds"].upsert({**row, "mechanism_record": json.dumps(extra) if extra else None}, pk="round")

    def _drop_models_before(self, new_version: int) -> None:
        """Delete the versions not kept once `new_version` is in: before inserting it, so that it can take their
        pages."""
        if not self._keep_models:
            return
        every = "" if not self._keep_every else f" and version % {self._keep_every} != 0"
        self._connection.execute(f"delete from models where version > 0 and version <= ?{every}",
                                 [new_version - self._keep_models])

    def tokenizer(self, version: int) -> str | None:
        """The tokenizer of model `version`: the newest stored at or before it, or None (the starting one)."""
        with self._lock:
            rows = list(self.db.query("select tokenizer from tokenizers where version <= ? order by version desc "
                                      "limit 1", [version]))
        return rows[0]["tokenizer"] if rows else None

    def enrol_device(self, device_id: str, token_sha256: str) -> None:
        with self._transaction():
            self.db["devices"].insert({"device_id": device_id, "token_sha256": token_sha256,
                                       "enrolled_at": time.time()})

    def device_tokens(self) -> dict[str, str]:
        """Every enrolled device, as token hash -> device id."""
        with self._lock:
            return {row["token_sha256"]: row["device_id"] for row in self.db["devices"].rows}

    def record_selection(self, round_number: int, device_id: str, token_sha256: str) -> None:
        with self._transaction():
            self.db["selections"].insert(
                {"round": round_number, "device_id": device_id, "token_sha256": token_sha256,
                 "status": "selected", "ts": time.time()}
            )

    def selection_for_token(self, token_sha256: str) -> dict | None:
        with self._lock:
            rows = list(self.db.query("select * from selections where token_sha256 = ?", [token_sha256]))
        return rows[0] if rows else None

    def record_late(self, round_number: int, device_id: str) -> None:
        """A selected device of a closed round uploaded after all: count it late, not dropped."""
        with self._transaction():
            self.db["selections"].update((round_number, device_id), {"status": "late", "ts": time.time()})
            self._connection.execute(
                "update rounds set late = late + 1, dropped = dropped - 1 where round = ?", [round_number]
            )

    def discard_selections(self, round_number: int) -> None:
        """Forget the selections of a round that was open at a crash: it is run again."""
        with self._transaction():
            self._connection.execute("delete from selections where round >= ?", [round_number])

    def last_round_number(self) -> int:
        with self._lock:
            rows = list(self.db.query("select max(round) as last from rounds"))
        return rows[0]["last"] or 0

    def privacy_events(self) -> list[tuple[float, float]]:
        """(sampling rate, noise multiplier) of every round that released a differentially private model."""
        with self._lock:
            rows = self.db.query("select dp_sampling_rate, dp_noise_multiplier from rounds "
                                 "where status = 'closed' and dp_sampling_rate is not null order by round")
            return [(row["dp_sampling_rate"], row["dp_noise_multiplier"]) for row in rows]

    def dp_mechanisms(self) -> set[str]:
        """The differential privacy mechanisms the closed rounds were released with (older rows: fedavg)."""
        with self._lock:
            rows = self.db.query("select distinct coalesce(dp_mechanism, 'fedavg') as m from rounds "
                                 "where status = 'closed' and dp_noise_multiplier is not null")
            return {row["m"] for row in rows}

    def last_participations(self) -> dict[str, int]:
        """Device id -> the DP-FTRL step of the last released round it reported in."""
        with self._lock:
            rows = self.db.query("select s.device_id, max(r.dp_step) as step from selections s join rounds r "
                                 "on s.round = r.round where s.status = 'reported' and r.status = 'closed' "
                                 "and r.dp_step is not null group by s.device_id")
            return {row["device_id"]: row["step"] for row in rows}

    def last_release(self) -> dict | None:
        """The record of the newest round that released a differentially private model."""
        with self._lock:
            rows = list(self.db.query("select * from rounds where status = 'closed' and dp_noise_multiplier is not "
                                      "null order by round desc limit 1"))
            return _whole(rows[0]) if rows else None

    def excluded_devices(self) -> dict[str, str]:
        """Device id -> how the protocol proved it lied, from every recorded round."""
        with self._lock:
            rows = self.db.query("select device.key as device_id, device.value as reason "
                                 "from rounds, json_each(rounds.excluded) as device order by round")
            return {row["device_id"]: row["reason"] for row in rows}

    def recent_rounds(self, limit: int) -> list[dict]:
        with self._lock:
            rows = self.db.query("select * from rounds order by round desc limit ?", [limit])
            return [_whole(row) for row in reversed(list(rows))]

    def last_round_with(self, field: str) -> dict | None:
        with self._lock:
            rows = list(self.db.query("select * from rounds where json_extract(mechanism_record, ?) is not null "
                                      "order by round desc limit 1", [f"$.{field}"]))
        return _whole(rows[0]) if rows else None

    def amend_round(self, round_number: int, fields: dict) -> None:
        with self._transaction():
            rows = list(self.db.query("select mechanism_record from rounds where round = ?", [round_number]))
            if not rows:
                raise KeyError(f"no round {round_number} is recorded")
            extra = {**json.loads(rows[0]["mechanism_record"] or "{}"), **fields}
            self.db["rounds"].update(round_number, {"mechanism_record": json.dumps(extra)})

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _whole(row: dict) -> dict:
    """A round's row as it was recorded: its mechanism's own fields merged back in, `excluded` read from JSON."""
    extra = json.loads(row.pop("mechanism_record") or "{}")
    return {**row, **extra, "excluded": json.loads(row["excluded"]) if row["excluded"] else None}
