"""The adaptive server optimisers of Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2).

With the round's mean delta Δ as the negative pseudo-gradient, every one of them keeps
    m ← β1·m + (1 − β1)·Δ
and a second moment v, updated in its own way (`second_moment`), and steps
    x ← x + η·m / (√v + τ).
τ, the "adaptivity", is large next to Adam's usual 1e-8, so that tiny deltas are not blown up into
full-size steps. There is no bias correction, as in the paper. m and v start at zero (the paper's
analysis takes v₋₁ ≥ τ²; with τ in the denominator the first step is bounded either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aggregator.strategies.state import saved
from keyboard_model.weights import Tensors


@dataclass(frozen=True)
class AdaptiveServerOptimizer:
    server_learning_rate: float
    beta1: float = 0.9
    epsilon: float = 1e-3  # τ

    def init(self, global_state: Tensors) -> Tensors:
        return {f"{moment}/{name}": torch.zeros_like(w) for moment in ("m", "v") for name, w in global_state.items()}

    def apply(self, global_state: Tensors, state: Tensors, mean_delta: Tensors) -> tuple[Tensors, Tensors]:
        new_weights, new_state = {}, {}
        for name, w in global_state.items():
            delta = mean_delta[name]
            m = self.beta1 * saved(state, f"m/{name}", w) + (1 - self.beta1) * delta
            v = self.second_moment(saved(state, f"v/{name}", w), delta * delta)
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
            new_weights[name] = w + self.server_learning_rate * m / (v.sqrt() + self.epsilon)
        return new_weights, new_state

    def second_moment(self, v: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        """The new second moment, from the last one and the square of the round's mean delta."""
        raise NotImplementedError
