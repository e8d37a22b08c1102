"""Pace steering: when a device that was not selected should check in again.

Bonawitz et al. 2019 (section 2.3): the server tells each device it turns away when to
come back, so that the population's check-ins spread over time instead of arriving
together when the next round opens (a thundering herd). A device is sent to a random
moment within the next round's expected lifetime, never before the current round is
expected to end, and never sooner than a floor that bounds the check-in rate.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def retry_after_s(
    elapsed_in_round_s: float, recent_round_durations_s: Sequence[float], min_wait_s: float, rng: random.Random
) -> float:
    """Seconds a turned-away device should wait before checking in again."""
    # Until some rounds have finished, the floor is the only estimate of a round's length.
    expected_round_s = statistics.median(recent_round_durations_s) if recent_round_durations_s else min_wait_s
    until_next_round = max(0.0, expected_round_s - elapsed_in_round_s)
    return max(min_wait_s, until_next_round + rng.uniform(0.0, expected_round_s))
