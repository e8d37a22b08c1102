"""Selection: which of the devices that check in train in a round.

Not the fastest ones (Bonawitz et al. 2019, "Towards Federated Learning at Scale",
section 2.2). Devices that check in while a selection window is open become
candidates, once each however often they ask; when the window closes the round draws
at random among them as many as it still needs, and the next window opens. A device
that polls a thousand times a second is one candidate like a device that asked once,
so a handful of fake devices cannot take a round's slots by being quick. A candidate
is told to come back when its window closes, and a drawn one then gets its upload
token. A window of 0 draws every check-in at once: first come, first served.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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
