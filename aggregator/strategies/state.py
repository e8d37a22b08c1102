"""Reading a server optimiser's saved state."""

from __future__ import annotations

import torch

from keyboard_model.weights import Tensors


def saved(state: Tensors, key: str, like: torch.Tensor) -> torch.Tensor:
    """`state[key]`, or zeros shaped like `like`: a database written before this optimiser was chosen holds no
    state for it, and every optimiser here starts its state at zero."""
    return state.get(key, torch.zeros_like(like))
