"""Canary clients: the aggregator's own one-shot audit of what its models leak about one client (Andrew et al. 2024,
"One-shot empirical privacy estimation for federated learning").

With `canary_clients` K, the aggregator makes 2K canaries, each a fixed random unit direction in the model's
parameter space, drawn from a seed taken from the database's version 0 (so a restart, whatever its --seed, makes the
same ones). The first K are inserted into training; the other K are held out and never sent. Every `audit_every`
rounds, once the round is committed, the aggregator scores every canary by the cosine of the global model's total
movement (the new model minus version 0) with its direction, and `keyboard_model/empirical_privacy.py` turns the
held-in and held-out scores into an empirical epsilon, added to the round's record (`audit_*`). An audit that fails
is logged and leaves the round as it was committed: a measurement never costs a round.

How they take part, as a phone would, counted in releases (committed rounds: a failed round releases nothing):
- how often: at each release, each inserted canary takes part with the sampling rate the accountant assumes of a
  phone, goal / population, drawn from a generator seeded by the release (a restart draws the same). Under DP-FTRL a
  canary takes part only in its own slot of every `min_separation` releases, at that rate times the separation, so
  it keeps the separation DP-FTRL's accounting assumes and takes part as often as a phone on average;
- what it sends: its direction scaled to the clip norm (the operator's --clip-norm without differential privacy);
- how it is aggregated: as one more input to the round's aggregate, after the phones' have been checked: clipped,
  counted once and noised with the rest under differential privacy; added to the unmasked sum of a secure round (the
  checks of that sum read the phones' part alone); in a plain round, weighted as the round's average phone (its
  examples over its reports). Robust rules are refused with canaries: a canary would be one more input to a median.

How they are kept out of the honest phones' statistics: they are the server's own inputs, never devices. They do not
enrol, check in or upload, so they are never selected in a phone's place, never asked to score the model, and never
counted among a round's selected, reported, examples or evaluation devices; and they send no clipping bit, so
adaptive clipping's fraction within the clip norm, and the bits' range check, are the phones' alone. What they
change is the model, as a client does: the audit's point.

What it costs: drawing a direction is a pass over the model's values (about 5 ms for the default model's 1.4 million),
so each round draws its taking-part canaries, and each audit all 2K, under the round lock: about a second for K = 50.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from keyboard_model.empirical_privacy import estimate
from keyboard_model.errors import UserFacingError
from keyboard_model.flat import flatten, length

if TYPE_CHECKING:
    from aggregator.aggregation import Aggregation
    from aggregator.config import AggregatorConfig
    from aggregator.global_model import GlobalModel
    from aggregator.storage import Storage
    from keyboard_model.weights import Tensors

# The recent rounds searched for the canaries the database was trained with (a failed round records none).
RECORDS_SEARCHED = 1000


@dataclass(frozen=True)
class CanaryClients:
    count: int  # K inserted; K more held out
    shapes: dict[str, tuple[int, ...]]  # the model's
    initial: torch.Tensor  # version 0's values, flat: the start the model's movement is measured from
    seed: int
    # The chance that a canary takes part in a release: a phone's sampling rate (goal / population), as a function,
    # since the population may grow while the aggregator runs.
    rate: Callable[[], float]
    # DP-FTRL's minimum separation between a client's releases (1: none).
    separation: int = 1

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(f"an audit needs two canary clients or more, got {self.count}")
        if self.separation < 1:
            raise ValueError(f"the separation must be at least 1, got {self.separation}")

    def direction(self, index: int) -> torch.Tensor:
        """Canary `index`'s unit direction: 0 to count - 1 are inserted, count to 2 count - 1 held out."""
        generator = torch.Generator().manual_seed((self.seed * 2**32 + index) % 2**63)
        vector = torch.randn(length(self.shapes), generator=generator, dtype=torch.float32)
        return vector / torch.linalg.vector_norm(vector)

    def taking_part(self, release: int) -> list[int]:
        """The inserted canaries that take part in the release after `release` earlier ones (the model's version)."""
        rng = random.Random(f"canary clients {self.seed} release {release}")
        chance = min(1.0, self.rate() * self.separation)
        draws = [rng.random() for _ in range(self.count)]  # every canary draws, so one's draw never shifts another's
        return [k for k, draw in enumerate(draws) if (release + k) % self.separation == 0 and draw < chance]

    def insert(self, aggregation: Aggregation, release: int, norm: float, weight: int) -> int:
        """Add the taking-part canaries' updates, their directions at L2 norm `norm`, to a round's aggregate, each as
        an input of `weight` examples; how many took part."""
        taking_part = self.taking_part(release)
        for k in taking_part:
            aggregation.add(self.direction(k) * norm, weight)
        return len(taking_part)

    def scores(self, movement: torch.Tensor) -> tuple[list[float], list[float]]:
        """(inserted canaries' cosines with `movement`, held-out ones'), `movement` a flat vector of the model's
        values."""
        norm = float(torch.linalg.vector_norm(movement))
        cosines = [float(movement @ self.direction(k)) / norm if norm > 0 else 0.0 for k in range(2 * self.count)]
        return cosines[: self.count], cosines[self.count :]

    def audit(self, state: Tensors, delta: float) -> dict:
        """The audit record (`audit_*`) of the model `state`: the empirical epsilon at `delta`."""
        held_in, held_out = self.scores(flatten(state, self.shapes) - self.initial)
        return estimate(held_in, held_out, delta, seed=self.seed).record()


def make_canary_clients(config: AggregatorConfig, model: GlobalModel, storage: Storage,
                        population: Callable[[], int]) -> CanaryClients | None:
    """The configured canary clients, or None; `population`: the phones that could take part. Refuses a number of
    canaries other than the database's rounds were trained with: the canaries inserted so far would be counted as
    held out, or the other way round."""
    recorded = next((row["audit_canaries"] for row in reversed(storage.recent_rounds(RECORDS_SEARCHED))
                     if row.get("audit_canaries")), None)
    if recorded is not None and config.canary_clients and recorded != config.canary_clients:
        raise UserFacingError(f"the database {config.db_path} was trained with --canary-clients {recorded}: with "
                              f"{config.canary_clients} its inserted and held-out canaries would change places; "
                              f"use --canary-clients {recorded}, 0, or another --db")
    if not config.canary_clients:
        return None
    initial = model.initial_state()
    goal = config.clients_per_round
    return CanaryClients(
        count=config.canary_clients, shapes=model.shapes, initial=flatten(initial, model.shapes),
        seed=int.from_bytes(hashlib.sha256(model.initial_bytes()).digest()[:8], "big"),
        rate=lambda: goal / max(population(), goal),
        separation=config.min_separation if config.dp_mechanism == "ftrl" and config.differential_privacy else 1,
    )
