"""DP-FTRL with BLT matrix-factorisation noise (Kairouz et al. 2021; McMahan et al. 2024), from jax-privacy.

The server releases, round after round, the prefix sums of the clipped updates through a
matrix mechanism A = B C: the noise added to round t's sum is row t of C^{-1} Z, a mix of
this round's fresh Gaussian noise and earlier rounds', so that much of it cancels in the
model, which is a sum of the releases. C is a buffered linear Toeplitz (BLT) matrix that
`jax_privacy.matrix_factorization.buffered_toeplitz.optimize` chooses for the number of
rounds and the minimum separation `b` (a device takes part at most once in any `b`
consecutive releases; the round manager refuses it otherwise). The noise is made in
streaming form by `jax_privacy.noise_addition.matrix_factorization_privatizer`: its
state (a random key and the BLT's few buffers, each the model's size) is committed with
the model, so a restarted aggregator continues the same noise stream.

Accounting needs no sampling assumption: after T releases, the sensitivity of the
T x T mechanism to one device's participations, at most one per `b` releases, is
`toeplitz.minsep_sensitivity_squared` of C's coefficients (jax-privacy), the whole run
is one Gaussian mechanism with noise multiplier z / sensitivity, so rho-zCDP is
sensitivity^2 / (2 z^2), and epsilon at delta comes from dp-accounting's RDP accountant
(for a Gaussian, RDP at order a is a * rho).

With adaptive clipping (`aggregator/adaptive_clipping.py`) the clip norm changes from
round to round, so the mechanism runs on the sums in units of the round's clip norm
(each device's contribution at most 1, whatever the norm) and each release is scaled
back; the norm depends only on earlier releases, which a matrix mechanism allows. The
updates are noised at the larger z_update, and the clipping bits, independent Gaussian
releases of sensitivity 1/2 in at most ceil(T / b) of the T rounds, add their own
rho-zCDP, ceil(T / b) / (8 sigma_b^2); zCDP composes by addition, and the sum is never
more than fixed clipping's at z.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import jax

# The BLT's optimisation and its buffers need float64 (buffered_toeplitz.check_float64_dtype); nothing else in
# this project uses JAX.
jax.config.update("jax_enable_x64", True)

import dp_accounting  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402
from jax_privacy import noise_addition  # noqa: E402
from jax_privacy.matrix_factorization import buffered_toeplitz, toeplitz  # noqa: E402
from safetensors.numpy import load as load_arrays  # noqa: E402
from safetensors.numpy import save as save_arrays  # noqa: E402

from aggregator.adaptive_clipping import AdaptiveClipping, ClipNorm  # noqa: E402
from keyboard_model.weights import Tensors  # noqa: E402


@functools.lru_cache(maxsize=8)
def optimised_blt(rounds: int, min_separation: int) -> buffered_toeplitz.BufferedToeplitz:
    """The BLT strategy C that jax-privacy finds best (max error) for `rounds` releases with this separation."""
    return buffered_toeplitz.optimize(n=rounds, min_sep=min_separation, max_participations=None)


def sensitivity_squared(blt: buffered_toeplitz.BufferedToeplitz, releases: int, min_separation: int) -> float:
    """Squared L2 sensitivity of `releases` releases to one device taking part at most once every `min_separation`
    releases, each time with an update of norm at most 1."""
    return float(toeplitz.minsep_sensitivity_squared(blt.toeplitz_coefs(releases), min_sep=min_separation))


def observed_sensitivity_squared(blt: buffered_toeplitz.BufferedToeplitz,
                                 participations: dict[str, list[int]]) -> float:
    """Squared sensitivity for the participation pattern a run actually produced (device -> the releases it
    reported in): the largest ||C 1_S||^2 over devices, with C materialised by jax-privacy. C's coefficients are
    non-negative, so one device's worst case is the same unit vector in every release it took part in. At most
    `sensitivity_squared` whenever the pattern kept the minimum separation."""
    if not participations:
        return 0.0
    releases = 1 + max(max(steps) for steps in participations.values())
    c = np.asarray(blt.materialize(releases))
    return max(float(np.sum(c[:, steps].sum(axis=1) ** 2)) for steps in participations.values())


def rho(sensitivity_sq: float, noise_multiplier: float) -> float:
    """rho-zCDP of a Gaussian mechanism of this sensitivity, noise std noise_multiplier (Bun and Steinke 2016)."""
    return sensitivity_sq / (2 * noise_multiplier**2)


def rho_spent(blt: buffered_toeplitz.BufferedToeplitz, releases: int, min_separation: int,
              update_noise_multiplier: float, adaptive: AdaptiveClipping | None) -> float:
    """rho-zCDP of `releases` releases for a device taking part at most once every `min_separation`: the updates'
    matrix mechanism and, with adaptive clipping, the device's bits (sensitivity 1/2 in each of at most
    ceil(releases / min_separation) rounds), added as zCDP composes."""
    spent = rho(sensitivity_squared(blt, releases, min_separation), update_noise_multiplier)
    if adaptive is not None:
        spent += rho(math.ceil(releases / min_separation) / 4, adaptive.count_stddev)
    return spent


def epsilon(sensitivity_sq: float, noise_multiplier: float, delta: float) -> float:
    """Epsilon at delta of one Gaussian release with noise multiplier noise_multiplier / sensitivity."""
    return epsilon_of_rho(rho(sensitivity_sq, noise_multiplier), delta)


def epsilon_of_rho(rho_zcdp: float, delta: float) -> float:
    """Epsilon at delta of Gaussian releases that spend `rho_zcdp` together: composed, they are one Gaussian with
    noise multiplier 1 / sqrt(2 rho), whose RDP dp-accounting converts."""
    if rho_zcdp == 0:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent((2 * rho_zcdp) ** -0.5))
    return float(accountant.get_epsilon(delta))


class BltNoise:
    """The correlated noise stream: jax-privacy's streaming privatizer for C^{-1}, with its state as bytes."""

    def __init__(self, blt: buffered_toeplitz.BufferedToeplitz, stddev: float, shapes: dict[str, tuple[int, ...]],
                 state: bytes | None = None) -> None:
        self.blt = blt
        self._shapes = shapes
        if state is None:
            # Unpredictable: anyone who could replay the noise could subtract it. A whole threefry key (64 bits) from
            # the operating system, not a 32-bit seed that could be searched.
            key = jax.random.wrap_key_data(jnp.asarray(np.frombuffer(os.urandom(8), dtype=np.uint32)))
            self._privatizer = noise_addition.matrix_factorization_privatizer(
                blt.inverse_as_streaming_matrix(), stddev=stddev, prng_key=key)
            zeros = {name: jnp.zeros(shape, dtype=jnp.float64) for name, shape in shapes.items()}
            self.state = self._privatizer.init(zeros)
            self.step = 0
        else:
            arrays = load_arrays(state)
            key = jax.random.wrap_key_data(jnp.asarray(arrays["key"]))
            self._privatizer = noise_addition.matrix_factorization_privatizer(
                blt.inverse_as_streaming_matrix(), stddev=stddev, prng_key=key)
            self.state = (key, {name: jnp.asarray(arrays[f"buffers.{name}"]) for name in shapes})
            self.step = int(arrays["step"][0])

    def add(self, total: Tensors) -> tuple[Tensors, tuple, int]:
        """(total + this release's noise, the state after it, its step); the stream moves on only with `advance`."""
        noisy, state = self._privatizer.update({name: jnp.asarray(t.numpy()) for name, t in total.items()}, self.state)
        return {name: torch.from_numpy(np.array(noisy[name])) for name in total}, state, self.step

    def advance(self, state: tuple) -> None:
        self.state, self.step = state, self.step + 1

    def to_bytes(self, state: tuple | None = None, step: int | None = None) -> bytes:
        key, buffers = self.state if state is None else state
        arrays = {"key": np.asarray(jax.random.key_data(key)), "step": np.array([self.step if step is None else step]),
                  "buf_decay": np.asarray(self.blt.buf_decay), "output_scale": np.asarray(self.blt.output_scale),
                  **{f"buffers.{name}": np.asarray(b) for name, b in buffers.items()}}
        return save_arrays(arrays)


def blt_from_state(state: bytes) -> buffered_toeplitz.BufferedToeplitz:
    """The BLT a committed noise state was made with."""
    arrays = load_arrays(state)
    return buffered_toeplitz.BufferedToeplitz.build(buf_decay=arrays["buf_decay"], output_scale=arrays["output_scale"])


class FtrlLedger:
    """DP-FTRL's noise and the privacy it has spent, as `PrivacyLedger` is DP-FedAvg's: `release` makes a round's
    noisy mean and its record; `spent` (after the commit) moves the noise stream and the clip norm on;
    `pending_state` is what to commit with the model."""

    def __init__(self, clip: ClipNorm, noise_multiplier: float, goal: int, min_separation: int, rounds: int,
                 shapes: dict[str, tuple[int, ...]], population: Callable[[], int], delta: float | None,
                 state: bytes | None) -> None:
        self.clip = clip
        self.min_separation = min_separation
        self._noise_multiplier = noise_multiplier
        self._goal = goal
        self._population = population
        self._delta = delta
        blt = blt_from_state(state) if state is not None else optimised_blt(rounds, min_separation)
        # In units of the clip norm: the stream stays the same whatever norm each round clips to.
        self._noise = BltNoise(blt, clip.update_noise_multiplier, shapes, state)
        self._pending: tuple[tuple, int] | None = None

    @property
    def clip_norm(self) -> float:
        return self.clip.norm

    @property
    def releases(self) -> int:
        """Releases committed so far: the next one is this step of the mechanism."""
        return self._noise.step

    @property
    def noise_stddev(self) -> float:
        """The standard deviation of each value of the noise the next release adds to the sum: its fresh noise's,
        times the norm of row `step` of C^{-1}, which mixes the noise of every release so far into it."""
        row = self._noise.blt.inverse().toeplitz_coefs(self._noise.step + 1)
        return self.clip.update_noise_multiplier * self.clip.norm * float(jnp.linalg.norm(row))

    def privacy_after(self, releases: int, delta: float) -> dict[str, float]:
        spent = rho_spent(self._noise.blt, releases, self.min_separation, self.clip.update_noise_multiplier,
                          self.clip.adaptive)
        return {"rho": spent, "epsilon": epsilon_of_rho(spent, delta)}

    def release(self, total: Tensors, within: int, reported: int) -> tuple[Tensors, dict]:
        """The round's noisy mean from the sum of its clipped updates, `within` of the `reported` ones within the clip
        norm (adaptive clipping), and the round's record."""
        norm = self.clip.norm
        noisy, state, step = self._noise.add({name: t / norm for name, t in total.items()})
        self._pending = (state, step)
        delta = self._delta or 1.0 / max(self._population(), self._goal)
        record = {"dp_mechanism": "ftrl", "dp_noise_multiplier": self._noise_multiplier, "dp_delta": delta,
                  "dp_min_separation": self.min_separation, "dp_step": step, **self.privacy_after(step + 1, delta),
                  **self.clip.release(within, reported)}
        # A fixed denominator, as DP-FedAvg's: how many devices reported is not a second release.
        return {name: (t * norm / self._goal).float() for name, t in noisy.items()}, record

    def pending_state(self) -> bytes | None:
        """The noise state after the last release, to commit with the model it made."""
        return None if self._pending is None else self._noise.to_bytes(self._pending[0], self._pending[1] + 1)

    def spent(self, record: dict) -> None:
        state, step = self._pending
        assert step == record["dp_step"]
        self._noise.advance(state)
        self.clip.spent(record)
        self._pending = None
