"""A phone that lies in what it sums: counts no honest phone could send, clipping bits that are not bits, an update
past the bound. In a secure round the server sees only the sums, so it checks them against what phones sending what
honest phones send could give, and refuses the round rather than apply an impossible one; adaptive clipping's norm
moves within a bound whatever the bits say, never reaches 0, and is read back from the database as a number."""

from __future__ import annotations

import math
import random
import sqlite3

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_numpy

from aggregator.adaptive_clipping import (
    FLOOR_FRACTION,
    AdaptiveClipping,
    ClipNorm,
    ImpossibleSumError,
    next_clip_norm,
    noisy_fraction_within,
)
from aggregator.config import AggregatorConfig
from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from keyboard_model.errors import UserFacingError
from keyboard_model.norms import clip_to_norm, l2_norm
from keyboard_model.secagg import RingEncoding, masked_layout
from keyboard_model.weights import Tensors, model_from_bytes, parameter_shapes
from tests.helpers import Device, adaptive_manager, confirm_all, random_delta, release_one_round, until_collecting

# The attack: goal 3, noise multiplier 0.01, the median's quantile.
ADAPTIVE = dict(noise_multiplier=0.01, clip_quantile=0.5, clip_norm=1.0, population=30)


def secure_client(tmp_path, tokenizer_path, model_config, **settings) -> InProcessClient:
    return InProcessClient(local_aggregator_config(
        tmp_path, tokenizer_path, model=model_config, secure_aggregation=True, server_optimizer="fedavg",
        clients_per_round=3, over_selection=1.0, selection_window_s=0.0, round_deadline_s=60.0, **settings))


def masked(device: Device, delta: Tensors, counts: list[int]) -> bytes:
    """A masked upload as a lying phone makes it: any counts, and the delta unclipped."""
    state = device.state()
    encoding = RingEncoding(**state.encoding.model_dump())
    flat = torch.cat([t.flatten() for t in delta.values()]).double().numpy()
    inputs = {"update": encoding.encode(flat, np.random.default_rng(0)), "counts": np.array(counts, np.uint32)}
    return save_numpy(device.part.mask(inputs, state.shared, masked_layout(encoding)))


def run_round(client: InProcessClient, deltas: list[Tensors], counts: list[list[int]]):
    """One secure round of three phones sending these deltas and counts; returns its record."""
    devices = [Device(client) for _ in range(3)]
    until_collecting(devices)
    for device, delta, sent in zip(devices, deltas, counts):
        client.upload(device.round, device.token, masked(device, delta, sent))
    confirm_all(devices)
    for device in devices:
        device.reveal()
    return client.status().recent_rounds[-1]


@pytest.mark.parametrize("lie, refused", [
    ([10, 1, 2, 1000], "adaptive-clipping bits"),  # the issue's: a thousand for a bit
    ([0, 0, 0, 2**31], "adaptive-clipping bits"),  # with today's code the norm became exactly 0.0
    ([0, 0, 0, 2**32 - 1], "adaptive-clipping bits"),  # -1 modulo 2**32, with honest bits summing to 0
    ([2**32 - 1, 0, 0, 0], "evaluation counts"),  # -1 predictions, modulo 2**32
    ([10, 5, 2, 0], "evaluation counts"),  # more hits at 1 than at 3
    ([10, 1, 20, 1], "evaluation counts"),  # more hits than predictions
    ([6001, 0, 0, 0], "evaluation counts"),  # more predictions than 3 phones of --max-eval-positions 2000 score
])
def test_counts_no_honest_phone_could_send_fail_the_secure_round_and_move_nothing(
    lie, refused, tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, **ADAPTIVE)
    shapes = parameter_shapes(model_from_bytes(client.model())[0].state_dict())
    honest_bit = int(lie[3] != 2**32 - 1)  # the wrapped -1 is impossible only when the honest bits sum to 0
    record = run_round(client, [clip_to_norm(random_delta(shapes, k), 1.0) for k in range(3)],
                       [[0, 0, 0, honest_bit], [0, 0, 0, honest_bit], lie])
    assert (record.status, record.new_version) == ("failed", None)
    assert refused in record.failure and "some phone lied" in record.failure
    status = client.status()
    assert status.model_version == 0 and status.clip_norm == 1.0  # the model and the norm are where they were
    # Training goes on: the next round asks for the same norm.
    assert client.checkin(client.enrol().device_token).clip_norm == 1.0


def test_an_update_past_the_bound_fails_the_secure_round_and_an_honest_one_at_the_bound_does_not(
    tmp_path, small_tokenizer_path, small_model_config
):
    client = secure_client(tmp_path / "a", small_tokenizer_path, small_model_config, max_update_norm=2.0)
    before = model_from_bytes(client.model())[0].state_dict()
    shapes = parameter_shapes(before)
    at_bound = {name: t * (2.0 / l2_norm(random_delta(shapes, 0))) for name, t in random_delta(shapes, 0).items()}
    # The largest mean honest phones can make: three updates alike at the bound, every count at its most.
    most = [2000, 2000, 2000, 0]
    record = run_round(client, [at_bound] * 3, [most] * 3)
    assert (record.status, record.eval_positions) == ("closed", 6000)
    assert record.update_norm == pytest.approx(2.0, rel=0.05)
    # One phone sends ten times the bound: the mean would be over three times it.
    liar = {name: 10 * t for name, t in at_bound.items()}
    record = run_round(client, [at_bound, at_bound, liar], [[0, 0, 0, 0]] * 3)
    assert (record.status, record.new_version) == ("failed", None)
    assert "some phone sent more than the bound" in record.failure
    assert client.status().model_version == 1


def test_with_differential_privacy_an_update_far_past_the_bound_still_fails_the_secure_round(
    tmp_path, small_tokenizer_path, small_model_config
):
    # The check reads the released mean, noise included: what it refuses must stand out from the noise. Here the
    # noise is small, so a liar at ten times the bound does.
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, **ADAPTIVE)
    shapes = parameter_shapes(model_from_bytes(client.model())[0].state_dict())
    delta = clip_to_norm(random_delta(shapes, 0), 1.0)
    liar = {name: 10 * t for name, t in delta.items()}
    record = run_round(client, [delta, delta, liar], [[0, 0, 0, 1]] * 3)
    assert (record.status, record.new_version) == ("failed", None)
    assert "some phone sent more than the bound" in record.failure and "privacy noise" in record.failure


def test_whatever_the_bits_say_a_round_moves_the_clip_norm_within_its_bound_and_never_below_the_floor():
    goal = reported = 3
    settings = AdaptiveClipping(target_quantile=0.3, learning_rate=0.2, count_stddev=goal / 20)
    eta, gamma, tolerance = settings.learning_rate, settings.target_quantile, 1e-9

    def step(within: int, seed: int) -> float:
        """The factor the norm moves by, with the noise draw `seed`."""
        fraction = noisy_fraction_within(within, reported, settings.count_stddev, goal, random.Random(seed))
        return next_clip_norm(1.0, fraction, settings, ceiling=20.0)

    for seed in range(500):
        factors = [step(within, seed) for within in range(reported + 1)]
        # With reported <= goal, no round moves the norm by more than all its phones saying the same would.
        assert all(math.exp(-eta * (1 - gamma)) * (1 - tolerance) <= f <= math.exp(eta * gamma) * (1 + tolerance)
                   for f in factors)
        # One phone's lie moves the sum by at most 1, so the norm by a factor of at most exp(eta / goal).
        assert all(1 <= a / b <= math.exp(eta / goal) * (1 + tolerance) for a, b in zip(factors, factors[1:]))
    # A sum no honest phones could send is refused, not stepped on: a thousand, or -1 modulo 2**32.
    for impossible in (1000, 2**32 - 1):
        with pytest.raises(ImpossibleSumError, match="some phone lied"):
            noisy_fraction_within(impossible, reported, settings.count_stddev, goal, random.Random(0))
    # Rounds whose bits all say "within" (as one liar can make a secure round's sum say) shrink the norm, down to the
    # floor, a tenth of the operator's norm, and no further: lies cannot cut honest updates to nothing.
    clip = ClipNorm(1.0, 0.01, settings, goal, ceiling=20.0)
    for _ in range(200):
        clip.spent(clip.release(within=reported, reported=reported))
    assert clip.norm == pytest.approx(FLOOR_FRACTION * 1.0)


# The manager's --clip-norm is 0.5, so its floor is 0.05.
@pytest.mark.parametrize("stored, resumed", [(0.0, 0.5 * FLOOR_FRACTION), (-1.0, 0.5 * FLOOR_FRACTION),
                                             (1e-29, 0.5 * FLOOR_FRACTION), (1e9, 20.0)])
def test_a_stored_clip_norm_is_read_as_a_number_and_brought_within_the_floor_and_ceiling(
    stored, resumed, tmp_path, small_tokenizer_path, small_model_config
):
    manager = adaptive_manager(tmp_path, small_tokenizer_path, small_model_config)
    assert release_one_round(manager)["status"] == "closed"
    manager.storage.close()
    with sqlite3.connect(tmp_path / "a.sqlite") as db:  # as a database of today's code may hold it after an attack
        db.execute("update rounds set dp_next_clip_norm = ?", [stored])
    restarted = adaptive_manager(tmp_path, small_tokenizer_path, small_model_config)
    assert restarted.privacy.clip_norm == pytest.approx(resumed)


def test_a_stored_clip_norm_that_is_not_finite_is_refused(tmp_path, small_tokenizer_path, small_model_config):
    manager = adaptive_manager(tmp_path, small_tokenizer_path, small_model_config)
    release_one_round(manager)
    manager.storage.close()
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("update rounds set dp_next_clip_norm = ?", [math.inf])
    with pytest.raises(UserFacingError, match="damaged"):
        adaptive_manager(tmp_path, small_tokenizer_path, small_model_config)


def test_a_secure_aggregator_whose_counts_could_wrap_around_the_ring_does_not_start(
    tmp_path, small_tokenizer_path, small_model_config
):
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, secure_aggregation=True, clients_per_round=4,
                              over_selection=1.0, max_eval_positions=2**30)
    with pytest.raises(UserFacingError, match="modulo 2\\*\\*32"):
        RoundManager(config, open_storage(config.db_path))


def test_with_differential_privacy_a_push_piled_on_one_value_fails_the_secure_round_though_its_norm_hides_in_the_noise(
    tmp_path, small_tokenizer_path, small_model_config
):
    # Noise of spread 0.5 on each of d = 1,421 values has norm about 0.5 sqrt(d) = 18.8, so a push of 14 on one value
    # lengthens the noisy sum only to about sqrt(18.8^2 + 14^2) = 23.5, within the norm's allowance of
    # 3 + 0.5 (sqrt(d) + 8) = 25.9; but no value of three honest updates within norm 1, with that noise, passes
    # 3 + 0.5 x 8.4 = 7.2 (8.4 spreads: the largest of d such values, but for 1e-12). (The ring holds a push of at most
    # about 20 on one value: its values are sized for three updates at the bound.)
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, noise_multiplier=0.5, clip_norm=1.0,
                           population=30)
    shapes = parameter_shapes(model_from_bytes(client.model())[0].state_dict())
    honest = [clip_to_norm(random_delta(shapes, k), 1.0) for k in range(3)]
    record = run_round(client, honest, [[0, 0, 0, 0]] * 3)
    assert record.status == "closed"
    name = next(iter(shapes))
    liar = {key: t.clone() for key, t in honest[2].items()}
    liar[name].view(-1)[0] += 14.0
    record = run_round(client, [*honest[:2], liar], [[0, 0, 0, 0]] * 3)
    assert (record.status, record.new_version) == ("failed", None)
    assert "has a value of" in record.failure and "privacy noise" in record.failure
