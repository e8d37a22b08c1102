"""DP-FTRL with BLT matrix-factorisation noise (Kairouz et al. 2021; McMahan et al. 2024), from jax-privacy.

The server releases, round after round, the prefix sums of the clipped updates through a
matrix mechanism A = B C: the noise added to round t's sum is row t of C^{-1} Z, a mix of
this round's fresh Gaussian noise and earlier rounds', so that much of it cancels in the
model, which is a sum of the releases. C is a buffered linear Toeplitz (BLT) matrix that
`jax_privacy.matrix_factorization.buffered_toeplitz.optimize` chooses for the number of
rounds and the minimum separation `b` (a device takes part at most once in any `b`
consecutive releases; the round manager refuses it otherwise). The noise is made in
streaming form as jax-privacy's `matrix_factorization_privatizer` makes it, in float32
torch (`BltNoise`): its state (a generator's and the BLT's few buffers, each the model's
size) is committed with the model, so a restarted aggregator continues the same noise
stream.

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

Registered as `ftrl` in `aggregator/mechanisms.py`; `dp_ftrl` resumes it from the database.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import jax

# The BLT's optimisation needs float64 (buffered_toeplitz.check_float64_dtype); nothing else in
# this project uses JAX.
jax.config.update("jax_enable_x64", True)

import dp_accounting
import numpy as np
import torch
from dp_accounting.rdp import RdpAccountant
from jax_privacy.matrix_factorization import buffered_toeplitz
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from aggregator.adaptive_clipping import AdaptiveClipping, ClipNorm, resumed_clip
from keyboard_model.errors import UserFacingError
from keyboard_model.flat import flatten, length, views
from keyboard_model.weights import Tensors

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.global_model import GlobalModel
    from aggregator.storage import Storage


@functools.lru_cache(maxsize=8)
def optimised_blt(rounds: int, min_separation: int) -> buffered_toeplitz.BufferedToeplitz:
    """The BLT strategy C that jax-privacy finds best (max error) for `rounds` releases with this separation."""
    return buffered_toeplitz.optimize(n=rounds, min_sep=min_separation, max_participations=None)


def toeplitz_coefs(blt: buffered_toeplitz.BufferedToeplitz, releases: int) -> np.ndarray:
    """C's first `releases` Toeplitz coefficients, as jax-privacy's `BufferedToeplitz.toeplitz_coefs` computes them,
    in NumPy: JAX compiles its operations anew for every length, which took a DP-FTRL round 0.1 to 3 CPU-s."""
    powers = np.arange(releases - 1)
    return np.append(1.0, (np.asarray(blt.buf_decay) ** powers[:, None] * np.asarray(blt.output_scale)).sum(axis=1))


def sensitivity_squared(blt: buffered_toeplitz.BufferedToeplitz, releases: int, min_separation: int) -> float:
    """Squared L2 sensitivity of `releases` releases to one device taking part at most once every `min_separation`
    releases, each time with an update of norm at most 1: jax-privacy's `toeplitz.minsep_sensitivity_squared`
    (McKenna et al. 2024, Theorem 2), in NumPy for the reason `toeplitz_coefs` gives. For non-negative,
    non-increasing coefficients the worst case is ceil(releases / b) participations exactly b apart: the sum of those
    columns of C, made as a difference of cumulative sums."""
    coef, b = toeplitz_coefs(blt, releases), min_separation
    if not (coef >= 0).all() or (np.diff(coef) > 0).any():
        raise ValueError("the BLT's Toeplitz coefficients must be non-negative and non-increasing")
    k = -(-releases // b)
    vector = np.pad(coef, (0, (b - releases) % b)).reshape(-1, b).cumsum(axis=0).flatten()
    vector[b * k :] -= vector[: -b * k].copy()
    return float(vector[:releases] @ vector[:releases])


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


# Words of a PCG64 generator's state as committed: its 128-bit state and increment, high and low 64 bits each, and
# its buffered 32-bit half-word.
_MASK_64 = 2**64 - 1


def _generator_words(generator: np.random.Generator) -> np.ndarray:
    state = generator.bit_generator.state
    inner = state["state"]
    return np.array([inner["state"] >> 64, inner["state"] & _MASK_64, inner["inc"] >> 64, inner["inc"] & _MASK_64,
                     state["has_uint32"], state["uinteger"]], dtype=np.uint64)


def _generator(words: np.ndarray) -> np.random.Generator:
    high_state, low_state, high_inc, low_inc, has_uint32, uinteger = (int(word) for word in words)
    bits = np.random.PCG64()
    bits.state = {"bit_generator": "PCG64",
                  "state": {"state": high_state << 64 | low_state, "inc": high_inc << 64 | low_inc},
                  "has_uint32": has_uint32, "uinteger": uinteger}
    return np.random.Generator(bits)


class BltNoise:
    """The correlated noise stream C^{-1} Z, made in streaming form as jax-privacy's
    `BufferedToeplitz.inverse_as_streaming_matrix` makes it (Alg. 3 of McMahan et al. 2024): release t's noise is
    x_t = z_t - sum_j s_j b_j, then each buffer b_j becomes d_j b_j + x_t (s: the BLT's output scales, d: its
    decays). Drawn once per release, in float32, over the flat update (`keyboard_model/flat.py`) in torch: the
    noise is a few passes over memory, where jax-privacy's privatizer drew float64 per parameter and crossed
    between torch, NumPy and JAX each round. float32's rounding (relative 6e-8 a step) is far below the noise it
    rounds. The fresh draws z_t come from a NumPy PCG64 generator seeded with 128 bits from the operating system; its
    state and the buffers are what is committed with the model (`to_bytes`), so a restarted aggregator draws the
    same noise."""

    def __init__(self, blt: buffered_toeplitz.BufferedToeplitz, stddev: float, shapes: dict[str, tuple[int, ...]],
                 state: bytes | None = None) -> None:
        self.blt = blt
        self._stddev = stddev
        self._decay = torch.from_numpy(np.asarray(blt.buf_decay, dtype=np.float32)).unsqueeze(1)
        self._scale = [float(s) for s in np.asarray(blt.output_scale)]
        self._length = length(shapes)
        if state is None:
            # Unpredictable: anyone who could replay the noise could subtract it. 128 bits, not a seed to search.
            generator = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16), "little")))
            self.state = (_generator_words(generator), torch.zeros(len(self._scale), self._length))
            self.step = 0
            return
        arrays = load_arrays(state)
        self.step = int(arrays["step"][0])
        if "generator" in arrays:
            self.state = (arrays["generator"], torch.from_numpy(arrays["buffers"]))
        elif "key" in arrays:
            self.state = _from_jax_state(arrays, shapes)
        else:
            raise UserFacingError("the database's DP-FTRL noise state holds neither a generator nor a JAX key: it "
                                  "was not written by this aggregator")
        if tuple(self.state[1].shape) != (len(self._scale), self._length):
            raise UserFacingError(f"the database's DP-FTRL noise state holds buffers of shape "
                                  f"{tuple(self.state[1].shape)}, not the model's ({len(self._scale)}, "
                                  f"{self._length}): it was written for another model")

    def add(self, total: torch.Tensor) -> tuple[torch.Tensor, tuple, int]:
        """(`total`, a flat float32 sum, plus this release's noise; the state after it; its step). The stream moves on
        only with `advance`, so the generator drawn from here is a copy."""
        words, buffers = self.state
        generator = _generator(words)
        noise = torch.from_numpy(generator.standard_normal(self._length, dtype=np.float32)).mul_(self._stddev)
        for scale, buffer in zip(self._scale, buffers):
            noise.sub_(buffer, alpha=scale)
        after = torch.mul(buffers, self._decay).add_(noise)
        return total + noise, (_generator_words(generator), after), self.step

    def advance(self, state: tuple) -> None:
        self.state, self.step = state, self.step + 1

    def to_bytes(self, state: tuple | None = None, step: int | None = None) -> bytes:
        words, buffers = self.state if state is None else state
        return save_arrays({"generator": words, "buffers": buffers.numpy(),
                            "step": np.array([self.step if step is None else step]),
                            "buf_decay": np.asarray(self.blt.buf_decay),
                            "output_scale": np.asarray(self.blt.output_scale)})


def _from_jax_state(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> tuple:
    """A noise state as this aggregator committed it before the noise was drawn in torch (a JAX threefry key and
    float64 buffers by parameter), as (generator words, float32 buffers). The stream goes on with fresh draws from
    a generator seeded by that secret key and the step: independent of the draws made with it, as every fresh draw
    must be, and the same on every restart from the same state, so no release is ever drawn twice with two noises."""
    missing = sorted(f"buffers.{name}" for name in shapes if f"buffers.{name}" not in arrays)
    if missing:
        raise UserFacingError(f"the database's DP-FTRL noise state lacks {', '.join(missing)}: it was written for "
                              "another model")
    seed = [int(word) for word in arrays["key"].astype(np.uint32)] + [int(arrays["step"][0])]
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    buffers = np.concatenate([arrays[f"buffers.{name}"].reshape(len(arrays["buf_decay"]), -1) for name in shapes],
                             axis=1)
    return _generator_words(generator), torch.from_numpy(buffers.astype(np.float32))


def blt_from_state(state: bytes) -> buffered_toeplitz.BufferedToeplitz:
    """The BLT a committed noise state was made with."""
    arrays = load_arrays(state)
    return buffered_toeplitz.BufferedToeplitz.build(buf_decay=arrays["buf_decay"], output_scale=arrays["output_scale"])


class FtrlLedger:
    """DP-FTRL's noise and the privacy it has spent, as `PrivacyLedger` is DP-FedAvg's: `release` makes a round's
    noisy mean and its record; `spent` (after the commit) moves the noise stream and the clip norm on;
    `pending_state` is what to commit with the model. `participations`: device id -> the step of the last release
    it reported in, for the minimum separation."""

    def __init__(self, clip: ClipNorm, noise_multiplier: float, goal: int, min_separation: int, rounds: int,
                 shapes: dict[str, tuple[int, ...]], population: Callable[[], int], delta: float | None,
                 state: bytes | None, participations: dict[str, int] | None = None) -> None:
        self.clip = clip
        self._participations = dict(participations or {})
        self.min_separation = min_separation
        self._noise_multiplier = noise_multiplier
        self._goal = goal
        self._population = population
        self._delta = delta
        blt = blt_from_state(state) if state is not None else optimised_blt(rounds, min_separation)
        # In units of the clip norm: the stream stays the same whatever norm each round clips to.
        self._noise = BltNoise(blt, clip.update_noise_multiplier, shapes, state)
        self._inverse = blt.inverse()  # C^{-1}, a BLT too
        self._shapes = shapes
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
        row = toeplitz_coefs(self._inverse, self._noise.step + 1)
        return self.clip.update_noise_multiplier * self.clip.norm * float(np.linalg.norm(row))

    def privacy_after(self, releases: int, delta: float) -> dict[str, float]:
        spent = rho_spent(self._noise.blt, releases, self.min_separation, self.clip.update_noise_multiplier,
                          self.clip.adaptive)
        return {"rho": spent, "epsilon": epsilon_of_rho(spent, delta)}

    def release(self, total: Tensors, within: int, reported: int) -> tuple[Tensors, dict]:
        """The round's noisy mean from the sum of its clipped updates, `within` of the `reported` ones within the clip
        norm (adaptive clipping), and the round's record."""
        norm = self.clip.norm
        noisy, state, step = self._noise.add(flatten(total, self._shapes).div_(norm))
        self._pending = (state, step)
        delta = self._delta or 1.0 / max(self._population(), self._goal)
        record = {"dp_mechanism": "ftrl", "dp_noise_multiplier": self._noise_multiplier, "dp_delta": delta,
                  "dp_min_separation": self.min_separation, "dp_step": step, **self.privacy_after(step + 1, delta),
                  **self.clip.release(within, reported)}
        # A fixed denominator, as DP-FedAvg's: how many devices reported is not a second release.
        return views(noisy.mul_(norm / self._goal), self._shapes), record

    def pending_state(self) -> bytes | None:
        """The noise state after the last release, to commit with the model it made."""
        return None if self._pending is None else self._noise.to_bytes(self._pending[0], self._pending[1] + 1)

    @property
    def participations(self) -> dict[str, int]:
        """Device id -> the step of the last committed release it reported in."""
        return dict(self._participations)

    def rounds_to_sit_out(self, device_id: str) -> int:
        last = self._participations.get(device_id)
        return 0 if last is None else max(0, last + self.min_separation - self.releases)

    def spent(self, record: dict, reporters: Iterable[str] = ()) -> None:
        assert self._pending is not None  # release() set it
        state, step = self._pending
        assert step == record["dp_step"]
        self._noise.advance(state)
        self.clip.spent(record)
        self._pending = None
        for device_id in reporters:
            self._participations[device_id] = step


def dp_ftrl(config: AggregatorConfig, storage: Storage, model: GlobalModel,
            population: Callable[[], int]) -> FtrlLedger:
    """DP-FTRL, resumed: the noise stream from the state committed with the newest model, the participations from
    the rounds' records. Its accounting covers a run with one noise multiplier and one way of clipping: a database
    that released with others is refused, as is a noise state committed with another model version."""
    last = storage.last_release()
    adaptive = config.adaptive_clipping
    if last is not None:
        was = (last.get("dp_noise_multiplier"), last.get("dp_count_stddev"))
        now = (config.noise_multiplier, adaptive.count_stddev if adaptive else None)
        if was != now:
            raise UserFacingError(
                f"the database {config.db_path} holds DP-FTRL rounds released with noise multiplier {was[0]} and "
                f"{'clipping bits noised at ' + str(was[1]) if was[1] else 'a fixed clip norm'}; DP-FTRL's "
                "accounting cannot change them mid-run: give the same --noise-multiplier and clipping, or another "
                "--db")
    saved = storage.noise_state()
    if saved is not None and saved[0] != model.version:
        raise UserFacingError(f"the database {config.db_path} holds DP-FTRL noise state for model version "
                              f"{saved[0]}, not the newest model's ({model.version})")
    return FtrlLedger(resumed_clip(config, last), config.private_noise_multiplier, config.clients_per_round,
                      config.min_separation, config.dp_rounds, model.shapes, population, config.dp_delta,
                      saved[1] if saved is not None else None, storage.last_participations())
