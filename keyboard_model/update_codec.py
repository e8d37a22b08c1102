"""The wire format of a phone's model update, optionally quantised to int8.

An update is a safetensors file (see `weights.py`) whose metadata is exactly
{"num_examples": "<int>", "compression": "<scheme>"} and, when the aggregator asked for
adaptive clipping, "within_clip": "0" or "1"; nothing else may travel with it.

- "none": one float32 tensor `<name>` per model parameter, as before.
- "int8": for each parameter, `<name>` holds int8 values in [-127, 127] and
  `<name>.scale` one float32 scale per row (`keyboard_model/int8.py`). This cuts an
  upload to about a quarter.

Rounding to the nearest step would bias every phone the same way, and the bias
would survive averaging, so updates are rounded stochastically: the aggregator's
weighted mean of decoded updates is an unbiased estimate of the mean of the true
updates, and the added noise shrinks as more phones are averaged.
"""

from __future__ import annotations

import math

import torch

from keyboard_model import int8
from keyboard_model.flat import flatten, length, views
from keyboard_model.int8 import SCALE_SUFFIX
from keyboard_model.weights import Tensors, WeightsError, read_metadata, read_tensors, write_tensors

SCHEMES = ("int8", "none")
# The metadata key of the adaptive-clipping bit.
WITHIN_CLIP = "within_clip"
# Room for the JSON header, as the aggregator has always allowed for float32 uploads.
HEADER_ALLOWANCE = 64 * 1024


def encode_update(
    delta: Tensors, num_examples: int, compression: str = "int8", generator: torch.Generator | None = None,
    within_clip: bool | None = None,
) -> bytes:
    """The upload for a float32 model delta trained on `num_examples` messages; `within_clip`, if not None, is the
    adaptive-clipping bit.

    `generator` drives the stochastic rounding of "int8"; without one torch's global generator is used.
    """
    metadata = {"num_examples": str(num_examples), "compression": compression,
                **({} if within_clip is None else {WITHIN_CLIP: str(int(within_clip))})}
    if compression == "none":
        return write_tensors(delta, metadata)
    if compression != "int8":
        raise ValueError(f"unknown compression {compression!r}; expected one of {SCHEMES}")
    stored: Tensors = {}
    for name, tensor in delta.items():
        stored[name], stored[name + SCALE_SUFFIX] = int8.quantize(tensor, generator, stochastic=True)
    return write_tensors(stored, metadata)


def decode_update(data: bytes, shapes: dict[str, tuple[int, ...]]) -> tuple[Tensors, dict[str, str]]:
    """`decode_flat_update`, the delta as one float32 tensor per parameter (views of the flat vector)."""
    flat, metadata = decode_flat_update(data, shapes)
    return views(flat, shapes), metadata


def decode_flat_update(data: bytes, shapes: dict[str, tuple[int, ...]]) -> tuple[torch.Tensor, dict[str, str]]:
    """Check an upload against the model's parameter shapes and return (float32 delta as one flat vector in the
    order of `shapes`, `keyboard_model/flat.py`; metadata).

    Raises WeightsError saying what is wrong. The values of num_examples and within_clip are left to the caller.
    """
    try:
        metadata = read_metadata(data)
    except (ValueError, AttributeError, RecursionError) as error:
        raise WeightsError(f"not a safetensors file: {error}") from error
    if set(metadata) - {WITHIN_CLIP} != {"num_examples", "compression"}:
        raise WeightsError(f'the update metadata must hold exactly "num_examples", "compression" and, if asked for, '
                           f'"{WITHIN_CLIP}", got {sorted(metadata)}')
    compression = metadata["compression"]
    if compression == "none":
        tensors, metadata = read_tensors(data, shapes)
        return flatten(tensors, shapes), metadata
    if compression != "int8":
        raise WeightsError(f"unknown compression {compression!r}; expected one of {SCHEMES}")

    expected_shapes = dict(shapes)
    expected_dtypes = {name: torch.int8 for name in shapes}
    for name, shape in shapes.items():
        expected_shapes[name + SCALE_SUFFIX] = int8.row_shape(shape)
    stored, metadata = read_tensors(data, expected_shapes, expected_dtypes)

    # Each tensor is decoded straight into its place in the flat vector: one pass over the update's values.
    flat = torch.empty(length(shapes), dtype=torch.float32)
    try:
        for name, out in views(flat, shapes).items():
            int8.dequantize_checked(name, stored[name], stored[name + SCALE_SUFFIX], out)
    except ValueError as error:
        raise WeightsError(str(error)) from error
    return flat, metadata


def max_encoded_bytes(shapes: dict[str, tuple[int, ...]], compression: str = "int8") -> int:
    """An upper bound on the size of an honest upload for a model of these shapes."""
    elements = length(shapes)
    if compression == "none":
        return 4 * elements + HEADER_ALLOWANCE
    if compression != "int8":
        raise ValueError(f"unknown compression {compression!r}; expected one of {SCHEMES}")
    scales = sum(math.prod(int8.row_shape(shape)) for shape in shapes.values())
    return elements + 4 * scales + HEADER_ALLOWANCE
