"""When a phone may train: only while idle, charging and on an unmetered network.

Real fleets are eligible mostly at night, local time: people charge their phones
on Wi-Fi and leave them alone while they sleep, so the number of phones able to
train follows a daily wave (Bonawitz et al. 2019, "Towards federated learning at
scale"). The simulator reproduces that:

* every phone has a `DeviceProfile`: a time zone drawn from a skewed mix, so
  the fleet's nights overlap unevenly and the eligible count has a clear peak
  and trough, and a speed factor, so phones take different times to train;
* the chance of each condition follows the local hour (`EligibilityConfig`:
  a day value, a night value, and linear ramps between them);
* a condition persists across ticks: it holds while a phone's latent signal (a
  weighted moving average of per-tick Gaussian noise, standard normal at every
  tick) is below the quantile of that hour's probability. Neighbouring ticks share most
  of their noise, so a phone on the charger at 01:00 is likely still on it at
  01:10, while at every tick the chance is that hour's probability.

All randomness is a counter-based hash of (seed, phone, tick, condition), so a
phone's conditions at any tick are computed directly, without simulating the
ticks before it, and never depend on which other phones exist. The hash is
splitmix64's, vectorised over every phone and tick in one numpy pass: numpy's
counter-based Philox would give the same property, but takes one generator
object per phone key, and making 10,000 of them took 230 ms where this whole
tick of 10,000 phones took 14 (measured together, on two busy cores).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

MINUTES_PER_DAY = 24 * 60

# (UTC offset in hours, share of phones): an illustrative user base of an English
# keyboard, heaviest in the Americas and Europe, then India. Americas and Europe
# sleep during UTC 04-07, so the fleet peaks then and bottoms out in the UTC afternoon.
DEFAULT_TIME_ZONES: tuple[tuple[float, float], ...] = (
    (-8.0, 0.14),  # US and Canada Pacific
    (-6.0, 0.08),  # US Central, Mexico
    (-5.0, 0.16),  # US and Canada Eastern, Colombia, Peru
    (-3.0, 0.10),  # Brazil, Argentina
    (0.0, 0.10),  # UK, Ireland, Portugal, West Africa
    (1.0, 0.16),  # Central Europe, Nigeria
    (3.0, 0.04),  # Turkey, Moscow, East Africa
    (5.5, 0.12),  # India
    (8.0, 0.06),  # China, Singapore, Philippines, Western Australia
    (10.0, 0.04),  # Eastern Australia
)

# The three conditions, in the order of DeviceConditions' fields and of every array axis below.
CONDITIONS = ("idle", "charging", "unmetered")

# splitmix64's increment and finaliser constants: a cheap, well-mixed 64-bit hash, vectorised by numpy.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
# Noise is drawn by looking 16 bits of a hash up in a table of 2**16 equally likely standard normal values
# (quantiles at bin midpoints, rescaled to unit variance). One 64-bit hash per (phone, tick) thus gives the
# noise of all three conditions, with no transcendental function per draw: 10,000 phones take milliseconds.
_NOISE_BITS = 16
_NOISE_TABLE = ndtri((np.arange(2**_NOISE_BITS) + 0.5) / 2**_NOISE_BITS)
_NOISE_TABLE /= _NOISE_TABLE.std()
# Where each condition's 16 bits sit in the hash, and the mask that cuts them out.
_CONDITION_SHIFTS = np.array([48, 32, 16], dtype=np.uint64)[:, None]
_NOISE_MASK = np.uint64(2**_NOISE_BITS - 1)


@dataclass(frozen=True)
class DeviceConditions:
    idle: bool
    charging: bool
    unmetered: bool

    @property
    def eligible(self) -> bool:
        return self.idle and self.charging and self.unmetered


@dataclass(frozen=True)
class DeviceProfile:
    """What sets a phone apart for the whole run.

    `speed` multiplies the phone's local training time (log-normal with median 1:
    2.0 takes twice as long as a median phone, 0.5 half as long).
    """

    utc_offset_h: float
    speed: float


@dataclass(frozen=True)
class EligibilityConfig:
    """How phones' conditions follow the local hour and persist across ticks.

    Each condition holds with its `*_day` probability during the day and its
    `*_night` probability from `night_start_h` to `night_end_h` local time, ramping
    linearly between the two over `transition_h` hours centred on each boundary.
    The defaults make a phone eligible (all three at once) about 73% of the time at
    night, when most phones lie untouched on a charger on home Wi-Fi, and 3% by day,
    when few are charging, unused and off mobile data at once.
    """

    p_idle_night: float = 0.95
    p_idle_day: float = 0.45
    p_charging_night: float = 0.85
    p_charging_day: float = 0.15
    p_unmetered_night: float = 0.9
    p_unmetered_day: float = 0.5
    night_start_h: float = 23.0
    night_end_h: float = 7.0
    transition_h: float = 2.0
    # How long a condition remembers its past: its states at two ticks this far apart are unrelated,
    # and the closer the ticks the likelier they agree. One tick or less draws every tick afresh.
    # With 240 about 8% of phones eligible at night drop out within the next 30 minutes, close to
    # the 6-10% of participants Bonawitz et al. report dropping out of a round.
    memory_minutes: float = 240.0
    time_zones: tuple[tuple[float, float], ...] = DEFAULT_TIME_ZONES
    # Spread of the log-normal speed factor (the standard deviation of its logarithm).
    speed_sigma: float = 0.5
    tick_minutes: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        for condition in CONDITIONS:
            for period in ("night", "day"):
                name = f"p_{condition}_{period}"
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        for name in ("night_start_h", "night_end_h"):
            if not 0.0 <= getattr(self, name) < 24.0:
                raise ValueError(f"{name} must be an hour in [0, 24), got {getattr(self, name)}")
        night = self.night_hours
        if not 0.0 < self.transition_h <= min(night, 24.0 - night):
            raise ValueError(f"transition_h must be positive and fit within the night ({night} h) "
                             f"and the day ({24.0 - night} h), got {self.transition_h}")
        if self.tick_minutes <= 0:
            raise ValueError(f"tick_minutes must be positive, got {self.tick_minutes}")
        if self.memory_minutes < 0:
            raise ValueError(f"memory_minutes must not be negative, got {self.memory_minutes}")
        if self.speed_sigma < 0:
            raise ValueError(f"speed_sigma must not be negative, got {self.speed_sigma}")
        if not self.time_zones:
            raise ValueError("time_zones must list at least one (utc_offset_h, weight)")
        for offset, weight in self.time_zones:
            if not -12.0 <= offset <= 14.0:
                raise ValueError(f"a UTC offset must be within [-12, 14] hours, got {offset}")
            if weight <= 0:
                raise ValueError(f"a time zone's weight must be positive, got {weight} for UTC{offset:+g}")

    @property
    def night_hours(self) -> float:
        """Length of the night, from `night_start_h` to `night_end_h` (across midnight if needed)."""
        return (self.night_end_h - self.night_start_h) % 24.0 or 24.0

    @property
    def memory_ticks(self) -> int:
        """Ticks of noise each condition's latent signal averages over (at least one)."""
        return max(1, round(self.memory_minutes / self.tick_minutes))

    def night_weight(self, local_hour: float) -> float:
        """How much of the night profile applies at `local_hour`: 1 at night, 0 by day, linear in between."""
        # Hours since the start of the rising ramp, which begins half a transition before night_start_h.
        since = (local_hour - self.night_start_h + self.transition_h / 2) % 24.0
        rising = since / self.transition_h
        falling = (self.night_hours + self.transition_h - since) / self.transition_h
        return min(1.0, max(0.0, min(rising, falling)))

    def probabilities(self, local_hour: float) -> tuple[float, ...]:
        """Chance that each condition (idle, charging, unmetered) holds at `local_hour`."""
        night = self.night_weight(local_hour)
        return tuple(
            getattr(self, f"p_{condition}_day") * (1.0 - night) + getattr(self, f"p_{condition}_night") * night
            for condition in CONDITIONS
        )


@dataclass(frozen=True)
class _Phone:
    """A phone's profile and what the vectorised draws need of it, cached per phone id."""

    key: int  # the 64-bit stream its per-tick noise is hashed from
    zone: int  # index into the config's time_zones
    profile: DeviceProfile


class SimulatedClock:
    """Ticks of simulated time, and every phone's conditions at each tick.

    Tick 0 starts at 00:00 UTC of day 0; each tick lasts `tick_minutes`. Answers are
    pure functions of (config, phone id, tick): the clock only caches work. `eligible`
    answers for many phones in one vectorised pass; `conditions` at the current tick
    answers for every phone the clock has seen in one pass too, the first time any is asked.
    """

    def __init__(self, config: EligibilityConfig) -> None:
        self.config = config
        self.tick = 0
        self._phones: dict[str, _Phone] = {}
        # (tick, every known phone's (idle, charging, unmetered) then): a fleet asks phone by phone.
        self._now: tuple[int, dict[str, tuple[bool, ...]]] = (-1, {})
        offsets, weights = zip(*config.time_zones)
        self._zone_offsets: tuple[float, ...] = offsets
        self._zone_weights: tuple[float, ...] = weights

    def advance(self) -> None:
        self.tick += 1

    def hour_utc(self, tick: int | None = None) -> float:
        """Hour of the UTC day (0 <= hour < 24) at the start of `tick` (default: the current tick)."""
        minutes = self._tick_or_now(tick) * self.config.tick_minutes
        return (minutes % MINUTES_PER_DAY) / 60.0

    def day(self, tick: int | None = None) -> int:
        """Simulated UTC day (0, 1, ...) that `tick` (default: the current tick) starts in."""
        return int(self._tick_or_now(tick) * self.config.tick_minutes // MINUTES_PER_DAY)

    def profile(self, phone_id: str) -> DeviceProfile:
        """The phone's time zone and speed, fixed by (seed, phone_id)."""
        return self._phone(phone_id).profile

    def conditions(self, phone_id: str, tick: int | None = None) -> DeviceConditions:
        """The phone's conditions at `tick` (default: the current tick)."""
        phone = self._phone(phone_id)
        tick = self._tick_or_now(tick)
        if tick == self.tick:
            if self._now[0] != tick:
                held = self._held(list(self._phones.values()), tick, 1)[0]
                self._now = (tick, dict(zip(self._phones, map(tuple, held.T.tolist()))))
            if phone_id in self._now[1]:  # not when first seen after the pass
                return DeviceConditions(*self._now[1][phone_id])
        return DeviceConditions(*(bool(h) for h in self._held([phone], tick, 1)[0, :, 0]))

    def eligible(self, phone_ids: Sequence[str], tick: int | None = None) -> np.ndarray:
        """Whether each phone is eligible at `tick` (default: the current tick), as a bool array.

        Same answers as `conditions(phone_id, tick).eligible`, computed for all phones in one pass.
        """
        phones = [self._phone(phone_id) for phone_id in phone_ids]
        return self._held(phones, self._tick_or_now(tick), 1)[0].all(axis=0)

    def stays_eligible(self, phone_id: str, from_tick: int, ticks: int) -> bool:
        """Whether the phone is eligible at every tick from `from_tick` to `from_tick + ticks - 1`.

        A phone that trains over those ticks must abort when this is False: a real one
        stops as soon as it is unplugged, picked up or leaves Wi-Fi.
        """
        if ticks < 1:
            raise ValueError(f"ticks must be at least 1, got {ticks}")
        return bool(self._held([self._phone(phone_id)], from_tick, ticks).all())

    def _tick_or_now(self, tick: int | None) -> int:
        return self.tick if tick is None else tick

    def _phone(self, phone_id: str) -> _Phone:
        phone = self._phones.get(phone_id)
        if phone is None:
            # Seeded by the id itself (random.Random hashes strings with SHA-512): stable across runs.
            draw = random.Random(f"{self.config.seed}:{phone_id}")
            zone = draw.choices(range(len(self._zone_offsets)), weights=self._zone_weights)[0]
            speed = draw.lognormvariate(0.0, self.config.speed_sigma)
            profile = DeviceProfile(utc_offset_h=self._zone_offsets[zone], speed=speed)
            phone = self._phones[phone_id] = _Phone(key=draw.getrandbits(64), zone=zone, profile=profile)
        return phone

    def _held(self, phones: Sequence[_Phone], first_tick: int, ticks: int) -> np.ndarray:
        """Whether each condition holds for each phone at each tick: bool array (ticks, 3, phones)."""
        keys = np.fromiter((phone.key for phone in phones), dtype=np.uint64, count=len(phones))
        zones = np.fromiter((phone.zone for phone in phones), dtype=np.intp, count=len(phones))
        return self._latent(keys, first_tick, ticks) < self._thresholds(first_tick, ticks)[:, :, zones]

    def _thresholds(self, first_tick: int, ticks: int) -> np.ndarray:
        """Per tick, condition and time zone, the latent value below which the condition holds: (ticks, 3, zones)."""
        minutes = ((first_tick + step) * self.config.tick_minutes % MINUTES_PER_DAY for step in range(ticks))
        return np.stack([_zone_quantiles(self.config, minute) for minute in minutes])

    def _latent(self, keys: np.ndarray, first_tick: int, ticks: int) -> np.ndarray:
        """Each phone's latent signal per tick and condition: standard normal, (ticks, 3, phones).

        The signal at tick t is a weighted sum of the noise at ticks t - memory + 1 .. t, so
        neighbouring ticks share most of their terms and ticks `memory` apart none. The
        weights rise and fall as half a sine, not a flat average: the signal then drifts
        smoothly and a phone near the threshold does not flicker in and out every tick.
        """
        memory = self.config.memory_ticks
        weights = np.sin(math.pi * (np.arange(memory) + 0.5) / memory)
        weights /= np.sqrt(np.sum(weights**2))  # unit variance, like each noise term
        # Negative ticks (the memory before tick 0) wrap around to unused counters.
        noise_ticks = np.arange(first_tick - memory + 1, first_tick + ticks, dtype=np.int64).astype(np.uint64)
        hashes = _splitmix64(keys[None, :] + _GOLDEN * (noise_ticks[:, None] + np.uint64(1)))
        noise = _NOISE_TABLE[((hashes[:, None, :] >> _CONDITION_SHIFTS) & _NOISE_MASK).astype(np.intp)]
        # Added term by term, so a phone's signal is bit-identical however many phones or ticks are asked for.
        total = weights[-1] * noise[0:ticks]
        for lag in range(1, memory):
            total += weights[memory - 1 - lag] * noise[lag:lag + ticks]
        return total


@functools.lru_cache(maxsize=4096)
def _zone_quantiles(config: EligibilityConfig, minute_of_day: float) -> np.ndarray:
    """Per condition and time zone, the latent value below which the condition holds: (3, zones).

    It is the standard normal quantile of the local hour's probability, so the condition
    holds with that probability at every tick. Cached: it only depends on the time of day.
    """
    # ndtri gives -inf and inf for the certain cases, 0 and 1: never and always.
    quantiles = ndtri(np.array([config.probabilities((minute_of_day / 60.0 + offset) % 24.0)
                                for offset, _ in config.time_zones]).T)
    quantiles.flags.writeable = False
    return quantiles


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """splitmix64's output function: a well-mixed 64-bit hash of each state (multiplications wrap by design)."""
    state = (state ^ (state >> np.uint64(30))) * _MIX_1
    state = (state ^ (state >> np.uint64(27))) * _MIX_2
    return state ^ (state >> np.uint64(31))
