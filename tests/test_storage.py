import sqlite3

import pytest

from aggregator.sqlite_storage import SqliteStorage
from keyboard_model.errors import UserFacingError


def summary(round_number: int, **changes) -> dict:
    row = {"round": round_number, "status": "closed", "started_at": 1.0, "closed_at": 2.0, "goal": 2, "selected": 2,
           "reported": 2, "examples": 10, "base_version": round_number - 1, "new_version": round_number,
           "update_norm": 0.5}
    return row | changes


def test_a_round_and_its_model_land_together_or_not_at_all(tmp_path):
    storage = SqliteStorage(tmp_path / "a.sqlite")
    storage.save_initial_model(b"v0")
    storage.record_round(summary(1), b"v1", b"momentum1")
    with pytest.raises(sqlite3.Error):
        # A round row the table cannot take: the model written just before it must be rolled back.
        storage.record_round(summary(2, no_such_column=1), b"v2", b"momentum2")
    assert storage.latest_model() == (1, b"v1")
    assert storage.last_round_number() == 1
    storage.close()

    reopened = SqliteStorage(tmp_path / "a.sqlite")
    assert reopened.latest_model() == (1, b"v1") and reopened.model(2) is None
    assert reopened.optimizer_state(1) == b"momentum1"
    reopened.record_round(summary(2), b"v2", b"momentum2")  # the failed attempt left nothing in the way
    assert reopened.latest_model() == (2, b"v2") and reopened.optimizer_state(2) == b"momentum2"


def test_a_database_of_an_older_version_gets_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("create table models (version integer primary key, round integer, created_at float, weights blob)")
        db.execute("insert into models values (0, 0, 1.0, x'00')")
    storage = SqliteStorage(path)
    assert storage.latest_model() == (0, b"\x00") and storage.optimizer_state(0) is None
    storage.record_round(summary(1), b"v1", b"state")
    assert storage.optimizer_state(1) == b"state"


def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path):
    path = tmp_path / "not.sqlite"
    path.write_bytes(b"hello, I am a text file" * 100)
    with pytest.raises(UserFacingError, match="not a usable aggregator database"):
        SqliteStorage(path)
