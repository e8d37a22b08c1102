"""Symmetric int8 quantisation with one float32 scale per row: the one quantiser of the project.

Row r of a tensor (a slice along its first dimension; a 1-D tensor is one row) is
stored as int8 values `q[r]` in [-127, 127] and `scale[r] = max|row r| / 127`, and
decodes as `q[r] * scale[r]`. Per-row scales keep a rare word's small embedding from
being rounded away by a frequent word's large one. Two roundings:
- to the nearest step, for a model that is used as it is (the on-device artifact, the
  global model as phones download it: `quantize_state`);
- stochastic, up with probability equal to the fractional part, for updates that are
  averaged: every decoded value then equals the true one in expectation, so the mean
  of many is unbiased (Konečný et al. 2016; Suresh et al. 2017).
Written here rather than with `torch.quantize_per_channel`, which rounds only to the
nearest step (and to [-128, 127]): updates need the stochastic rounding.
"""

from __future__ import annotations

import torch

LEVELS = 127  # symmetric, so -128 is never produced and is refused when decoding
SCALE_SUFFIX = ".scale"
# A finite scale near the float32 limit times 127 would overflow to infinity.
MAX_SCALE = torch.finfo(torch.float32).max / LEVELS

Tensors = dict[str, torch.Tensor]


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


def dequantize(values: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 values `values * scale` by row; into `out` (float32, `values`' shape) if given. One pass: the int8
    values are converted as they are multiplied, with no float32 copy of them first."""
    if out is None:
        out = torch.empty(values.shape, dtype=torch.float32)
    torch.mul(_as_rows(values), scale.unsqueeze(1), out=_as_rows(out))
    return out


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(row_shape(tuple(tensor.shape)) + (-1,))


def dequantize_checked(name: str, values: torch.Tensor, scale: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize int8 values that came from elsewhere (into `out`, as `dequantize`), refusing what no honest
    quantiser writes: negative scales, scales so large the values overflow, and -128. Raises ValueError naming the
    tensor."""
    if (scale < 0).any():
        raise ValueError(f"{name}{SCALE_SUFFIX} holds negative scales")
    # Bounding the (few) scales spares a pass over the (many) decoded values.
    if (scale > MAX_SCALE).any():
        raise ValueError(f"{name} decodes to infinite values: a scale above {MAX_SCALE:.3g}")
    # The minimum, a reduction over the int8 values, costs a fortieth of comparing each with -127 and reducing that.
    if values.numel() and int(values.min()) < -LEVELS:
        raise ValueError(f"{name} holds values outside [-{LEVELS}, {LEVELS}]")
    return dequantize(values, scale, out)


def quantize_state(state: Tensors) -> Tensors:
    """A model's weights to use as they are: int8 per-row copies of every matrix (with `<name>.scale`), rounded to
    the nearest step; other tensors (biases, few) as float32."""
    out: Tensors = {}
    for name, tensor in state.items():
        if tensor.dim() != 2:
            out[name] = tensor.float()
            continue
        out[name], out[name + SCALE_SUFFIX] = quantize(tensor)
    return out


def quantized_layout(state: Tensors) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """(shape, dtype) of every tensor `quantize_state(state)` holds, to check received bytes against."""
    shapes, dtypes = {}, {}
    for name, tensor in state.items():
        shapes[name], dtypes[name] = tuple(tensor.shape), torch.int8 if tensor.dim() == 2 else torch.float32
        if tensor.dim() == 2:
            shapes[name + SCALE_SUFFIX], dtypes[name + SCALE_SUFFIX] = row_shape(tuple(tensor.shape)), torch.float32
    return shapes, dtypes


def dequantize_state(stored: Tensors) -> Tensors:
    """The float32 weights of `quantize_state`'s output, checked (`dequantize_checked`)."""
    return {name: dequantize_checked(name, tensor, stored[name + SCALE_SUFFIX]) if tensor.dtype == torch.int8
            else tensor for name, tensor in stored.items() if not name.endswith(SCALE_SUFFIX)}
