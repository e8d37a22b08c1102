"""The coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-robust distributed learning"): for each value,
drop the largest and the smallest `floor(trim_fraction x n)` of the round's n updates' and average the rest, so up to
that many updates, whatever they hold, cannot move it outside the range of the honest ones'. Unweighted, as in the
paper; it keeps the round's updates (`kept.py` says what that costs)."""

from __future__ import annotations

import functools
import math

import torch

from aggregator.aggregation import Shapes
from aggregator.config import AggregatorConfig
from aggregator.rules.kept import KeptUpdates


def trimmed_mean(updates: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """The mean of each column of `updates` (one update a row) without its `floor(trim_fraction x rows)` largest and
    smallest values; `trim_fraction` in [0, 0.5), so at least one value of each column is kept."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    trimmed = math.floor(trim_fraction * updates.shape[0])
    ordered = updates.sort(dim=0).values
    return ordered[trimmed : updates.shape[0] - trimmed].mean(dim=0)


def trimmed_mean_rule(shapes: Shapes, config: AggregatorConfig) -> KeptUpdates:
    return KeptUpdates(shapes, functools.partial(trimmed_mean, trim_fraction=config.trim_fraction))
