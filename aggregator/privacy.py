"""Differential privacy for the global model (DP-FedAvg, McMahan et al. 2018).

Each phone clips its update to an L2 norm of at most `clip_norm` (the server clips
again whatever it can see, so an update that crossed the network cannot exceed it);
the server sums the updates of a round, each counting once, adds Gaussian noise of
standard deviation `noise_multiplier * clip_norm` to the sum, exactly once, and divides
by the round's goal, a fixed denominator, so that how many phones reported is not a
second, unprotected release. One phone's whole history then moves the noisy sum by at
most `clip_norm`: the guarantee is per phone (user-level), not per message.

The privacy spent is counted by Google's `dp-accounting` (its RDP accountant), one
sampled Gaussian event per round with sampling rate goal / population. That assumes
each phone takes part in a round with that probability, independently; the simulator
selects phones by eligibility and check-in order instead, so the figure is the one a
deployment with uniform sampling would report, not a proof about the simulation.

Registered as `fedavg` in `aggregator/mechanisms.py`; `dp_fedavg` resumes it from the database.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant

from aggregator.adaptive_clipping import ClipNorm, resumed_clip
from keyboard_model.weights import Tensors

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.global_model import GlobalModel
    from aggregator.storage import Storage


@dataclass(frozen=True)
class PrivacyEvent:
    """One round's release: a Gaussian sum with this noise multiplier, each phone in it with this probability."""

    sampling_rate: float
    noise_multiplier: float


def epsilon(events: Iterable[PrivacyEvent], delta: float, orders: Sequence[float] | None = None) -> float:
    """Cumulative epsilon at `delta` after these rounds (0 before any); `orders`: the RDP orders to optimise over
    (default: the accountant's own, a fine grid)."""
    accountant = RdpAccountant() if orders is None else RdpAccountant(orders=list(orders))
    for event, count in Counter(events).items():
        gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(event.sampling_rate, gaussian), count)
    return float(accountant.get_epsilon(delta))


def noisy_mean(total: Tensors, clip_norm: float, noise_multiplier: float, denominator: int,
               generator: torch.Generator) -> Tensors:
    """(sum of clipped updates + N(0, (noise_multiplier * clip_norm)^2) per coordinate) / denominator."""
    std = noise_multiplier * clip_norm
    return {
        name: ((t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype)) / denominator).float()
        for name, t in total.items()
    }


class PrivacyLedger:
    """The privacy a run has spent: every round that released a differentially private model, from the database
    at start and one more at each commit. `clip` is the clip norm the rounds ask for (fixed or adaptive)."""

    def __init__(self, clip: ClipNorm, noise_multiplier: float, goal: int, population: Callable[[], int],
                 delta: float | None, past: Iterable[PrivacyEvent]) -> None:
        self.clip = clip
        self._noise_multiplier = noise_multiplier
        self._goal = goal
        # Counted when a round releases: devices may still enrol while it runs.
        self._population = population
        self._delta = delta
        self._events = list(past)

    @property
    def clip_norm(self) -> float:
        return self.clip.norm

    @property
    def noise_stddev(self) -> float:
        """The standard deviation of each value of the noise the next release adds to the sum."""
        return self.clip.update_noise_multiplier * self.clip.norm

    def release(self, total: Tensors, within: int, reported: int) -> tuple[Tensors, dict[str, float]]:
        """The noisy mean of a sum of clipped updates (`within` of the `reported` ones within the clip norm, for
        adaptive clipping), and the record of the release: its noise, the sampling rate the accountant assumed,
        delta, the epsilon spent by every round up to this one, and the clip norm. With adaptive clipping the updates
        are noised at the larger z_update, so that with the bits the round is one Gaussian release at the noise
        multiplier accounted for."""
        population = max(self._population(), self._goal)
        event = PrivacyEvent(self._goal / population, self._noise_multiplier)
        delta = self._delta or 1.0 / population
        record = {"dp_noise_multiplier": event.noise_multiplier, "dp_sampling_rate": event.sampling_rate,
                  "dp_delta": delta, "epsilon": epsilon([*self._events, event], delta),
                  **self.clip.release(within, reported)}
        # Unpredictable noise: anyone who could replay it could subtract it.
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        return noisy_mean(total, self.clip.norm, self.clip.update_noise_multiplier, self._goal, generator), record

    def rounds_to_sit_out(self, device_id: str) -> int:
        return 0  # the accounting assumes sampling, which no sitting out would make true

    def pending_state(self) -> None:
        return None  # the records hold every event the accountant needs

    def spent(self, record: dict[str, float], reporters: Iterable[str] = ()) -> None:
        """A release was committed: count it, and move the clip norm on."""
        self._events.append(PrivacyEvent(record["dp_sampling_rate"], record["dp_noise_multiplier"]))
        self.clip.spent(record)


def dp_fedavg(config: AggregatorConfig, storage: Storage, model: GlobalModel,
              population: Callable[[], int]) -> PrivacyLedger:
    """DP-FedAvg, resumed: every release the database holds is counted again, and an adaptive clip norm goes on
    from where the last one left it."""
    return PrivacyLedger(resumed_clip(config, storage.last_release()), config.private_noise_multiplier,
                         config.clients_per_round, population, config.dp_delta,
                         [PrivacyEvent(q, z) for q, z in storage.privacy_events()])
