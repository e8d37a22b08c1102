"""Federated Averaging (McMahan et al. 2017): the new global model is the old one plus
the example-weighted mean of the clients' deltas.

The sum is kept as a running total (`UpdateSum`), so the server's memory does not
grow with the number of updates in a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keyboard_model.weights import Tensors


class UpdateSum:
    """Running example-weighted sum of model deltas."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        # float64 so that summing hundreds of updates loses nothing to rounding.
        self.weighted_sum = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Tensors, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"an update's weight must be positive, got {weight}")
        for name, total in self.weighted_sum.items():
            total.add_(delta[name].double(), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> Tensors:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {name: (total / self.total_weight).float() for name, total in self.weighted_sum.items()}


def weighted_mean(deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Example-weighted mean of deltas: sum_k n_k * delta_k / sum_k n_k."""
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("need one weight per delta, and at least one delta")
    total = UpdateSum({name: tuple(t.shape) for name, t in deltas[0].items()})
    for delta, weight in zip(deltas, weights):
        total.add(delta, weight)
    return total.mean()


@dataclass(frozen=True)
class FedAvg:
    """Server step of Federated Averaging; server_learning_rate 1.0 is plain FedAvg."""

    server_learning_rate: float = 1.0

    def apply(self, global_state: Tensors, mean_delta: Tensors) -> Tensors:
        return {name: w + self.server_learning_rate * mean_delta[name] for name, w in global_state.items()}
