"""A phone's round session: training wrapped by mods, each of which does one thing and can be left out."""

from __future__ import annotations

import math

import torch

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
from keyboard_model.evaluate import evaluate
from keyboard_model.model import build_model
from keyboard_model.train import LocalTrainConfig, TrainResult
from keyboard_model.update_codec import decode_update
from keyboard_model.norms import l2_norm
from keyboard_model.weights import parameter_shapes
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
