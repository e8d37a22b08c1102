"""The web demo's configuration: one object, filled from the command line or by code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    # Where the global model, its version and the tokenizer come from.
    aggregator_url: str = "http://127.0.0.1:8600"
    host: str = "127.0.0.1"
    port: int = 8700
    # How often to ask the aggregator for a newer model; the page polls the demo as often.
    refresh_seconds: float = 5.0
    # "This browser is a phone": its folder (history.sqlite, device.json, phone.json) on this machine, and how often
    # it checks in with the aggregator while eligible.
    phone_dir: Path = field(default_factory=lambda: Path("runs") / "browser-phone")
    phone_check_in_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.aggregator_url.startswith(("http://", "https://")):
            raise ValueError(f"aggregator_url must start with http:// or https://, got {self.aggregator_url!r}")
        if not self.phone_check_in_s > 0:
            raise ValueError(f"phone_check_in_s must be positive, got {self.phone_check_in_s}")
        if not self.refresh_seconds > 0:
            raise ValueError(f"refresh_seconds must be positive, got {self.refresh_seconds}")
