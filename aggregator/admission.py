"""Who may enrol and how fast: attestation, trusted networks and rate limits per client address.

Enrolment is where a Sybil attack starts: every fake device needs a device token. A
real deployment asks the phone's platform to attest that it is a genuine device (Play
Integrity, App Attest) before it enrols it; here that check is a seam,
`EnrolmentAttestation`, with one implementation: devices on a trusted network (by
default loopback, the simulator's own machine) enrol freely, and any other must show
the deployment's enrolment secret. On top of it, enrolments and check-ins are rate
limited per client address outside the trusted networks, with `limits`' moving
windows. None of this stops an attacker with many addresses and the secret; random
selection (aggregator/selection.py) and the norm bound limit what such devices can do.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from aggregator.config import AggregatorConfig

ENROLMENT_SECRET_HEADER = "X-Enrolment-Secret"


class AdmissionError(Exception):
    """A request refused before it is served; `status_code` is its HTTP answer."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class EnrolmentAttestation(Protocol):
    def check(self, client_host: str, headers: dict[str, str]) -> None:
        """Return if a device at `client_host` that sent `headers` may enrol; raise AdmissionError if not."""


def trusted(client_host: str, networks: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client_host)
    except ValueError:  # not an IP address (a test client's name): not trusted
        return False
    return any(address in ipaddress.ip_network(network) for network in networks)


@dataclass(frozen=True)
class TrustedNetworkOrSecret:
    """The default attestation: open on the trusted networks; elsewhere, the enrolment secret."""

    networks: tuple[str, ...]
    secret: str | None

    def check(self, client_host: str, headers: dict[str, str]) -> None:
        if trusted(client_host, self.networks):
            return
        if self.secret is None:
            raise AdmissionError(403, "this aggregator enrols devices only from its trusted networks; start it "
                                      "with an enrolment secret (FEDKB_ENROLMENT_SECRET) to enrol others")
        offered = headers.get(ENROLMENT_SECRET_HEADER.lower(), "")
        if not hmac.compare_digest(offered.encode(), self.secret.encode()):
            raise AdmissionError(403, f"enrolment needs the deployment's secret in the {ENROLMENT_SECRET_HEADER} "
                                      "header")


class RateLimits:
    """Enrolments and check-ins per client address and minute, outside the trusted networks."""

    def __init__(self, config: AggregatorConfig) -> None:
        self._networks = config.trusted_networks
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._per_minute = {"enrol": RateLimitItemPerMinute(config.enrolments_per_minute),
                            "checkin": RateLimitItemPerMinute(config.checkins_per_minute)}

    def hit(self, action: str, client_host: str) -> None:
        """Count one request; raise AdmissionError (429) if the address is over its limit."""
        if trusted(client_host, self._networks):
            return
        limit = self._per_minute[action]
        if not self._limiter.hit(limit, action, client_host):
            raise AdmissionError(429, f"too many {action} requests from {client_host}: at most {limit.amount} a "
                                      "minute; wait before trying again")
