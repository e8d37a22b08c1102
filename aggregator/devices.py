"""Enrolled devices: each has a random id and a secret token, which the database keeps only as a SHA-256 hash,
so a copy of it does not let anyone act as a device."""

from __future__ import annotations

import hashlib
import secrets
import threading

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

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token_hash)
