"""The coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning"): each value of the
aggregate is the median of that value over the round's updates, so fewer than half the updates, whatever they
hold, cannot move it outside the range of the honest ones'. Unweighted, as in the paper; it keeps the round's
updates (`kept.py` says what that costs)."""

from __future__ import annotations

import torch

from aggregator.aggregation import Shapes
from aggregator.config import AggregatorConfig
from aggregator.rules.kept import KeptUpdates


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """The median of each column of `updates` (one update a row); with an even number of rows, the mean of the two
    middle values (torch.median would take the lower one, biased towards negative values)."""
    ordered = updates.sort(dim=0).values
    middle = updates.shape[0] // 2
    if updates.shape[0] % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def median_rule(shapes: Shapes, config: AggregatorConfig) -> KeptUpdates:
    return KeptUpdates(shapes, coordinate_median)
