"""Server optimisers: each step against numbers worked out by hand from its paper's formulas, and their state
across a restart."""

import math
from dataclasses import replace

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.global_model import GlobalModel
from aggregator.storage import open_storage
from aggregator.strategies import STRATEGIES, Averaged, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, make_strategy
from aggregator.strategies.averaged import served_weights
from keyboard_model.weights import model_from_bytes

# Two rounds' mean deltas of a two-weight model starting at (0, 1). The second round's first coordinate is small
# next to the first round's, so a second moment that tracks it must move down; its second coordinate is large.
START = (0.0, 1.0)
DELTAS = ((0.2, -0.1), (0.01, 0.3))


def two_steps(strategy) -> tuple[list[float], list[float]]:
    """The weights after each of the two rounds, in float64 so that the hand-computed values compare tightly."""
    w = {"w": torch.tensor(START, dtype=torch.float64)}
    state = strategy.init(w)
    after = []
    for delta in DELTAS:
        w, state = strategy.apply(w, state, {"w": torch.tensor(delta, dtype=torch.float64)})
        after.append(w["w"].tolist())
    return after[0], after[1]


def test_fedavg_applies_the_mean_delta_scaled_by_the_server_learning_rate():
    strategy = FedAvg(server_learning_rate=0.5)
    w = {"w": torch.tensor([1.0])}
    new, state = strategy.apply(w, strategy.init(w), {"w": torch.tensor([2.0])})
    torch.testing.assert_close(new["w"], torch.tensor([2.0]))
    assert state == {}


def test_fedavgm_accumulates_nesterov_momentum():
    strategy = FedAvgM(server_learning_rate=1.0, momentum=0.9)
    w = {"w": torch.tensor([0.0])}
    state = strategy.init(w)
    delta = {"w": torch.tensor([1.0])}
    w, state = strategy.apply(w, state, delta)  # velocity 1, step 1 + 0.9 * 1
    torch.testing.assert_close(w["w"], torch.tensor([1.9]))
    w, state = strategy.apply(w, state, delta)  # velocity 1.9, step 1 + 0.9 * 1.9
    torch.testing.assert_close(w["w"], torch.tensor([1.9 + 2.71]))


@pytest.mark.parametrize("strategy, second_v", [
    # Adam: v = 0.99 v + 0.01 Δ² = 0.99 (4e-4, 1e-4) + 0.01 (1e-4, 0.09).
    (FedAdam(server_learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3), (3.97e-4, 9.99e-4)),
    # Yogi: v = v - 0.01 Δ² sign(v - Δ²). First coordinate: v = 4e-4 > Δ² = 1e-4, so it moves down by 0.01 * 1e-4,
    # less than Adam's; second: v = 1e-4 < Δ² = 0.09, so it moves up by 0.01 * 0.09.
    (FedYogi(server_learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3), (3.99e-4, 1.0e-3)),
], ids=["fedadam", "fedyogi"])
def test_fedadam_and_fedyogi_follow_algorithm_2(strategy, second_v):
    first, second = two_steps(strategy)
    # Round 1, the same for both from zero: m = 0.1 Δ = (0.02, -0.01); v = 0.01 Δ² = (4e-4, 1e-4),
    # √v = (0.02, 0.01).
    w1 = (0.0 + 0.1 * 0.02 / (0.02 + 1e-3), 1.0 + 0.1 * -0.01 / (0.01 + 1e-3))
    assert first == pytest.approx(w1, rel=1e-12)
    # Round 2: m = 0.9 (0.02, -0.01) + 0.1 (0.01, 0.3) = (0.019, 0.021).
    w2 = (w1[0] + 0.1 * 0.019 / (math.sqrt(second_v[0]) + 1e-3), w1[1] + 0.1 * 0.021 / (math.sqrt(second_v[1]) + 1e-3))
    assert second == pytest.approx(w2, rel=1e-12)


def test_fedadagrad_follows_algorithm_2():
    first, second = two_steps(FedAdagrad(server_learning_rate=0.1, beta1=0.5, epsilon=1e-3))
    # Round 1: m = 0.5 Δ = (0.1, -0.05); v = Δ² = (0.04, 0.01), √v = (0.2, 0.1).
    w1 = (0.0 + 0.1 * 0.1 / (0.2 + 1e-3), 1.0 + 0.1 * -0.05 / (0.1 + 1e-3))
    assert first == pytest.approx(w1, rel=1e-12)
    # Round 2: m = 0.5 (0.1, -0.05) + 0.5 (0.01, 0.3) = (0.055, 0.125); v = (0.04 + 1e-4, 0.01 + 0.09).
    w2 = (w1[0] + 0.1 * 0.055 / (math.sqrt(0.0401) + 1e-3), w1[1] + 0.1 * 0.125 / (math.sqrt(0.1) + 1e-3))
    assert second == pytest.approx(w2, rel=1e-12)


def test_fedadagrad_has_no_momentum_by_default():
    # As Reddi et al. ran it: each step is the round's own delta, normalised by the root of all squared deltas.
    first, second = two_steps(FedAdagrad(server_learning_rate=0.1, epsilon=1e-3))
    w1 = (0.0 + 0.1 * 0.2 / (0.2 + 1e-3), 1.0 + 0.1 * -0.1 / (0.1 + 1e-3))
    assert first == pytest.approx(w1, rel=1e-12)
    w2 = (w1[0] + 0.1 * 0.01 / (math.sqrt(0.0401) + 1e-3), w1[1] + 0.1 * 0.3 / (math.sqrt(0.1) + 1e-3))
    assert second == pytest.approx(w2, rel=1e-12)


def test_strategies_are_chosen_by_name_with_their_own_default_rates():
    assert isinstance(make_strategy("fedadam", 0.02), FedAdam)
    assert make_strategy("fedavgm", 0.5).server_learning_rate == 0.5
    assert isinstance(make_strategy("fedyogi"), FedYogi) and isinstance(make_strategy("fedadagrad"), FedAdagrad)
    assert make_strategy("fedyogi").server_learning_rate == FedYogi().server_learning_rate
    with pytest.raises(ValueError, match="fedavg"):
        make_strategy("sgd", 1.0)


@pytest.mark.parametrize("average_decay", [0.0, 0.9])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_step_changes_neither_the_weights_nor_the_state_it_is_given(name, average_decay):
    # A step that updated its moments (or the served average) in place would apply them twice when a failed commit
    # is retried.
    strategy = make_strategy(name, average_decay=average_decay)
    w = {"w": torch.tensor([0.5, -1.0])}
    state = strategy.init(w)
    if average_decay:  # a state that already holds an average
        _, state = strategy.apply(w, state, {"w": torch.tensor([0.1, 0.1])})
    state, w_before = {k: v.clone() for k, v in state.items()}, {k: v.clone() for k, v in w.items()}
    first, first_state = strategy.apply(w, state, {"w": torch.tensor([1.0, 2.0])})
    again, again_state = strategy.apply(w, state, {"w": torch.tensor([1.0, 2.0])})
    torch.testing.assert_close(w, w_before)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first_state, again_state)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_optimiser_state_survives_a_restart_and_the_next_step_is_the_same(
    tmp_path, small_tokenizer_path, small_model_config, name
):
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, server_optimizer=name)
    generator = torch.Generator().manual_seed(0)

    def delta(like) -> dict:
        return {n: 0.01 * torch.randn(t.shape, generator=generator) for n, t in like.items()}

    def record(round_number: int) -> dict:
        return {"round": round_number, "status": "closed", "started_at": 0.0, "closed_at": 1.0}

    storage = open_storage(config.db_path)
    running = GlobalModel(config, storage)
    running.commit_step(delta(running.state), record(1))
    state_after_one = {k: v.clone() for k, v in running.optimizer_state.items()}
    second = delta(running.state)
    running.commit_step(second, record(2))
    storage.close()

    restarted_storage = open_storage(config.db_path)
    restarted = GlobalModel(config, restarted_storage)
    assert restarted.version == 2
    assert set(restarted.optimizer_state) == set(running.optimizer_state)
    assert all(torch.equal(restarted.optimizer_state[k], v) for k, v in running.optimizer_state.items())
    # The state moved (the served average does under every optimiser): a restart that lost it would start the
    # moments and the average again.
    assert any(not torch.equal(state_after_one[k], v) for k, v in restarted.optimizer_state.items())
    assert restarted.served() == running.served() != running.bytes
    third = delta(running.state)
    expected, _ = running.strategy.apply(running.state, running.optimizer_state, third)
    restarted.commit_step(third, record(3))
    assert all(torch.equal(restarted.state[k], v) for k, v in expected.items())
    restarted_storage.close()


def test_the_served_average_weights_each_model_by_decay_to_its_age_and_leaves_the_initial_model_out():
    strategy = Averaged(FedAvg(server_learning_rate=1.0), decay=0.5)
    w = {"w": torch.tensor(START, dtype=torch.float64)}
    state = strategy.init(w)
    assert served_weights(w, state) is w  # no step yet: the global model is served
    models = []
    for delta in DELTAS:
        w, state = strategy.apply(w, state, {"w": torch.tensor(delta, dtype=torch.float64)})
        models.append(w["w"])
    # Phones train from the optimiser's own models: (0.2, 0.9), then (0.21, 1.2).
    torch.testing.assert_close(models[1], torch.tensor((0.21, 1.2), dtype=torch.float64))
    # Weights 0.5 and 1 for the models of steps 1 and 2, normalised; the start (0, 1) has none.
    expected = (0.5 * torch.tensor((0.2, 0.9), dtype=torch.float64) + models[1]) / 1.5
    torch.testing.assert_close(served_weights(w, state)["w"], expected)


def test_an_aggregator_without_averaging_serves_its_global_model_even_from_a_database_with_an_average(
    tmp_path, small_tokenizer_path, small_model_config
):
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                              model=small_model_config, server_optimizer="fedavg")
    storage = open_storage(config.db_path)
    running = GlobalModel(config, storage)
    for round_number in (1, 2):
        step = {n: torch.full_like(t, 0.01 * round_number) for n, t in running.state.items()}
        running.commit_step(step, {"round": round_number, "status": "closed", "started_at": 0.0, "closed_at": 1.0})
    averaged = model_from_bytes(running.served())[0].state_dict()
    assert any(not torch.equal(averaged[n], t) for n, t in running.state.items())
    storage.close()

    storage = open_storage(config.db_path)
    plain = GlobalModel(replace(config, serving_average=0.0), storage)
    assert plain.served() == plain.bytes
    storage.close()
