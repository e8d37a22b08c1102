"""Pace steering: when a device that was not selected should check in again.

Bonawitz et al. 2019 (section 2.3): the server tells each device it turns away when to
come back, so that the population's check-ins spread over time instead of arriving
together when the next round opens (a thundering herd), and so that a large population
checks in only about as often as rounds need it. A device is sent to a random moment
within the next `spread` rounds' expected lifetimes, never before the current round is
expected to end, and never sooner than a floor that bounds the check-in rate. The
spread follows the load: it grows while rounds see many more check-ins than they have
slots, and shrinks back when they see too few.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

# Check-ins a round should see for each device it selects: enough for a random draw among many, few enough that a
# population a hundred times the round's size does not keep the server answering "come back later".
CHECKINS_PER_SLOT = 4.0
MAX_SPREAD_ROUNDS = 100.0


def retry_after_s(
    elapsed_in_round_s: float, recent_round_durations_s: Sequence[float], min_wait_s: float, rng: random.Random,
    spread_rounds: float = 1.0,
) -> float:
    """Seconds a turned-away device should wait before checking in again."""
    # Until some rounds have finished, the floor is the only estimate of a round's length.
    expected_round_s = statistics.median(recent_round_durations_s) if recent_round_durations_s else min_wait_s
    until_next_round = max(0.0, expected_round_s - elapsed_in_round_s)
    return max(min_wait_s, until_next_round + rng.uniform(0.0, expected_round_s * spread_rounds))


def next_spread(spread_rounds: float, checkins: int, slots: int) -> float:
    """The spread for the next round, from the distinct devices that checked in during the last one.

    Devices come back over `spread_rounds` rounds, so a round sees about population / spread of them: scaling the
    spread by checkins / wanted would hit the target in one step if the population held still. It moves by the
    square root of that instead, because the devices checking in now were sent over earlier rounds' spreads.
    """
    wanted = CHECKINS_PER_SLOT * max(slots, 1)
    ratio = max(checkins, 1) / wanted
    return min(MAX_SPREAD_ROUNDS, max(1.0, spread_rounds * math.sqrt(ratio)))
