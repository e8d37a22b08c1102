"""The round's updates, kept: what a rule needs when its aggregate is not a running sum (a median, a trimmed mean).

Memory: every update of the round, a float32 row of the model's size each (10 updates of a 1.3M-parameter model:
52 MB), held until the round closes; a running sum holds one."""

from __future__ import annotations

from collections.abc import Callable

import torch

from aggregator.aggregation import Release, Shapes
from keyboard_model.flat import views

# A pure function from the round's updates, one row each (reported x parameters), to one aggregate row.
Combine = Callable[[torch.Tensor], torch.Tensor]


class KeptUpdates:
    """Keeps each update and releases `combine` of them all. Each update counts once, whatever examples it claims:
    robust rules (Yin et al. 2018) are unweighted, and a claimed count is one more lever for a lying phone."""

    def __init__(self, shapes: Shapes, combine: Combine) -> None:
        self._shapes = shapes
        self._combine = combine
        self._updates: list[torch.Tensor] = []

    def add(self, delta: torch.Tensor, num_examples: int, within_clip: bool | None = None) -> None:
        """`delta`: a flat update (`keyboard_model/flat.py`); `num_examples` is not used (see the class)."""
        self._updates.append(delta.to(torch.float32))

    def release(self, reported: int) -> Release:
        if not self._updates:
            raise ValueError("no updates to aggregate")
        return Release(views(self._combine(torch.stack(self._updates)), self._shapes))
