"""Canary clients (aggregator/canary_clients.py): the aggregator's one-shot empirical privacy audit. Without
differential privacy the model's movement gives the inserted canaries away; with it the estimate stays within the
accountant's epsilon; and the canaries never reach the phones' own statistics."""

from __future__ import annotations

import json

import pytest
import torch

from aggregator.canary_clients import CanaryClients
from aggregator.config import AggregatorConfig
from aggregator.refusals import AuditError
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from device_sim.session import update_bytes
from keyboard_model.empirical_privacy import estimate, gaussian_epsilon
from keyboard_model.errors import UserFacingError
from keyboard_model.flat import flatten, views
from keyboard_model.norms import clip_to_norm
from keyboard_model.weights import model_from_bytes, parameter_shapes
from tests.helpers import assert_mean_within_rounding, finished_round, random_delta, secure_client, unmasking_round

PHONES = 4


def manager(tmp_path, small_tokenizer_path, small_model_config, **changes) -> RoundManager:
    settings = dict(model=small_model_config, clients_per_round=PHONES, over_selection=1.0, server_optimizer="fedavg",
                    population=PHONES, selection_window_s=0.0, canary_clients=16, audit_every=3)
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                              **(settings | changes))
    return RoundManager(config, open_storage(config.db_path))


def run_rounds(rounds: RoundManager, count: int, within_clip: bool | None = None, seed: int = 0) -> list[dict]:
    """`count` rounds in which the round's phones each report an update of norm 0.5 (a fresh random one each), with
    this clipping bit; the rounds' records."""
    shapes = parameter_shapes(model_from_bytes(rounds.current_model()[1])[0].state_dict())
    for index in range(count):
        decisions = [rounds.checkin(rounds.enrol()[0]) for _ in range(PHONES)]
        for phone, decision in enumerate(decisions):
            delta = clip_to_norm(random_delta(shapes, seed + 100 * index + phone), 0.5)
            data = update_bytes(delta, 5, "none", within_clip=within_clip)
            rounds.submit(decision.round, decision.upload_token, data)
    return rounds.storage.recent_rounds(count)


def test_without_noise_the_models_movement_gives_the_inserted_canaries_away(tmp_path, small_tokenizer_path,
                                                                              small_model_config):
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, dp_delta=1e-5)
    records = run_rounds(rounds, 3)
    # Every phone takes part in every round here (population = goal), and so does every canary.
    assert [r["audit_canaries_taking_part"] for r in records] == [16, 16, 16]
    audited = records[-1]
    assert [r.get("audit_epsilon") for r in records[:2]] == [None, None]  # audited every third round only
    # Each inserted canary is a twentieth of every step; a held-out direction is at about 1 / sqrt(d) of it.
    assert audited["audit_score_in"] > 0.1 > 0.02 > abs(audited["audit_score_out"])
    assert audited["audit_epsilon_low"] > 20 and audited["audit_epsilon_lower_bound"] > 1
    assert audited["audit_delta"] == 1e-5
    status = rounds.snapshot()
    assert status["audit_epsilon"] == audited["audit_epsilon"]


def test_the_canaries_are_the_servers_inputs_never_the_phones_statistics(tmp_path, small_tokenizer_path,
                                                                         small_model_config):
    """Adaptive clipping: every phone's update is outside the clip norm (bit 0), and each canary sits exactly on it.
    Counted as phones, the canaries' 16 bits of 1 against 4 zeros would put the fraction within near 0.8."""
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, noise_multiplier=0.01, clip_norm=0.25,
                     clip_quantile=0.5, population=40, dp_delta=1e-5)
    with_canaries = rounds.canaries
    assert with_canaries is not None
    rounds.canaries = CanaryClients(count=16, shapes=with_canaries.shapes, initial=with_canaries.initial,
                                    seed=with_canaries.seed, rate=lambda: 1.0)  # every canary in every round
    record = run_rounds(rounds, 1, within_clip=False)[0]
    assert record["audit_canaries_taking_part"] == 16
    assert (record["reported"], record["selected"], record["examples"]) == (PHONES, PHONES, PHONES * 5)
    # The phones' four zeros and the bits' noise (stddev 0.2 of 4); counted as reporters, the canaries would widen the
    # range the noisy sum is taken into, and the fraction could fall below 0.
    assert 0 <= record["dp_fraction_within"] < 0.3
    # They did move the model: the step holds their sixteen directions at the clip norm, not just four phones'.
    assert record["update_norm"] * PHONES > 0.25 * 16**0.5 * 0.8


@pytest.mark.parametrize("mechanism", ["fedavg", "ftrl"])
def test_with_noise_the_estimate_stays_within_the_accountants_epsilon(tmp_path, small_tokenizer_path,
                                                                      small_model_config, mechanism):
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, noise_multiplier=1.0, clip_norm=0.5,
                     population=16, dp_delta=1e-5, dp_mechanism=mechanism, min_separation=2, dp_rounds=6,
                     canary_clients=64)
    audited = run_rounds(rounds, 3)[-1]
    assert audited["audit_canaries"] == 64 and audited["epsilon"] is not None
    # The estimate is for one attack, the accountant's bound for every attack: beyond its interval the estimate
    # would say the accounting, or the noise, is wrong (without noise it is past 20: the test above).
    assert audited["audit_epsilon_low"] <= audited["epsilon"]
    assert audited["audit_epsilon_lower_bound"] <= audited["epsilon"]


def test_a_secure_rounds_canaries_join_the_unmasked_sum_as_the_servers_own_inputs(tmp_path, small_tokenizer_path,
                                                                                   small_model_config):
    client = secure_client(tmp_path, small_tokenizer_path, small_model_config, devices=PHONES, canary_clients=3,
                           audit_every=1)
    members, deltas, state, before = unmasking_round(client, PHONES)
    for device in members:
        device.reveal()
    record = finished_round(client)
    assert record.status == "closed" and record.audit_canaries_taking_part == 3 and record.reported == PHONES
    shapes = {name: tuple(value.shape) for name, value in before.items()}
    # Seven inputs, each counted once: the phones' four and the canaries' three at the clip norm (1.0).
    own = sum(client._rounds.canaries.direction(k) for k in range(3))
    phones = flatten({name: sum(d[name] for d in deltas) for name in before}, shapes)
    after, _ = model_from_bytes(client.model())
    assert_mean_within_rounding(after.state_dict(), before, views((phones + own) / 7, shapes), state,
                                reporters=PHONES)
    client.close()


def test_a_restarted_aggregator_draws_the_same_canaries_and_shows_the_last_audit(tmp_path, small_tokenizer_path,
                                                                                 small_model_config):
    first = manager(tmp_path, small_tokenizer_path, small_model_config)
    run_rounds(first, 3)
    before = first.snapshot()
    directions = [first.canaries.direction(k) for k in (0, 31)]
    first.storage.close()
    # Another number of canaries would swap inserted and held-out ones: refused.
    with pytest.raises(UserFacingError, match="--canary-clients 16"):
        manager(tmp_path, small_tokenizer_path, small_model_config, canary_clients=20)
    # The directions come from the database's first model, not from --seed.
    again = manager(tmp_path, small_tokenizer_path, small_model_config, seed=5)
    assert again.snapshot()["audit_epsilon"] == before["audit_epsilon"] is not None
    # Without differential privacy, the audit's delta is 1 / population, as the accountant's would be.
    assert again.storage.recent_rounds(1)[0]["audit_delta"] == pytest.approx(1 / PHONES)
    assert all(torch.equal(a, b) for a, b in zip(directions, [again.canaries.direction(k) for k in (0, 31)]))
    assert torch.equal(again.canaries.initial, first.canaries.initial)


def test_a_canary_keeps_dp_ftrls_separation_and_takes_part_at_a_phones_rate():
    canaries = CanaryClients(count=200, shapes={"w": (3,)}, initial=torch.zeros(3), seed=1, rate=lambda: 0.1,
                             separation=4)
    rounds = {r: set(canaries.taking_part(r)) for r in range(400)}
    for k in range(200):
        taken = [r for r, taking in rounds.items() if k in taking]
        assert all(later - earlier >= 4 for earlier, later in zip(taken, taken[1:]))
    share = sum(map(len, rounds.values())) / (200 * 400)
    assert 0.08 < share < 0.12  # 80,000 draws at 0.1 on average: within 0.1 +- 0.001 (rms)


def test_under_dp_ftrl_canaries_are_drawn_by_release_so_a_failed_round_cannot_break_the_separation(
        tmp_path, small_tokenizer_path, small_model_config, monkeypatch):
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, noise_multiplier=1.0, clip_norm=0.5,
                     dp_mechanism="ftrl", min_separation=2, dp_rounds=4, simulated_clock=True)
    drawn_for = []
    insert = CanaryClients.insert

    def noted(canaries, aggregation, release, norm, weight):
        drawn_for.append(release)
        return insert(canaries, aggregation, release, norm, weight)

    monkeypatch.setattr(CanaryClients, "insert", noted)
    run_rounds(rounds, 1)
    for _ in range(PHONES):  # round 2: its phones never report, and it fails at its deadline
        rounds.checkin(rounds.enrol()[0])
    rounds.set_simulated_time(10_000.0)
    rounds.tick()
    run_rounds(rounds, 1)
    statuses = [record["status"] for record in rounds.storage.recent_rounds(3)]
    assert statuses == ["closed", "failed", "closed"]
    # Releases 0 and 1 (the model's versions), not rounds 1 and 3: by round, the same canaries would take part in two
    # releases in a row, within the separation of 2 that DP-FTRL accounts for.
    assert drawn_for == [0, 1]
    assert not set(rounds.canaries.taking_part(0)) & set(rounds.canaries.taking_part(1))


def test_a_failed_audit_leaves_its_round_committed(tmp_path, small_tokenizer_path, small_model_config, monkeypatch):
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config, audit_every=1)

    def broken(*args, **kwargs):
        raise RuntimeError("the estimator broke")

    monkeypatch.setattr("aggregator.canary_clients.estimate", broken)
    record = run_rounds(rounds, 1)[0]
    assert record["status"] == "closed" and record["new_version"] == 1 and record.get("audit_epsilon") is None


def test_robust_rules_are_refused_with_canary_clients(tmp_path, small_tokenizer_path):
    with pytest.raises(ValueError, match="does not sum"):
        AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path, canary_clients=4,
                         aggregation_rule="median")


def test_the_estimate_reads_two_gaussians_apart_as_the_gaussian_mechanisms_epsilon():
    generator = torch.Generator().manual_seed(0)
    apart = estimate((torch.randn(400, generator=generator) + 2).tolist(),
                     torch.randn(400, generator=generator).tolist(), delta=1e-5)
    # mu = 2 is epsilon 10.0 at delta 1e-5; 400 canaries a side pin it to about +-1.
    assert apart.epsilon_low < gaussian_epsilon(2.0, 1e-5) < apart.epsilon_high
    assert 1 < apart.lower_bound < apart.epsilon
    alike = estimate(torch.randn(400, generator=generator).tolist(), torch.randn(400, generator=generator).tolist(),
                     delta=1e-5)
    assert alike.epsilon_low < 0.5 and alike.lower_bound == 0


def test_the_operator_audits_the_last_model_whatever_the_audit_interval(tmp_path, small_tokenizer_path,
                                                                         small_model_config):
    rounds = manager(tmp_path, small_tokenizer_path, small_model_config)  # audits every third round
    run_rounds(rounds, 2)
    assert rounds.storage.recent_rounds(1)[0].get("audit_epsilon") is None
    record = rounds.audit_now()
    # The figures go on the record of round 2, which made the current model, in the database too.
    assert record["round"] == 2 and record["new_version"] == rounds.model.version
    stored = rounds.storage.recent_rounds(1)[0]
    assert stored["audit_epsilon"] == record["audit_epsilon"] > 0 and stored["status"] == "closed"
    assert rounds.snapshot()["audit_epsilon"] == record["audit_epsilon"]
    assert rounds.audit_now() == record  # asked again, the same record: nothing is measured twice
    plain = manager(tmp_path / "plain", small_tokenizer_path, small_model_config, canary_clients=0)
    with pytest.raises(AuditError, match="no canary clients"):
        plain.audit_now()


def test_fedkb_audit_reports_the_last_models_audit_though_it_sits_on_an_earlier_rounds_line(tmp_path, capsys):
    """The run's last rounds failed, so the aggregator added the audit of its last model to round 1's record after
    round 1's line was written; summary.json holds it, and `fedkb audit` reads it from there."""
    from fedkb.cli import main

    lines = [{"round": r, "epsilon": None, "audit_epsilon": None} for r in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    audit = {"round": 1, "audit_canaries": 8, "audit_epsilon": 3.25, "audit_epsilon_low": 2.0,
             "audit_epsilon_high": 4.5, "audit_epsilon_lower_bound": 0.5, "audit_delta": 1e-5, "epsilon": None}
    (tmp_path / "summary.json").write_text(json.dumps({"privacy_audit": audit}))
    assert main(["audit", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "canary clients, round 1 (8 inserted" in said and "empirical epsilon 3.25" in said
    assert (tmp_path / "audit.png").stat().st_size > 0
