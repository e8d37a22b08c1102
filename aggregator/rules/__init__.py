"""Aggregation rules (Flower's sense): how a plain round's updates become the one mean delta the server optimiser
steps with (`aggregator/strategies/`), one module each.

- `mean` (`aggregator/aggregation.py` `WeightedMean`): FedAvg's example-weighted mean (McMahan et al. 2017), a
  running sum;
- `median` (`median.py`): the coordinate-wise median (Yin et al. 2018);
- `trimmed_mean` (`trimmed_mean.py`): the coordinate-wise trimmed mean (Yin et al. 2018).

A rule is told each checked update as it arrives (`Aggregation.add`) and releases the round's aggregate when it
closes (`Aggregation.release`). It chooses how plain rounds aggregate only: a private round's updates are clipped and
their noised sum released by its privacy mechanism, and a secure round's server sees only their sum, which neither
robust rule can use; `AggregatorConfig` refuses any rule but `mean` with either.

A new rule is a module with a factory `(shapes, config) -> Aggregation`, and one line in `RULES`. The table names
each factory by where it lives rather than importing it, so that the command line lists the rules without importing
torch (tests/test_cli_startup.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aggregator.aggregation import Aggregation, Shapes
    from aggregator.config import AggregatorConfig

    RuleFactory = Callable[[Shapes, AggregatorConfig], Aggregation]

# name -> "module:factory"
RULES: dict[str, str] = {
    "mean": "aggregator.rules.mean:weighted_mean",
    "median": "aggregator.rules.median:median_rule",
    "trimmed_mean": "aggregator.rules.trimmed_mean:trimmed_mean_rule",
}
# The rule of private and secure rounds too: the only one that works on a sum.
DEFAULT_RULE = "mean"


def make_rule(name: str, shapes: Shapes, config: AggregatorConfig) -> Aggregation:
    """A fresh aggregation of the rule named `name`, for one round of a model of these shapes."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {sorted(RULES)}")
    module, factory = RULES[name].split(":")
    make: RuleFactory = getattr(importlib.import_module(module), factory)
    return make(shapes, config)
