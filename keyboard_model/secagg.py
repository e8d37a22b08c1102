"""Secure aggregation's building blocks, shared by phones and the aggregator.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation") on the sparse
neighbour graph of SecAgg+ (Bell et al. 2020). Every primitive comes from a maintained
library: X25519, HKDF, AES-CTR and AES-GCM from `cryptography`, Shamir secret sharing
from `pycryptodome`. What is ours is how they are put together:

- Each phone has two key pairs per round: one to agree on keys that encrypt the secret
  shares it sends its neighbours, one whose agreements seed the pairwise masks. The
  private masking key is derived from a 16-byte seed, so that seed is what is shared.
- A phone's masked input is `x + PRG(b) + sum over neighbours v of ±PRG(s_uv)` in a
  ring of integers modulo 2**bits (numpy's unsigned arithmetic wraps exactly there). `b` is
  the phone's own random seed; `s_uv` comes from X25519 between u's and v's masking keys,
  so u adds what v subtracts, and the pairwise masks cancel in the sum.
- `b` and the masking seed are each split into Shamir shares, one per neighbour, with
  threshold t. After the masked inputs are in, each surviving neighbour reveals, for
  each of its neighbours, the share of `b` if that neighbour sent its input and the
  share of the masking seed if it did not, never both: the server can then remove the
  self masks of the phones that reported and the pairwise masks of the ones that did not.

Model deltas enter the ring rotated and in fixed point (`RingEncoding`), with a scale
chosen so that the sum of every selected phone's largest possible delta does not wrap
around; an 8-bit ring makes a masked upload the size of a plain int8 one.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy.fft import dct, idct, next_fast_len
from scipy.stats import binom

SEED_BYTES = 16  # AES-128 keys and Shamir secrets (pycryptodome shares 16-byte secrets)
RING_WIDTHS = (8, 16, 32)
# Values of a round's sum expected to wrap around the ring when every phone sends the largest delta, all alike.
WRAP_BUDGET = 0.01
NONCE_BYTES = 12


class SecAggError(Exception):
    """The protocol cannot go on: a message is malformed, forged, or too few phones remain."""


# --- keys -----------------------------------------------------------------------------------------------------


def _derive(secret: bytes, info: bytes, length: int = SEED_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"fedkeyboard secagg " + info).derive(secret)


def masking_key(seed: bytes) -> X25519PrivateKey:
    """The private masking key a 16-byte seed stands for: whoever rebuilds the seed from shares rebuilds the key."""
    return X25519PrivateKey.from_private_bytes(_derive(seed, b"masking key", 32))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKeys:
    """What a phone advertises for a round: 32 raw bytes each."""

    cipher: bytes
    masking: bytes

    def __post_init__(self) -> None:
        if len(self.cipher) != 32 or len(self.masking) != 32:
            raise SecAggError("public keys are 32 bytes each")


@dataclass(frozen=True)
class RoundSecrets:
    """A phone's secrets for one round. Fresh every round; never leave the phone except as shares."""

    cipher_key: bytes  # raw X25519 private key
    masking_seed: bytes
    self_mask_seed: bytes

    @classmethod
    def generate(cls) -> RoundSecrets:
        cipher = X25519PrivateKey.generate()
        raw = cipher.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
        return cls(raw, os.urandom(SEED_BYTES), os.urandom(SEED_BYTES))

    def public(self) -> PublicKeys:
        return PublicKeys(public_bytes(X25519PrivateKey.from_private_bytes(self.cipher_key)),
                          public_bytes(masking_key(self.masking_seed)))


def pairwise_seed(own_masking_seed: bytes, peer_masking_public: bytes, round_number: int) -> bytes:
    """The seed two phones share for their pairwise mask; either side (or the server, given one's seed) computes it."""
    shared = masking_key(own_masking_seed).exchange(X25519PublicKey.from_public_bytes(peer_masking_public))
    return _derive(shared, b"pairwise mask round %d" % round_number)


def share_cipher_key(own_cipher_key: bytes, peer_cipher_public: bytes, round_number: int) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(own_cipher_key).exchange(
        X25519PublicKey.from_public_bytes(peer_cipher_public))
    return _derive(shared, b"share encryption round %d" % round_number, 32)


# --- masks ----------------------------------------------------------------------------------------------------


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


# --- secret shares --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    x: int  # the point (Shamir index, from 1)
    value: bytes


def split_secret(secret: bytes, threshold: int, holders: int) -> list[Share]:
    """Shares of a 16-byte secret for `holders` parties, any `threshold` of which rebuild it."""
    return [Share(x, value) for x, value in Shamir.split(threshold, holders, secret)]


def combine_shares(shares: list[Share], threshold: int) -> bytes:
    distinct = list({share.x: share for share in shares}.values())
    if len(distinct) < threshold:
        raise SecAggError(f"{len(distinct)} distinct shares cannot rebuild a secret shared with threshold {threshold}")
    try:
        return Shamir.combine([(share.x, share.value) for share in distinct[:threshold]])
    except ValueError as error:  # e.g. points that coincide in the field: "Inversion of zero"
        raise SecAggError(f"the shares do not rebuild a secret: {error}") from error


@dataclass(frozen=True)
class SharePair:
    """What phone `owner` gives one neighbour: a share of its self-mask seed and one of its masking seed."""

    self_mask: Share
    masking: Share

    def to_bytes(self) -> bytes:
        return (self.self_mask.x.to_bytes(2, "big") + self.self_mask.value
                + self.masking.x.to_bytes(2, "big") + self.masking.value)

    @classmethod
    def from_bytes(cls, data: bytes) -> SharePair:
        if len(data) != 2 * (2 + SEED_BYTES):
            raise SecAggError("a share pair has the wrong length")
        half = 2 + SEED_BYTES
        return cls(Share(int.from_bytes(data[:2], "big"), data[2:half]),
                   Share(int.from_bytes(data[half : half + 2], "big"), data[half + 2 :]))


def _associated_data(round_number: int, sender: int, recipient: int) -> bytes:
    # Binds a ciphertext to its round and its two ends, so the server cannot replay or redirect it.
    return b"round %d from %d to %d" % (round_number, sender, recipient)


def seal_shares(key: bytes, pair: SharePair, round_number: int, sender: int, recipient: int) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, pair.to_bytes(), _associated_data(round_number, sender, recipient))


def open_shares(key: bytes, sealed: bytes, round_number: int, sender: int, recipient: int) -> SharePair:
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                    _associated_data(round_number, sender, recipient))
    except Exception as error:  # cryptography raises InvalidTag, or ValueError for a short input
        raise SecAggError(f"the shares from phone {sender} do not open: forged, altered or misdirected") from error
    return SharePair.from_bytes(plain)


# --- the neighbour graph --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphParameters:
    degree: int  # neighbours per phone
    threshold: int  # shares that rebuild a secret


def graph_parameters(cohort: int, dropout: float = 1 / 3, failure: float = 1e-4) -> GraphParameters:
    """The sparsest graph that survives `dropout` of the cohort (at random) in all but `failure` of rounds.

    The threshold is a third of the degree (at least two, where there are two neighbours): to rebuild a phone's
    secrets the server would have to collude with that many of its neighbours, and they stay recoverable unless
    more than two thirds of its neighbours drop out. With random drop-outs the count of neighbours left is
    binomial; the degree is the smallest (even) one for which too few are left, for any phone, with probability
    at most `failure`. When no sparse graph does, every phone neighbours every other (SecAgg), and then any
    `dropout` share of the cohort may drop out, whichever phones they are.
    """
    if cohort < 2:
        raise SecAggError("secure aggregation needs at least two phones")
    for degree in range(4, cohort - 1, 2):
        threshold = math.ceil(degree / 3)
        if cohort * binom.cdf(threshold - 1, degree, 1 - dropout) <= failure:
            return GraphParameters(degree, threshold)
    degree = cohort - 1
    return GraphParameters(degree, max(min(2, degree), math.ceil(degree / 3)))


def neighbours(cohort: int, degree: int, seed: int) -> list[list[int]]:
    """Each phone's neighbours (by cohort index): a Harary graph over a random order of the phones.

    Phones sit on a ring in an order drawn from `seed` and neighbour the `degree / 2` nearest on either side, so
    every phone has the same degree and only the loss of `degree / 2` consecutive phones cuts the ring.
    """
    if degree >= cohort - 1:
        return [[v for v in range(cohort) if v != u] for u in range(cohort)]
    order = list(range(cohort))
    random.Random(seed).shuffle(order)
    position = {phone: p for p, phone in enumerate(order)}
    half = degree // 2
    return [
        sorted(order[(position[u] + step) % cohort] for step in range(-half, half + 1) if step != 0)
        for u in range(cohort)
    ]


@dataclass(frozen=True)
class Roster:
    """The round's cohort as every phone sees it once keys are in: public keys by cohort index, and the graph."""

    round_number: int
    keys: list[PublicKeys]
    parameters: GraphParameters
    graph_seed: int

    def neighbours(self) -> list[list[int]]:
        return neighbours(len(self.keys), self.parameters.degree, self.graph_seed)


# --- fixed point in the ring ----------------------------------------------------------------------------------


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

    def encode(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        padded = np.zeros(self.size)
        padded[: self.length] = delta
        scaled = dct(padded * self._signs, norm="ortho") * self.scale
        floor = np.floor(scaled)
        rounded = (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.int64)
        return np.mod(rounded, 2**self.bits).astype(self.dtype)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        signed = total.view(f"int{self.bits}").astype(np.float64) / self.scale
        return (idct(signed, norm="ortho") * self._signs)[: self.length]


def masked_layout(encoding: RingEncoding) -> Layout:
    """A secure round's masked input: the encoded update, then the evaluation counts (predictions, hits at 1, hits
    at 3), which stay exact modulo 2**32. Phones and the server both build it here, so their masks line up."""
    return Layout((("update", encoding.dtype, encoding.size), ("counts", "uint32", 3)))
