"""An upload is counted whole or not at all, even when the database is busy with another writer: a phone that is
answered with an error and retries is counted once, in the round's sum, its record and its devices' statuses."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import torch

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.schemas import EvaluationReport
from aggregator.config import AggregatorConfig
from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from keyboard_model.update_codec import encode_update
from keyboard_model.weights import model_from_bytes
from tests.helpers import Device, confirm_all, random_delta, until_collecting


@contextlib.contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """The database held by another writer: the aggregator's writes wait out their busy timeout and fail."""
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def statuses(db_path: Path, round_number: int) -> list[str]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return sorted(s for (s,) in db.execute("select status from selections where round = ?", [round_number]))


def test_an_upload_while_the_database_is_locked_is_counted_once_when_the_phone_retries(
    tmp_path, small_tokenizer_path, small_model_config
):
    config = AggregatorConfig(db_path=tmp_path / "db.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, clients_per_round=2, over_selection=1.0,
                              server_optimizer="fedavg", selection_window_s=0.0)
    rounds = RoundManager(config, open_storage(config.db_path))
    first, second = (rounds.checkin(rounds.authenticate(rounds.enrol()[1])) for _ in range(2))
    before = {name: t.clone() for name, t in rounds.model.state.items()}
    deltas = [random_delta(rounds.model.shapes, seed) for seed in (1, 2)]
    uploads = [encode_update(delta, examples, "none") for delta, examples in zip(deltas, (5, 7))]
    report = EvaluationReport(model_version=0, positions=40, hits_at_1=10, hits_at_3=20)
    with locked(config.db_path):
        # Refused (today's code answered 500 after the busy timeout) or taken whole: either way, once.
        with contextlib.suppress(sqlite3.OperationalError):
            rounds.submit(first.round, first.upload_token, uploads[0])
        with contextlib.suppress(sqlite3.OperationalError):
            rounds.submit_evaluation(first.round, first.upload_token, report)
    # The phone was not sure it was counted: it sends both again.
    rounds.submit(first.round, first.upload_token, uploads[0])
    rounds.submit_evaluation(first.round, first.upload_token, report)
    assert rounds.submit(second.round, second.upload_token, uploads[1]).round_closed

    (record,) = rounds.storage.recent_rounds(1)
    assert (record["status"], record["reported"], record["examples"]) == ("closed", 2, 12)
    assert (record["eval_devices"], record["eval_positions"], record["eval_hits_at_1"]) == (1, 40, 10)
    assert statuses(config.db_path, first.round) == ["reported", "reported"]
    # FedAvg at rate 1: the model moved by the examples-weighted mean of the two updates, the first counted once.
    for name, start in before.items():
        expected = start + (5 * deltas[0][name] + 7 * deltas[1][name]) / 12
        torch.testing.assert_close(rounds.model.state[name], expected, rtol=0, atol=1e-6)


def test_a_masked_upload_while_the_database_is_locked_is_counted_once_when_the_phone_retries(
    tmp_path, small_tokenizer_path, small_model_config
):
    config = local_aggregator_config(tmp_path, small_tokenizer_path, model=small_model_config,
                                     secure_aggregation=True, server_optimizer="fedavg", clients_per_round=3,
                                     over_selection=1.0, selection_window_s=0.0, round_deadline_s=60.0,
                                     secagg_ring_bits=16)
    client = InProcessClient(config)
    before = model_from_bytes(client.model())[0].state_dict()
    devices = [Device(client) for _ in range(3)]
    until_collecting(devices)
    deltas = [random_delta({name: t.shape for name, t in before.items()}, seed) for seed in range(3)]
    for device, delta in zip(devices[:2], deltas):
        device.upload(delta, None, seed=0)
    # The last upload reaches the goal and ends collection, with the database locked.
    last = devices[2].part.masked_upload(deltas[2], None, False, devices[2].state(), 0)
    with locked(config.db_path), contextlib.suppress(sqlite3.OperationalError, AggregatorRefusedError):
        client.upload(devices[2].round, devices[2].token, last)
    # Its phone retries: the upload counted (today's code had it in the sum but answered 409, "not counted").
    assert client.upload(devices[2].round, devices[2].token, last).reported == 3
    confirm_all(devices)
    for device in devices:
        device.reveal()
    (record,) = client.status().recent_rounds
    assert (record.status, record.reported) == ("closed", 3)
    assert statuses(config.db_path, record.round) == ["reported"] * 3
    # The mean of three, not the sum of three over two.
    after = model_from_bytes(client.model())[0].state_dict()
    moved = torch.cat([(after[name] - before[name]).flatten() for name in before])
    mean = torch.cat([(sum(d[name] for d in deltas) / 3).flatten() for name in before])
    assert torch.linalg.vector_norm(moved - mean) < 0.1 * torch.linalg.vector_norm(mean)
