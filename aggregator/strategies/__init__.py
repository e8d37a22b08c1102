"""Server optimisers: how a round's mean delta becomes a step of the global model, one module each.

A strategy treats the example-weighted mean of the clients' deltas (`aggregator/aggregation.py`) as a
negative gradient and steps the model with it. Each is a pure step, as in Optax and FedJAX:
`init(params) -> state` and `apply(params, state, mean_delta) -> (params, state)`. Nothing changes in
place, so the round manager commits the new model and the new state together, and a close that fails
before its commit leaves both as they were. The state is a dict of tensors, saved with each model
version, so it survives a restart.

- `FedAvg` (`fedavg.py`): add the mean delta, scaled by the server learning rate (McMahan et al. 2017);
- `FedAvgM` (`fedavgm.py`): SGD with (Nesterov) momentum on it (Hsu et al. 2019);
- `FedAdam`, `FedYogi`, `FedAdagrad` (`fedadam.py`, `fedyogi.py`, `fedadagrad.py`): Reddi et al. 2021's
  adaptive server optimisers, which differ only in how their second moment moves (`adaptive.py`);
- `Averaged` (`averaged.py`) wraps any of them and keeps an average of the models they make: the served model.

A new one is a frozen dataclass with `server_learning_rate`, `init` and `apply`, named in `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aggregator.strategies.averaged import Averaged
from aggregator.strategies.fedadagrad import FedAdagrad
from aggregator.strategies.fedadam import FedAdam
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedavgm import FedAvgM
from aggregator.strategies.fedyogi import FedYogi
from keyboard_model.weights import Tensors


class Strategy(Protocol):
    @property  # read-only, as a frozen dataclass's fields are
    def server_learning_rate(self) -> float: ...

    def init(self, global_state: Tensors) -> Tensors:
        """What the optimiser carries from round to round, saved with each model version."""

    def apply(self, global_state: Tensors, state: Tensors, mean_delta: Tensors) -> tuple[Tensors, Tensors]:
        """(the stepped weights, the new state); neither argument is changed."""


# Each called with no argument or with server_learning_rate=.
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
}


def make_strategy(name: str, server_learning_rate: float | None = None, average_decay: float = 0.0) -> Strategy:
    """The named strategy, with its own default learning rate unless one is given, averaging the models it makes
    with this decay (0: no average; the served model is the global one)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown server optimiser {name!r}; choose one of {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name]() if server_learning_rate is None else STRATEGIES[name](
        server_learning_rate=server_learning_rate)
    return Averaged(strategy, average_decay) if average_decay else strategy
