"""Model weights and updates as safetensors bytes; a model as float32, or as int8 to download.

safetensors holds only named tensors and a str->str header, so reading bytes that
arrived over the network can never run code (unlike pickle or `torch.load`).
`read_tensors` checks the bytes against the shapes the receiver expects before
anyone uses them.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from keyboard_model import int8
from keyboard_model.architecture import (
    DEFAULT_ARCHITECTURE,
    ArchitectureConfig,
    NextWordModel,
    config_from_dict,
    new_model,
)

Tensors = dict[str, torch.Tensor]
MODEL_ENCODINGS = ("float32", "int8")


class WeightsError(ValueError):
    """Bytes that are not the tensors the receiver expects; the message says how."""


def write_tensors(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of `tensors` and `metadata`, the same bytes for the same tensors and metadata.

    safetensors orders the tensors itself (by dtype, then name), but writes the metadata in its Rust hash map's
    order, which changes from call to call; so the metadata goes into the header here, keys sorted, and
    identical models are identical files.
    """
    data = save_safetensors({name: t.detach().contiguous() for name, t in tensors.items()})
    if not metadata:
        return data
    length = _header_length(data)
    header = {"__metadata__": dict(sorted(metadata.items())), **json.loads(data[8 : 8 + length])}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # as safetensors pads it: the tensors' bytes stay 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


def read_tensors(
    data: bytes, expected_shapes: dict[str, tuple[int, ...]], expected_dtypes: dict[str, torch.dtype] | None = None
) -> tuple[Tensors, dict[str, str]]:
    """Parse safetensors bytes and insist on exactly the expected, finite tensors (float32 unless told)."""
    try:
        tensors = load_safetensors(data)
        metadata = read_metadata(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, AttributeError, KeyError, TypeError) as error:
        raise WeightsError(f"not a safetensors file: {error}") from error
    missing = sorted(expected_shapes.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected_shapes.keys())
    if missing or unexpected:
        raise WeightsError(f"tensor names do not match the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected_shapes[name]):
            raise WeightsError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected_shapes[name])}")
        expected_dtype = (expected_dtypes or {}).get(name, torch.float32)
        if tensor.dtype != expected_dtype:
            raise WeightsError(f"{name} has dtype {tensor.dtype}, expected {expected_dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{name} holds NaN or infinite values")
    return tensors, metadata


def read_metadata(data: bytes) -> dict[str, str]:
    """The free-form header of a safetensors file, which safetensors.torch.load drops.

    Read here because safetensors reads it only from a file (`safe_open(...).metadata()`), and models and
    updates arrive as bytes. The format is an 8-byte little-endian length followed by that many bytes of JSON.
    """
    metadata = json.loads(data[8 : 8 + _header_length(data)]).get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata must map strings to strings")
    return metadata


def _header_length(data: bytes) -> int:
    header_length = int.from_bytes(data[:8], "little")
    if header_length > len(data) - 8:
        raise ValueError("header length runs past the end of the data")
    return header_length


def model_to_bytes(state: Tensors, version: int, config: ArchitectureConfig, encoding: str = "float32") -> bytes:
    """A global model as it is served and saved: weights plus its version, architecture and sizes. "int8" is the
    smaller download (`int8.quantize_state`, about a quarter of the bytes), marked as such."""
    metadata = {"version": str(version), "architecture": config.architecture,
                "model_config": json.dumps(config.to_dict())}
    if encoding == "int8":
        return write_tensors(int8.quantize_state(state), {**metadata, "encoding": "int8"})
    if encoding != "float32":
        raise ValueError(f"unknown model encoding {encoding!r}; expected one of {MODEL_ENCODINGS}")
    return write_tensors(state, metadata)


def model_from_bytes(data: bytes) -> tuple[NextWordModel, int]:
    """Rebuild a served or saved model of the architecture it records; returns it with its version."""
    try:
        metadata = read_metadata(data)
        config = config_from_dict(metadata.get("architecture", DEFAULT_ARCHITECTURE),
                                  json.loads(metadata["model_config"]))
        version = int(metadata["version"])
    except (ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"not a fedkeyboard model file: {error!r}") from error
    model = new_model(config)
    encoding = metadata.get("encoding", "float32")
    if encoding == "float32":
        state, _ = read_tensors(data, parameter_shapes(model.state_dict()))
    elif encoding == "int8":
        stored, _ = read_tensors(data, *int8.quantized_layout(model.state_dict()))
        try:
            state = int8.dequantize_state(stored)
        except ValueError as error:
            raise WeightsError(str(error)) from error
    else:
        raise WeightsError(f"unknown model encoding {encoding!r}; expected one of {MODEL_ENCODINGS}")
    model.load_state_dict(state)
    return model, version


class LatestModel:
    """The latest downloaded model, decoded once: each phone a worker runs gets the worker's one module, reset to it.

    Every phone of a round downloads the same bytes; decoding them (parsing, checking, dequantising, building the
    module) cost about a tenth of a phone's local work (benchmarks/train_speed.py). Resetting is a copy of the
    weights into the module the previous phone trained, so no phone ever starts from another's training.
    """

    def __init__(self) -> None:
        self._data: bytes | None = None
        self._weights: Tensors = {}
        self._model: NextWordModel | None = None
        self._version = 0

    def fresh(self, data: bytes) -> tuple[NextWordModel, int]:
        """The model `data` holds, with its version, as `model_from_bytes` gives it; the module is the one the
        previous call returned, its weights and gradients reset, so it is valid until the next call."""
        if data != self._data:  # a comparison of bytes: far cheaper than decoding them
            self._model, self._version = model_from_bytes(data)
            self._weights = {name: t.detach().clone() for name, t in self._model.state_dict().items()}
            self._data = data
            return self._model, self._version
        model = self._model
        assert model is not None  # set with _data
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(self._weights[name])
        for parameter in model.parameters():
            parameter.grad = None
        return model.train(), self._version  # as a newly built module


def parameter_shapes(state: Tensors) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}
