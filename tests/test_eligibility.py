"""Simulated eligibility: diurnal, persistent, reproducible, and independent of the rest of the fleet."""

from __future__ import annotations

import dataclasses
import random
import statistics

import numpy as np
import pytest

from device_sim.eligibility import DEFAULT_TIME_ZONES, EligibilityConfig, SimulatedClock

PHONES = [f"phone-{index:05d}" for index in range(4000)]
TICKS_PER_HOUR = 6  # with the default tick_minutes of 10
ONE_ZONE = EligibilityConfig(time_zones=((0.0, 1.0),))


def tick_at(hour: float, day: int = 0) -> int:
    return round((24 * day + hour) * TICKS_PER_HOUR)


def eligible_rate(config: EligibilityConfig, hour: float) -> float:
    return float(SimulatedClock(config).eligible(PHONES, tick_at(hour)).mean())


def test_same_seed_same_conditions_and_another_seed_others() -> None:
    first, second = SimulatedClock(EligibilityConfig(seed=3)), SimulatedClock(EligibilityConfig(seed=3))
    other = SimulatedClock(EligibilityConfig(seed=4))
    ticks = range(0, 144, 7)
    assert [first.conditions(p, t) for p in PHONES[:50] for t in ticks] == \
           [second.conditions(p, t) for p in PHONES[:50] for t in ticks]
    assert [first.profile(p) for p in PHONES[:50]] == [second.profile(p) for p in PHONES[:50]]
    assert [first.conditions(p, t) for p in PHONES[:50] for t in ticks] != \
           [other.conditions(p, t) for p in PHONES[:50] for t in ticks]


def test_a_phone_does_not_depend_on_other_phones_or_on_how_it_is_asked() -> None:
    config = EligibilityConfig(seed=7)
    whole_fleet, alone, ticking = SimulatedClock(config), SimulatedClock(config), SimulatedClock(config)
    shuffled = PHONES[:500]
    random.Random(0).shuffle(shuffled)
    for tick in (5, 40, 100):
        together = dict(zip(shuffled, whole_fleet.eligible(shuffled, tick)))
        for phone_id in PHONES[:500:37]:
            assert alone.eligible([phone_id], tick)[0] == together[phone_id]
            assert alone.conditions(phone_id, tick).eligible == together[phone_id]
        # As the fleet asks: phone by phone at the current tick, answered from one pass over known phones.
        while ticking.tick < tick:
            ticking.advance()
        assert {p: ticking.conditions(p).eligible for p in shuffled} == together


def test_clock_advances_and_tells_the_time() -> None:
    clock = SimulatedClock(EligibilityConfig())
    assert (clock.tick, clock.hour_utc(), clock.day()) == (0, 0.0, 0)
    for _ in range(150):
        clock.advance()
    assert (clock.tick, clock.hour_utc(), clock.day()) == (150, 1.0, 1)  # 1,500 minutes in
    assert clock.conditions("phone-00001") == clock.conditions("phone-00001", 150)
    assert clock.hour_utc(9) == 1.5


def test_night_weight_ramps_between_day_and_night() -> None:
    config = EligibilityConfig(night_start_h=23.0, night_end_h=7.0, transition_h=2.0)
    assert [config.night_weight(h) for h in (3.0, 12.0, 23.0, 7.0, 22.0, 22.5, 7.5, 8.0)] == \
           [1.0, 0.0, 0.5, 0.5, 0.0, 0.25, 0.25, 0.0]
    assert config.probabilities(3.0) == (config.p_idle_night, config.p_charging_night, config.p_unmetered_night)
    assert config.probabilities(15.0) == (config.p_idle_day, config.p_charging_day, config.p_unmetered_day)


def test_phones_in_one_zone_are_eligible_at_night_and_rarely_by_day() -> None:
    night, day = eligible_rate(ONE_ZONE, 3.0), eligible_rate(ONE_ZONE, 14.0)
    # Each rate is the product of the hour's three probabilities; 4,000 phones give about +-0.01.
    assert night == pytest.approx(np.prod(ONE_ZONE.probabilities(3.0)), abs=0.04)
    assert day == pytest.approx(np.prod(ONE_ZONE.probabilities(14.0)), abs=0.02)
    assert night > 5 * day


def test_night_is_local() -> None:
    # At 03:00 UTC it is 15:00 in UTC+12: those phones are in their day.
    far_east = EligibilityConfig(time_zones=((12.0, 1.0),))
    assert eligible_rate(far_east, 3.0) < eligible_rate(ONE_ZONE, 3.0) / 5
    assert eligible_rate(far_east, 15.0) > 5 * eligible_rate(ONE_ZONE, 15.0)


def test_the_default_fleet_has_a_clear_daily_peak_and_trough() -> None:
    clock = SimulatedClock(EligibilityConfig())
    counts = [int(clock.eligible(PHONES, tick).sum()) for tick in range(24 * TICKS_PER_HOUR)]
    assert max(counts) > 3 * min(counts)
    # The Americas and Europe, three quarters of the default mix, all sleep between 04:00 and 06:00 UTC.
    assert 2.0 <= np.argmax(counts) / TICKS_PER_HOUR <= 9.0


def test_eligibility_persists_from_one_tick_to_the_next() -> None:
    def still_eligible(config: EligibilityConfig, hours: tuple[int, int]) -> tuple[float, float, float]:
        """P(eligible at t+1 | eligible at t), P(eligible at t+1..t+3 | at t) and P(eligible), within `hours`."""
        clock = SimulatedClock(config)
        now = np.array([clock.eligible(PHONES, tick) for tick in range(tick_at(hours[0]), tick_at(hours[1]))])
        next_three = now[1:-2] & now[2:-1] & now[3:]
        return float(now[1:][now[:-1]].mean()), float(next_three[now[:-3]].mean()), float(now.mean())

    # Midday, where the profile is flat and eligibility rare.
    stays, _, base = still_eligible(ONE_ZONE, (11, 15))
    assert base < 0.1
    assert stays > 0.5 and stays > 5 * base
    # At night few eligible phones drop out within 30 minutes (Bonawitz et al. see 6-10% per round).
    _, stays_30_minutes, _ = still_eligible(ONE_ZONE, (1, 5))
    assert 0.85 < stays_30_minutes < 0.96
    # Without memory every tick is a fresh draw: the same measurement gives the base rate.
    stays_memoryless, _, base_memoryless = still_eligible(dataclasses.replace(ONE_ZONE, memory_minutes=0), (11, 15))
    assert stays_memoryless == pytest.approx(base_memoryless, abs=0.03)


def test_stays_eligible_agrees_with_checking_every_tick() -> None:
    clock = SimulatedClock(EligibilityConfig())
    draw = random.Random(1)
    answers = []
    for phone_id in PHONES[:300]:
        start, ticks = draw.randrange(0, 3 * 24 * TICKS_PER_HOUR), draw.randint(1, 12)
        expected = all(clock.conditions(phone_id, tick).eligible for tick in range(start, start + ticks))
        assert clock.stays_eligible(phone_id, start, ticks) == expected
        answers.append(expected)
    assert True in answers and False in answers
    with pytest.raises(ValueError):
        clock.stays_eligible(PHONES[0], 0, 0)


def test_profiles_spread_speeds_and_follow_the_time_zone_weights() -> None:
    clock = SimulatedClock(EligibilityConfig())
    profiles = [clock.profile(phone_id) for phone_id in PHONES]
    speeds = [profile.speed for profile in profiles]
    deciles = statistics.quantiles(speeds, n=10)
    assert statistics.median(speeds) == pytest.approx(1.0, abs=0.05)
    assert deciles[-1] / deciles[0] > 2.5  # sigma 0.5: the 90th percentile is ~3.6 times the 10th
    assert min(speeds) > 0
    for offset, weight in DEFAULT_TIME_ZONES:
        share = sum(profile.utc_offset_h == offset for profile in profiles) / len(profiles)
        assert share == pytest.approx(weight, abs=0.025)
    uniform = SimulatedClock(EligibilityConfig(speed_sigma=0.0))
    assert {uniform.profile(phone_id).speed for phone_id in PHONES[:100]} == {1.0}


@pytest.mark.parametrize("changes", [
    {"p_idle_night": 1.5},
    {"p_charging_day": -0.1},
    {"night_start_h": 24.0},
    {"transition_h": 0.0},
    {"transition_h": 9.0},  # longer than the 8-hour night
    {"tick_minutes": 0.0},
    {"memory_minutes": -1.0},
    {"speed_sigma": -0.5},
    {"time_zones": ()},
    {"time_zones": ((15.0, 1.0),)},
    {"time_zones": ((0.0, 1.0), (1.0, 0.0))},
])
def test_invalid_configs_are_refused(changes: dict) -> None:
    with pytest.raises(ValueError):
        EligibilityConfig(**changes)
