"""Differential privacy: the accountant against a published figure, the noise against its calibration, and
clipping, noise and the privacy spent through the real service, across a restart (a phone's own clipping is in
test_adaptive_clipping.py)."""

from __future__ import annotations

import pytest
import torch

from aggregator.api.client import AggregatorClient
from aggregator.privacy import PrivacyEvent, epsilon, noisy_mean
from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim.session import update_bytes
from keyboard_model.norms import clip_to_norm, l2_norm
from keyboard_model.weights import model_from_bytes, parameter_shapes


def test_the_accountant_reproduces_a_published_epsilon():
    # Opacus's documentation of compute_dp_sgd_privacy: sampling rate 1%, noise multiplier 1.0, 300 steps, RDP
    # orders 2, 5, 10, 20 and 100, delta 1e-5: "epsilon = 2.39", at the optimal order 5.
    events = [PrivacyEvent(0.01, 1.0)] * 300
    assert epsilon(events, 1e-5, orders=(2, 5, 10, 20, 100)) == pytest.approx(2.39, abs=0.005)
    # The accountant's own, finer grid of orders can only find a tighter bound.
    assert epsilon(events, 1e-5) < 2.39


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    base = epsilon([PrivacyEvent(0.02, 1.0)] * 100, 1e-4)
    assert epsilon([PrivacyEvent(0.02, 1.0)] * 200, 1e-4) > base
    assert epsilon([PrivacyEvent(0.02, 2.0)] * 100, 1e-4) < base
    assert epsilon([PrivacyEvent(0.01, 1.0)] * 100, 1e-4) < base
    # Rounds with different settings compose: the order they came in does not matter.
    mixed = [PrivacyEvent(0.02, 1.0)] * 50 + [PrivacyEvent(0.05, 1.5)] * 30
    assert epsilon(mixed, 1e-4) == pytest.approx(epsilon(mixed[::-1], 1e-4))
    assert epsilon([], 1e-4) == 0.0


def test_noise_has_the_calibrated_spread_and_no_bias():
    total = {"w": torch.zeros(400, 500, dtype=torch.float64), "b": torch.full((1000,), 8.0, dtype=torch.float64)}
    mean = noisy_mean(total, clip_norm=2.0, noise_multiplier=1.5, denominator=10,
                      generator=torch.Generator().manual_seed(0))
    assert mean["w"].std().item() == pytest.approx(1.5 * 2.0 / 10, rel=0.01)
    assert abs(mean["w"].mean().item()) < 0.002
    assert mean["b"].mean().item() == pytest.approx(0.8, abs=0.03)


def test_clipping_scales_down_only_what_is_too_long():
    long = {"a": torch.full((10,), 3.0), "b": torch.full((6,), -4.0)}
    clipped = clip_to_norm(long, 1.5)
    assert l2_norm(clipped) == pytest.approx(1.5)
    assert torch.allclose(clipped["a"] / clipped["b"][0], long["a"] / long["b"][0])  # direction kept
    short = {"a": torch.full((4,), 0.1)}
    assert clip_to_norm(short, 1.5) is short


@pytest.mark.slow
def test_the_service_clips_adds_calibrated_noise_once_and_accounts_for_every_round_across_a_restart(
    tmp_path, small_tokenizer_path, small_model_config
):
    settings = dict(model=small_model_config, clients_per_round=4, over_selection=1.0, server_optimizer="fedavg",
                    noise_multiplier=0.2, clip_norm=0.5, population=40, selection_window_s=0.0)
    config = local_aggregator_config(tmp_path, small_tokenizer_path, **settings)

    def run_round(client: AggregatorClient, value: float) -> tuple[dict, dict, dict]:
        """Four phones: three send -value everywhere, one +value, with very different example counts (weighted by
        them, the mean would be near zero; with each phone counting once it is half the clipped -value).
        Returns the model before and after, and the mean of the clipped updates with each phone counted once."""
        before, _ = model_from_bytes(client.model())
        shapes = parameter_shapes(before.state_dict())
        decisions = [client.checkin(client.enrol().device_token) for _ in range(4)]
        assert {d.clip_norm for d in decisions} == {0.5}
        # Updates far longer than the clip norm, as a phone that ignored it would send: the server clips them.
        updates = [{name: torch.full(shape, sign * value) for name, shape in shapes.items()}
                   for sign in (1, -1, -1, -1)]
        assert l2_norm(updates[0]) > 10 * 0.5
        for k, (decision, update) in enumerate(zip(decisions, updates)):
            # Example counts differ wildly; each phone still counts once.
            client.upload(decision.round, decision.upload_token, update_bytes(update, 1 + 300 * k, compression="none"))
        after, _ = model_from_bytes(client.model())
        clipped = [clip_to_norm(update, 0.5) for update in updates]
        return before.state_dict(), after.state_dict(), {n: sum(c[n] for c in clipped) / 4 for n in shapes}

    with LocalAggregator(config) as service:
        client = AggregatorClient(service.url)
        before, after, mean = run_round(client, 0.15)
        # FedAvg with server learning rate 1: new = old + (sum of clipped updates + noise) / 4.
        residual = torch.cat([(after[n] - before[n] - mean[n]).flatten() for n in before])
        # The noise is unpredictable by design (not seeded), so the bounds are five standard errors wide.
        assert residual.std().item() == pytest.approx(0.2 * 0.5 / 4, rel=0.1)
        assert abs(residual.mean().item()) < 5 * 0.025 / residual.numel() ** 0.5
        run_round(client, -0.15)
        status = client.status()
    expected = [epsilon([PrivacyEvent(4 / 40, 0.2)] * k, 1 / 40) for k in (1, 2)]
    assert status.differential_privacy and status.epsilon == pytest.approx(expected[1])
    assert [r.epsilon for r in status.recent_rounds] == pytest.approx(expected)
    assert [r.dp_delta for r in status.recent_rounds] == [1 / 40, 1 / 40]

    with LocalAggregator(local_aggregator_config(tmp_path, small_tokenizer_path, **settings)) as restarted:
        client = AggregatorClient(restarted.url)
        assert client.status().epsilon == pytest.approx(expected[1])
        run_round(client, 0.15)
        assert client.status().epsilon == pytest.approx(epsilon([PrivacyEvent(4 / 40, 0.2)] * 3, 1 / 40))
