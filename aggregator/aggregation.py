"""Aggregation: how one round's reports become the step the global model takes, one class per kind of round.

- `WeightedMean` (FedAvg, McMahan et al. 2017): each update weighted by the examples it
  trained on.
- `PrivateMean` (a privacy mechanism of `aggregator/mechanisms.py`: DP-FedAvg or DP-FTRL):
  each update clipped and counted once, Gaussian noise (DP-FTRL: correlated across
  rounds) added to the sum once, divided by the round's goal; with adaptive clipping
  (`aggregator/adaptive_clipping.py`) it also counts the phones' within-the-clip bits.
- `SecureSum` (`aggregator/secure_round.py`): the server sees only the unmasked sum of a
  secure round, in which each device counts once; with differential privacy that sum is
  released as `PrivateMean` releases its own. The server cannot check one device's input,
  so it checks the sum against what devices sending what honest ones send could give
  (`ImpossibleSumError`, and the round fails): each evaluation count, and the released
  mean's norm. Updates within the ring's bound B average to at most B; the ring's
  stochastic rounding adds to the sum a vector whose expected squared norm is at most
  r size / (4 scale^2) for r inputs, allowed for at twice its root-mean-square (an honest
  round exceeds that with probability below exp(-9 size / (8 r^2)), by Hoeffding); with
  differential privacy the released mean also carries the noise, allowed for at
  sigma (sqrt(d) + 8), which a Gaussian vector of d values exceeds with probability
  below exp(-32). The noise is in the check because the check must read only what is
  released: whether a round failed on its sum before the noise would tell a lying phone
  something about the others' updates that no noise covers. So with differential privacy
  the check refuses only what stands out from the noise; so that a push piled on a few
  values stands out, no value of the mean may pass rB plus the rounding's and the
  noise's largest value over d (their sub-Gaussian tail, at a union-bound false alarm
  of 1e-12). Plain rounds need no such check:
  the server bounds (`WeightedMean`) or clips (`PrivateMean`) each update itself, and a
  mean of updates within a bound is within it.
Sums run as updates arrive, so memory does not grow with the round. A rule's `release`
gives the mean delta and what the round's record says of it; the round manager decides
whether enough devices reported, and the server optimiser (`aggregator/strategies/`)
turns the mean into a step. Plain rounds may instead use a robust rule from the table in
`aggregator/rules/` (median, trimmed mean), which keeps the round's updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from aggregator.adaptive_clipping import ImpossibleSumError
from aggregator.secure_round import SecureRound
from keyboard_model.flat import length, views
from keyboard_model.norms import l2_norm
from keyboard_model.weights import Tensors

if TYPE_CHECKING:
    from aggregator.mechanisms import PrivacyMechanism

Shapes = dict[str, tuple[int, ...]]
# The privacy noise's norm is allowed for up to sigma (sqrt(d) + this): P(more) <= exp(-8^2 / 2)
# (Gaussian concentration).
NOISE_NORM_STDDEVS = 8.0
# The chance that an honest round's largest value, over all d of them, passes its allowance (union bound).
LARGEST_VALUE_FALSE_ALARM = 1e-12
# Floats: a phone's float32 clip lands a hair past the bound (2.000000238 for 2), which a 32-bit ring's rounding
# allowance (about 1e-8 of it) would not cover.
FLOAT_TOLERANCE = 1e-6


class UpdateSum:
    """Running weighted sum of model deltas, each a flat float32 vector in the order of `shapes`
    (`keyboard_model/flat.py`)."""

    def __init__(self, shapes: Shapes) -> None:
        # float32: one fused multiply-add per upload, a quarter of float64's cost with a float32 delta. Its rounding
        # (relative 6e-8 per addition, so at most about 1e-4 of the sum's size after 1,000 updates, and in practice
        # the square root of that count times 6e-8) is far below the int8 rounding each update already carries.
        self._shapes = shapes
        self.weighted_sum = torch.zeros(length(shapes), dtype=torch.float32)
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"an update's weight must be positive, got {weight}")
        self.weighted_sum.add_(delta, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def total(self) -> Tensors:
        """The weighted sum itself, by parameter (views); with weights of 1, the plain sum."""
        return views(self.weighted_sum, self._shapes)

    def mean(self) -> Tensors:
        if self.count == 0:
            raise ValueError("no updates to average")
        return views(self.weighted_sum / self.total_weight, self._shapes)


@dataclass(frozen=True)
class Release:
    mean_delta: Tensors
    # Fields of the round's record that only the aggregate tells (privacy spent, summed evaluation counts).
    record: dict[str, float | int] = field(default_factory=dict)


class Aggregation(Protocol):
    """One round's aggregation, made fresh for each round: what the round manager calls on it."""

    def add(self, delta: torch.Tensor, num_examples: int, within_clip: bool | None = None) -> None:
        """One update the manager has checked: `delta` a flat float32 vector (`keyboard_model/flat.py`) within the
        aggregator's norm bound, `num_examples` within its limit, `within_clip` adaptive clipping's bit (None when
        the round does not adapt its clip norm). Only called once per device and round, and for the server's own
        inputs (an audit's canary clients, aggregator/canary_clients.py), which send no bit."""

    def release(self, reported: int) -> Release:
        """The round's mean delta from the `reported` devices whose updates it holds."""


class WeightedMean:
    def __init__(self, shapes: Shapes) -> None:
        self._sum = UpdateSum(shapes)

    def add(self, delta: torch.Tensor, num_examples: int, within_clip: bool | None = None) -> None:
        """`delta`: a flat update (`keyboard_model/flat.py`)."""
        self._sum.add(delta, float(num_examples))

    def release(self, reported: int) -> Release:
        return Release(self._sum.mean())


class PrivateMean:
    def __init__(self, shapes: Shapes, ledger: PrivacyMechanism) -> None:
        self._sum = UpdateSum(shapes)
        self._ledger = ledger
        self._within = 0  # adaptive clipping: updates their phones said were within the clip norm

    def add(self, delta: torch.Tensor, num_examples: int, within_clip: bool | None = None) -> None:
        """`delta`: a flat update (`keyboard_model/flat.py`)."""
        # Phones clip already; clipping what arrived makes the bound hold whatever a device sent. Each phone counts
        # once: weighting by its claimed example count would let one phone move the sum further. The clip is the
        # weight of the sum's one multiply-add, so no clipped copy is made.
        norm = float(torch.linalg.vector_norm(delta))
        self._sum.add(delta, min(1.0, self._ledger.clip.norm / norm) if norm > 0 else 1.0)
        self._within += bool(within_clip)

    def release(self, reported: int) -> Release:
        return Release(*self._ledger.release(self._sum.total(), self._within, reported))


class SecureSum:
    def __init__(self, secure: SecureRound, ledger: PrivacyMechanism | None,
                 max_eval_positions: int) -> None:
        self._secure = secure
        self._ledger = ledger
        self._max_eval_positions = max_eval_positions
        # The server's own inputs (an audit's canary clients, aggregator/canary_clients.py), added in the clear.
        self._own: UpdateSum | None = None

    def add(self, delta: torch.Tensor, num_examples: int, within_clip: bool | None = None) -> None:
        """The server's own input, added to the unmasked sum, counted once. A device's input arrives masked and is
        summed by the SecureRound: no device's update is ever seen to add."""
        if self._own is None:
            self._own = UpdateSum(self._secure.shapes)
        self._own.add(delta, 1.0)

    def release(self, reported: int) -> Release:
        """Raises ImpossibleSumError if the sum is not one that `reported` devices sending what honest devices send
        could give."""
        phones, (positions, hits_1, hits_3, within) = self._secure.result()
        # The checks below read the phones' part alone: counting the server's own inputs in would widen what a lying
        # phone may send by their share of the allowance.
        own = self._own.total() if self._own is not None else None
        total = phones if own is None else {name: value + own[name] for name, value in phones.items()}
        # The counts are summed modulo 2**32 and read as 0 to 2**32 - 1, so one that wrapped below 0 reads as huge.
        if not hits_1 <= hits_3 <= positions <= reported * self._max_eval_positions:
            raise ImpossibleSumError(
                f"the evaluation counts sum to {positions} predictions, {hits_1} hits at 1 and {hits_3} at 3; "
                f"{reported} phones send 0 <= hits at 1 <= hits at 3 <= predictions <= {self._max_eval_positions} "
                "each: some phone lied")
        evaluation: dict[str, float | int] = {
            "eval_devices": reported, "eval_positions": positions, "eval_hits_at_1": hits_1, "eval_hits_at_3": hits_3}
        if self._ledger is None or self._ledger.clip.adaptive is None:
            if within != 0:  # honest phones send 0 when the round does not adapt its clip norm
                raise ImpossibleSumError(f"this round does not adapt its clip norm, yet the clipping bits sum to "
                                         f"{within}: some phone lied")
        if self._ledger is None:
            # Each device counts once: its example count would be one more thing sent in the clear.
            mean = {name: (t / reported).float() for name, t in phones.items()}
            self._check_norm(mean, reported, reported, noise_stddev=0.0)
            if self._own is None:
                return Release(mean, evaluation)
            inputs = reported + self._own.count
            return Release({name: (t / inputs).float() for name, t in total.items()}, evaluation)
        # The clipping bits come summed, inside the masked vector: the server never sees one. Their range is checked
        # on their noisy sum (aggregator/adaptive_clipping.py).
        noise_stddev = self._ledger.noise_stddev
        goal = self._secure.goal
        mean_delta, privacy = self._ledger.release(total, within, reported)
        phones_part = (mean_delta if own is None
                       else {name: value - own[name] / goal for name, value in mean_delta.items()})
        self._check_norm(phones_part, reported, goal, noise_stddev)
        return Release(mean_delta, {**privacy, **evaluation})

    def _check_norm(self, mean_delta: Tensors, reported: int, denominator: int, noise_stddev: float) -> None:
        """Refuse a released mean (the sum, plus noise of `noise_stddev` per value, over `denominator`) longer than
        `reported` inputs within the ring's bound could give, or with a value larger than they could give (see the
        module's docstring for the allowances)."""
        encoding = self._secure.encoding
        rounding = (reported * encoding.size) ** 0.5 / encoding.scale
        noise = noise_stddev * (encoding.length**0.5 + NOISE_NORM_STDDEVS)
        longest = (reported * encoding.bound + rounding + noise) / denominator * (1 + FLOAT_TOLERANCE)
        with_what = f"with the ring's rounding{' and the privacy noise' if noise_stddev else ''}"
        norm = l2_norm(mean_delta)
        if not norm <= longest:
            raise ImpossibleSumError(
                f"the round's mean update has L2 norm {norm:.4g}; {reported} updates within the bound of "
                f"{encoding.bound:g} give at most {longest:.4g} ({with_what}): some phone sent more than the bound")
        # Noise hides a push spread thinly at right angles to it, but not one piled on a few values: no value of
        # honest updates passes the bound, and the rounding and noise on one value are sub-Gaussian, of spread
        # sqrt(reported) / (2 scale) and noise_stddev.
        tail = math.sqrt(2 * math.log(2 * encoding.length / LARGEST_VALUE_FALSE_ALARM))
        spread = noise_stddev + reported**0.5 / (2 * encoding.scale)
        highest = (reported * encoding.bound + tail * spread) / denominator * (1 + FLOAT_TOLERANCE)
        value = max(float(t.abs().max()) for t in mean_delta.values())
        if not value <= highest:
            raise ImpossibleSumError(
                f"the round's mean update has a value of {value:.4g}; {reported} updates within the bound of "
                f"{encoding.bound:g} give at most {highest:.4g} ({with_what}): some phone sent more than the bound")
