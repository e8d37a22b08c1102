"""DP-FTRL (aggregator/ftrl.py): the accounting against jax-privacy's own published cases, the noise against the
mechanism's C^{-1}, its state across a restart, the minimum separation, the same noise through secure aggregation,
and the same epsilon in service mode and in process."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from jax_privacy.matrix_factorization import buffered_toeplitz, toeplitz
from safetensors.numpy import save as save_arrays

from aggregator.api.schemas import SecAggState
from aggregator.config import AggregatorConfig
from aggregator.ftrl import BltNoise, epsilon, observed_sensitivity_squared, rho, sensitivity_squared, toeplitz_coefs
from aggregator.inprocess import InProcessClient
from aggregator.privacy import PrivacyEvent
from aggregator.privacy import epsilon as fedavg_epsilon
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from device_sim.session import update_bytes
from keyboard_model.errors import UserFacingError
from keyboard_model.norms import clip_to_norm
from tests.helpers import (
    IDENTITY,
    TWO_BUFFERS,
    Device,
    assert_mean_within_rounding,
    confirm_all,
    fedkb,
    random_delta,
    until_collecting,
)

# Every Toeplitz coefficient 1: C is the prefix-sum matrix (all ones on and below the diagonal).
PREFIX_SUM = buffered_toeplitz.BufferedToeplitz.build(buf_decay=[1.0], output_scale=[1.0])


@pytest.mark.parametrize("releases", [1, 2, 3, 5, 11])
@pytest.mark.parametrize("separation", [1, 4, 11])
def test_sensitivity_is_the_one_jax_privacys_own_tests_publish(releases, separation):
    # jax-privacy's tests/matrix_factorization/toeplitz_test.py: test_sensitivity_squared_identity (C = I: one
    # unit per participation, ceil(n / b) of them) and test_sensitivity_squared_tri (C = prefix sums, every release:
    # the sum over rows of the squared row sums of the first n columns, n(n + 1)(2n + 1) / 6).
    participations = -(-releases // separation)
    assert sensitivity_squared(IDENTITY, releases, separation) == pytest.approx(participations)
    if separation == 1:
        assert sensitivity_squared(PREFIX_SUM, releases, 1) == pytest.approx(
            releases * (releases + 1) * (2 * releases + 1) / 6)


@pytest.mark.parametrize("blt", [TWO_BUFFERS, PREFIX_SUM], ids=["two-buffers", "prefix-sum"])
@pytest.mark.parametrize("releases,separation", [(1, 1), (7, 1), (10, 2), (23, 5), (40, 40)])
def test_numpy_accounting_equals_jax_privacys_own_functions(blt, releases, separation):
    # ftrl.py computes C's coefficients and the min-separation sensitivity in NumPy (JAX compiled them anew for
    # every release count); jax-privacy's own functions stay the reference they must match.
    reference = np.asarray(blt.toeplitz_coefs(releases))
    assert toeplitz_coefs(blt, releases) == pytest.approx(reference, rel=1e-12)
    assert sensitivity_squared(blt, releases, separation) == pytest.approx(
        float(toeplitz.minsep_sensitivity_squared(reference, separation, n=releases)), rel=1e-9)


def test_epsilon_of_uncorrelated_noise_is_dp_fedavgs_without_sampling():
    # With C = I and a device in every release, DP-FTRL is DP-FedAvg with sampling rate 1: T Gaussian releases of
    # multiplier z are one of multiplier z / sqrt(T) (rho = T / (2 z^2)), and the RDP accountant, checked against
    # Opacus's published figure in tests/test_privacy.py, must give the same epsilon for both.
    sens_sq = sensitivity_squared(IDENTITY, 30, 1)
    assert rho(sens_sq, 2.0) == pytest.approx(30 / 8)
    assert epsilon(sens_sq, 2.0, 1e-5) == pytest.approx(fedavg_epsilon([PrivacyEvent(1.0, 2.0)] * 30, 1e-5), rel=1e-6)
    # More separation, fewer participations: less privacy spent.
    assert epsilon(sensitivity_squared(TWO_BUFFERS, 30, 5), 2.0, 1e-5) < epsilon(
        sensitivity_squared(TWO_BUFFERS, 30, 1), 2.0, 1e-5)


def test_the_noise_over_rounds_is_correlated_as_c_inverse_says():
    rounds, coordinates, std = 6, 200_000, 0.5
    noise = BltNoise(TWO_BUFFERS, std, {"x": (coordinates,)})
    rows = []
    for _ in range(rounds):
        noisy, state, _ = noise.add(torch.zeros(coordinates))
        noise.advance(state)
        rows.append(noisy.double().numpy())
    observed = np.stack(rows)  # rounds x coordinates, each column one draw of C^{-1} z
    # The library's own materialisations of C^{-1} and C.
    c_inverse = np.asarray(TWO_BUFFERS.inverse_as_streaming_matrix().materialize(rounds))
    c = np.asarray(TWO_BUFFERS.materialize(rounds))
    expected = std**2 * c_inverse @ c_inverse.T
    # Each estimated covariance has a standard error of at most about 2 std^2 / sqrt(coordinates): 4 of them.
    tolerance = 8 * std**2 / coordinates**0.5
    np.testing.assert_allclose(observed @ observed.T / coordinates, expected, atol=tolerance)
    assert not np.allclose(expected, np.diag(np.diag(expected)), atol=0.01)  # the rounds' noise really is correlated
    # C times the noise gives back independent N(0, std^2) draws.
    np.testing.assert_allclose(np.cov(c @ observed, bias=True), std**2 * np.eye(rounds), atol=tolerance)


def _round(manager: RoundManager, devices: dict[str, str], value: float) -> list[str]:
    """Every device checks in; those selected upload the same update. Returns the ids of those told to retry."""
    retried = []
    for device_id, _ in devices.items():
        decision = manager.checkin(device_id)
        if decision.action == "retry":
            retried.append(device_id)
            continue
        update = {name: torch.full(shape, value) for name, shape in manager.model.shapes.items()}
        manager.submit(decision.round, decision.upload_token, update_bytes(update, 5, compression="none"))
        if manager.round.number != decision.round:
            break
    return retried


@pytest.mark.slow
def test_restarting_keeps_the_noise_stream_and_the_separation(tmp_path, small_tokenizer_path, small_model_config):
    settings = dict(model=small_model_config, clients_per_round=3, over_selection=1.0, server_optimizer="fedavg",
                    noise_multiplier=0.5, clip_norm=0.5, population=30, selection_window_s=0.0,
                    dp_mechanism="ftrl", min_separation=2, dp_rounds=10)
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path, **settings)
    running = RoundManager(config, open_storage(config.db_path))
    devices = dict(running.enrol() for _ in range(6))
    # Release 0: the first three to check in are selected and report, and the round closes.
    assert _round(running, devices, 0.1) == []
    first = [d for d, step in running.privacy.participations.items() if step == 0]
    assert len(first) == 3
    # Release 1: they may not take part (separation 2) and are told to retry; the other three report.
    assert sorted(_round(running, devices, 0.1)) == sorted(first)
    # A restart, here from a copy of the database as it is now, while the original manager keeps running.
    copy = tmp_path / "b.sqlite"
    with sqlite3.connect(config.db_path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    restarted = RoundManager(AggregatorConfig(db_path=copy, tokenizer_path=small_tokenizer_path, **settings),
                             open_storage(copy))
    assert restarted.privacy.releases == running.privacy.releases == 2
    assert restarted.storage.noise_state() == running.storage.noise_state()
    # The separation survived: the devices of release 1 are still refused, with a wait, in both.
    recent = [d for d, step in running.privacy.participations.items() if step == 1]
    assert len(recent) == 3 and restarted.privacy.participations == running.privacy.participations
    for manager in (running, restarted):
        assert all(manager.checkin(d).action == "retry" and manager.checkin(d).retry_after_s > 0 for d in recent)
    # Release 2: the devices of release 0 may take part again; it is noised the same way in both: same model, same
    # noise state, same privacy.
    for manager in (running, restarted):
        assert _round(manager, {d: devices[d] for d in first}, -0.2) == []
    assert running.model.bytes == restarted.model.bytes and running.model.version == 3
    assert running.storage.noise_state() == restarted.storage.noise_state()
    assert running.snapshot()["epsilon"] == restarted.snapshot()["epsilon"] > 0
    assert running.snapshot()["rho"] == restarted.snapshot()["rho"] > 0
    # The guarantee holds for the pattern the fleet produced, read back from the aggregator's record.
    pattern: dict[str, list[int]] = {}
    with sqlite3.connect(config.db_path) as db:
        for device_id, step in db.execute(
                "select s.device_id, r.dp_step from selections s join rounds r on s.round = r.round "
                "where s.status = 'reported' and r.status = 'closed' order by r.dp_step"):
            pattern.setdefault(device_id, []).append(step)
    assert sorted(map(len, pattern.values())) == [1, 1, 1, 2, 2, 2]
    assert all(b - a >= 2 for steps in pattern.values() for a, b in zip(steps, steps[1:]))
    blt = running.privacy._noise.blt
    assert observed_sensitivity_squared(blt, pattern) <= sensitivity_squared(blt, 3, 2) + 1e-9


@pytest.mark.slow
def test_dp_ftrl_reports_the_same_epsilon_in_service_mode_and_in_process(tmp_path: Path, shakespeare):
    common = ["simulate", "--phones", "12", "--clients-per-round", "3", "--rounds", "3", "--no-progress",
              "--hidden-dim", "16", "--embedding-dim", "8", "--seed", "5", "--noise-multiplier", "0.5",
              "--dp-mechanism", "ftrl", "--min-separation", "2", "--dp-rounds", "4"]
    lines = {}
    for mode, extra in (("service", []), ("in-process", ["--in-process"])):
        result = fedkb(*common, "--out", str(tmp_path / mode), *extra)
        assert result.returncode == 0, result.stderr
        lines[mode] = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    privacy = {mode: [(line["status"], line["epsilon"], line["rho"]) for line in mode_lines]
               for mode, mode_lines in lines.items()}
    assert privacy["service"] == privacy["in-process"]
    released = [(eps, spent) for status, eps, spent in privacy["service"] if status == "closed"]
    assert released and all(eps > 0 and spent > 0 for eps, spent in released), privacy
    # The run ends saying what it spent, on its last screen and in summary.json.
    summary = json.loads((tmp_path / "service" / "summary.json").read_text())
    last = next(line for line in reversed(lines["service"]) if line["status"] == "closed")  # the last release
    assert summary["privacy_spent"] == {"epsilon": last["epsilon"], "dp_delta": last["dp_delta"], "rho": last["rho"]}
    assert f"differential privacy spent: epsilon {last['epsilon']:,.4g} at delta" in result.stdout


@pytest.mark.slow
def test_a_secure_round_releases_exactly_the_noise_a_plain_round_would(tmp_path, small_tokenizer_path,
                                                                       small_model_config):
    # The restart test's BLT (10 rounds, separation 2): optimising one takes most of a minute, once per process.
    settings = dict(model=small_model_config, clients_per_round=3, over_selection=1.0, server_optimizer="fedavg",
                    noise_multiplier=0.5, clip_norm=0.5, population=30, selection_window_s=0.0,
                    dp_mechanism="ftrl", min_separation=2, dp_rounds=10, secagg_phase_s=1.0, round_deadline_s=60.0,
                    secagg_ring_bits=16)
    secure = InProcessClient(AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                                              secure_aggregation=True, **settings))
    manager = secure._rounds
    shapes = manager.model.shapes

    def secure_round(seed: int) -> tuple[list[Device], list[dict], SecAggState]:
        devices = [Device(secure) for _ in range(3)]
        state = until_collecting(devices)
        deltas = [random_delta(shapes, seed + k) for k in range(3)]  # norms well above 0.5: clipped on the phone
        for k, (device, delta) in enumerate(zip(devices, deltas)):
            device.upload(delta, None, seed=seed + k)
        confirm_all(devices)
        for device in devices:
            device.reveal()
        return devices, deltas, state

    first, _, _ = secure_round(40)
    # A copy of the database after release 0: the same devices, noise stream and separation, run without masking.
    copy = tmp_path / "b.sqlite"
    with sqlite3.connect(tmp_path / "a.sqlite") as source, sqlite3.connect(copy) as target:
        source.backup(target)
    plain = RoundManager(AggregatorConfig(db_path=copy, tokenizer_path=small_tokenizer_path, **settings),
                         open_storage(copy))
    before = {name: t.clone() for name, t in manager.model.state.items()}
    # The separation holds in a secure round too: release 0's devices are told to wait out release 1.
    assert all(manager.checkin(device.part.device_id).action == "retry" for device in first)
    second, deltas, state = secure_round(50)
    for device, delta in zip(second, deltas):
        decision = plain.checkin(device.part.device_id)
        assert decision.action == "train"
        plain.submit(decision.round, decision.upload_token,
                     update_bytes(clip_to_norm(delta, 0.5), 5, compression="none"))

    records = [r for r in manager.storage.recent_rounds(5) if r["status"] == "closed"]
    assert sorted((r["dp_mechanism"], r["dp_step"]) for r in records) == [("ftrl", 0), ("ftrl", 1)]
    assert 0 < min(r["rho"] for r in records) < max(r["rho"] for r in records)
    assert [manager.snapshot()[k] for k in ("rho", "epsilon")] == [plain.snapshot()[k] for k in ("rho", "epsilon")]
    assert manager.storage.noise_state() == plain.storage.noise_state()
    # Release 1 in the clear moved the model by the mean plus release 1's noise over the goal; the secure round by
    # the same, to within its ring's rounding: its unmasked sum got the stream's noise once, neither twice nor none.
    clear = {name: t - before[name] for name, t in plain.model.state.items()}
    assert_mean_within_rounding(manager.model.state, before, clear, state, reporters=3)


def test_a_noise_state_from_before_float32_noise_loads_and_one_for_another_model_is_refused():
    # As the aggregator committed it when JAX drew the noise: a threefry key and float64 buffers by parameter.
    shapes = {"a": (2, 3), "b": (4,)}
    buffers = {"a": np.arange(12.0).reshape(2, 2, 3), "b": np.arange(8.0).reshape(2, 4)}
    old = save_arrays({"key": np.array([7, 9], np.uint32), "step": np.array([5]),
                       "buf_decay": np.asarray(TWO_BUFFERS.buf_decay),
                       "output_scale": np.asarray(TWO_BUFFERS.output_scale),
                       **{f"buffers.{name}": b for name, b in buffers.items()}})
    loaded = [BltNoise(TWO_BUFFERS, 0.5, shapes, old) for _ in range(2)]
    assert loaded[0].step == 5
    np.testing.assert_array_equal(loaded[0].state[1].numpy(),
                                  np.concatenate([buffers["a"].reshape(2, -1), buffers["b"]], axis=1))
    # Every restart from that state draws the same next release: none is ever released with two noises.
    draws = [noise.add(torch.zeros(10))[0] for noise in loaded]
    assert torch.equal(draws[0], draws[1])
    # Committed again, it is in the new form and goes on the same way.
    again = BltNoise(TWO_BUFFERS, 0.5, shapes, loaded[0].to_bytes())
    assert torch.equal(again.add(torch.zeros(10))[0], draws[0])
    with pytest.raises(UserFacingError, match="another model"):
        BltNoise(TWO_BUFFERS, 0.5, {"a": (3, 3)}, loaded[0].to_bytes())
    with pytest.raises(UserFacingError, match="another model"):
        BltNoise(TWO_BUFFERS, 0.5, {"c": (6,)}, old)
