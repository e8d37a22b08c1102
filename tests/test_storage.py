import argparse
import sqlite3
from contextlib import ExitStack, closing

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
        # A round row the table cannot take (a value SQLite cannot store): the model written just before it must be
        # rolled back.
        storage.record_round(summary(2, goal=object()), b"v2", b"momentum2")
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


def stored_versions_and_pages(path) -> tuple[list[int], int]:
    """The model versions in the database and its size in pages, as another connection sees them (WAL included)."""
    with closing(sqlite3.connect(path)) as db:
        versions = [row[0] for row in db.execute("select version from models order by version")]
        return versions, db.execute("pragma page_count").fetchone()[0]


def test_only_the_newest_models_version_0_and_the_marked_ones_are_kept_and_the_file_stops_growing(tmp_path):
    blob = bytes(range(256)) * 1200  # 300 KB, as weights and again as optimiser state: overflow pages, like a model
    runs = {"all": (0, 0), "last 3": (3, 0), "last 3 and every 4th": (3, 4)}
    pages: dict[str, list[int]] = {}
    for name, (keep_models, keep_every) in runs.items():
        path = tmp_path / f"{name}.sqlite"
        storage = SqliteStorage(path, keep_models=keep_models, keep_every=keep_every)
        storage.save_initial_model(b"v0")
        pages[name] = []
        for round_number in range(1, 9):
            storage.record_round(summary(round_number), blob + bytes([round_number]), blob)
            pages[name].append(stored_versions_and_pages(path)[1])
        versions, _ = stored_versions_and_pages(path)
        runs[name] = versions
        assert storage.latest_model() == (8, blob + bytes([8])) and storage.optimizer_state(8) == blob
        assert storage.last_round_number() == 8  # rounds are never deleted, only models
        storage.close()
    assert runs == {"all": list(range(9)), "last 3": [0, 6, 7, 8], "last 3 and every 4th": [0, 4, 6, 7, 8]}
    with closing(sqlite3.connect(tmp_path / "all.sqlite")) as db:
        one_version = 2 * len(blob) // db.execute("pragma page_size").fetchone()[0]  # pages
    # Keeping everything grows by a version a round; keeping the last three stops growing once three are there:
    # the deleted versions' pages are reused (SQLite's free list), not added to the file.
    assert pages["all"][7] - pages["all"][3] > 3.5 * one_version
    assert pages["last 3"][7] - pages["last 3"][3] < 0.1 * one_version
    assert pages["last 3"][7] < 5 * one_version


def test_a_negative_number_of_models_to_keep_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_models"):
        SqliteStorage(tmp_path / "a.sqlite", keep_models=-1)


def test_the_child_aggregator_is_told_what_to_keep(tmp_path, small_tokenizer_path):
    from aggregator.cli import add_arguments, round_settings
    from aggregator.process import LocalAggregator, local_aggregator_config

    config = local_aggregator_config(tmp_path, small_tokenizer_path, keep_models=3, keep_every=100,
                                     noise_multiplier=0.5, dp_mechanism="ftrl", min_separation=7, dp_rounds=50)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with ExitStack() as stack:
        aggregator = stack.push(LocalAggregator(config))  # never started: only its command line is needed
        settings = round_settings(parser.parse_args(aggregator.command(listen_fd=3)[3:]))
    assert (settings["keep_models"], settings["keep_every"]) == (3, 100)
    assert (settings["dp_mechanism"], settings["min_separation"], settings["dp_rounds"]) == ("ftrl", 7, 50)


def test_a_new_database_keeps_its_model_blobs_in_large_pages(tmp_path):
    SqliteStorage(tmp_path / "new.sqlite").close()
    with closing(sqlite3.connect(tmp_path / "new.sqlite")) as db:
        assert db.execute("pragma page_size").fetchone()[0] == 65536


def test_the_child_aggregator_is_given_every_size_of_its_model(tmp_path, small_tokenizer_path, small_tokenizer):
    """A Transformer's layers, heads and context reach the child too: it gave a run's aggregator the default 4 layers
    while the phones trained 2."""
    from aggregator.cli import add_arguments, config_from_args
    from aggregator.process import LocalAggregator, local_aggregator_config
    from keyboard_model.model import ModelConfig
    from keyboard_model.transformer import TransformerConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    vocabulary = small_tokenizer.vocab_size
    for model in (ModelConfig(vocab_size=vocabulary, embedding_dim=8, hidden_dim=16),
                  TransformerConfig(vocab_size=vocabulary, embedding_dim=16, layers=2, heads=2, context=12)):
        config = local_aggregator_config(tmp_path, small_tokenizer_path, model=model)
        with ExitStack() as stack:
            aggregator = stack.push(LocalAggregator(config))  # never started: only its command line is needed
            args = parser.parse_args(aggregator.command(listen_fd=3)[3:])
        assert config_from_args(args, small_tokenizer_path).model == model
