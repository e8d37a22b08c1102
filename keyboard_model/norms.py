"""The L2 norm of a model update (its tensors taken as one vector), and clipping to a bound.

Phones clip for differential privacy and for secure aggregation's ring; the aggregator
bounds and re-clips what arrives. All of them measure the same way, here.
"""

from __future__ import annotations

import math

import torch

Tensors = dict[str, torch.Tensor]


def l2_norm(tensors: Tensors) -> float:
    # Each tensor's norm in its own precision (float32 is ample for comparing with a bound); the squares are
    # summed in Python floats, i.e. float64.
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors.values()))


def clip_to_norm(tensors: Tensors, bound: float) -> Tensors:
    """`tensors` scaled down, as one vector, to an L2 norm of at most `bound` (unchanged if already within it)."""
    norm = l2_norm(tensors)
    if norm <= bound:
        return tensors
    return {name: t * (bound / norm) for name, t in tensors.items()}
