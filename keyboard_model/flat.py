"""A model update as one flat float32 vector: its tensors, in the order of the model's shapes, end to end.

The aggregator decodes, checks and sums each upload as one vector, so that the work per upload is a few passes
over contiguous memory whatever the number of tensors; the tensors are views into it.
"""

from __future__ import annotations

import math

import torch

Shapes = dict[str, tuple[int, ...]]
Tensors = dict[str, torch.Tensor]


def length(shapes: Shapes) -> int:
    """How many values an update of these shapes holds."""
    return sum(math.prod(shape) for shape in shapes.values())


def views(flat: torch.Tensor, shapes: Shapes) -> Tensors:
    """The tensors of `flat`, as views of it (no copy)."""
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        tensors[name] = flat[offset : offset + size].view(shape)
        offset += size
    return tensors


def flatten(tensors: Tensors, shapes: Shapes) -> torch.Tensor:
    """`tensors` (one per name of `shapes`) as one flat float32 vector."""
    return torch.cat([tensors[name].reshape(-1).float() for name in shapes])
