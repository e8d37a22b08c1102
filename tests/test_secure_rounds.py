"""Secure aggregation through the real service: rounds with drop-outs at each phase give the mean of what the
reporting phones sent, and a round with too few phones fails without moving the model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.schemas import DealtShares, EvaluationReport, SecAggShares
from aggregator.config import AggregatorConfig
from aggregator.inprocess import InProcessClient
from device_sim.secure_aggregation import SecAggPhone
from keyboard_model.norms import clip_to_norm
from keyboard_model.secagg import IdentityKey, RingEncoding, SecAggError
from keyboard_model.weights import model_from_bytes, parameter_shapes
from tests.helpers import (
    DIRECTORY,
    Device,
    assert_mean_within_rounding,
    confirm_all,
    finished_round,
    random_delta,
    start_secure,
    until_collecting,
    wait_for_phase,
)


@pytest.mark.slow
def test_drop_outs_before_sharing_before_uploading_and_late_still_give_the_mean_of_the_reports(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config,
                                  clients_per_round=5, over_selection=1.6, max_update_norm=6.0, eval_share=1.0)
    devices = [Device(client) for _ in range(8)]
    no_keys, no_shares, no_upload, *reporters = devices
    for device in devices[1:]:
        device.send_keys()
    # The key phase closes when its time is up: one selected device never sent keys.
    assert wait_for_phase(no_shares, "share").roster.degree == 6  # seven in the cohort, all neighbours
    # A device that sent no keys is not in the cohort: its phone sees that, and the server refuses its shares.
    with pytest.raises(SecAggError, match="lists its keys"):
        no_keys.send_shares()
    with pytest.raises(AggregatorRefusedError) as refused:
        client.secagg_shares(no_keys.round, no_keys.token, SecAggShares(
            pairs={1: DealtShares(sealed=bytes(64), self_mask=bytes(32), masking=bytes(32))},
            seed_commitment=bytes(32)))
    assert refused.value.status_code == 409 and "cohort" in refused.value.detail
    for device in [no_upload, *reporters]:
        device.send_shares()
    state = wait_for_phase(no_upload, "collect")
    assert len(state.shared) == 6 and (state.encoding.bits, state.encoding.bound) == (8, 6.0)

    shapes = parameter_shapes(before)
    deltas = [random_delta(shapes, seed) for seed in range(5)]
    evaluations = [EvaluationReport(model_version=0, positions=100 + k, hits_at_1=k, hits_at_3=2 * k) for k in range(5)]
    answers = [d.upload(delta, e, seed) for seed, (d, delta, e) in enumerate(zip(reporters, deltas, evaluations))]
    assert [a.round_closed for a in answers] == [False] * 5  # the round closes after unmasking
    assert wait_for_phase(reporters[0], "confirm").reported is not None
    with pytest.raises(AggregatorRefusedError) as late:
        no_upload.upload(deltas[0], evaluations[0], seed=9)
    assert late.value.status_code == 409
    assert confirm_all(reporters).confirmations is not None
    for device in reporters:
        device.reveal()

    status = client.status()
    (summary,) = status.recent_rounds
    assert (summary.status, summary.reported, summary.new_version) == ("closed", 5, 1)
    assert (summary.eval_devices, summary.eval_positions, summary.eval_hits_at_1) == (5, 510, 10)
    after, _ = model_from_bytes(client.model())
    # The server learnt the mean of the five updates, to within the ring's rounding.
    mean = {name: sum(clip_to_norm(d, 6.0)[name] for d in deltas) / 5 for name in before}
    assert_mean_within_rounding(after.state_dict(), before, mean, state, reporters=5)


@pytest.mark.slow
def test_devices_dropping_out_while_unmasking_leave_enough_shares(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config,
                                  clients_per_round=6, over_selection=1.0, secagg_ring_bits=16)
    devices = [Device(client) for _ in range(6)]
    state = until_collecting(devices)
    shapes = parameter_shapes(before)
    deltas = [random_delta(shapes, 10 + k) for k in range(6)]
    for k, device in enumerate(devices):
        device.upload(deltas[k], None, seed=k)
    confirm_all(devices)
    for device in devices[:4]:  # a third never reveal
        device.reveal()
    summary = finished_round(client)
    assert summary.status == "closed" and summary.eval_positions == 0
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before, {n: sum(d[n] for d in deltas) / 6 for n in before},
                                state, reporters=6)


@pytest.mark.slow
def test_too_few_devices_sharing_fails_the_round_before_anything_is_revealed_and_keeps_the_model(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config,
                                  clients_per_round=4, over_selection=1.0)
    devices = [Device(client) for _ in range(4)]
    for device in devices:
        device.send_keys()
    wait_for_phase(devices[0], "share")
    for device in devices[:2]:  # two of four: fewer than a secret's threshold plus one
        device.send_shares()
    summary = finished_round(client)
    assert summary.status == "failed" and "shared their seeds" in summary.failure
    assert summary.new_version is None and client.status().model_version == 0
    with pytest.raises(AggregatorRefusedError) as refused:
        devices[0].state()
    assert refused.value.status_code == 409  # the round is over: there is nothing to unmask


def test_with_differential_privacy_the_unmasked_sum_gets_its_noise_exactly_once(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config, clients_per_round=4,
                                  over_selection=1.0, noise_multiplier=0.2, clip_norm=0.5, population=40,
                                  secagg_ring_bits=16)
    devices = [Device(client) for _ in range(4)]
    assert until_collecting(devices).encoding.bound == 0.5  # phones clip to the privacy bound
    shapes = parameter_shapes(before)
    deltas = [random_delta(shapes, 20 + k) for k in range(4)]  # norms well above 0.5: clipped on the phone
    for k, device in enumerate(devices):
        device.upload(deltas[k], None, seed=k)
    confirm_all(devices)
    for device in devices:
        device.reveal()
    summary = finished_round(client)
    assert summary.epsilon is not None and summary.dp_noise_multiplier == 0.2
    after, _ = model_from_bytes(client.model())
    mean = {n: sum(clip_to_norm(d, 0.5)[n] for d in deltas) / 4 for n in shapes}
    residual = torch.cat([(after.state_dict()[n] - before[n] - mean[n]).flatten() for n in before])
    # Noise of z * clip on the sum, divided by the goal: once, not once per phone (which would double it).
    assert residual.std().item() == pytest.approx(0.2 * 0.5 / 4, rel=0.1)


def test_a_tiny_cohort_collects_past_its_goal_until_the_reporters_can_unmask_each_other(
    start_aggregator, small_tokenizer_path, small_model_config
):
    # Goal 2, three selected: each reporter's self mask needs two shares from the others, so two reports are not
    # enough to unmask; the round keeps collecting until the third.
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config, clients_per_round=2,
                                  over_selection=1.5)
    devices = [Device(client) for _ in range(3)]
    assert until_collecting(devices).roster.threshold == 2
    shapes = parameter_shapes(before)
    deltas = [random_delta(shapes, 30 + k) for k in range(3)]
    devices[0].upload(deltas[0], None, seed=0)
    devices[1].upload(deltas[1], None, seed=1)
    assert devices[0].state().phase == "collect"
    devices[2].upload(deltas[2], None, seed=2)
    assert devices[0].state().phase == "confirm"
    confirm_all(devices)
    for device in devices:
        device.reveal()
    (summary,) = client.status().recent_rounds
    assert (summary.status, summary.reported) == ("closed", 3)


def test_a_masked_upload_in_a_type_numpy_cannot_read_is_refused_not_a_server_error(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, _ = start_secure(start_aggregator, small_tokenizer_path, small_model_config, clients_per_round=3,
                             over_selection=1.0)
    devices = [Device(client) for _ in range(3)]
    state = until_collecting(devices)
    size = RingEncoding(**state.encoding.model_dump()).size
    bfloat16 = save({"update": torch.zeros(size, dtype=torch.bfloat16), "counts": torch.zeros(3, dtype=torch.int32)})
    with pytest.raises(AggregatorRefusedError) as refused:
        client.upload(devices[0].round, devices[0].token, bfloat16)
    assert refused.value.status_code == 422 and "not a masked upload" in refused.value.detail


def test_devices_drawn_as_the_selection_deadline_passes_still_get_the_phase_to_send_keys(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Found by a DP-FTRL run on the fleet: with phones sitting out the separation, the only check-ins of a round came
    # late, were drawn as half the deadline passed, and the round failed at once with no keys, before they could come
    # back for their answer.
    client = InProcessClient(AggregatorConfig(
        db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path, model=small_model_config,
        secure_aggregation=True, simulated_clock=True, clients_per_round=3, over_selection=2.0,
        round_deadline_s=3600.0, secagg_phase_s=120.0, selection_window_s=10.0))
    enrolments = [client.enrol() for _ in range(4)]
    client.set_clock(1200.0)
    assert all(client.checkin(e.device_token).action == "retry" for e in enrolments)  # candidates until 1210
    client.set_clock(1800.0)  # drawn as the selection deadline passes: 4 of the 6 it wanted, so the cohort is fixed
    decisions = [client.checkin(e.device_token) for e in enrolments]
    assert all(d.action == "train" and d.secure_aggregation for d in decisions)
    assert client.checkin(client.enrol().device_token).action == "retry"  # no one joins a fixed cohort
    for enrolment, decision in zip(enrolments, decisions):
        assert client.secagg_state(decision.round, decision.upload_token).phase == "advertise"
        identity = IdentityKey.generate()
        DIRECTORY.register(enrolment.device_id, identity.public())
        client.secagg_keys(decision.round, decision.upload_token,
                           SecAggPhone(decision.round, enrolment.device_id, identity, DIRECTORY).keys_message())
    # All four sent keys within the phase's time: the round goes on to sharing, with all of them.
    state = client.secagg_state(decisions[0].round, decisions[0].upload_token)
    assert state.phase == "share" and len(state.roster.device_ids) == 4
