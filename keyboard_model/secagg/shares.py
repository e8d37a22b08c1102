"""Secret shares: Shamir shares of a phone's seeds (pycryptodome), paired and sealed for one neighbour (AES-GCM)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyboard_model.secagg.errors import SecAggError
from keyboard_model.secagg.keys import SEED_BYTES

NONCE_BYTES = 12


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
