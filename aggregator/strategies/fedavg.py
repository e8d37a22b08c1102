"""FedAvg's server step (McMahan et al. 2017): the mean delta, scaled by the server learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from keyboard_model.weights import Tensors


@dataclass(frozen=True)
class FedAvg:
    """Server step of Federated Averaging; server_learning_rate 1.0 is plain FedAvg."""

    server_learning_rate: float = 1.0

    def init(self, global_state: Tensors) -> Tensors:
        return {}

    def apply(self, global_state: Tensors, state: Tensors, mean_delta: Tensors) -> tuple[Tensors, Tensors]:
        return {name: w + self.server_learning_rate * mean_delta[name] for name, w in global_state.items()}, state
