"""A phone's keys for one round: two X25519 key pairs, one to encrypt the shares it sends its neighbours, one whose
agreements seed the pairwise masks (its private key derived from a seed, so that the seed is what is shared).

A public key of small order (all zeros, one, and a few others, each with several encodings) agrees on the
all-zero secret with every private key, which anyone can compute. cryptography refuses such an agreement (OpenSSL
checks the result), and every agreement here goes through `_agree`, which turns that refusal into a SecAggError;
`PublicKeys.check` tries one with a throwaway key, so the server refuses such keys when they are advertised."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyboard_model.secagg.errors import SecAggError

SEED_BYTES = 16  # AES-128 keys and Shamir secrets (pycryptodome shares 16-byte secrets)


def _derive(secret: bytes, info: bytes, length: int = SEED_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"fedkeyboard secagg " + info).derive(secret)


def masking_key(seed: bytes) -> X25519PrivateKey:
    """The private masking key a 16-byte seed stands for: whoever rebuilds the seed from shares rebuilds the key."""
    return X25519PrivateKey.from_private_bytes(_derive(seed, b"masking key", 32))


def _agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # cryptography: "Error computing shared key", for a key of small order
        raise SecAggError("a public key of small order: agreeing with it gives a secret anyone knows") from error


# Any private key tells a key of small order: the agreement is all zeros whatever the scalar.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(32)))


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

    def check(self) -> None:
        """Raises SecAggError if either key is of small order."""
        _agree(_PROBE, self.cipher)
        _agree(_PROBE, self.masking)


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
    shared = _agree(masking_key(own_masking_seed), peer_masking_public)
    return _derive(shared, b"pairwise mask round %d" % round_number)


def share_cipher_key(own_cipher_key: bytes, peer_cipher_public: bytes, round_number: int) -> bytes:
    shared = _agree(X25519PrivateKey.from_private_bytes(own_cipher_key), peer_cipher_public)
    return _derive(shared, b"share encryption round %d" % round_number, 32)
