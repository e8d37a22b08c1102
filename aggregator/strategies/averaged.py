"""The served model: an exponentially weighted average of the global models (Polyak averaging).

Phones train from the global model as the server optimiser leaves it each round; keyboards suggest with an
average of the recent global models, which is what `GET /model/served` answers. Server momentum makes each
round's model overshoot a little in the direction of that round's ten phones; averaging cancels much of it.
In the ten-minute main job the average of about the last twenty models (decay 0.95) scored 11.82% top-1 where the
last model scored 10.93% (README, "Results").

The average is of models the aggregator released anyway, so it costs no privacy: under differential privacy it
is post-processing, and under secure aggregation the server sees only the sums it already saw.

`Averaged` wraps a server optimiser and keeps the average in its state, which is committed with every model
version (so it survives a restart, and a round whose commit fails leaves it as it was). The weight of the
model of step t is proportional to decay**(T - t), normalised over the steps taken so far, so the first step's
average is that step's model: the random initial model is never in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from keyboard_model.weights import Tensors

if TYPE_CHECKING:
    from aggregator.strategies import Strategy

AVERAGE = "average/"
STEPS = "average_steps"


@dataclass(frozen=True)
class Averaged:
    """`inner`'s steps, and the exponentially weighted average of the models they make."""

    inner: Strategy
    decay: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"the average's decay must be in (0, 1), got {self.decay}")

    @property
    def server_learning_rate(self) -> float:
        return self.inner.server_learning_rate

    def init(self, global_state: Tensors) -> Tensors:
        # No average yet: the served model is the global one until the first step.
        return self.inner.init(global_state)

    def apply(self, global_state: Tensors, state: Tensors, mean_delta: Tensors) -> tuple[Tensors, Tensors]:
        inner_state = {key: value for key, value in state.items() if not key.startswith(AVERAGE) and key != STEPS}
        new_weights, new_inner_state = self.inner.apply(global_state, inner_state, mean_delta)
        # A database written without averaging has no steps: its average starts at this step.
        steps = int(state[STEPS].item()) + 1 if STEPS in state else 1
        weight = (1.0 - self.decay) / (1.0 - self.decay**steps)
        average = {}
        for name, new in new_weights.items():
            previous = state.get(AVERAGE + name, new)
            average[AVERAGE + name] = previous + weight * (new - previous)
        return new_weights, {**new_inner_state, **average, STEPS: torch.tensor(float(steps))}


def served_weights(global_state: Tensors, state: Tensors) -> Tensors:
    """The weights keyboards should suggest with: the average in an optimiser's `state`, if it keeps one, else the
    global model's."""
    if STEPS not in state:
        return global_state
    return {name: state[AVERAGE + name] for name in global_state}
