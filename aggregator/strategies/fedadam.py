"""FedAdam (Reddi et al. 2021): Adam on the server, its second moment an exponential moving average of Δ²."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aggregator.strategies.adaptive import AdaptiveServerOptimizer


@dataclass(frozen=True)
class FedAdam(AdaptiveServerOptimizer):
    server_learning_rate: float = 0.01
    beta2: float = 0.99

    def second_moment(self, v: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * squared_delta
