"""Empirical privacy from canaries' scores: how well an attacker tells canaries that were in a run from ones that
were not, read as an epsilon.

Two kinds of canary give scores (`aggregator/canary_clients.py`: the cosine of the model's movement with a canary
client's update direction; `device_sim/canaries.py`: a planted phrase's exposure). Held-in canaries took part,
held-out ones never did; from their scores:

- the one-shot estimate of Andrew et al. 2024 ("One-shot empirical privacy estimation for federated learning"):
  fit a Gaussian to each set of scores and report the epsilon, at `delta`, of the Gaussian mechanism that would
  make the two exactly that hard to tell apart. It is an *estimate* for this attack, with a
  95% bootstrap interval over the canaries, not a bound: the fit may be off in the tails;
- a 95% *lower bound*: jax-privacy's `CanaryScoreAuditor.epsilon_one_run` (Steinke et al. 2023, "Privacy auditing
  with one (1) training run"), which assumes nothing about the scores' shape. A run whose proven epsilon is below
  this bound would have a broken accountant or a broken mechanism, with 95% confidence.

Neither is a guarantee: a better attack may find more. The accountant's epsilon is the guarantee, for every attack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from scipy import optimize

# The one-shot estimate's interval: resamplings of the canaries, and the confidence.
BOOTSTRAP_SAMPLES = 200
CONFIDENCE = 0.95
# Past this, an estimate says "as good as no privacy": the fitted Gaussians do not overlap at delta.
EPSILON_CEILING = 1_000.0


@dataclass(frozen=True)
class EmpiricalPrivacy:
    epsilon: float  # the one-shot estimate
    epsilon_low: float  # its bootstrap interval
    epsilon_high: float
    lower_bound: float  # CanaryScoreAuditor's one-run lower bound, at 95% confidence
    delta: float
    canaries_in: int
    canaries_out: int
    mean_in: float  # the scores' means: how far the held-in canaries stand out
    mean_out: float

    def record(self) -> dict[str, float | int]:
        """As a round's record and metrics.jsonl hold it."""
        return {"audit_epsilon": self.epsilon, "audit_epsilon_low": self.epsilon_low,
                "audit_epsilon_high": self.epsilon_high, "audit_epsilon_lower_bound": self.lower_bound,
                "audit_delta": self.delta, "audit_canaries": self.canaries_in, "audit_score_in": self.mean_in,
                "audit_score_out": self.mean_out}


def estimate(in_scores: Sequence[float], out_scores: Sequence[float], delta: float,
             seed: int = 0) -> EmpiricalPrivacy:
    """The one-shot estimate with its interval, and the one-run lower bound, from held-in canaries' scores (higher:
    more exposed) and held-out ones'. Each set needs two scores or more."""
    held_in, held_out = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if held_in.size < 2 or held_out.size < 2:
        raise ValueError(f"an estimate needs two held-in and two held-out scores or more, got {held_in.size} and "
                         f"{held_out.size}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    # A canary's place in the resampling is random; the interval's width, not its exact ends, is what matters.
    rng = np.random.default_rng(seed)
    resampled = [_fitted_epsilon(rng.choice(held_in, held_in.size), rng.choice(held_out, held_out.size), delta)
                 for _ in range(BOOTSTRAP_SAMPLES)]
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    # jax-privacy imports JAX (a second or two): only an audit pays for it.
    from jax_privacy.auditing import CanaryScoreAuditor

    bound = CanaryScoreAuditor(held_in, held_out).epsilon_one_run(significance=1 - CONFIDENCE, delta=delta)
    return EmpiricalPrivacy(
        epsilon=_fitted_epsilon(held_in, held_out, delta), epsilon_low=float(low), epsilon_high=float(high),
        lower_bound=float(bound), delta=delta, canaries_in=int(held_in.size), canaries_out=int(held_out.size),
        mean_in=float(held_in.mean()), mean_out=float(held_out.mean()),
    )


def _fitted_epsilon(held_in: np.ndarray, held_out: np.ndarray, delta: float) -> float:
    """The Gaussian mechanism's epsilon at `delta` whose sensitivity, in units of its noise, is how far the held-in
    mean stands above the held-out one, in units of their pooled spread (0 if it does not stand above: the attack
    calls the higher scores "in").

    One spread, where the paper fits the held-in canaries' own: with a hundred canaries a side, the sampling error of
    two spreads reads as privacy lost in the far tails (epsilon in the single digits at delta 1e-5 for two samples of
    one distribution). The price: a canary's number of rounds is random, which widens the held-in spread (by about a
    half in tests/test_canary_clients.py's private runs), and the pooled fit reads less of that tail than the
    paper's would, so its estimate can be lower."""
    pooled = math.sqrt((held_in.var(ddof=1) * (held_in.size - 1) + held_out.var(ddof=1) * (held_out.size - 1))
                       / (held_in.size + held_out.size - 2))
    gap = float(held_in.mean() - held_out.mean())
    if gap <= 0:
        return 0.0
    if pooled == 0:  # apart, and no spread at all: nothing hides which is which
        return EPSILON_CEILING
    return gaussian_epsilon(gap / pooled, delta)


def gaussian_epsilon(sensitivity: float, delta: float) -> float:
    """The smallest epsilon at `delta` of the Gaussian mechanism with noise of standard deviation 1 and this
    sensitivity (dp-accounting's exact privacy loss)."""
    loss = GaussianPrivacyLoss(1.0, sensitivity=sensitivity)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    if loss.get_delta_for_epsilon(EPSILON_CEILING) > delta:
        return EPSILON_CEILING
    return float(optimize.brentq(lambda epsilon: loss.get_delta_for_epsilon(epsilon) - delta, 0.0, EPSILON_CEILING,
                                 xtol=1e-6))
