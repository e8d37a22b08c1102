"""The on-device artifact: an int8 model, its tokenizer and a manifest in one small zip file.

Every weight matrix (the tied embedding/output matrix and every other 2-D weight of
the architecture the manifest names) is stored as int8 with one float32 scale per row, rounded to
the nearest step (`keyboard_model/int8.py`, the quantiser updates use too). Biases are
few and stay float32. Loading dequantises to a float32 model, so
inference needs no int8 kernels; what the phone downloads and stores is the int8 file.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from keyboard_model import int8
from keyboard_model.architecture import DEFAULT_ARCHITECTURE, NextWordModel, config_from_dict, new_model
from keyboard_model.files import write_atomically
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import WeightsError, read_tensors, write_tensors

FORMAT = "fedkeyboard-int8-v1"


@dataclass(frozen=True)
class Artifact:
    model: NextWordModel
    tokenizer: KeyboardTokenizer
    manifest: dict


def export(model: NextWordModel, tokenizer: KeyboardTokenizer, path: Path, version: int) -> dict:
    """Write the artifact; returns its manifest."""
    stored = int8.quantize_state(model.state_dict())
    manifest = {
        "format": FORMAT,
        "model_version": version,
        "architecture": model.config.architecture,
        "model_config": model.config.to_dict(),
        "int8_tensors": sorted(n for n, t in stored.items() if t.dtype == torch.int8),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=1))
        archive.writestr("tokenizer.json", tokenizer.to_json())
        # The int8 weights barely compress; stored as they are, a phone reads them without inflating.
        archive.writestr("weights.safetensors", write_tensors(stored), compress_type=zipfile.ZIP_STORED)
    write_atomically(path, buffer.getvalue())
    return manifest


def load(path: Path) -> Artifact:
    """Read an artifact back into a float32 model ready to suggest."""
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            tokenizer = KeyboardTokenizer.from_json(archive.read("tokenizer.json").decode("utf-8"))
            weights = archive.read("weights.safetensors")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        config = config_from_dict(manifest.get("architecture", DEFAULT_ARCHITECTURE), manifest["model_config"])
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise WeightsError(f"{path} is not a fedkeyboard artifact: {error}") from error
    model = new_model(config)
    stored, _ = read_tensors(weights, *int8.quantized_layout(model.state_dict()))
    try:
        state = int8.dequantize_state(stored)
    except ValueError as error:
        raise WeightsError(f"{path} is not a fedkeyboard artifact: {error}") from error
    model.load_state_dict(state)
    return Artifact(model.eval(), tokenizer, manifest)
