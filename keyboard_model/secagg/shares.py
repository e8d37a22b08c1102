"""Secret shares: Shamir shares of a phone's seeds (pycryptodome), paired and sealed for one neighbour (AES-GCM),
and the dealer's commitments to them, by which a share revealed later is told right or wrong.

A commitment is SHA-256 over a domain tag, the round, the roster's digest, the dealer, the kind of seed, the point and
the value. It needs no salt to hide the value: a share, like a seed, is 16 uniformly random bytes, and fewer than
threshold shares of a seed say nothing about it (Shamir), so telling the value behind a commitment means searching
2**128 values; the round, roster, dealer and point in each hash make every commitment a search of its own. It binds,
as SHA-256 resists second preimages: a revealer cannot find another value that matches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyboard_model.secagg.errors import SecAggError
from keyboard_model.secagg.keys import SEED_BYTES

NONCE_BYTES = 12
SEALED_BYTES = NONCE_BYTES + 2 * (2 + SEED_BYTES) + 16  # nonce, the pair, AES-GCM's tag
COMMITMENT_BYTES = 32
KINDS = ("self_mask", "masking")  # the two seeds a phone shares


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


def _associated_data(round_number: int, sender: int, recipient: int, roster: bytes) -> bytes:
    # Binds a ciphertext to its round, its two ends and the roster (digest) the sender saw, so the server cannot
    # replay or redirect it, nor have it opened by a phone it showed another roster.
    return b"round %d from %d to %d roster " % (round_number, sender, recipient) + roster


def seal_shares(key: bytes, pair: SharePair, round_number: int, sender: int, recipient: int,
                roster: bytes = b"") -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, pair.to_bytes(),
                                       _associated_data(round_number, sender, recipient, roster))


def open_shares(key: bytes, sealed: bytes, round_number: int, sender: int, recipient: int,
                roster: bytes = b"") -> SharePair:
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                    _associated_data(round_number, sender, recipient, roster))
    except Exception as error:  # cryptography raises InvalidTag, or ValueError for a short input
        raise SecAggError(f"the shares from phone {sender} do not open: forged, altered or misdirected") from error
    return SharePair.from_bytes(plain)


def commitment(round_number: int, roster: bytes, dealer: int, kind: str, share: Share) -> bytes:
    """The dealer's commitment to one share of its `kind` seed, or, at x = 0 (where a Shamir polynomial's value is
    the secret), to the seed itself."""
    if kind not in KINDS:
        raise SecAggError(f"a phone shares its {' and '.join(KINDS)} seeds, not {kind!r}")
    digest = hashlib.sha256(b"fedkeyboard secagg share commitment\0" + kind.encode() + b"\0")
    digest.update(round_number.to_bytes(8, "big") + len(roster).to_bytes(2, "big") + roster)
    digest.update(dealer.to_bytes(4, "big") + share.x.to_bytes(4, "big") + share.value)
    return digest.digest()


@dataclass(frozen=True)
class DealtPair:
    """A share pair as its dealer hands it to the server for one neighbour: sealed for that neighbour, with the
    dealer's commitments to its two shares in the clear. The server refuses a revealed share that does not match
    its commitment; the neighbour reveals a share only if it matches, so that a dealer cannot have an honest
    neighbour's share refused by committing to another value than it sealed."""

    sealed: bytes
    self_mask: bytes  # commitment to the share of the self-mask seed
    masking: bytes  # commitment to the share of the masking seed

    def __post_init__(self) -> None:
        if len(self.sealed) != SEALED_BYTES or {len(self.self_mask), len(self.masking)} != {COMMITMENT_BYTES}:
            raise SecAggError(f"a dealt pair is {SEALED_BYTES} sealed bytes and two {COMMITMENT_BYTES}-byte "
                              "commitments")

    def commits_to(self, kind: str, share: Share, round_number: int, roster: bytes, dealer: int) -> bool:
        committed = self.self_mask if kind == "self_mask" else self.masking
        return commitment(round_number, roster, dealer, kind, share) == committed


@dataclass(frozen=True)
class Dealing:
    """What a phone sends in the share phase: a dealt pair for each neighbour, by cohort index, and its commitment
    to its self-mask seed, which a seed rebuilt from shares must match. (Its masking seed needs none: the public
    masking key it advertised is one.)"""

    pairs: dict[int, DealtPair]
    seed_commitment: bytes

    def __post_init__(self) -> None:
        if len(self.seed_commitment) != COMMITMENT_BYTES:
            raise SecAggError(f"a commitment is {COMMITMENT_BYTES} bytes")

    @property
    def nbytes(self) -> int:
        return len(self.pairs) * (SEALED_BYTES + 2 * COMMITMENT_BYTES) + COMMITMENT_BYTES
