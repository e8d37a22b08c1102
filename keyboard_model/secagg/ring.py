"""Fixed point in the ring: a model delta rotated and rounded into integers modulo 2**bits, sized so that a round's
sum does not wrap, and the layout of a secure round's masked input."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy.fft import dct, idct, next_fast_len

from keyboard_model.secagg.errors import SecAggError
from keyboard_model.secagg.keys import SEED_BYTES
from keyboard_model.secagg.masks import Layout

RING_WIDTHS = (8, 16, 32)
# The counts a masked input carries beside the update, in this order.
COUNTS = ("positions", "hits_at_1", "hits_at_3", "within_clip")
# Values of a round's sum expected to wrap around the ring when every phone sends the largest delta, all alike.
WRAP_BUDGET = 0.01


@dataclass(frozen=True)
class RingEncoding:
    """A model delta of `length` values (L2 norm at most `bound`) as `size` integers modulo 2**bits, for sums of at
    most `max_summands` deltas. As in Kairouz et al. 2021 (the distributed discrete Gaussian):

    - Every phone rotates its delta by the same random orthogonal map, random signs then the orthonormal DCT
      (scipy). Each rotated value of a sum S is then sub-Gaussian with variance at most 2 |S|^2 / size, however
      the sum was spread over the parameters, because no DCT entry exceeds sqrt(2 / size). The delta is padded
      with zeros to `size`, the next length scipy's FFT is fast for (for the default model, 1.2% longer and 12
      times faster).
    - The scale is the largest for which, even for `max_summands` deltas at the bound all pointing the same way,
      the expected number of the sum's values that leave the signed range is at most WRAP_BUDGET. A single
      phone's values may wrap: only the sum must not.
    - Rounding is stochastic and unbiased, so the decoded sum is too. Each summand adds rounding noise of
      variance at most 1 / (4 scale^2) per value; rotating back leaves its size unchanged.
    """

    bits: int
    bound: float
    max_summands: int
    length: int
    rotation_seed: int

    def __post_init__(self) -> None:
        if self.bits not in RING_WIDTHS:
            raise SecAggError(f"the ring is 2**8, 2**16 or 2**32, not 2**{self.bits}")

    @functools.cached_property
    def size(self) -> int:
        return next_fast_len(self.length, real=True)

    @property
    def dtype(self) -> str:
        return f"uint{self.bits}"

    @property
    def scale(self) -> float:
        # Sub-Gaussian tail: P(|value| > k sigma) <= 2 exp(-k^2 / 2), over `size` values.
        k = math.sqrt(2 * math.log(2 * self.size / WRAP_BUDGET))
        sigma = math.sqrt(2 / self.size) * self.max_summands * self.bound
        return (2 ** (self.bits - 1) - 1) / (k * sigma)

    @functools.cached_property
    def _signs(self) -> np.ndarray:
        # From AES-CTR, not numpy's generators, whose streams may change between numpy versions: a phone and the
        # server must draw the same signs.
        key = self.rotation_seed.to_bytes(SEED_BYTES, "big")
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(-(-self.size // 8)))
        bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[: self.size]
        return 1.0 - 2.0 * bits

    @property
    def _float(self) -> type:
        # A phone's rotated values stay far below 2**(bits - 1) (sub-Gaussian, sized for the sum of max_summands):
        # float32 holds those of a ring of up to 16 bits with more than 8 bits of fraction to round stochastically,
        # at half float64's cost for the DCT and the rounding. A 32-bit ring's need float64.
        return np.float32 if self.bits <= 16 else np.float64

    def encode(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        padded: np.ndarray = np.zeros(self.size, self._float)
        # The DCT is linear, so the scale is applied with the signs, in the same pass.
        np.multiply(delta, self._signs[: self.length] * self.scale, out=padded[: self.length], casting="same_kind")
        scaled = dct(padded, norm="ortho", overwrite_x=True)
        # Stochastic rounding, floor(x + U[0, 1)): up with probability equal to the fractional part.
        scaled += rng.random(self.size, dtype=self._float)
        np.floor(scaled, out=scaled)
        # Casting an int64 to an unsigned integer of fewer bits keeps its low bits: the value modulo 2**bits.
        return scaled.astype(np.int64).astype(self.dtype)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        signed = total.view(f"int{self.bits}").astype(np.float64) / self.scale
        return (idct(signed, norm="ortho") * self._signs)[: self.length]


def masked_layout(encoding: RingEncoding) -> Layout:
    """A secure round's masked input: the encoded update, then the counts (predictions, hits at 1, hits at 3 and the
    adaptive-clipping bit), which stay exact modulo 2**32. Phones and the server both build it here, so their masks
    line up."""
    return Layout((("update", encoding.dtype, encoding.size), ("counts", "uint32", len(COUNTS))))
