"""Adaptive clipping (Andrew et al. 2021): the clip norm follows a quantile of the update norms.

A fixed clip norm is a guess: too small and every update is cut short (bias), too large
and the noise, proportional to it, swamps the mean. With a target quantile gamma, each
round every phone also reports one bit, whether its update's norm was within the clip
norm C. The server sums the bits, centred (b - 1/2, so one phone moves the sum by at most
1/2) with Gaussian noise of standard deviation sigma_b, divides by the round's goal as it
divides the updates, and takes a geometric step towards the quantile:

    C <- C * exp(-eta * (noisy fraction within - gamma))

What a lying phone can do to it. Honest bits sum to between 0 and the `r` phones that
reported. The noisy sum is taken into [0, r] before the step, and a round whose noisy sum
lies more than IMPOSSIBLE_BITS_STDDEVS sigma_b outside it is refused (no honest round
gets there but with probability 2e-9). With the sum in [0, r] the released fraction is
within 1/2 +- r / (2 goal), so a round, whatever its phones say, multiplies the norm by
between exp(-eta (r / (2 goal) + 1/2 - gamma)) and exp(eta (r / (2 goal) - 1/2 + gamma)):
with r <= goal, between exp(-eta (1 - gamma)) and exp(eta gamma). In a plain round the
server reads each bit as 0 or 1, so one lie moves the sum by at most 1 and the norm by a
factor of at most exp(eta / goal) (taking into [0, r] and the floor and ceiling only
bring values closer). Under secure aggregation the server sees only the sum: one lying
phone can put it anywhere in [0, r], as far as all the round's phones saying the same
would, and a liar in most rounds walks the norm down step by step. So the norm never
falls below FLOOR_FRACTION of the operator's --clip-norm (nor rises above the aggregator's
norm bound): lying bits can cut honest updates to a tenth of what the operator chose, never
to nothing (at 0 phones could not even scale an update into the secure-aggregation ring). Both the check and the
clamp read the noisy sum, which
is released anyway: a check of the exact sum would itself be a release without noise (a
lying phone would learn from the round's failure whether the others' bits reach a count
it chose).

The bits are a second Gaussian release, so they cost privacy. As the paper does, the
noise multiplier the operator asks for, z, is the privacy of the pair: the updates get
the larger z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2), and a round of (updates at z_update,
bits at sigma_b) is exactly one Gaussian release at z. DP-FedAvg's accounting is therefore
unchanged; DP-FTRL (`aggregator/ftrl.py`) adds the bits' rho-zCDP to its own.

Under secure aggregation the bit travels inside the masked vector with the evaluation
counts, so the server sees only the sum. The next clip norm is a function of released
(noisy) values only, and is committed with the round's record so a restart continues it.

No maintained library we depend on offers this (TensorFlow Privacy's
QuantileAdaptiveClipSumQuery is TensorFlow; jax-privacy and Opacus clip per example): the
geometric step is three lines of the paper's Algorithm, written here.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

logger = logging.getLogger(__name__)

# The lowest clip norm adapting goes to, as a fraction of the operator's --clip-norm. Under secure aggregation one
# lying phone can push the bits' sum to its top every round it is in (the server sees only the sum), which walks the
# norm down; an absolute floor far below the operator's norm (1e-3 cuts honest updates of 0.3 to 6.0 by 300 to 6,000
# times) would let it stop training. A tenth bounds what lies cost, and still lets the norm adapt tenfold downwards.
FLOOR_FRACTION = 0.1
# How far outside [0, reported], in standard deviations of their noise, the bits' noisy sum may fall before the round
# is refused: an honest round's noise gets there with probability 2 Phi(-6) = 2e-9.
IMPOSSIBLE_BITS_STDDEVS = 6.0


class ImpossibleSumError(ValueError):
    """A round's summed reports that phones sending what honest phones send could not have produced: the round
    fails, and nothing of it is applied."""


@dataclass(frozen=True)
class AdaptiveClipping:
    """The adaptive clip's settings (the paper's defaults: eta = 0.2, sigma_b = goal / 20)."""

    target_quantile: float  # gamma: the fraction of updates that should fall within the clip norm
    learning_rate: float  # eta
    count_stddev: float  # sigma_b: noise on the sum of the bits


def default_count_stddev(goal: int) -> float:
    """The paper's noise on the sum of the bits: a twentieth of the expected reports, the goal."""
    return goal / 20


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_update such that updates noised at z_update and bits noised at `count_stddev` are, together, one Gaussian
    release at `noise_multiplier` (Andrew et al. 2021, section 3)."""
    remaining = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if remaining <= 0:
        raise ValueError(f"the clipping bits' noise (count stddev {count_stddev}) alone spends more than noise "
                         f"multiplier {noise_multiplier} allows: it must be above {noise_multiplier / 2:g}")
    return remaining**-0.5


def noisy_fraction_within(within: int, reported: int, count_stddev: float, goal: int, rng: random.Random) -> float:
    """The released fraction of updates within the clip norm: (sum of (b - 1/2) + N(0, sigma_b^2)) / goal + 1/2, the
    noisy sum of the bits taken into [0, reported], where honest bits sum. The goal, not the number that reported,
    divides it, as it divides the updates. Raises ImpossibleSumError if the noisy sum is far outside that range."""
    noisy = within + rng.gauss(0.0, count_stddev)
    slack = IMPOSSIBLE_BITS_STDDEVS * count_stddev
    if not -slack <= noisy <= reported + slack:
        raise ImpossibleSumError(f"the adaptive-clipping bits sum to about {noisy:.0f} (with their noise), but "
                                 f"{reported} phones each send 0 or 1: some phone lied")
    return (min(max(noisy, 0.0), reported) - reported / 2) / goal + 0.5


def next_clip_norm(clip_norm: float, fraction_within: float, settings: AdaptiveClipping, ceiling: float,
                   floor: float = 0.0) -> float:
    """The geometric step towards the target quantile, between `floor` and `ceiling` (the largest norm the aggregator
    accepts)."""
    step = math.exp(-settings.learning_rate * (fraction_within - settings.target_quantile))
    return min(max(clip_norm * step, floor), ceiling)


class ClipNorm:
    """The clip norm private rounds ask for: fixed, or (with `adaptive`) following a quantile of the update norms.
    Like the ledgers it serves, `release` gives a round's record and `spent` (after the commit) moves on."""

    def __init__(self, initial: float, noise_multiplier: float, adaptive: AdaptiveClipping | None, goal: int,
                 ceiling: float, floor: float | None = None) -> None:
        """`floor`: the lowest norm adapting may reach; by default FLOOR_FRACTION of `initial`."""
        self.norm = initial
        self.adaptive = adaptive
        self._goal = goal
        self._ceiling = ceiling
        self._floor = initial * FLOOR_FRACTION if floor is None else floor
        self.update_noise_multiplier = (noise_multiplier if adaptive is None
                                        else update_noise_multiplier(noise_multiplier, adaptive.count_stddev))
        # Unpredictable noise: anyone who could replay it could subtract it.
        self._rng = random.SystemRandom()

    def release(self, within: int, reported: int) -> dict[str, float]:
        """The round's clipping record: the norm it used and, adapting, the noisy fraction within it and the norm
        the next round will use. `within`: how many of the `reported` updates were within the norm."""
        record = {"dp_clip_norm": self.norm}
        if self.adaptive is None:
            return record
        fraction = noisy_fraction_within(within, reported, self.adaptive.count_stddev, self._goal, self._rng)
        return {**record, "dp_update_noise_multiplier": self.update_noise_multiplier,
                "dp_count_stddev": self.adaptive.count_stddev, "dp_fraction_within": fraction,
                "dp_next_clip_norm": next_clip_norm(self.norm, fraction, self.adaptive, self._ceiling, self._floor)}

    def spent(self, record: dict) -> None:
        if self.adaptive is not None:
            self.norm = record["dp_next_clip_norm"]


def resumed_clip(config: AggregatorConfig, last_release: dict | None) -> ClipNorm:
    """The clip norm private rounds ask for: the configured one, or, adapting, where the database's last release
    (`Storage.last_release`) left it."""
    adaptive = config.adaptive_clipping
    floor = config.clip_norm * FLOOR_FRACTION
    resumed = last_release.get("dp_next_clip_norm") if adaptive is not None and last_release is not None else None
    if resumed is None:
        norm = config.clip_norm
    elif not math.isfinite(resumed):
        raise UserFacingError(f"the database {config.db_path} holds the clip norm {resumed!r} for the next round, "
                              "which no round can have released: the database is damaged")
    else:
        # The geometric step keeps the norm within these bounds; a database written before they existed may hold a
        # norm outside them (0, after lying clipping bits). Any positive norm keeps the privacy promised, since the
        # noise is proportional to it, so the norm is brought within them rather than the run refused.
        norm = min(max(resumed, floor), config.max_update_norm)
        if norm != resumed:
            logger.warning("the database's clip norm for the next round, %r, is outside [%g, %g]; using %g",
                           resumed, floor, config.max_update_norm, norm)
    return ClipNorm(norm, config.private_noise_multiplier, adaptive, config.clients_per_round,
                    config.max_update_norm, floor)
