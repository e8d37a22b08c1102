"""Who a phone is: a long-lived Ed25519 identity key, made on the phone, whose public half a directory the phones
trust (not the aggregator) vouches for. Secure aggregation against a lying server (Bonawitz et al. 2017, the
active-adversary protocol) signs two things with it: the public keys a phone advertises for a round, so that the
server cannot slip its own keys in for a neighbour's, and the set of survivors the server told the phone about,
so that the server cannot tell two phones two different stories about who dropped out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keyboard_model.secagg.errors import SecAggError
from keyboard_model.secagg.keys import PublicKeys

SIGNATURE_BYTES = 64


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def keys_statement(round_number: int, device_id: str, keys: PublicKeys) -> bytes:
    """What a phone signs when it advertises its round keys: round, who, and the two keys."""
    return (b"fedkeyboard secagg keys\0" + round_number.to_bytes(8, "big") + _field(device_id.encode())
            + keys.cipher + keys.masking)


def survivors_statement(round_number: int, roster: bytes, survivors: list[str]) -> bytes:
    """What a phone signs in the consistency round: the round, the roster it saw (`Roster.digest`) and the device
    ids whose masked inputs count."""
    return (b"fedkeyboard secagg survivors\0" + round_number.to_bytes(8, "big") + _field(roster)
            + b"".join(_field(device_id.encode()) for device_id in sorted(survivors)))


@dataclass(frozen=True)
class IdentityKey:
    """A phone's private identity key (raw Ed25519, 32 bytes). Raw bytes, so that it pickles to a worker."""

    private: bytes

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))

    def public(self) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, statement: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(statement)


@dataclass
class Directory:
    """The identity public keys of enrolled devices, by device id: the PKI the phones trust.

    The aggregator neither runs nor writes it. A device's key is registered once; a second registration of another
    key under the same id is refused, so whoever can reach the directory cannot take over an existing identity. With
    a `folder`, entries are files there (`<device id>.pub`), shared by the phones of one host (the fleet, the browser
    phone); without one, it lives in memory (tests)."""

    folder: Path | None = None
    _keys: dict[str, bytes] = field(default_factory=dict, repr=False)

    def register(self, device_id: str, public: bytes) -> None:
        if not device_id or "/" in device_id or device_id.startswith(".") or len(public) != 32:
            raise SecAggError("a directory entry is a plain device id and a 32-byte Ed25519 key")
        known = self._lookup(device_id)
        if known is not None:
            if known != public:
                raise SecAggError(f"device {device_id} is registered with another identity key")
            return
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = self.folder / f".{device_id}.{os.getpid()}.tmp"
            staging.write_bytes(public)
            try:
                os.link(staging, self.folder / f"{device_id}.pub")  # fails if another key got there first
            except FileExistsError:
                pass
            finally:
                staging.unlink()
            if self._lookup(device_id) != public:
                raise SecAggError(f"device {device_id} is registered with another identity key")
        self._keys[device_id] = public

    def _lookup(self, device_id: str) -> bytes | None:
        if device_id not in self._keys and self.folder is not None:
            path = self.folder / f"{device_id}.pub"
            if path.exists():
                self._keys[device_id] = path.read_bytes()
        return self._keys.get(device_id)

    def verify(self, device_id: str, statement: bytes, signature: bytes) -> None:
        """Raises SecAggError unless `device_id`'s registered identity key signed `statement`."""
        public = self._lookup(device_id)
        if public is None:
            raise SecAggError(f"device {device_id} has no identity key in the directory")
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, statement)
        except InvalidSignature as error:
            raise SecAggError(f"device {device_id}'s signature does not verify") from error
