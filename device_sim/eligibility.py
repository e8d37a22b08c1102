"""When a phone may train: only while idle, charging and on an unmetered network.

The simulator drives each phone's conditions on a simulated clock of fixed ticks.
Every condition is a seeded draw per (phone, tick), so a run is reproducible and
a phone's state does not depend on which other phones exist.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceConditions:
    idle: bool
    charging: bool
    unmetered: bool

    @property
    def eligible(self) -> bool:
        return self.idle and self.charging and self.unmetered


@dataclass(frozen=True)
class EligibilityConfig:
    """Chance that each condition holds at a tick; all three together make a phone eligible."""

    p_idle: float = 0.7
    p_charging: float = 0.5
    p_unmetered: float = 0.8
    tick_minutes: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("p_idle", "p_charging", "p_unmetered"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")


class SimulatedClock:
    """Ticks of simulated time, and every phone's conditions at each tick."""

    def __init__(self, config: EligibilityConfig) -> None:
        self.config = config
        self.tick = 0

    def advance(self) -> None:
        self.tick += 1

    def conditions(self, phone_id: str) -> DeviceConditions:
        draw = random.Random(f"{self.config.seed}:{phone_id}:{self.tick}")
        return DeviceConditions(
            idle=draw.random() < self.config.p_idle,
            charging=draw.random() < self.config.p_charging,
            unmetered=draw.random() < self.config.p_unmetered,
        )
