"""Selection: which of the devices that check in train in a round.

Not the fastest ones (Bonawitz et al. 2019, "Towards Federated Learning at Scale",
section 2.2). Devices that check in while a selection window is open become
candidates, once each however often they ask; when the window closes the round draws
at random among them as many as it still needs, and the next window opens. A device
that polls a thousand times a second is one candidate like a device that asked once,
so a handful of fake devices cannot take a round's slots by being quick. A candidate
is told to come back when its window closes, and a drawn one then gets its upload
token. A window of 0 draws every check-in at once: first come, first served.

Counting each device once per window is not enough on its own: a device that polls
every 50 ms is in every window, while a phone that does as it is told comes back only
when pace steering sends it, and so is in few. So a device turned away is held to the
time it was told (`Comebacks`): a check-in before then is answered with the time left,
and makes it a candidate of no window. Polling fast then gets a device exactly what
coming back when told gets it. What this does not stop is a device that comes back
later than told, at a moment it picks because it watched a window open: it is then a
candidate more often than a phone that comes back at pace steering's random moment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# A phone's next request reaches the aggregator after the wait it was told plus two network trips, so never early;
# this covers the wait's rounding to milliseconds, and a simulator's clock stepping in ticks.
EARLY_SLACK_S = 0.5


class Comebacks:
    """When each device that was turned away was told to come back, on the round manager's clock."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}

    def told(self, device_id: str, due: float) -> None:
        self._due[device_id] = due

    def early_by(self, device_id: str, now: float) -> float | None:
        """How long before its time the device checks in, or None if it is not early (and then no longer held)."""
        due = self._due.get(device_id)
        if due is not None and now < due - EARLY_SLACK_S:
            return due - now
        self._due.pop(device_id, None)
        return None


@dataclass
class SelectionWindow:
    window_s: float
    ends: float  # on the round manager's clock
    # In order of first check-in (a dict keeps it), so that a seeded draw is repeatable.
    candidates: dict[str, None] = field(default_factory=dict)

    def offer(self, device_id: str, now: float) -> None:
        if now >= self.ends and not self.candidates:
            # Nobody asked while the last window was open: a new one opens with this device, rather than this
            # device being drawn alone, which would hand a slot to whoever polls first after a quiet spell.
            self.ends = now + self.window_s
        self.candidates.setdefault(device_id)

    def due(self, now: float) -> bool:
        return now >= self.ends and bool(self.candidates)

    def draw(self, slots: int, now: float, rng: random.Random) -> list[str]:
        """Up to `slots` candidates, uniformly at random; the next window opens now."""
        chosen = rng.sample(list(self.candidates), min(slots, len(self.candidates)))
        self.candidates.clear()
        self.ends = now + self.window_s
        return chosen
