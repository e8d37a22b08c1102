"""Enrolled devices: each has a random id and a secret token, which the database keeps only as a SHA-256 hash,
so a copy of it does not let anyone act as a device. A device the secure-aggregation protocol proved to lie
(`SecureRound.culprits`) is excluded from every later round, also after a restart: its round's record keeps it."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Mapping

from aggregator.refusals import UnauthorizedError
from aggregator.storage import Storage


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Devices:
    """Thread-safe: enrolment and authentication happen on many request threads at once."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self._by_token_hash = storage.device_tokens()
        self._excluded = storage.excluded_devices()

    def enrol(self) -> tuple[str, str]:
        """A new device: its id and the secret token it must show at every check-in."""
        device_id, token = f"device-{secrets.token_hex(8)}", secrets.token_urlsafe(32)
        with self._lock:
            self._storage.enrol_device(device_id, token_hash(token))
            self._by_token_hash[token_hash(token)] = device_id
        return device_id, token

    def authenticate(self, device_token: str) -> str:
        """The enrolled device this token belongs to."""
        with self._lock:
            device_id = self._by_token_hash.get(token_hash(device_token))
        if device_id is None:
            raise UnauthorizedError("unknown device token: enrol first (POST /devices)")
        return device_id

    def exclusion(self, device_id: str) -> str | None:
        """How the protocol proved this device to lie, if it did: then it takes part in no round."""
        with self._lock:
            return self._excluded.get(device_id)

    def exclude(self, culprits: Mapping[str, str]) -> None:
        """Exclude these devices (device id -> how they lied) once the round that proved it is recorded."""
        with self._lock:
            self._excluded.update(culprits)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token_hash)
