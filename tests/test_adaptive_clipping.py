"""Adaptive clipping (aggregator/adaptive_clipping.py): the privacy of updates and bits together, the clip norm
finding its quantile, the bit on the wire (plain and masked), and the norm carried across a restart."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from aggregator.adaptive_clipping import AdaptiveClipping, ClipNorm, next_clip_norm, update_noise_multiplier
from aggregator.config import AggregatorConfig
from aggregator.ftrl import rho, rho_spent
from aggregator.privacy import PrivacyEvent, epsilon
from aggregator.refusals import BadUpdateError
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from device_sim.phone import Phone
from device_sim.session import Clipping, update_bytes
from keyboard_model.architecture import build_model
from keyboard_model.errors import UserFacingError
from keyboard_model.norms import clip_to_norm, l2_norm
from keyboard_model.train import LocalTrainConfig
from keyboard_model.update_codec import decode_update
from keyboard_model.weights import model_from_bytes, model_to_bytes, parameter_shapes, write_tensors
from tests.conftest import SMALL_TEXT
from tests.helpers import (
    IDENTITY,
    TWO_BUFFERS,
    Device,
    adaptive_manager,
    confirm_all,
    finished_round,
    random_delta,
    release_one_round,
    start_secure,
    until_collecting,
)


def test_updates_and_bits_together_spend_what_the_noise_multiplier_alone_would():
    # Andrew et al. 2021, section 3: z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that the round's two Gaussian
    # releases (updates at z_update, centred bits of sensitivity 1/2 at sigma_b) are one at z.
    z, count_stddev = 1.0, 0.6
    z_update = update_noise_multiplier(z, count_stddev)
    assert z_update > z
    pair = RdpAccountant()
    pair.compose(dp_accounting.GaussianDpEvent(z_update))
    pair.compose(dp_accounting.GaussianDpEvent(2 * count_stddev))
    assert pair.get_epsilon(1e-6) == pytest.approx(epsilon([PrivacyEvent(1.0, z)], 1e-6), rel=1e-9)
    with pytest.raises(ValueError, match="above 0.5"):
        update_noise_multiplier(z, 0.5)  # the bits alone would spend all of z's privacy


def test_dp_ftrl_counts_the_bits_and_never_spends_more_than_fixed_clipping():
    settings = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=0.6)
    z_update = update_noise_multiplier(1.0, settings.count_stddev)
    # C = I, every round: the bits cost exactly what raising the update noise saved.
    assert rho_spent(IDENTITY, 12, 1, z_update, settings) == pytest.approx(12 / 2, rel=1e-9)
    # A real BLT with separation: the bits count in at most ceil(12 / 2) rounds, and the total stays below fixed
    # clipping's at z, which is what the operator asked for.
    adaptive = rho_spent(TWO_BUFFERS, 12, 2, z_update, settings)
    fixed = rho_spent(TWO_BUFFERS, 12, 2, 1.0, None)
    assert adaptive == pytest.approx(rho_spent(TWO_BUFFERS, 12, 2, z_update, None) + rho(6 / 4, 0.6), rel=1e-12)
    assert adaptive < fixed


def test_the_clip_norm_settles_at_the_target_quantile_of_the_update_norms():
    norms = [0.1 * k for k in range(1, 101)]  # update norms 0.1 to 10; their 30th percentile is about 3
    settings = AdaptiveClipping(target_quantile=0.3, learning_rate=0.2, count_stddev=1.0)
    clip = 0.01
    for _ in range(300):
        clip = next_clip_norm(clip, sum(n <= clip for n in norms) / len(norms), settings, ceiling=100.0)
    assert 2.0 < clip < 4.0
    # It never asks for more than the aggregator accepts.
    assert next_clip_norm(99.0, 0.0, settings, ceiling=100.0) == 100.0


def test_the_released_fraction_is_the_bits_with_their_noise_divided_by_the_goal():
    clip = ClipNorm(1.0, 0.001, AdaptiveClipping(0.5, 0.2, count_stddev=0.01), goal=10, ceiling=20.0)
    draws = [clip.release(within=7, reported=8)["dp_fraction_within"] for _ in range(200)]
    # (7 - 8/2 + noise) / 10 + 1/2: the goal divides, not the number that reported.
    assert sum(draws) / len(draws) == pytest.approx(0.8, abs=0.002)
    assert len(set(draws)) > 1  # noised, with fresh noise each time
    record = clip.release(within=7, reported=8)
    assert record["dp_next_clip_norm"] == pytest.approx(math.exp(-0.2 * (record["dp_fraction_within"] - 0.5)))
    clip.spent(record)
    assert clip.norm == record["dp_next_clip_norm"]


def test_a_round_moves_the_clip_norm_from_the_phones_bits_and_a_restart_keeps_it(
    tmp_path, small_tokenizer_path, small_model_config
):
    manager = adaptive_manager(tmp_path, small_tokenizer_path, small_model_config)
    decision = manager.checkin(manager.enrol()[0])
    assert decision.action == "train" and decision.clip_norm == 0.5 and decision.adaptive_clipping
    shapes = parameter_shapes(model_from_bytes(manager.current_model()[1])[0].state_dict())
    delta = clip_to_norm(random_delta(shapes, 1), 0.5)
    # The bit is asked for: an upload without it, or with something else in its place, is refused.
    for data in (update_bytes(delta, 5, "none"),
                 write_tensors(delta, {"num_examples": "5", "compression": "none", "within_clip": "yes"})):
        with pytest.raises(BadUpdateError, match="within_clip"):
            manager.submit(decision.round, decision.upload_token, data)
    # Every update was within the norm: the fraction released is about 1, above the target, so the norm shrinks.
    record = release_one_round(manager, [decision, *(manager.checkin(manager.enrol()[0]) for _ in range(3))])
    assert record["status"] == "closed" and record["dp_clip_norm"] == 0.5
    assert record["dp_fraction_within"] == pytest.approx(1.0, abs=0.5)  # sigma_b = goal / 20: 0.05 on the fraction
    assert record["dp_next_clip_norm"] == pytest.approx(0.5 * math.exp(-0.2 * (record["dp_fraction_within"] - 0.5)))
    assert record["dp_next_clip_norm"] < 0.5
    assert record["dp_update_noise_multiplier"] == pytest.approx(update_noise_multiplier(0.01, 4 / 20))
    following = manager.checkin(manager.enrol()[0])
    assert following.clip_norm == record["dp_next_clip_norm"] == manager.snapshot()["clip_norm"]
    # A restarted aggregator asks for the same norm.
    restarted = adaptive_manager(tmp_path, small_tokenizer_path, small_model_config)
    assert restarted.checkin(restarted.enrol()[0]).clip_norm == record["dp_next_clip_norm"]


@pytest.mark.slow
def test_a_dp_ftrl_database_refuses_another_noise_multiplier_or_clipping_on_resume(
    tmp_path, small_tokenizer_path, small_model_config
):
    # The BLT of tests/test_ftrl.py (10 rounds, separation 2): optimised once per process.
    ftrl = dict(dp_mechanism="ftrl", min_separation=2, dp_rounds=10, noise_multiplier=0.2)
    record = release_one_round(adaptive_manager(tmp_path, small_tokenizer_path, small_model_config, **ftrl))
    assert record["dp_mechanism"] == "ftrl" and record["rho"] > 0
    # Its accounting adds up releases of one noise multiplier and one way of clipping.
    for changed in ({"noise_multiplier": 0.3}, {"clip_quantile": None}, {"clip_count_stddev": 0.5}):
        with pytest.raises(UserFacingError, match="cannot change them mid-run"):
            adaptive_manager(tmp_path, small_tokenizer_path, small_model_config, **(ftrl | changed))
    resumed = adaptive_manager(tmp_path, small_tokenizer_path, small_model_config, **ftrl)
    assert resumed.privacy.clip_norm == record["dp_next_clip_norm"]


def test_without_adaptive_clipping_an_update_may_not_carry_the_bit(tmp_path, small_tokenizer_path,
                                                                    small_model_config):
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, clients_per_round=2, noise_multiplier=0.5,
                              selection_window_s=0.0)
    manager = RoundManager(config, open_storage(config.db_path))
    decision = manager.checkin(manager.enrol()[0])
    assert decision.clip_norm == 1.0 and not decision.adaptive_clipping
    shapes = parameter_shapes(model_from_bytes(manager.current_model()[1])[0].state_dict())
    with pytest.raises(BadUpdateError, match="must not carry within_clip"):
        manager.submit(decision.round, decision.upload_token,
                       update_bytes(random_delta(shapes, 2), 5, "none", within_clip=False))


def test_under_secure_aggregation_the_bits_arrive_only_as_their_sum(
    start_aggregator, small_tokenizer_path, small_model_config
):
    client, before = start_secure(start_aggregator, small_tokenizer_path, small_model_config, clients_per_round=4,
                                  over_selection=1.0, noise_multiplier=0.2, clip_norm=0.5, clip_quantile=0.5,
                                  population=40, secagg_ring_bits=16)
    devices = [Device(client) for _ in range(4)]
    assert until_collecting(devices).encoding.bound == 0.5  # phones clip to the round's norm, as the ring expects
    shapes = parameter_shapes(before)
    deltas = [random_delta(shapes, 40 + k) for k in range(4)]
    for k, device in enumerate(devices):
        device.upload(deltas[k], None, seed=k, within_clip=k < 3)  # three of four within the norm
    confirm_all(devices)
    for device in devices:
        device.reveal()
    summary = finished_round(client)
    # (3 - 4/2 + N(0, 0.2^2)) / 4 + 1/2: 0.75, give or take 0.05 a standard deviation.
    assert summary.dp_fraction_within == pytest.approx(0.75, abs=0.25)
    assert summary.dp_next_clip_norm == pytest.approx(0.5 * math.exp(-0.2 * (summary.dp_fraction_within - 0.5)))
    # The updates were noised at z_update, above z = 0.2, so that with the bits the round spends z's privacy.
    z_update = update_noise_multiplier(0.2, 4 / 20)
    after, _ = model_from_bytes(client.model())
    mean = {n: sum(clip_to_norm(d, 0.5)[n] for d in deltas) / 4 for n in shapes}
    residual = torch.cat([(after.state_dict()[n] - before[n] - mean[n]).flatten() for n in before])
    assert residual.std().item() == pytest.approx(z_update * 0.5 / 4, rel=0.07)
    # The next round asks for the new norm, and sizes its ring for it.
    assert client.checkin(client.enrol().device_token).clip_norm == summary.dp_next_clip_norm


def test_a_phone_clips_its_update_when_asked_and_reports_whether_it_was_within(
    tmp_path, small_tokenizer, small_model_config
):
    phone = Phone.create("p", tmp_path / "p", [(float(i), t) for i, t in enumerate(SMALL_TEXT * 6)])
    model = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 0, small_model_config)
    shapes = parameter_shapes(build_model(small_model_config).state_dict())
    train = LocalTrainConfig(batch_size=4, epochs=2)
    free = phone.local_work(model, small_tokenizer, train, seed=0, compression="none")
    norm = l2_norm(decode_update(free.upload, shapes)[0])
    for clip, within in ((norm / 2, False), (norm * 2, True)):
        work = phone.local_work(model, small_tokenizer, train, seed=0, compression="none",
                                clipping=Clipping(clip, report_within=True))
        delta, metadata = decode_update(work.upload, shapes)
        assert work.within_clip is within and metadata["within_clip"] == str(int(within))
        assert l2_norm(delta) == pytest.approx(min(norm, clip), rel=1e-5)
    # Not asked (fixed clipping): no bit in the upload.
    fixed = phone.local_work(model, small_tokenizer, train, seed=0, compression="none", clipping=Clipping(norm / 2))
    assert fixed.within_clip is None and "within_clip" not in decode_update(fixed.upload, shapes)[1]
