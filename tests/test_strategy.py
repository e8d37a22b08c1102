import pytest
import torch

from aggregator.strategy import FedAvg, UpdateSum, weighted_mean


def test_weighted_mean_weights_by_example_count():
    deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    mean = weighted_mean(deltas, [3, 1])
    torch.testing.assert_close(mean["w"], torch.tensor([0.75, 1.0]))


def test_streaming_sum_equals_the_batch_mean():
    generator = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(3, 2, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(7)]
    weights = [5, 1, 9, 2, 2, 40, 3]
    total = UpdateSum({"a": (3, 2), "b": (5,)})
    for delta, weight in zip(deltas, weights):
        total.add(delta, weight)
    expected = sum(w * d["a"].double() for d, w in zip(deltas, weights)) / sum(weights)
    torch.testing.assert_close(total.mean()["a"], expected.float())
    assert total.count == 7 and total.total_weight == sum(weights)


def test_fedavg_applies_the_mean_delta_scaled_by_the_server_learning_rate():
    new = FedAvg(server_learning_rate=0.5).apply({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    torch.testing.assert_close(new["w"], torch.tensor([2.0]))


def test_empty_or_unweighted_updates_are_refused():
    with pytest.raises(ValueError):
        UpdateSum({"w": (1,)}).mean()
    with pytest.raises(ValueError):
        UpdateSum({"w": (1,)}).add({"w": torch.zeros(1)}, 0)
    with pytest.raises(ValueError):
        weighted_mean([], [])
