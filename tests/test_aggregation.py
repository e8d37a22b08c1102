"""The aggregation rules: a weighted mean, a private mean that clips and counts each device once, and a ledger
that counts a release only once it is committed."""

from __future__ import annotations

import pytest
import torch

from aggregator.adaptive_clipping import ClipNorm
from aggregator.aggregation import PrivateMean, UpdateSum, WeightedMean
from aggregator.privacy import PrivacyEvent, PrivacyLedger, epsilon
from keyboard_model.flat import flatten


def test_the_weighted_mean_weights_each_update_by_its_examples():
    rule = WeightedMean({"w": (2,)})
    rule.add(torch.tensor([1.0, 0.0]), 3)
    rule.add(torch.tensor([0.0, 4.0]), 1)
    torch.testing.assert_close(rule.release(2).mean_delta["w"], torch.tensor([0.75, 1.0]))


def test_the_private_mean_clips_counts_each_device_once_and_divides_by_the_goal():
    ledger = PrivacyLedger(ClipNorm(1.0, 1e-9, None, 4, 20.0), noise_multiplier=1e-9, goal=4, population=lambda: 100,
                           delta=None, past=[])
    rule = PrivateMean({"w": (2,)}, ledger)
    rule.add(torch.tensor([30.0, 40.0]), 900)  # norm 50: clipped to 1, and its 900 examples do not count
    rule.add(torch.tensor([0.1, 0.0]), 1)
    release = rule.release(2)
    torch.testing.assert_close(release.mean_delta["w"], torch.tensor([0.6 + 0.1, 0.8]) / 4, atol=1e-6, rtol=0)
    assert release.record["dp_sampling_rate"] == 4 / 100 and release.record["dp_delta"] == 1 / 100
    # Until committed, a release is not spent: the next one reports the epsilon of one round, not two.
    again = PrivateMean({"w": (2,)}, ledger).release(0)
    assert again.record["epsilon"] == release.record["epsilon"]
    ledger.spent(release.record)
    after = PrivateMean({"w": (2,)}, ledger).release(0)
    assert after.record["epsilon"] > release.record["epsilon"]
    one_round = PrivacyEvent(release.record["dp_sampling_rate"], release.record["dp_noise_multiplier"])
    assert after.record["epsilon"] == epsilon([one_round, one_round], 0.01)


def test_the_running_sum_equals_the_batch_mean():
    generator = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(3, 2, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(7)]
    weights = [5, 1, 9, 2, 2, 40, 3]
    shapes = {"a": (3, 2), "b": (5,)}
    total = UpdateSum(shapes)
    for delta, weight in zip(deltas, weights):
        total.add(flatten(delta, shapes), weight)
    expected = sum(w * d["a"].double() for d, w in zip(deltas, weights)) / sum(weights)
    torch.testing.assert_close(total.mean()["a"], expected.float())
    assert total.count == 7 and total.total_weight == sum(weights)


def test_empty_or_unweighted_updates_are_refused():
    with pytest.raises(ValueError):
        UpdateSum({"w": (1,)}).mean()
    with pytest.raises(ValueError):
        UpdateSum({"w": (1,)}).add(torch.zeros(1), 0)
