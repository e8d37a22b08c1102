"""FedYogi (Reddi et al. 2021): Yogi on the server (Zaheer et al. 2018). Its second moment moves towards Δ² by
at most (1 − β2)·Δ² a round, so one round with a large delta cannot shrink the steps of many rounds after it as
Adam's moving average does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aggregator.strategies.adaptive import AdaptiveServerOptimizer


@dataclass(frozen=True)
class FedYogi(AdaptiveServerOptimizer):
    # FedAdam's: from zero moments their first step is the same, and Reddi et al. tuned both to the same server
    # rates on their text tasks.
    server_learning_rate: float = 0.01
    beta2: float = 0.99

    def second_moment(self, v: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * squared_delta * torch.sign(v - squared_delta)
