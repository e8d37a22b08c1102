"""Aggregation rules are chosen from a table (aggregator/rules/): the robust ones compute what Yin et al. 2018 define,
resist a poisoning phone where FedAvg does not, are refused where rounds aggregate a sum, and a rule registered by a
test module runs a round of the real aggregator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aggregator.aggregation import Release, Shapes
from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundManager
from aggregator.rules import RULES, make_rule
from aggregator.rules.median import coordinate_median
from aggregator.rules.trimmed_mean import trimmed_mean
from aggregator.storage import open_storage
from keyboard_model.flat import views
from keyboard_model.update_codec import encode_update
from keyboard_model.weights import Tensors

UPDATES = torch.tensor([[1.0, 9.0, -4.0], [3.0, 2.0, 0.0], [2.0, -7.0, 8.0], [100.0, 5.0, 1.0]])


def test_the_coordinate_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones():
    assert coordinate_median(UPDATES[:3]).tolist() == [2.0, 2.0, 0.0]
    assert coordinate_median(UPDATES).tolist() == [2.5, 3.5, 0.5]


def test_the_trimmed_mean_drops_the_same_number_of_values_from_each_end_of_each_coordinate():
    # floor(0.25 x 4) = 1 from each end: the mean of the two middle values.
    assert trimmed_mean(UPDATES, 0.25).tolist() == [2.5, 3.5, 0.5]
    # floor(0.2 x 4) = 0: the plain mean.
    assert trimmed_mean(UPDATES, 0.2).tolist() == [26.5, 2.25, 1.25]
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(UPDATES, 0.5)


@pytest.mark.parametrize("name, expected", [("median", [2.5, 3.5, 0.5]), ("trimmed_mean", [2.5, 3.5, 0.5])])
def test_a_robust_rule_counts_each_update_once_whatever_examples_it_claims(name, expected, tmp_path):
    config = AggregatorConfig(tmp_path / "db.sqlite", tmp_path / "tokenizer.json", aggregation_rule=name,
                              trim_fraction=0.25)
    rule = make_rule(name, {"w": (1,), "v": (2,)}, config)
    for row, examples in zip(UPDATES, (1, 1000, 1, 1)):
        rule.add(row, examples)
    release = rule.release(4)
    assert release.mean_delta["w"].tolist() == expected[:1] and release.mean_delta["v"].tolist() == expected[1:]


@pytest.mark.parametrize("privacy", [{"secure_aggregation": True}, {"noise_multiplier": 1.0}])
@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_a_robust_rule_is_refused_for_rounds_that_aggregate_a_sum(name, privacy, tmp_path):
    with pytest.raises(ValueError, match="is for plain rounds"):
        AggregatorConfig(tmp_path / "db.sqlite", tmp_path / "tokenizer.json", aggregation_rule=name, **privacy)


def test_an_unknown_rule_is_refused_with_the_table_s_names(tmp_path):
    with pytest.raises(ValueError, match="mean.*median.*trimmed_mean"):
        AggregatorConfig(tmp_path / "db.sqlite", tmp_path / "tokenizer.json", aggregation_rule="krum")


def manager(tmp_path: Path, tokenizer: Path, model, rule: str, goal: int) -> RoundManager:
    # FedAvg's server step at rate 1: the model moves by exactly the round's aggregate.
    config = AggregatorConfig(db_path=tmp_path / rule / "db.sqlite", tokenizer_path=tokenizer, model=model,
                              clients_per_round=goal, over_selection=1.0, selection_window_s=0.0,
                              server_optimizer="fedavg", serving_average=0.0, aggregation_rule=rule)
    return RoundManager(config, open_storage(config.db_path))


def round_step(rounds: RoundManager, deltas: list[Tensors]) -> Tensors:
    """Run one round in which each of len(deltas) new phones uploads its delta (40 examples each); how it moved the
    global model."""
    before = {name: t.clone() for name, t in rounds.model.state.items()}
    phones = [rounds.authenticate(rounds.enrol()[1]) for _ in deltas]
    for phone, delta in zip(phones, deltas):
        decision = rounds.checkin(phone)
        assert decision.action == "train"
        rounds.submit(decision.round, decision.upload_token, encode_update(delta, 40, "none"))
    assert rounds.storage.recent_rounds(1)[0]["status"] == "closed"
    return {name: rounds.model.state[name] - before[name] for name in before}


def distance(a: Tensors, b: Tensors) -> float:
    return float(sum(((a[name] - b[name]) ** 2).sum() for name in a)) ** 0.5


def honest_deltas(shapes: Shapes, phones: int) -> tuple[list[Tensors], Tensors]:
    """Phones that agree on a direction, each with its own noise a tenth of its size; and the mean of their updates."""
    generator = torch.Generator().manual_seed(0)
    direction = {name: torch.randn(shape, generator=generator) * 1e-4 for name, shape in shapes.items()}
    deltas = [{name: t * (1 + 0.1 * torch.randn(t.shape, generator=generator)) for name, t in direction.items()}
              for _ in range(phones)]
    return deltas, {name: sum(d[name] for d in deltas) / phones for name in shapes}


@pytest.mark.parametrize("rule, moved_far", [("mean", True), ("median", False), ("trimmed_mean", False)])
def test_one_poisoning_phone_moves_fedavg_far_and_the_robust_rules_hardly(
    rule, moved_far, tmp_path, small_tokenizer_path, small_model_config
):
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, rule, goal=10)
    honest, honest_mean = honest_deltas(rounds.model.shapes, 9)
    size = distance(honest_mean, {name: torch.zeros_like(t) for name, t in honest_mean.items()})
    # Its own update scaled 1000 times: still within the aggregator's norm bound, so it is accepted.
    poisoned = {name: 1000 * t for name, t in honest[0].items()}
    step = round_step(rounds, [*honest, poisoned])
    if moved_far:
        assert distance(step, honest_mean) > 50 * size
    else:
        assert distance(step, honest_mean) < 0.2 * size


class Halved:
    """A toy rule: half the plain mean, kept as a running sum."""

    def __init__(self, shapes: Shapes, config: AggregatorConfig) -> None:
        self._shapes, self._sum, self._count = shapes, None, 0

    def add(self, delta: torch.Tensor, num_examples: int, within_clip: bool | None = None) -> None:
        self._sum = delta.clone() if self._sum is None else self._sum + delta
        self._count += 1

    def release(self, reported: int) -> Release:
        return Release(views(self._sum / (2 * self._count), self._shapes))


def test_a_rule_registered_with_one_line_runs_a_round_of_the_real_aggregator(
    monkeypatch, tmp_path, small_tokenizer_path, small_model_config
):
    monkeypatch.setitem(RULES, "halved", f"{__name__}:Halved")
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, "halved", goal=2)
    deltas = [{name: torch.full(shape, value) for name, shape in rounds.model.shapes.items()} for value in (0.01, 0.03)]
    step = round_step(rounds, deltas)
    assert all(torch.allclose(t, torch.full_like(t, 0.01), atol=1e-6, rtol=0) for t in step.values())
