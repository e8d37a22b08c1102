"""The vectorised cohort executor: phones trained together end where each would have ended on its own.

Every comparison here is within a float tolerance: the batched pass adds and multiplies in
another order than a phone's own training (and than the C++ kernel), so results agree to
rounding, not bit for bit. The tolerances are far above rounding (about 1e-7 relative per
step) and far below what a wrong batch, a missed step or another phone's gradient would move.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch

from device_sim import cli as device_cli
from device_sim.executor import SerialExecutor
from device_sim.fleet import typing_times
from device_sim.phone import Phone
from device_sim.session import Clipping, RoundInput, train
from device_sim.vectorised import VectorisedCohort, check_device, train_cohort
from device_sim.worker import TrainingJob
from keyboard_model.architecture import build_model
from keyboard_model.errors import UserFacingError
from keyboard_model.train import LocalTrainConfig, batch_order, training_rows
from keyboard_model.transformer import TransformerConfig
from keyboard_model.weights import model_to_bytes
from tests.conftest import SMALL_TEXT
from tests.helpers import close, make_phones, outcome, run_fleet

# Gradient norms of these phones run from 0.12 to 0.28 (measured): some steps are clipped, some not.
CONFIG = LocalTrainConfig(batch_size=4, max_grad_norm=0.15)
# Message counts of the ragged phones: one message (a single row, so a single batch), a few, many; and a phone with
# nothing to train on.
MESSAGES = (1, 6, 14, 40, 0)


def ragged_phones(tokenizer) -> list[tuple[list[str], int]]:
    """(training texts, seed) of phones with different amounts of history."""
    return [([SMALL_TEXT[(p + t) % len(SMALL_TEXT)] for t in range(count)], 10 + p) for p, count in enumerate(MESSAGES)]


def sequential(model, tokenizer, texts: list[str], seed: int, config: LocalTrainConfig):
    """The phone's own training, as `Phone.local_work` runs it (session.train -> train_local), on a fresh copy."""
    fresh = build_model(model.config)
    fresh.load_state_dict(model.state_dict())
    return train(RoundInput(fresh, 0, tokenizer, texts, [], config, seed))


def test_ragged_phones_each_end_where_their_own_training_ends(small_tokenizer, small_model_config):
    model = build_model(small_model_config, seed=1)
    phones = ragged_phones(small_tokenizer)
    steps = [len(batch_order(len(rows), CONFIG, seed)) if rows is not None else 0
             for texts, seed in phones for _, rows in [training_rows(small_tokenizer.encode_batch(texts), CONFIG)]]
    assert steps[0] == 1 and len(set(steps)) == len(steps)  # ragged: one phone a single batch, all different

    # Two phones a pass: passes of different lengths, and phones that run out of batches while others go on.
    trained = train_cohort(model, [(small_tokenizer.encode_batch(texts), seed) for texts, seed in phones], CONFIG,
                           phones_per_pass=2)

    assert [t.steps for t in trained] == steps
    for (texts, seed), together in zip(phones, trained):
        alone = sequential(model, small_tokenizer, texts, seed, CONFIG)
        assert together.result.num_examples == alone.result.num_examples == len(texts)
        assert together.result.divergence is None and alone.result.divergence is None
        if not texts:
            assert math.isnan(together.result.mean_loss) and math.isnan(alone.result.mean_loss)
        else:
            assert math.isclose(together.result.mean_loss, alone.result.mean_loss, rel_tol=1e-5)
        assert set(together.delta) == set(alone.delta)
        for name in alone.delta:
            assert close(together.delta[name], alone.delta[name]), name
    # The phones really moved, and differently: equal deltas would pass the comparison above for the wrong reason.
    moved = [t.delta["embedding.weight"] for t in trained[:-1]]
    assert all(d.abs().max() > 1e-3 for d in moved)
    assert not close(moved[0], moved[1])
    assert all(not d.any() for d in trained[-1].delta.values())  # nothing to train on: no step, no change


def test_a_fedprox_cohort_matches_its_phones_own_proximal_training(small_tokenizer, small_model_config):
    model = build_model(small_model_config, seed=1)
    phones = ragged_phones(small_tokenizer)[1:4]
    proximal = dataclasses.replace(CONFIG, proximal_mu=0.5)
    trained = train_cohort(model, [(small_tokenizer.encode_batch(texts), seed) for texts, seed in phones], proximal)
    for (texts, seed), together in zip(phones, trained):
        alone = sequential(model, small_tokenizer, texts, seed, proximal)
        plain = sequential(model, small_tokenizer, texts, seed, CONFIG)
        for name in alone.delta:
            assert close(together.delta[name], alone.delta[name]), name
        # The term did something: without it the phone ends elsewhere.
        assert not close(alone.delta["embedding.weight"], plain.delta["embedding.weight"])


def test_a_transformer_cohort_matches_its_phones_own_training(small_tokenizer):
    config = TransformerConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=16, layers=2, heads=2, context=20)
    model = build_model(config, seed=1)
    phones = ragged_phones(small_tokenizer)[:3]
    trained = train_cohort(model, [(small_tokenizer.encode_batch(texts), seed) for texts, seed in phones], CONFIG)
    for (texts, seed), together in zip(phones, trained):
        alone = sequential(model, small_tokenizer, texts, seed, CONFIG)
        assert math.isclose(together.result.mean_loss, alone.result.mean_loss, rel_tol=1e-5)
        for name in alone.delta:
            assert close(together.delta[name], alone.delta[name]), name


def test_a_nan_in_the_weights_stops_every_phone_at_its_first_step_and_moves_none(small_tokenizer, small_model_config):
    model = build_model(small_model_config)
    with torch.no_grad():
        model.recurrent_weights.weight[0, 0] = math.nan
    phones = ragged_phones(small_tokenizer)[:4]
    trained = train_cohort(model, [(small_tokenizer.encode_batch(texts), seed) for texts, seed in phones], CONFIG)
    for (texts, seed), together in zip(phones, trained):
        alone = sequential(model, small_tokenizer, texts, seed, CONFIG)
        assert together.result.divergence.startswith("step 1 ") and alone.result.divergence.startswith("step 1 ")
        assert together.steps == 1
        for name in alone.delta:  # nothing moved: zero, and NaN where the NaN was (NaN minus NaN)
            torch.testing.assert_close(together.delta[name], alone.delta[name], equal_nan=True)


def test_divergence_is_judged_phone_by_phone(small_tokenizer, small_model_config):
    # At learning rate 50 the two phones with the most steps (3 and 8) end 41 and 1,876 nats above their first batch's
    # starting loss, the two shortest (1 and 2 steps) 0.6 below and 3.1 above it (measured on their own training),
    # against a limit of 2 ln V = 7.9 nats: which phones diverge does not hang on rounding.
    config = LocalTrainConfig(batch_size=4, learning_rate=50.0)
    model = build_model(small_model_config, seed=1)
    phones = ragged_phones(small_tokenizer)[:4]
    trained = train_cohort(model, [(small_tokenizer.encode_batch(texts), seed) for texts, seed in phones], config)
    diverged = [t.result.divergence is not None for t in trained]
    assert diverged == [sequential(model, small_tokenizer, texts, seed, config).result.divergence is not None
                        for texts, seed in phones]
    assert diverged == [False, False, True, True]
    kept = trained[0]
    alone = sequential(model, small_tokenizer, *phones[0], config)
    for name in alone.delta:  # the diverging phones beside it did not disturb it
        assert close(kept.delta[name], alone.delta[name]), name


def test_the_executor_gives_what_phone_local_work_gives(tmp_path, small_tokenizer, small_model_config):
    phones = [Phone.create(f"phone-{p}", tmp_path / f"phone-{p}",
                           typing_times([SMALL_TEXT[(p + t) % len(SMALL_TEXT)] for t in range(count)], 1.0))
              for p, count in enumerate((2, 6, 20))]
    model = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 5, small_model_config)
    cohort = VectorisedCohort(small_tokenizer)
    now = 2 * 86_400.0
    jobs = [cohort.submit(TrainingJob(phone, model, CONFIG, seed, "none", now, Clipping(0.05, report_within=True)))
            for seed, phone in enumerate(phones)]
    assert not any(job.done() for job in jobs)  # queued: nothing trains until a result is asked for
    first, _ = jobs[1].result()
    assert all(job.done() for job in jobs)  # ...and then every queued phone trained, in one go
    for seed, (phone, job) in enumerate(zip(phones, jobs)):
        together, seconds = job.result()
        alone = phone.local_work(model, small_tokenizer, CONFIG, seed, "none", now,
                                 clipping=Clipping(0.05, report_within=True))
        assert seconds > 0
        assert together.evaluation == alone.evaluation  # the downloaded model, scored before training
        assert together.result.num_examples == alone.result.num_examples
        assert math.isclose(together.result.mean_loss, alone.result.mean_loss, rel_tol=1e-5)
        for name in alone.delta:  # clipped to the norm the aggregator asked for, then encoded
            assert close(together.delta[name], alone.delta[name]), name
        assert together.within_clip is not None and together.within_clip == alone.within_clip
        assert together.upload is not None and len(together.upload) == len(alone.upload)
    assert first is jobs[1].result()[0]


def test_close_cancels_what_is_still_queued(tmp_path, small_tokenizer, small_model_config):
    phone = make_phones(tmp_path, 1)[0]
    model = model_to_bytes(build_model(small_model_config).state_dict(), 0, small_model_config)
    cohort = VectorisedCohort(small_tokenizer)
    job = cohort.submit(TrainingJob(phone, model, CONFIG, 0, "int8", 86_400.0, None))
    cohort.close()
    assert job.cancelled()


def test_a_fleet_on_the_vectorised_executor_follows_the_one_by_one_trajectory(
    tmp_path, small_tokenizer_path, small_tokenizer, small_model_config
):
    # Phones of a round are selected at different ticks, and their results asked for ticks later: the lazy futures
    # train whoever is queued by then. The rounds, their phones and the model come out as one phone at a time.
    together, reports = run_fleet(tmp_path / "vectorised", small_tokenizer_path, small_model_config,
                                  VectorisedCohort(small_tokenizer), rounds=3)
    alone, expected = run_fleet(tmp_path / "one-by-one", small_tokenizer_path, small_model_config,
                                SerialExecutor(small_tokenizer), rounds=3)
    assert [len(report.participants) for report in reports] == [3, 3, 3]
    for report, same in zip(reports, expected):
        assert [outcome(p) for p in report.participations] == [outcome(p) for p in same.participations]
    # A phone beyond its round's goal is not trained on this executor either: it is told it is late.
    late = [p for report in reports for p in report.participations if p.outcome == "late"]
    assert late and all(p.result is None for p in late)
    initial = build_model(small_model_config).state_dict()
    for name, tensor in alone.state_dict().items():
        assert close(together.state_dict()[name], tensor), name
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in together.state_dict().items())


def test_secure_rounds_complete_on_the_vectorised_executor(tmp_path, small_tokenizer_path, small_tokenizer,
                                                          small_model_config):
    # In a secure round the masking mod runs in this process, on the phone's own SecAggPhone (the pool masks a copy).
    settings = dict(rounds=2, phones=30, per_round=4, secure_aggregation=True)
    _, reports = run_fleet(tmp_path / "vectorised", small_tokenizer_path, small_model_config,
                           VectorisedCohort(small_tokenizer), **settings)
    _, expected = run_fleet(tmp_path / "one-by-one", small_tokenizer_path, small_model_config,
                            SerialExecutor(small_tokenizer), **settings)
    assert [len(report.participants) for report in reports] == [4, 4]
    assert [[(p.phone_id, p.outcome) for p in report.participations] for report in reports] == [
        [(p.phone_id, p.outcome) for p in report.participations] for report in expected]


def test_an_unregistered_architecture_is_refused_by_name(small_tokenizer, small_model_config, monkeypatch):
    model = build_model(small_model_config)
    monkeypatch.setattr(type(model.config), "architecture", "lstm-of-the-future")
    with pytest.raises(ValueError, match="unknown model architecture 'lstm-of-the-future'"):
        train_cohort(model, [([[5, 6, 7]], 0)], CONFIG)


def test_cuda_is_refused_clearly_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserFacingError, match="no CUDA device"):
        check_device("cuda")
    parser = argparse.ArgumentParser()
    device_cli.add_fleet_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cuda"])
    # The local pool trains on the CPU only; the refusal names both options.
    args = parser.parse_args(["--executor", "local"])
    args.device = "cuda"
    with pytest.raises(UserFacingError, match="--device cuda needs --executor vectorised"):
        device_cli.executor_from_args(args)


def test_the_cli_builds_the_executor_it_is_asked_for(small_tokenizer):
    parser = argparse.ArgumentParser()
    device_cli.add_fleet_arguments(parser)
    made = device_cli.executor_from_args(parser.parse_args(["--executor", "vectorised", "--phones-per-pass", "7"]))(
        small_tokenizer)
    assert isinstance(made, VectorisedCohort) and made.phones_per_pass == 7 and made.device == "cpu"
    with pytest.raises(UserFacingError, match="--phones-per-pass"):
        device_cli.executor_from_args(parser.parse_args(["--phones-per-pass", "7"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_cuda_cohort_matches_the_cpu_cohort(small_tokenizer, small_model_config):
    model = build_model(small_model_config, seed=1)
    phones = [(small_tokenizer.encode_batch(texts), seed) for texts, seed in ragged_phones(small_tokenizer)]
    for on_cpu, on_gpu in zip(train_cohort(model, phones, CONFIG), train_cohort(model, phones, CONFIG, "cuda")):
        for name in on_cpu.delta:
            assert close(on_gpu.delta[name], on_cpu.delta[name]), name

