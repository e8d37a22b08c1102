import pytest
import torch

from aggregator.strategy import STRATEGIES, FedAdam, FedAvg, FedAvgM, UpdateSum, make_strategy, weighted_mean


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
    strategy = FedAvg(server_learning_rate=0.5)
    w = {"w": torch.tensor([1.0])}
    new, state = strategy.apply(w, strategy.init(w), {"w": torch.tensor([2.0])})
    torch.testing.assert_close(new["w"], torch.tensor([2.0]))
    assert state == {}


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
    state = strategy.init(w)
    delta = {"w": torch.tensor([1.0])}
    w, state = strategy.apply(w, state, delta)  # velocity 1, step 1 + 0.9 * 1
    torch.testing.assert_close(w["w"], torch.tensor([1.9]))
    w, state = strategy.apply(w, state, delta)  # velocity 1.9, step 1 + 0.9 * 1.9
    torch.testing.assert_close(w["w"], torch.tensor([1.9 + 2.71]))


def test_fedadam_steps_by_the_normalised_mean_delta():
    strategy = FedAdam(server_learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3)
    w = {"w": torch.tensor([0.0, 0.0])}
    w, state = strategy.apply(w, strategy.init(w), {"w": torch.tensor([2.0, -0.5])})
    # m = 0.1 * delta, v = 0.01 * delta^2: the step is 0.1 * 0.1 d / (0.1 |d| + 0.001).
    expected = 0.1 * torch.tensor([0.2 / (0.2 + 1e-3), -0.05 / (0.05 + 1e-3)])
    torch.testing.assert_close(w["w"], expected)
    second, _ = strategy.apply(w, state, {"w": torch.tensor([2.0, -0.5])})
    m = 0.9 * 0.2 + 0.1 * 2.0
    v = 0.99 * 0.04 + 0.01 * 4.0
    torch.testing.assert_close(second["w"][0], w["w"][0] + 0.1 * m / (v**0.5 + 1e-3))


def test_strategies_are_chosen_by_name():
    assert isinstance(make_strategy("fedadam", 0.02), FedAdam)
    assert make_strategy("fedavgm", 0.5).server_learning_rate == 0.5
    with pytest.raises(ValueError, match="fedavg"):
        make_strategy("sgd", 1.0)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_step_changes_neither_the_weights_nor_the_state_it_is_given(name):
    # A step that updated its moments in place would apply them twice when a failed commit is retried.
    strategy = make_strategy(name)
    w = {"w": torch.tensor([0.5, -1.0])}
    state = strategy.init(w)
    state, w_before = {k: v.clone() for k, v in state.items()}, {k: v.clone() for k, v in w.items()}
    first, first_state = strategy.apply(w, state, {"w": torch.tensor([1.0, 2.0])})
    again, again_state = strategy.apply(w, state, {"w": torch.tensor([1.0, 2.0])})
    torch.testing.assert_close(w, w_before)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first_state, again_state)
