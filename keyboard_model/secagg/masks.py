"""Masks: a masked input's arrays, each in the ring of its width, and the pseudo-random masks added to them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keyboard_model.secagg.errors import SecAggError

# A masked input: named arrays of unsigned integers, each in the ring of its width (numpy's unsigned arithmetic
# wraps at 2**bits), so that adding masks and summing inputs are plain numpy additions.
Masked = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layout:
    """What every masked input of a round holds: (name, unsigned numpy type, length) for each array, in the order
    one keystream masks them."""

    arrays: tuple[tuple[str, str, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(np.dtype(dtype).itemsize * length for _, dtype, length in self.arrays)

    def zeros(self) -> Masked:
        return {name: np.zeros(length, dtype) for name, dtype, length in self.arrays}

    def check(self, masked: Masked) -> None:
        """Raises SecAggError unless `masked` holds exactly this layout's arrays."""
        if set(masked) != {name for name, _, _ in self.arrays}:
            raise SecAggError(f"a masked input holds exactly the arrays {[name for name, _, _ in self.arrays]}")
        for name, dtype, length in self.arrays:
            if masked[name].dtype != np.dtype(dtype) or masked[name].shape != (length,):
                raise SecAggError(f"{name!r} of a masked input is {length} {dtype} values")


def prg_mask(seed: bytes, layout: Layout) -> Masked:
    """Pseudo-random arrays in `layout`: the AES-128-CTR keystream of `seed`, cut in order. Each seed masks one
    input once."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(layout.nbytes))
    mask, offset = {}, 0
    for name, dtype, length in layout.arrays:
        mask[name] = np.frombuffer(stream, dtype=dtype, count=length, offset=offset)
        offset += np.dtype(dtype).itemsize * length
    return mask


def add_mask(total: Masked, mask: Masked, sign: int) -> None:
    """total += sign * mask, in each array's ring."""
    for name, values in mask.items():
        if sign > 0:
            total[name] += values
        else:
            total[name] -= values


def pairwise_sign(own_index: int, peer_index: int) -> int:
    """+1 or -1: the lower-indexed phone of a pair adds the mask, the other subtracts it."""
    return 1 if own_index < peer_index else -1
