"""FedAvg's rule (McMahan et al. 2017): each update weighted by the examples it trained on, summed as it arrives, so
memory does not grow with the round (`aggregator/aggregation.py` `WeightedMean`)."""

from __future__ import annotations

from aggregator.aggregation import Shapes, WeightedMean
from aggregator.config import AggregatorConfig


def weighted_mean(shapes: Shapes, config: AggregatorConfig) -> WeightedMean:
    return WeightedMean(shapes)
