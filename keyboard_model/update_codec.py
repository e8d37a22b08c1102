"""The wire format of a phone's model update, optionally quantised to int8.

An update is a safetensors file (see `weights.py`) whose metadata is exactly
{"num_examples": "<int>", "compression": "<scheme>"}; nothing else may travel with it.

- "none": one float32 tensor `<name>` per model parameter, as before.
- "int8": for each parameter, `<name>` holds int8 values in [-127, 127] and
  `<name>.scale` one float32 scale per row (per slice along the first dimension;
  a 1-D tensor is one row, so its scale has shape (1,)). A row decodes as
  `q * scale`, where scale = max|row| / 127. This cuts an upload to about a quarter.

Rounding to the nearest step would bias every phone the same way, and the bias
would survive averaging. Instead each value is rounded up with probability equal
to its fractional part (floor(x / scale + u), u ~ U[0, 1)), so every decoded value
equals its true value in expectation and the aggregator's weighted mean of decoded
updates is an unbiased estimate of the mean of the true updates (Konečný et al.
2016; Suresh et al. 2017). The added noise shrinks as more phones are averaged.
"""

from __future__ import annotations

import math

import torch

from keyboard_model.weights import Tensors, WeightsError, read_metadata, read_tensors, write_tensors

SCHEMES = ("int8", "none")
LEVELS = 127  # symmetric, so -128 is never produced and is refused when decoding
MAX_SCALE = torch.finfo(torch.float32).max / LEVELS
SCALE_SUFFIX = ".scale"
# Room for the JSON header, as the aggregator has always allowed for float32 uploads.
HEADER_ALLOWANCE = 64 * 1024


def encode_update(
    delta: Tensors, num_examples: int, compression: str = "int8", generator: torch.Generator | None = None
) -> bytes:
    """The upload for a float32 model delta trained on `num_examples` messages.

    `generator` drives the stochastic rounding of "int8"; without one torch's global generator is used.
    """
    metadata = {"num_examples": str(num_examples), "compression": compression}
    if compression == "none":
        return write_tensors(delta, metadata)
    if compression != "int8":
        raise ValueError(f"unknown compression {compression!r}; expected one of {SCHEMES}")
    stored: Tensors = {}
    for name, tensor in delta.items():
        rows = _as_rows(tensor.detach().float())
        scale = rows.abs().amax(dim=1) / LEVELS
        # An all-zero row keeps scale 0 and decodes to zeros; dividing by 1 instead avoids 0/0.
        steps = rows / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        noise = torch.rand(steps.shape, generator=generator)
        # max|row| / scale can land a hair above 127 in float32; clamping that is far below one step.
        quantised = torch.floor(steps + noise).clamp_(-LEVELS, LEVELS).to(torch.int8)
        stored[name] = quantised.reshape(tensor.shape)
        stored[name + SCALE_SUFFIX] = scale
    return write_tensors(stored, metadata)


def decode_update(data: bytes, shapes: dict[str, tuple[int, ...]]) -> tuple[Tensors, dict[str, str]]:
    """Check an upload against the model's parameter shapes and return (float32 delta, metadata).

    Raises WeightsError saying what is wrong. The value of num_examples is left to the caller.
    """
    try:
        metadata = read_metadata(data)
    except (ValueError, AttributeError, RecursionError) as error:
        raise WeightsError(f"not a safetensors file: {error}") from error
    if set(metadata) != {"num_examples", "compression"}:
        raise WeightsError(
            f'the update metadata must hold exactly "num_examples" and "compression", got {sorted(metadata)}'
        )
    compression = metadata["compression"]
    if compression == "none":
        return read_tensors(data, shapes)
    if compression != "int8":
        raise WeightsError(f"unknown compression {compression!r}; expected one of {SCHEMES}")

    expected_shapes = dict(shapes)
    expected_dtypes = {name: torch.int8 for name in shapes}
    for name, shape in shapes.items():
        expected_shapes[name + SCALE_SUFFIX] = _scale_shape(shape)
    stored, metadata = read_tensors(data, expected_shapes, expected_dtypes)

    delta: Tensors = {}
    for name, shape in shapes.items():
        quantised, scale = stored[name], stored[name + SCALE_SUFFIX]
        if (scale < 0).any():
            raise WeightsError(f"{name}{SCALE_SUFFIX} holds negative scales")
        # A finite scale near the float32 limit times 127 would overflow to infinity; bounding the
        # (few) scales spares a pass over the (many) decoded values.
        if (scale > MAX_SCALE).any():
            raise WeightsError(f"{name} decodes to infinite values: a scale above {MAX_SCALE:.3g}")
        if (quantised < -LEVELS).any():
            raise WeightsError(f"{name} holds values outside [-{LEVELS}, {LEVELS}]")
        delta[name] = (_as_rows(quantised.float()) * scale.unsqueeze(1)).reshape(shape)
    return delta, metadata


def max_encoded_bytes(shapes: dict[str, tuple[int, ...]], compression: str = "int8") -> int:
    """An upper bound on the size of an honest upload for a model of these shapes."""
    elements = sum(math.prod(shape) for shape in shapes.values())
    if compression == "none":
        return 4 * elements + HEADER_ALLOWANCE
    if compression != "int8":
        raise ValueError(f"unknown compression {compression!r}; expected one of {SCHEMES}")
    scales = sum(math.prod(_scale_shape(shape)) for shape in shapes.values())
    return elements + 4 * scales + HEADER_ALLOWANCE


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if len(shape) >= 2 else (1,)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(_scale_shape(tuple(tensor.shape)) + (-1,))
