"""Symmetric int8 quantisation with one float32 scale per row: the one quantiser of the project.

Row r of a tensor (a slice along its first dimension; a 1-D tensor is one row) is
stored as int8 values `q[r]` in [-127, 127] and `scale[r] = max|row r| / 127`, and
decodes as `q[r] * scale[r]`. Per-row scales keep a rare word's small embedding from
being rounded away by a frequent word's large one. Two roundings:
- to the nearest step, for a model that is used as it is (the on-device artifact, a
  downloaded model);
- stochastic, up with probability equal to the fractional part, for updates that are
  averaged: every decoded value then equals the true one in expectation, so the mean
  of many is unbiased (Konečný et al. 2016; Suresh et al. 2017).
"""

from __future__ import annotations

import torch

LEVELS = 127  # symmetric, so -128 is never produced and is refused when decoding
SCALE_SUFFIX = ".scale"


def row_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a tensor's scales: one per row."""
    return (shape[0],) if len(shape) > 1 else (1,)


def quantize(tensor: torch.Tensor, generator: torch.Generator | None = None,
             stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values of `tensor`'s shape, float32 scale per row). `generator` drives stochastic rounding."""
    rows = _as_rows(tensor.detach().float())
    scale = rows.abs().amax(dim=1) / LEVELS
    # An all-zero row keeps scale 0 and decodes to zeros; dividing by 1 instead avoids 0/0.
    steps = rows / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    rounded = torch.floor(steps + torch.rand(steps.shape, generator=generator)) if stochastic else torch.round(steps)
    # max|row| / scale can land a hair above 127 in float32; clamping that is far below one step.
    return rounded.clamp_(-LEVELS, LEVELS).to(torch.int8).reshape(tensor.shape), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_as_rows(values.float()) * scale.unsqueeze(1)).reshape(values.shape)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(row_shape(tuple(tensor.shape)) + (-1,))
