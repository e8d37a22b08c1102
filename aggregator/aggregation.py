"""Aggregation: how one round's reports become the step the global model takes, one class per rule.

- `WeightedMean` (FedAvg, McMahan et al. 2017): each update weighted by the examples it
  trained on.
- `PrivateMean` (DP-FedAvg, `aggregator/privacy.py`, or DP-FTRL, `aggregator/ftrl.py`):
  each update clipped and counted once, Gaussian noise (DP-FTRL: correlated across
  rounds) added to the sum once, divided by the round's goal; with adaptive clipping
  (`aggregator/adaptive_clipping.py`) it also counts the phones' within-the-clip bits.
- `SecureSum` (`aggregator/secure_round.py`): the server sees only the unmasked sum of a
  secure round, in which each device counts once; with differential privacy that sum is
  released as `PrivateMean` releases its own.
Sums run as updates arrive, so memory does not grow with the round. A rule's `release`
gives the mean delta and what the round's record says of it; the round manager decides
whether enough devices reported, and the server optimiser (`aggregator/strategies/`)
turns the mean into a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from aggregator.privacy import PrivacyLedger
from aggregator.secure_round import SecureRound
from keyboard_model.norms import clip_to_norm
from keyboard_model.weights import Tensors

if TYPE_CHECKING:  # JAX is imported only when DP-FTRL is used
    from aggregator.ftrl import FtrlLedger

Shapes = dict[str, tuple[int, ...]]


class UpdateSum:
    """Running weighted sum of model deltas."""

    def __init__(self, shapes: Shapes) -> None:
        # float64 so that summing hundreds of updates loses nothing to rounding.
        self.weighted_sum = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Tensors, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"an update's weight must be positive, got {weight}")
        for name, total in self.weighted_sum.items():
            total.add_(delta[name], alpha=weight)  # promoted to float64 element by element, without a copy
        self.total_weight += weight
        self.count += 1

    def total(self) -> Tensors:
        """The weighted sum itself (float64); with weights of 1, the plain sum."""
        return self.weighted_sum

    def mean(self) -> Tensors:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {name: (total / self.total_weight).float() for name, total in self.weighted_sum.items()}


@dataclass(frozen=True)
class Release:
    mean_delta: Tensors
    # Fields of the round's record that only the aggregate tells (privacy spent, summed evaluation counts).
    record: dict[str, float | int] = field(default_factory=dict)


class Aggregation(Protocol):
    def release(self, reported: int) -> Release:
        """The round's mean delta from the `reported` devices whose updates it holds."""


class WeightedMean:
    def __init__(self, shapes: Shapes) -> None:
        self._sum = UpdateSum(shapes)

    def add(self, delta: Tensors, num_examples: int) -> None:
        self._sum.add(delta, float(num_examples))

    def release(self, reported: int) -> Release:
        return Release(self._sum.mean())


class PrivateMean:
    def __init__(self, shapes: Shapes, ledger: PrivacyLedger | FtrlLedger) -> None:
        self._sum = UpdateSum(shapes)
        self._ledger = ledger
        self._within = 0  # adaptive clipping: updates their phones said were within the clip norm

    def add(self, delta: Tensors, num_examples: int, within_clip: bool = False) -> None:
        # Phones clip already; clipping what arrived makes the bound hold whatever a device sent. Each phone counts
        # once: weighting by its claimed example count would let one phone move the sum further.
        self._sum.add(clip_to_norm(delta, self._ledger.clip_norm), 1.0)
        self._within += within_clip

    def release(self, reported: int) -> Release:
        return Release(*self._ledger.release(self._sum.total(), self._within, reported))


class SecureSum:
    def __init__(self, secure: SecureRound, ledger: PrivacyLedger | FtrlLedger | None) -> None:
        self._secure = secure
        self._ledger = ledger

    def release(self, reported: int) -> Release:
        total, (positions, hits_1, hits_3, within) = self._secure.result()
        evaluation = {"eval_devices": reported, "eval_positions": positions, "eval_hits_at_1": hits_1,
                      "eval_hits_at_3": hits_3}
        if self._ledger is not None:
            # The clipping bits come summed, inside the masked vector: the server never sees one.
            mean_delta, privacy = self._ledger.release(total, within, reported)
            return Release(mean_delta, {**privacy, **evaluation})
        # Each device counts once: its example count would be one more thing sent in the clear.
        return Release({name: (t / reported).float() for name, t in total.items()}, evaluation)
