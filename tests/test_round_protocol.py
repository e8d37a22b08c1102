"""The round protocol on the real service: enrolment, over-selection, drop-outs, pace steering, crash recovery."""

from __future__ import annotations

import random
import sqlite3
import time

import httpx
import pytest
import torch

from aggregator.api.client import AggregatorClient, AggregatorRefusedError
from aggregator.api.schemas import EvaluationReport
from aggregator.inprocess import InProcessClient
from aggregator.pace import CHECKINS_PER_SLOT, next_spread, retry_after_s
from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim.session import update_bytes
from keyboard_model.weights import model_from_bytes, parameter_shapes, read_metadata
from tests.helpers import Device, confirm_all, finished_round, random_delta, start_secure, until_collecting


def constant_update(client: AggregatorClient, value: float, examples: int) -> bytes:
    model, _ = model_from_bytes(client.model())
    return update_bytes({name: torch.full(shape, value)
                         for name, shape in parameter_shapes(model.state_dict()).items()},
                        examples)


def wait_for_round(client: AggregatorClient, number: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.status().round <= number:
        assert time.monotonic() < deadline, f"round {number} never closed"
        time.sleep(0.1)


def test_checkin_needs_an_enrolled_device_and_tokens_are_stored_hashed(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    assert httpx.post(f"{aggregator.url}/checkin", timeout=10).status_code == 401
    with pytest.raises(AggregatorRefusedError) as refused:
        client.checkin("a-token-nobody-issued")
    assert refused.value.status_code == 401 and "enrol" in refused.value.detail

    enrolment = client.enrol()
    assert client.checkin(enrolment.device_token).action == "train"
    assert client.enrol().device_id != enrolment.device_id
    database = (aggregator.config.db_path.read_bytes()
                + aggregator.config.db_path.with_suffix(".sqlite-wal").read_bytes())
    assert enrolment.device_id.encode() in database
    assert enrolment.device_token.encode() not in database


def test_over_selection_absorbs_drop_outs_and_counts_aborted_late_and_dropped(
    start_aggregator, small_tokenizer_path, small_model_config
):
    # Goal 3, six selected. One aborts, three report (the round closes), one uploads too late, one vanishes.
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=3, over_selection=2.0,
                                  round_deadline_s=60.0)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    decisions = [client.checkin(client.enrol().device_token) for _ in range(7)]
    assert [d.action for d in decisions] == ["train"] * 6 + ["retry"]
    assert client.status().selected == 6 and client.status().selection_target == 6

    aborting, *reporting, late, vanished = decisions[:6]
    assert client.abort(aborting.round, aborting.upload_token).aborted == 1
    update = constant_update(client, 0.01, 5)
    answers = [client.upload(d.round, d.upload_token, update) for d in reporting]
    assert [a.round_closed for a in answers] == [False, False, True]
    with pytest.raises(AggregatorRefusedError) as refused:
        client.upload(late.round, late.upload_token, update)
    assert refused.value.status_code == 409 and "not counted" in refused.value.detail

    (summary,) = client.status().recent_rounds
    assert (summary.status, summary.selected, summary.reported) == ("closed", 6, 3)
    assert (summary.aborted, summary.late, summary.dropped) == (1, 1, 1)
    assert summary.bytes_up == 3 * len(update)
    assert summary.bytes_down == 6 * len(client.model_version(0))
    assert summary.duration_s > 0
    # A second late upload from the same device is not counted twice.
    with pytest.raises(AggregatorRefusedError):
        client.upload(late.round, late.upload_token, update)
    assert client.status().recent_rounds[0].late == 1
    del vanished


@pytest.mark.slow
def test_the_deadline_closes_a_round_whose_selected_devices_vanished(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=4, over_selection=1.5,
                                  min_report_fraction=0.5, round_deadline_s=2.0)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    decisions = [client.checkin(client.enrol().device_token) for _ in range(6)]
    update = constant_update(client, 0.01, 5)
    for decision in decisions[:2]:
        client.upload(decision.round, decision.upload_token, update)
    wait_for_round(client, decisions[0].round)
    (summary,) = client.status().recent_rounds
    assert (summary.status, summary.reported, summary.dropped, summary.new_version) == ("closed", 2, 4, 1)


def test_pace_steering_spreads_the_devices_it_turns_away(start_aggregator, small_tokenizer_path, small_model_config):
    # The rule itself: never before the round is expected to end, spread over a round's length.
    rng = random.Random(0)
    waits = [retry_after_s(4.0, [10.0, 12.0, 10.0], 1.0, rng) for _ in range(1_000)]
    assert min(waits) >= 6.0 and max(waits) <= 16.0
    assert max(waits) - min(waits) > 8.0
    assert retry_after_s(100.0, [10.0], 1.0, rng) >= 1.0  # an overdue round still waits the floor

    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=1, over_selection=1.0)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    client.checkin(client.enrol().device_token)
    turned_away = [client.checkin(client.enrol().device_token) for _ in range(20)]
    assert {d.action for d in turned_away} == {"retry"}
    waits = [d.retry_after_s for d in turned_away]
    assert min(waits) >= aggregator.config.retry_after_s
    assert len(set(waits)) > 15  # not one moment for everybody: no thundering herd


def test_pace_steering_spreads_a_large_population_over_as_many_rounds_as_it_needs():
    # A population that holds still: a round sees population / spread of it. The spread settles where a round sees
    # about CHECKINS_PER_SLOT check-ins per slot, and never below one round.
    population, slots, spread = 10_000, 50, 1.0
    for _ in range(20):
        spread = next_spread(spread, int(population / spread), slots)
    assert population / spread == pytest.approx(CHECKINS_PER_SLOT * slots, rel=0.05)
    for _ in range(20):
        spread = next_spread(spread, 20, slots)  # the population shrank to fewer devices than a round wants
    assert spread == 1.0
    rng = random.Random(0)
    waits = [retry_after_s(0.0, [10.0], 1.0, rng, spread_rounds=5.0) for _ in range(1_000)]
    assert min(waits) >= 10.0 and max(waits) <= 60.0 and max(waits) > 50.0


def test_a_busy_round_sends_the_devices_it_turns_away_further_out(tmp_path, small_tokenizer_path, small_model_config):
    from aggregator.inprocess import InProcessClient
    from aggregator.process import local_aggregator_config

    client = InProcessClient(local_aggregator_config(
        tmp_path, small_tokenizer_path, model=small_model_config, clients_per_round=1, over_selection=1.0,
        simulated_clock=True, selection_window_s=0.0))
    devices = [client.enrol().device_token for _ in range(60)]
    clock = [0.0]

    def turned_away_waits() -> list[float]:
        decisions = [client.checkin(token) for token in devices]
        chosen = next(d for d in decisions if d.action == "train")
        clock[0] += 100.0  # the round lasts 100 simulated seconds
        client.set_clock(clock[0])
        client.upload(chosen.round, chosen.upload_token, constant_update(client, 0.01, 5))
        return [d.retry_after_s for d in decisions if d.action == "retry"]

    turned_away_waits()
    # After a round of 100 s that 60 devices asked to join for one slot, the next round spreads them over several
    # rounds' lengths: with one round's, no wait could pass 200 s (the rest of the round, plus one more).
    waits = turned_away_waits()
    assert len(waits) == 59 and max(waits) > 250.0


@pytest.mark.slow
def test_sigkill_mid_round_loses_no_committed_round_and_the_redone_round_gives_the_same_model(
    tmp_path, small_tokenizer_path, small_model_config
):
    from aggregator.process import local_aggregator_config

    def config(name: str):
        workdir = tmp_path / name
        workdir.mkdir()
        # FedAvgM: its momentum must survive the crash too, or the redone round would differ.
        return local_aggregator_config(workdir, small_tokenizer_path, model=small_model_config, clients_per_round=2,
                                       over_selection=1.0, server_optimizer="fedavgm", selection_window_s=0.0)

    def run_round(client: AggregatorClient, tokens: list[str], values: list[float]) -> None:
        for token, value, examples in zip(tokens, values, (3, 7)):
            decision = client.checkin(token)
            assert decision.action == "train"
            client.upload(decision.round, decision.upload_token, constant_update(client, value, examples))

    # Without a crash.
    with LocalAggregator(config("reference")) as aggregator:
        client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
        tokens = [client.enrol().device_token for _ in range(2)]
        run_round(client, tokens, [0.01, -0.02])
        run_round(client, tokens, [0.03, 0.01])
        expected = client.model()

    crashing = config("crashing")
    aggregator = LocalAggregator(crashing).__enter__()
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    tokens = [client.enrol().device_token for _ in range(2)]
    run_round(client, tokens, [0.01, -0.02])
    first = client.checkin(tokens[0])
    client.upload(first.round, first.upload_token, constant_update(client, 0.03, 3))
    assert client.status().reported == 1
    aggregator.process.kill()  # SIGKILL: no chance to clean up
    aggregator.process.wait()

    with LocalAggregator(crashing) as restarted:
        client = AggregatorClient(restarted.url)
        status = client.status()
        assert (status.model_version, status.round, status.reported) == (1, 2, 0)
        assert [r.round for r in status.recent_rounds] == [1]
        # The interrupted round's upload token is gone with it; the device checks in again.
        with pytest.raises(AggregatorRefusedError) as refused:
            client.upload(first.round, first.upload_token, constant_update(client, 0.03, 3))
        assert refused.value.status_code == 401
        again = client.checkin(tokens[0])
        update = constant_update(client, 0.03, 3)
        assert client.upload(again.round, again.upload_token, update).duplicate is False
        assert client.upload(again.round, again.upload_token, update).duplicate is True  # counted once
        second = client.checkin(tokens[1])
        assert client.upload(second.round, second.upload_token, constant_update(client, 0.01, 7)).round_closed
        recovered = client.model()

    expected_model, expected_version = model_from_bytes(expected)
    recovered_model, recovered_version = model_from_bytes(recovered)
    assert recovered_version == expected_version == 2
    for (name, want), got in zip(expected_model.state_dict().items(), recovered_model.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    with sqlite3.connect(crashing.db_path) as db:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        assert [row[0] for row in db.execute("select round from rounds order by round")] == [1, 2]


@pytest.mark.slow
def test_on_a_simulated_clock_the_deadline_is_simulated_time(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=2, over_selection=1.0,
                                  min_report_fraction=0.5, round_deadline_s=600.0, simulated_clock=True)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    assert client.status().clock == "simulated"
    first, _ = (client.checkin(client.enrol().device_token) for _ in range(2))
    client.upload(first.round, first.upload_token, constant_update(client, 0.01, 5))
    time.sleep(1.5)  # wall time passes: nothing happens
    client.set_clock(599.0)
    assert client.status().round == first.round
    client.set_clock(600.0)  # the deadline, in simulated seconds
    (summary,) = client.status().recent_rounds
    assert (summary.status, summary.reported, summary.dropped, summary.duration_s) == ("closed", 1, 1, 600.0)
    with pytest.raises(AggregatorRefusedError) as refused:
        client.set_clock(10.0)
    assert refused.value.status_code == 409 and "forward" in refused.value.detail


def test_a_wall_clock_aggregator_refuses_to_have_its_clock_set(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    assert client.status().clock == "wall"
    with pytest.raises(AggregatorRefusedError) as refused:
        client.set_clock(100.0)
    assert refused.value.status_code == 409 and "--simulated-clock" in refused.value.detail


def test_evaluation_reports_are_checked_counted_once_and_summed_into_the_rounds_quality_metrics(
    start_aggregator, small_tokenizer_path, small_model_config
):
    # Both devices are asked to score (every device: --eval-share 1).
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=2, over_selection=1.0,
                                  max_eval_positions=500, eval_share=1.0)
    client = AggregatorClient(aggregator.url, operator_token=aggregator.config.operator_token)
    first, second = (client.checkin(client.enrol().device_token) for _ in range(2))

    def post(decision, body: dict, token: str | None = "same") -> httpx.Response:
        token = decision.upload_token if token == "same" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(f"{aggregator.url}/rounds/{decision.round}/evaluations", json=body, headers=headers,
                          timeout=10)

    good = {"model_version": 0, "positions": 200, "hits_at_1": 30, "hits_at_3": 50}
    refusals = {
        "no token": (post(first, good, token=None), 401),
        "someone else's token": (post(first, good, token="not-issued"), 401),
        "another model": (post(first, good | {"model_version": 1}), 422),
        "more hits than predictions": (post(first, good | {"hits_at_3": 201, "hits_at_1": 201}), 422),
        "top-1 above top-3": (post(first, good | {"hits_at_1": 60}), 422),
        "over the cap": (post(first, good | {"positions": 501}), 422),
        "a word in it": (post(first, good | {"last_word": "rose"}), 422),
    }
    for what, (response, status) in refusals.items():
        assert response.status_code == status, what
        assert response.json()["detail"], what

    assert post(first, good).json() == {"round": 1, "evaluations": 1, "duplicate": False}
    # A repeat is not counted again, even with other numbers.
    assert post(first, good | {"hits_at_1": 40}).json() == {"round": 1, "evaluations": 1, "duplicate": True}
    assert post(second, {"model_version": 0, "positions": 100, "hits_at_1": 5, "hits_at_3": 25}).status_code == 200
    update = constant_update(client, 0.01, 5)
    for decision in (first, second):
        client.upload(decision.round, decision.upload_token, update)
    assert post(second, good).status_code == 409  # its round has closed

    (summary,) = client.status().recent_rounds
    assert (summary.eval_devices, summary.eval_positions, summary.eval_hits_at_1, summary.eval_hits_at_3) == (
        2, 300, 35, 75)
    assert summary.recall_at_1 == pytest.approx(35 / 300) and summary.recall_at_3 == pytest.approx(75 / 300)
    raw = httpx.get(f"{aggregator.url}/status", timeout=10).json()["recent_rounds"][0]
    assert raw["recall_at_1"] == pytest.approx(35 / 300)


def test_phones_told_to_download_int8_get_an_int8_model_and_the_round_counts_its_bytes(
    start_aggregator, small_tokenizer_path, small_model_config
):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, clients_per_round=2, over_selection=1.0,
                                  download_encoding="int8")
    client = AggregatorClient(aggregator.url)
    decisions = [client.checkin(client.enrol().device_token) for _ in range(2)]
    assert [d.model_encoding for d in decisions] == ["int8", "int8"]
    float32, quantised = client.model(), client.model("int8")
    # int8 (test_weights.py checks the size on rows of real width; this model's rows are 8 wide).
    assert read_metadata(quantised)["encoding"] == "int8" and len(quantised) < len(float32)
    # The download rebuilds the server's model to within half an int8 step per row.
    served, version = model_from_bytes(float32)
    downloaded, downloaded_version = model_from_bytes(quantised)
    assert downloaded_version == version == 0
    for name, tensor in served.state_dict().items():
        steps = tensor.abs().amax(dim=1, keepdim=True) / 127 if tensor.dim() == 2 else 0
        assert ((downloaded.state_dict()[name] - tensor).abs() <= steps * 0.5001).all(), name
    update = constant_update(client, 0.01, 5)
    for decision in decisions:
        client.upload(decision.round, decision.upload_token, update)
    (summary,) = client.status().recent_rounds
    assert summary.status == "closed" and summary.bytes_down == 2 * len(quantised)
    # The next version is served as int8 too; an unknown encoding is refused before anything is made.
    assert model_from_bytes(client.model("int8"))[1] == 1
    assert httpx.get(f"{aggregator.url}/model", params={"encoding": "int4"}, timeout=5).status_code == 422


def test_the_aggregator_asks_a_share_of_each_rounds_devices_to_score_the_model(tmp_path, small_tokenizer_path,
                                                                              small_model_config):
    # Goal 5, ten selected, first come first served (so drawn in the order they ask): ceil(0.3 x 10) score.
    client = InProcessClient(local_aggregator_config(tmp_path, small_tokenizer_path, model=small_model_config,
                                                     clients_per_round=5, over_selection=2.0, selection_window_s=0.0,
                                                     eval_share=0.3))
    tokens = [client.enrol().device_token for _ in range(10)]
    decisions = [client.checkin(token) for token in tokens]
    assert [d.action for d in decisions] == ["train"] * 10
    assert [d.evaluate for d in decisions] == [True] * 3 + [False] * 7
    assert [client.checkin(token).evaluate for token in tokens] == [True] * 3 + [False] * 7  # asked again: the same
    # A device not asked cannot send counts anyway; one that was asked can.
    report = EvaluationReport(model_version=0, positions=100, hits_at_1=90, hits_at_3=95)
    with pytest.raises(AggregatorRefusedError, match="not asked to score"):
        client.report_evaluation(decisions[3].round, decisions[3].upload_token, report)
    assert client.report_evaluation(decisions[0].round, decisions[0].upload_token, report).evaluations == 1


def test_in_a_secure_round_devices_not_asked_to_score_send_zero_counts_and_the_round_says_how_many_scored(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config, clients_per_round=5,
                                  over_selection=1.0, selection_window_s=0.0, eval_share=0.4)
    devices = [Device(client) for _ in range(5)]
    asked = [client.checkin(device.device_token).evaluate for device in devices]
    assert asked == [True, True, False, False, False]
    until_collecting(devices)
    for seed, (device, evaluates) in enumerate(zip(devices, asked)):
        scored = (EvaluationReport(model_version=0, positions=100, hits_at_1=10 + seed, hits_at_3=30)
                  if evaluates else None)
        device.upload(random_delta(parameter_shapes(before), seed), scored, seed)  # None: zero counts, masked
    confirm_all(devices)
    for device in devices:
        device.reveal()
    summary = finished_round(client)
    # The counts' checks held (hits <= positions <= reporters x max), and the round names the two that scored.
    assert ((summary.status, summary.eval_devices, summary.eval_positions, summary.eval_hits_at_1)
            == ("closed", 2, 200, 21))
