"""A secure round of honest phones fails only when too few of them are left, not because of its own phases' timing.

Each case is a round of the main job's fleet that failed with every phone alive (found by `benchmarks/secure_run.py`;
the simulator's clock moves in 10-minute ticks, so each phase that waits on a drop-out lasts a tick, not
`secagg_phase_s`). They run on the aggregator's round code in process, on a simulated clock set by the test.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from aggregator.api.client import AggregatorRefusedError
from aggregator.config import AggregatorConfig
from aggregator.inprocess import InProcessClient
from keyboard_model.weights import model_from_bytes, parameter_shapes
from tests.helpers import Device, random_delta

DEADLINE_S, PHASE_S = 3600.0, 120.0


def secure_round(tmp_path, tokenizer_path, model_config, goal: int, over_selection: float):
    """An in-process aggregator on a simulated clock whose first round is secure; returns (client, model shapes)."""
    client = InProcessClient(AggregatorConfig(
        db_path=tmp_path / "a.sqlite", tokenizer_path=tokenizer_path, model=model_config, secure_aggregation=True,
        simulated_clock=True, clients_per_round=goal, over_selection=over_selection, round_deadline_s=DEADLINE_S,
        secagg_phase_s=PHASE_S, selection_window_s=0.0, server_optimizer="fedavg"))
    model, _ = model_from_bytes(client.model())
    return client, parameter_shapes(model.state_dict())


def upload(devices: list[Device], shapes) -> None:
    for seed, device in enumerate(devices):
        device.upload(random_delta(shapes, seed), None, seed)


def only_round(client: InProcessClient):
    (summary,) = client.status().recent_rounds
    return summary


def test_phases_that_wait_on_drop_outs_before_training_do_not_cost_the_cohort_its_time_to_train(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Round 7 of the main job: one phone drawn never sent keys, one never shared, and each phase waited a tick for
    # it; collection opened one tick before the deadline, and the deadline closed it before any phone had trained.
    client, shapes = secure_round(tmp_path, small_tokenizer_path, small_model_config, goal=4, over_selection=1.5)
    client.set_clock(1200.0)
    devices = [Device(client) for _ in range(6)]  # the cohort is full at 1200
    no_keys, no_shares, *reporters = devices
    for device in devices[1:]:
        device.send_keys()
    client.set_clock(1800.0)  # the key phase waited for no_keys
    for device in reporters:
        device.send_shares()
    client.set_clock(2400.0)  # the share phase waited for no_shares
    assert reporters[0].state().phase == "collect"
    client.set_clock(DEADLINE_S)  # the cohort trained from 2400: it had 2400 s, when fixed, to train
    assert reporters[0].state().phase == "collect"
    upload(reporters, shapes)
    for device in reporters:
        device.confirm()
    for device in reporters:
        device.reveal()
    summary = only_round(client)
    assert (summary.status, summary.reported, summary.new_version) == ("closed", 4, 1)


def test_a_round_whose_collection_ends_at_its_deadline_still_gets_its_confirm_and_unmask_phases(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Round 56: collection closed at the deadline, a phone dropped out before confirming, and the round failed as
    # unmasking opened, "past its deadline", before any phone could reveal.
    client, shapes = secure_round(tmp_path, small_tokenizer_path, small_model_config, goal=6, over_selection=1.0)
    devices = [Device(client) for _ in range(6)]
    for device in devices:
        device.send_keys()
    for device in devices:
        device.send_shares()
    reporters = devices[:5]  # one never uploads: the goal of six is not reached
    upload(reporters, shapes)
    client.set_clock(DEADLINE_S)
    confirmers = reporters[:4]  # one drops out before confirming: the phase waits for it
    for device in confirmers:
        device.confirm()
    client.set_clock(DEADLINE_S + 600.0)
    assert confirmers[0].state().phase == "unmask"
    for device in confirmers:
        device.reveal()
    summary = only_round(client)
    assert (summary.status, summary.reported, summary.new_version) == ("closed", 5, 1)


def test_reporters_reveal_when_exactly_half_of_each_ones_neighbours_confirmed(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Round 15: 7 of 13 phones reported and confirmed, above the threshold of 4, but each reporter had 6 of its 12
    # neighbours confirming, not a majority of them, and every phone refused to reveal. A phone's own signature
    # counts too: an honest phone signs only a survivor set that holds it.
    client, shapes = secure_round(tmp_path, small_tokenizer_path, small_model_config, goal=5, over_selection=1.0)
    devices = [Device(client) for _ in range(5)]  # every phone neighbours the four others; threshold 2
    for device in devices:
        device.send_keys()
    for device in devices:
        device.send_shares()
    reporters = devices[:3]
    upload(reporters, shapes)
    client.set_clock(DEADLINE_S)  # collection closes with three
    for device in reporters:
        device.confirm()
    for device in reporters:
        device.reveal()
    summary = only_round(client)
    assert (summary.status, summary.reported, summary.new_version) == ("closed", 3, 1)


def test_a_masked_input_late_for_collection_is_counted_late_once_as_its_selection_says(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Found by benchmarks/soak.py's check of the database: the round counted the device late when it closed, left
    # its selection "selected" (dropped), and counted it late again, from that selection, when it next asked.
    client, shapes = secure_round(tmp_path, small_tokenizer_path, small_model_config, goal=3, over_selection=4 / 3)
    devices = [Device(client) for _ in range(4)]
    for device in devices:
        device.send_keys()
    for device in devices:
        device.send_shares()
    *reporters, slow = devices
    upload(reporters, shapes)  # the goal: collection closes
    with pytest.raises(AggregatorRefusedError) as late:
        upload([slow], shapes)
    assert late.value.status_code == 409
    for device in reporters:
        device.confirm()
    for device in reporters:
        device.reveal()
    with pytest.raises(AggregatorRefusedError):
        slow.state()  # the round is over; the device asks once more
    summary = only_round(client)
    assert (summary.status, summary.reported, summary.late, summary.dropped) == ("closed", 3, 1, 0)
    with closing(sqlite3.connect(tmp_path / "a.sqlite")) as db:
        statuses = sorted(status for (status,) in db.execute("SELECT status FROM selections WHERE round = 1"))
    assert statuses == ["late", "reported", "reported", "reported"]


def test_a_round_without_a_majority_confirming_around_some_phone_fails_at_once_and_says_why(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Phones reveal a neighbour's shares only when more than half of it and its neighbours confirmed (their check
    # against a lying server). Round 7 of benchmarks/soak.py: 6 of 13 confirmed, above the threshold, and the round
    # failed as unmasking ended, "phone 0's secrets have 0 shares". Three of seven here: threshold 2, no majority.
    client = InProcessClient(AggregatorConfig(
        db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path, model=small_model_config,
        secure_aggregation=True, simulated_clock=True, clients_per_round=7, over_selection=1.0,
        min_report_fraction=0.4, round_deadline_s=DEADLINE_S, secagg_phase_s=PHASE_S, selection_window_s=0.0))
    model, _ = model_from_bytes(client.model())
    devices = [Device(client) for _ in range(7)]
    for device in devices:
        device.send_keys()
    for device in devices:
        device.send_shares()
    upload(devices[:4], parameter_shapes(model.state_dict()))
    client.set_clock(DEADLINE_S)  # collection closes with four
    for device in devices[:3]:
        device.confirm()
    client.set_clock(DEADLINE_S + 600.0)  # the fourth never confirms
    summary = only_round(client)
    assert summary.status == "failed" and "no majority" in summary.failure and summary.new_version is None
