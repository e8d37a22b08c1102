"""The web demo's configuration: one object, filled from the command line or by code."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from keyboard_model.arguments import LONGEST_WAIT_S

# A DNS name, or a pattern of them like *.example.com, as TrustedHostMiddleware takes them.
HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*", re.IGNORECASE)


def host_pattern(name: str) -> str:
    """`name` as TrustedHostMiddleware compares it with the host of a Host header: lower case, an IPv6 address
    in brackets as browsers write it. A ValueError if `name` is not a host name, *.domain pattern or IP address."""
    try:
        address = ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        if HOST_NAME.fullmatch(name) is None:
            raise ValueError(f"a host is a name or IP address without a scheme or port, got {name!r}") from None
        return name.lower()
    return f"[{address}]" if address.version == 6 else str(address)


@dataclass(frozen=True)
class DemoConfig:
    # Where the global model, its version and the tokenizer come from.
    aggregator_url: str = "http://127.0.0.1:8600"
    host: str = "127.0.0.1"
    port: int = 8700
    # How often to ask the aggregator for a newer model; the page polls the demo as often.
    refresh_seconds: float = 5.0
    # The training run's folder (`fedkb simulate --out`), for what the aggregator does not record: training loss,
    # central evaluation, the comparison table and whether the run has ended. None: the dashboard shows the
    # aggregator's rounds only.
    run_dir: Path | None = None
    # "This browser is a phone": its folder (history.sqlite, device.json, phone.json) on this machine, and how often
    # it checks in with the aggregator while eligible. None: run_dir/browser-phone, or runs/browser-phone without
    # a run folder.
    phone_dir: Path | None = None
    phone_check_in_s: float = 10.0
    # Host names the page answers to besides the one it binds to, localhost, 127.0.0.1 and [::1]: any other Host
    # header is refused, which keeps a DNS-rebinding page from reading or writing this phone's history.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run_dir must be a run's folder, got the file {self.run_dir}")
        if self.phone_dir is None:
            object.__setattr__(self, "phone_dir", (self.run_dir or Path("runs")) / "browser-phone")
        if not self.aggregator_url.startswith(("http://", "https://")):
            raise ValueError(f"aggregator_url must start with http:// or https://, got {self.aggregator_url!r}")
        for name in ("phone_check_in_s", "refresh_seconds"):
            if not 0 < getattr(self, name) <= LONGEST_WAIT_S:
                raise ValueError(f"{name} must be positive and at most {LONGEST_WAIT_S} s, got {getattr(self, name)}")
        self.host_patterns()

    def host_patterns(self) -> list[str]:
        """The hosts of the Host headers the page answers (with any port or none)."""
        names = ("localhost", "127.0.0.1", "::1", self.host, *self.allowed_hosts)
        return sorted({host_pattern(name) for name in names})
