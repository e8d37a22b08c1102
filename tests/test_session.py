"""A phone's round session: training wrapped by mods, each of which does one thing and can be left out."""

from __future__ import annotations

import math

import torch

from device_sim import worker
from device_sim.fleet import typing_times
from device_sim.phone import Phone
from device_sim.session import (
    Clipping,
    LocalWork,
    RoundInput,
    clipped,
    encoded,
    evaluated,
    guarded,
    local_work,
    train,
)
from device_sim.worker import TrainingJob
from keyboard_model import weights
from keyboard_model.architecture import build_model
from keyboard_model.evaluate import evaluate
from keyboard_model.norms import l2_norm
from keyboard_model.train import LocalTrainConfig, TrainResult
from keyboard_model.update_codec import decode_update
from keyboard_model.weights import model_from_bytes, model_to_bytes, parameter_shapes
from tests.conftest import SMALL_TEXT


def round_input(small_tokenizer, small_model_config) -> RoundInput:
    return RoundInput(build_model(small_model_config, seed=1), 7, small_tokenizer, SMALL_TEXT[:4], SMALL_TEXT[4:],
                      LocalTrainConfig(learning_rate=0.5), seed=3)


def test_the_evaluation_scores_the_downloaded_model_before_training_moves_it(small_tokenizer, small_model_config):
    given = round_input(small_tokenizer, small_model_config)
    before = evaluate(build_model(small_model_config, seed=1), small_tokenizer,
                      small_tokenizer.encode_batch(SMALL_TEXT[4:]))
    work = local_work(given, [evaluated(25)])
    assert work.delta is not None and l2_norm(work.delta) > 0  # it trained...
    assert (work.evaluation.model_version, work.evaluation.positions, work.evaluation.hits_at_1) == (
        7, before.positions, before.hits_at_1)  # ...after scoring the model as it came


def test_clipping_wraps_training_and_encoding_wraps_clipping(small_tokenizer, small_model_config):
    given = round_input(small_tokenizer, small_model_config)
    unclipped = local_work(round_input(small_tokenizer, small_model_config), [])
    assert l2_norm(unclipped.delta) > 0.01
    work = local_work(given, [encoded("none"), clipped(Clipping(0.01))])
    decoded, metadata = decode_update(work.upload, parameter_shapes(given.model.state_dict()))
    assert math.isclose(l2_norm(decoded), 0.01, rel_tol=1e-4)
    assert metadata["num_examples"] == str(work.result.num_examples)


def test_the_guard_drops_a_diverged_or_non_finite_delta_and_its_evaluation(small_tokenizer, small_model_config):
    given = round_input(small_tokenizer, small_model_config)

    def trained(delta, divergence=None):
        return lambda _: LocalWork(TrainResult(1.0, 4, divergence), delta)

    nan = {"w": torch.tensor([1.0, float("nan")])}
    for step in (trained({"w": torch.ones(2)}, divergence="loss rose 40 nats"), trained(nan)):
        work = guarded(given, lambda r, step=step: evaluated(25)(r, step))
        assert work.delta is None and work.evaluation is None and work.result.divergence
    kept = guarded(given, trained({"w": torch.ones(2)}))
    assert kept.delta is not None and kept.result.divergence is None
    # And nothing is encoded from a dropped delta.
    assert encoded("int8")(given, lambda r: guarded(r, trained(nan))).upload is None


def test_training_alone_returns_only_a_delta(small_tokenizer, small_model_config):
    work = train(round_input(small_tokenizer, small_model_config))
    assert work.upload is None and work.evaluation is None and set(work.delta) == set(
        parameter_shapes(build_model(small_model_config).state_dict()))


def two_phones(folder):
    return [Phone.create(f"phone-{p}", folder / f"phone-{p}",
                         typing_times([SMALL_TEXT[(p + t) % len(SMALL_TEXT)] for t in range(6)], 1.0))
            for p in range(2)]


def test_a_worker_decodes_the_model_once_and_each_phone_starts_from_it(tmp_path, monkeypatch, small_tokenizer,
                                                                     small_model_config):
    decoded = []
    monkeypatch.setattr(weights, "model_from_bytes", lambda data: decoded.append(data) or model_from_bytes(data))
    monkeypatch.setattr(worker, "_LATEST_MODEL", weights.LatestModel())
    model = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 5, small_model_config)
    first, second = two_phones(tmp_path)
    config, now = LocalTrainConfig(learning_rate=0.5, batch_size=2), 2 * 86_400.0
    in_a_row = [worker.run_in_worker(small_tokenizer.to_json(), TrainingJob(phone, model, config, seed, "none", now,
                                                                           None))[0]
                for seed, phone in enumerate((first, second))]
    assert len(decoded) == 1  # the second phone reused the worker's decoded model...
    alone = second.local_work(model, small_tokenizer, config, 1, "none", now)
    assert in_a_row[0].result.num_examples > 0  # ...which the first phone had trained...
    assert in_a_row[1].evaluation == alone.evaluation  # ...yet the second scored and trained the model it downloaded
    assert in_a_row[1].upload == alone.upload


def test_a_phone_scores_the_model_only_when_asked(tmp_path, small_tokenizer, small_model_config):
    model = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 5, small_model_config)
    phone = two_phones(tmp_path)[0]
    asked, not_asked = (phone.local_work(model, small_tokenizer, LocalTrainConfig(), 0, "none", 2 * 86_400.0,
                                         evaluate=evaluate) for evaluate in (True, False))
    assert asked.evaluation is not None and not_asked.evaluation is None
    assert not_asked.upload == asked.upload  # training is the same either way
