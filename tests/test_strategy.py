import pytest
import torch

from aggregator.strategy import FedAdam, FedAvg, FedAvgM, UpdateSum, make_strategy, weighted_mean


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


def test_fedavgm_accumulates_nesterov_momentum():
    strategy = FedAvgM(server_learning_rate=1.0, momentum=0.9)
    w = {"w": torch.tensor([0.0])}
    delta = {"w": torch.tensor([1.0])}
    w = strategy.apply(w, delta)  # velocity 1, step 1 + 0.9 * 1
    torch.testing.assert_close(w["w"], torch.tensor([1.9]))
    w = strategy.apply(w, delta)  # velocity 1.9, step 1 + 0.9 * 1.9
    torch.testing.assert_close(w["w"], torch.tensor([1.9 + 2.71]))


def test_fedadam_steps_by_the_normalised_mean_delta():
    strategy = FedAdam(server_learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3)
    w = strategy.apply({"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, -0.5])})
    # m = 0.1 * delta, v = 0.01 * delta^2: the step is 0.1 * 0.1 d / (0.1 |d| + 0.001).
    expected = 0.1 * torch.tensor([0.2 / (0.2 + 1e-3), -0.05 / (0.05 + 1e-3)])
    torch.testing.assert_close(w["w"], expected)
    second = strategy.apply(w, {"w": torch.tensor([2.0, -0.5])})
    m = 0.9 * 0.2 + 0.1 * 2.0
    v = 0.99 * 0.04 + 0.01 * 4.0
    torch.testing.assert_close(second["w"][0], w["w"][0] + 0.1 * m / (v**0.5 + 1e-3))


def test_strategies_are_chosen_by_name():
    assert isinstance(make_strategy("fedadam", 0.02), FedAdam)
    assert make_strategy("fedavgm", 0.5).server_learning_rate == 0.5
    with pytest.raises(ValueError, match="fedavg"):
        make_strategy("sgd", 1.0)
