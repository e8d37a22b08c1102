"""The simulated fleet against a real aggregator: aborts, late uploads, and the same run in both modes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aggregator.api.client import AggregatorClient
from aggregator.inprocess import InProcessClient
from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim.executor import LocalProcessPool
from device_sim.fleet import ACTIVITIES, Fleet
from device_sim.phone import EVAL_MESSAGES
from keyboard_model.evaluate import evaluate
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import model_from_bytes
from tests.helpers import Tap, fleet_config, make_phones


@pytest.mark.slow
def test_a_phone_whose_conditions_change_while_training_aborts_and_uploads_nothing(
    tmp_path, small_tokenizer_path, small_model_config
):
    # On the wall clock, which the fleet's ticks outrun: no selection window, or no round would fill in time.
    aggregator = InProcessClient(local_aggregator_config(
        tmp_path, small_tokenizer_path, model=small_model_config, clients_per_round=4, selection_window_s=0.0))
    tap = Tap(aggregator)
    # Slow phones: training takes hours of simulated time, so many are interrupted.
    config = fleet_config(tmp_path / "phones", minutes_per_message=12.0, vanish_probability=0.0)
    fleet = Fleet(make_phones(tmp_path / "phones", 24), config, tap)
    try:
        reports = [fleet.run_round() for _ in range(3)]
    finally:
        fleet.close()

    phone_of_device = {json.loads(p.credentials_path.read_text())["device_token"]: p.phone_id
                       for p in fleet.phones if p.credentials_path.exists()}

    def selection(upload_token: str) -> tuple[str, int]:
        device_token, round_number = tap.selections[upload_token]
        return phone_of_device[device_token], round_number

    aborted = [p for report in reports for p in report.participations if p.outcome == "aborted"]
    assert aborted, "slow phones at night should sometimes be interrupted"
    for participation in aborted:
        # It really was ineligible when it gave up, and was eligible until then.
        assert not fleet.clock.conditions(participation.phone_id, participation.done_tick).eligible
        assert fleet.clock.stays_eligible(participation.phone_id, participation.selected_tick,
                                          participation.done_tick - participation.selected_tick)
    uploaded = {selection(token) for token in tap.uploads}
    assert uploaded  # the others did report
    assert not uploaded & {(p.phone_id, p.round) for p in aborted}
    assert sorted(map(selection, tap.aborts)) == sorted((p.phone_id, p.round) for p in aborted)
    status = aggregator.status()
    assert sum(r.aborted for r in status.recent_rounds) >= 1
    for report in reports:
        assert len(report.participants) == 4


@pytest.mark.slow
def test_the_rounds_quality_metrics_are_the_sum_of_what_its_phones_measured_on_their_own_held_out_messages(
    tmp_path, small_tokenizer_path, small_tokenizer, small_model_config
):
    aggregator = InProcessClient(local_aggregator_config(
        tmp_path, small_tokenizer_path, model=small_model_config, clients_per_round=3, selection_window_s=0.0,
        eval_share=1.0))  # every phone asked to score the model
    tap = Tap(aggregator)
    phones = make_phones(tmp_path / "phones", 12)
    fleet = Fleet(phones, fleet_config(tmp_path / "phones", vanish_probability=0.0), tap)
    try:
        reports = [fleet.run_round() for _ in range(2)]
    finally:
        fleet.close()

    by_id = {phone.phone_id: phone for phone in phones}
    summaries = {r.round: r for r in aggregator.status().recent_rounds}
    for report in reports:
        summary = summaries[report.round]
        base_model, version = model_from_bytes(aggregator.model_version(summary.base_version))
        # Scored here from the phones' own files, not with anything the aggregator computed.
        expected = sum(
            (evaluate(base_model, small_tokenizer, by_id[p.phone_id].held_out(small_tokenizer)[:EVAL_MESSAGES])
             for p in report.participants),
            start=evaluate(base_model, small_tokenizer, []),
        )
        assert summary.eval_devices == len(report.participants) == 3
        assert (summary.eval_positions, summary.eval_hits_at_1, summary.eval_hits_at_3) == (
            expected.positions, expected.hits_at_1, expected.hits_at_3)
        assert summary.recall_at_1 == expected.recall_at_1 and summary.recall_at_3 == expected.recall_at_3
    # Every phone scored the model it was selected to train (late ones too, though theirs were refused).
    assert len(tap.evaluations) >= 6
    for token, report in tap.evaluations.items():
        assert report.model_version == tap.selections[token][1] - 1
    assert reports[1].participants and summaries[2].recall_at_3 > 0


@pytest.mark.slow
def test_in_process_and_service_mode_follow_the_same_trajectory(tmp_path, small_tokenizer_path, small_model_config):
    def run(client, folder: Path) -> bytes:
        fleet = Fleet(make_phones(folder, 16), fleet_config(folder), client)
        try:
            for _ in range(3):
                fleet.run_round()
        finally:
            fleet.close()
        quality = [(r.eval_positions, r.eval_hits_at_1, r.eval_hits_at_3) for r in client.status().recent_rounds]
        return client.model(), quality

    # On a simulated clock, as simulations run: deadlines and pace steering then shape the trajectory too.
    settings = dict(model=small_model_config, clients_per_round=3, simulated_clock=True, round_deadline_s=3600.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    in_process, quality_a = run(InProcessClient(local_aggregator_config(tmp_path / "a", small_tokenizer_path,
                                                                        **settings)),
                     tmp_path / "a" / "phones")
    with LocalAggregator(local_aggregator_config(tmp_path / "b", small_tokenizer_path, **settings)) as service:
        over_http, quality_b = run(AggregatorClient(service.url, operator_token=service.config.operator_token),
                                  tmp_path / "b" / "phones")
    assert quality_a == quality_b and len(quality_a) == 3

    (model_a, version_a), (model_b, version_b) = model_from_bytes(in_process), model_from_bytes(over_http)
    assert version_a == version_b == 3
    initial = model_from_bytes(InProcessClient(local_aggregator_config(
        tmp_path / "a", small_tokenizer_path, **settings)).model_version(0))[0].state_dict()
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert any(not torch.equal(a, initial[name]) for name, a in model_a.state_dict().items())


@pytest.mark.slow
def test_secure_rounds_run_through_the_fleet_with_drop_outs_at_every_step_and_match_across_modes(
    tmp_path, small_tokenizer_path, small_model_config
):
    def run(client, folder: Path):
        # Phones vanish at any of the protocol's steps.
        fleet = Fleet(make_phones(folder, 30), fleet_config(folder, vanish_probability=0.2), client)
        try:
            reports = [fleet.run_round() for _ in range(4)]
        finally:
            fleet.close()
        return client.model(), client.status().recent_rounds, reports

    settings = dict(model=small_model_config, clients_per_round=4, simulated_clock=True, round_deadline_s=3600.0,
                    secure_aggregation=True, eval_share=1.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    in_process, summaries, reports = run(
        InProcessClient(local_aggregator_config(tmp_path / "a", small_tokenizer_path, **settings)),
        tmp_path / "a" / "phones")
    with LocalAggregator(local_aggregator_config(tmp_path / "b", small_tokenizer_path, **settings)) as service:
        over_http, summaries_b, _ = run(AggregatorClient(service.url, operator_token=service.config.operator_token),
                                  tmp_path / "b" / "phones")

    # A round with more drop-outs than its graph survives fails, and says why; most close.
    closed = [s for s in summaries if s.status == "closed"]
    assert len(closed) >= 3 and all(s.failure for s in summaries if s.status == "failed")
    assert sum(r.count("vanished") for r in reports) >= 2
    for summary, report in zip(summaries, reports):
        if summary.status == "closed":
            assert summary.reported == len(report.participants) and summary.eval_devices == summary.reported
            assert summary.eval_positions > 0
    # Masks cancel exactly and the fixed-point rounding is seeded per phone: both modes reach the same model.
    (model_a, version_a), (model_b, version_b) = model_from_bytes(in_process), model_from_bytes(over_http)
    assert version_a == version_b == len(closed)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert [(s.eval_positions, s.eval_hits_at_1) for s in summaries] == [
        (s.eval_positions, s.eval_hits_at_1) for s in summaries_b]


class RecordingExecutor:
    """The fleet's executor, keeping the training config each phone was sent with."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.configs: list[LocalTrainConfig] = []

    def submit(self, job):
        self.configs.append(job.config)
        return self.executor.submit(job)

    def __getattr__(self, name):
        return getattr(self.executor, name)


@pytest.mark.slow
def test_a_round_trains_at_the_rate_it_is_given_and_says_where_its_time_went(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = InProcessClient(local_aggregator_config(tmp_path, small_tokenizer_path, model=small_model_config,
                                                     clients_per_round=3, simulated_clock=True,
                                                     round_deadline_s=3600.0))
    config = fleet_config(tmp_path / "phones", workers=1)
    recording = RecordingExecutor(LocalProcessPool(KeyboardTokenizer.from_json(client.tokenizer_json()), 1))
    fleet = Fleet(make_phones(tmp_path / "phones", 8), config, client, recording)
    try:
        stepped = fleet.run_round(learning_rate=0.25)
        started = len(recording.configs)
        default = fleet.run_round()
    finally:
        fleet.close()
    assert started >= 1 and {c.learning_rate for c in recording.configs[:started]} == {0.25}
    assert len(recording.configs) > started
    # Phones selected in the next round train at the fleet's own rate again; nothing else of the config changes.
    assert {c.learning_rate for c in recording.configs[started:]} == {config.train.learning_rate}
    assert {replace(c, learning_rate=1.0) for c in recording.configs} == {replace(config.train, learning_rate=1.0)}
    for report in (stepped, default):
        assert set(report.wall_s) <= {*ACTIVITIES, "other"}
        assert all(seconds >= 0 for seconds in report.wall_s.values())
        assert report.wall_s["check-ins"] > 0 and report.wall_s["uploads"] > 0 and report.wall_s["training"] > 0
