"""Canary clients: the aggregator's own one-shot audit of what its models leak about one client (Andrew et al. 2024,
"One-shot empirical privacy estimation for federated learning").

With `canary_clients` K, the aggregator makes 2K canaries, each a fixed random unit direction in the model's
parameter space, drawn from a generator seeded by the aggregator's seed and the canary's number (a restart makes the
same ones). The first K are inserted into training; the other K are held out and never sent. Every `audit_every`
rounds the aggregator scores every canary by the cosine of the model's total movement (the new global model minus
version 0) with its direction, and `keyboard_model/empirical_privacy.py` turns the held-in and held-out scores into
an empirical epsilon, committed with the round's record (`audit_*`).

How they take part, as a phone would:
- how often: in each round, each inserted canary takes part with the sampling rate the accountant assumes of a phone,
  goal / population, drawn from a generator seeded by the round (a restart draws the same). Under DP-FTRL a canary
  takes part only in its own slot of every `min_separation` rounds, at that rate times the separation, so it keeps
  the separation DP-FTRL's accounting assumes and takes part as often as a phone on average;
- what it sends: its direction scaled to the clip norm (the operator's --clip-norm without differential privacy);
- how it is aggregated: as one more input to the round's aggregate, after the phones' have been checked: clipped,
  counted once and noised with the rest under differential privacy; added to the unmasked sum of a secure round; in
  a plain round, weighted as the round's average phone (its examples over its reports).

How they are kept out of the honest phones' statistics: they are the server's own inputs, never devices. They do not
enrol, check in or upload, so they are never selected in a phone's place, never asked to score the model, and never
counted among a round's selected, reported, examples or evaluation devices; and they send no clipping bit, so
adaptive clipping's fraction within the clip norm, and the bits' range check, are the phones' alone. What they
change is the model, as a client does: the audit's point (at K of a few hundred against a fleet of thousands, in
rounds of tens, a canary is in few rounds: its pull is one client's).

What it costs: drawing a direction is a pass over the model's values (about 5 ms for the default model's 1.4 million),
so each round draws its taking-part canaries, and each audit all 2K.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from keyboard_model.empirical_privacy import estimate
from keyboard_model.flat import flatten, length

if TYPE_CHECKING:
    from aggregator.aggregation import Aggregation
    from aggregator.config import AggregatorConfig
    from aggregator.global_model import GlobalModel
    from keyboard_model.weights import Tensors


@dataclass(frozen=True)
class CanaryClients:
    count: int  # K inserted; K more held out
    shapes: dict[str, tuple[int, ...]]  # the model's
    initial: torch.Tensor  # version 0's values, flat: the start the model's movement is measured from
    seed: int
    # The chance that a canary takes part in a round: a phone's sampling rate (goal / population), as a function,
    # since the population may grow while the aggregator runs.
    rate: Callable[[], float]
    # DP-FTRL's minimum separation between a client's rounds (1: none).
    separation: int = 1
    audit_every: int = 10

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(f"an audit needs two canary clients or more, got {self.count}")
        if self.separation < 1 or self.audit_every < 1:
            raise ValueError(f"separation and audit_every must be at least 1, got {self.separation} and "
                             f"{self.audit_every}")

    def direction(self, index: int) -> torch.Tensor:
        """Canary `index`'s unit direction: 0 to count - 1 are inserted, count to 2 count - 1 held out."""
        generator = torch.Generator().manual_seed((self.seed * 2**32 + index) % 2**63)
        vector = torch.randn(length(self.shapes), generator=generator, dtype=torch.float32)
        return vector / torch.linalg.vector_norm(vector)

    def taking_part(self, round_number: int) -> list[int]:
        """The inserted canaries that take part in this round."""
        rng = random.Random(f"canary clients {self.seed} round {round_number}")
        chance = min(1.0, self.rate() * self.separation)
        draws = [rng.random() for _ in range(self.count)]  # every canary draws, so one's draw never shifts another's
        return [k for k, draw in enumerate(draws) if (round_number + k) % self.separation == 0 and draw < chance]

    def insert(self, aggregation: Aggregation, round_number: int, norm: float, weight: int) -> int:
        """Add the round's taking-part canaries' updates, their directions at L2 norm `norm`, to its aggregate, each
        as an input of `weight` examples; how many took part."""
        taking_part = self.taking_part(round_number)
        for k in taking_part:
            aggregation.add(self.direction(k) * norm, weight)
        return len(taking_part)

    def scores(self, movement: torch.Tensor) -> tuple[list[float], list[float]]:
        """(inserted canaries' cosines with `movement`, held-out ones'), `movement` a flat vector of the model's
        values."""
        norm = float(torch.linalg.vector_norm(movement))
        cosines = [float(movement @ self.direction(k)) / norm if norm > 0 else 0.0 for k in range(2 * self.count)]
        return cosines[: self.count], cosines[self.count :]

    def measure(self, round_number: int, state: Tensors, delta: float) -> dict:
        """The round's audit record of the model `state` it made, on every `audit_every`-th round."""
        return {} if round_number % self.audit_every else self.audit(state, delta)

    def audit(self, state: Tensors, delta: float) -> dict:
        """The audit record (`audit_*`) of the model `state`: the empirical epsilon at `delta`."""
        held_in, held_out = self.scores(flatten(state, self.shapes) - self.initial)
        return estimate(held_in, held_out, delta, seed=self.seed).record()


def canary_clients(config: AggregatorConfig, model: GlobalModel,
                   population: Callable[[], int]) -> CanaryClients | None:
    """The configured canary clients, or None; `population`: the phones that could take part."""
    if not config.canary_clients:
        return None
    goal = config.clients_per_round
    return CanaryClients(
        count=config.canary_clients, shapes=model.shapes, initial=flatten(model.initial_state(), model.shapes),
        seed=config.seed, rate=lambda: goal / max(population(), goal),
        separation=config.min_separation if config.dp_mechanism == "ftrl" and config.differential_privacy else 1,
        audit_every=config.audit_every,
    )
