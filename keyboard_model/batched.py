"""A model's features with another phone's weights, batched over phones by the vectorised executor.

The default `Architecture.batched_features` (keyboard_model/architecture.py): right for a model written in plain
torch operations, such as the Transformer; one with hand-written autograd Functions, which torch.func.vmap cannot
batch, brings its own (the CIFG's is in model.py).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from keyboard_model.architecture import NextWordModel


class _Features(torch.nn.Module):
    """A model's `features` as a module's forward, so that functional_call runs it with other weights."""

    def __init__(self, model: NextWordModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.features(tokens)


def functional_features(model: NextWordModel, params: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The model's own `features` with `params` in place of its weights."""
    return functional_call(_Features(model), {f"model.{name}": t for name, t in params.items()}, (tokens,))
