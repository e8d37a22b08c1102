"""FedAdagrad (Reddi et al. 2021): Adagrad on the server, its second moment the sum of every round's Δ², so each
coordinate's steps shrink as its deltas add up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aggregator.strategies.adaptive import AdaptiveServerOptimizer


@dataclass(frozen=True)
class FedAdagrad(AdaptiveServerOptimizer):
    # Its first step moves every weight by about this much (v is then Δ² itself), as FedAdam's does, but its later
    # steps shrink (v only grows), so it wants a larger rate than FedAdam's 0.01, though not much larger: on the
    # default fleet from a random start (60 rounds), 0.1 blew the model up with its first step, 0.03 reached 7.0%
    # top-1 and 0.01 6.2%.
    server_learning_rate: float = 0.03
    # No momentum, as Reddi et al. ran it (Algorithm 2 allows β1 > 0).
    beta1: float = 0.0

    def second_moment(self, v: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        return v + squared_delta
