"""A plain or private round's upload, checked before it reaches a sum: every value a phone sends is.

The bytes are a safetensors update (`keyboard_model/update_codec.py`), never unpickled; `decode_flat_update` refuses
any tensor the model does not have, any shape it does not have and any value that is not finite, and any metadata
but the example count, the compression and adaptive clipping's bit, which are checked here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aggregator.config import AggregatorConfig
from aggregator.refusals import BadUpdateError
from keyboard_model.update_codec import WITHIN_CLIP, decode_flat_update
from keyboard_model.weights import WeightsError


@dataclass(frozen=True)
class CheckedUpdate:
    delta: torch.Tensor  # flat float32 (keyboard_model/flat.py), its L2 norm within config.max_update_norm
    num_examples: int  # 1 to config.max_examples_per_update
    within_clip: bool | None  # adaptive clipping's bit; None when the aggregator does not adapt its clip norm


def check_update(data: bytes, shapes: dict[str, tuple[int, ...]], config: AggregatorConfig) -> CheckedUpdate:
    """Raises BadUpdateError, in words a phone's owner can act on, for anything an honest phone would not send."""
    try:
        delta, metadata = decode_flat_update(data, shapes)
    except WeightsError as error:
        raise BadUpdateError(str(error)) from error
    num_examples = _example_count(metadata, config.max_examples_per_update)
    within_clip = _within_clip(metadata, config.adaptive_clipping is not None)
    norm = float(torch.linalg.vector_norm(delta))
    if norm > config.max_update_norm:
        raise BadUpdateError(f"the update's L2 norm is {norm:.2f}, above this aggregator's bound of "
                             f"{config.max_update_norm}")
    return CheckedUpdate(delta, num_examples, within_clip)


def _within_clip(metadata: dict[str, str], asked: bool) -> bool | None:
    """The adaptive-clipping bit: present exactly when the round asked for it."""
    raw = metadata.get(WITHIN_CLIP)
    if not asked:
        if raw is not None:
            raise BadUpdateError(f"this round does not adapt its clip norm; the update must not carry {WITHIN_CLIP}")
        return None
    if raw not in ("0", "1"):
        raise BadUpdateError(f"this round adapts its clip norm: the update's {WITHIN_CLIP} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _example_count(metadata: dict[str, str], limit: int) -> int:
    # decode_flat_update has made sure the metadata holds nothing but the count, the compression and the bit.
    raw = metadata["num_examples"]
    try:
        count = int(raw)
    except ValueError as error:
        raise BadUpdateError(f"num_examples must be a whole number, got {raw!r}") from error
    if not 1 <= count <= limit:
        raise BadUpdateError(f"num_examples must be between 1 and {limit}, got {count}")
    return count
