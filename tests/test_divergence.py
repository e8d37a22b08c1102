"""Local training that blows up: it is caught, and nothing of it reaches the aggregator.

The blow-ups here are forced far past any rounding (a learning rate of a million, a NaN in the
weights), so they happen alike on every CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from device_sim import session as session_module
from device_sim.fleet import Fleet
from device_sim.phone import Phone
from device_sim.session import Clipping
from keyboard_model.architecture import build_model
from keyboard_model.train import LocalTrainConfig, TrainingDivergedError, train_centrally, train_local
from keyboard_model.weights import model_to_bytes
from tests.conftest import SMALL_TEXT
from tests.helpers import Tap, fleet_config, make_phones

BLOW_UP = LocalTrainConfig(batch_size=2, learning_rate=1e6)


def test_a_nan_in_the_weights_stops_training_at_its_first_step_before_the_model_moves(
    small_tokenizer, small_model_config
):
    model = build_model(small_model_config)
    with torch.no_grad():
        model.recurrent_weights.weight[0, 0] = math.nan
    before = {name: t.clone() for name, t in model.state_dict().items()}

    result = train_local(model, small_tokenizer.encode_batch(SMALL_TEXT), LocalTrainConfig(batch_size=2))

    assert result.divergence is not None and result.divergence.startswith("step 1 ")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], equal_nan=True, msg=name)


@pytest.mark.parametrize("batch_size", [2, 16])  # several steps; one step over all rows
def test_a_learning_rate_that_blows_the_model_up_is_judged_diverged(small_tokenizer, small_model_config, batch_size):
    model = build_model(small_model_config)
    config = LocalTrainConfig(batch_size=batch_size, learning_rate=1e6)
    result = train_local(model, small_tokenizer.encode_batch(SMALL_TEXT), config)
    assert result.divergence is not None


def test_healthy_training_is_not_judged_diverged(small_tokenizer, small_model_config):
    result = train_local(build_model(small_model_config), small_tokenizer.encode_batch(SMALL_TEXT),
                         LocalTrainConfig(epochs=5, batch_size=2))
    assert result.divergence is None and result.num_examples == len(SMALL_TEXT)


def test_central_training_that_diverges_fails_instead_of_becoming_a_baseline(small_tokenizer, small_model_config):
    with pytest.raises(TrainingDivergedError, match="epoch 1"):
        train_centrally(build_model(small_model_config), small_tokenizer.encode_batch(SMALL_TEXT), BLOW_UP, epochs=2)


def test_a_phone_whose_training_diverges_encodes_no_update_and_no_evaluation(
    tmp_path, small_tokenizer, small_model_config, monkeypatch
):
    encoded = []
    monkeypatch.setattr(session_module, "encode_update", lambda *args: encoded.append(args) or b"")
    phone = make_phones(tmp_path, 1)[0]

    model = model_to_bytes(build_model(small_model_config).state_dict(), 0, small_model_config)
    work = phone.local_work(model, small_tokenizer, BLOW_UP, seed=0)

    assert work.upload is None and work.evaluation is None
    assert work.result.divergence is not None
    assert not encoded


def test_a_delta_that_is_not_finite_is_never_encoded_even_if_training_missed_it(
    tmp_path, small_tokenizer, small_model_config, monkeypatch
):
    def training_that_leaves_an_infinity(model, messages, config, seed=0):
        result = train_local(model, messages, config, seed)
        with torch.no_grad():
            model.output_bias[3] = math.inf
        return result

    encoded = []
    monkeypatch.setattr(session_module, "train_local", training_that_leaves_an_infinity)
    monkeypatch.setattr(session_module, "encode_update", lambda *args: encoded.append(args) or b"")
    phone: Phone = make_phones(tmp_path, 1)[0]
    model = model_to_bytes(build_model(small_model_config).state_dict(), 0, small_model_config)

    for clipping in (None, Clipping(1.0)):  # clipping an infinite delta gives NaN: refused all the same
        work = phone.local_work(model, small_tokenizer, LocalTrainConfig(batch_size=2), seed=0, clipping=clipping)
        assert work.upload is None and "not finite" in work.result.divergence
    assert not encoded


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True])
def test_phones_whose_training_diverges_abort_and_upload_nothing_so_the_round_fails_and_the_model_stays(
    tmp_path, small_tokenizer_path, small_model_config, secure
):
    aggregator = InProcessClient(local_aggregator_config(
        tmp_path, small_tokenizer_path, model=small_model_config, clients_per_round=3, simulated_clock=True,
        round_deadline_s=3600.0, secure_aggregation=secure))
    tap = Tap(aggregator)
    initial = aggregator.model()
    fleet = Fleet(make_phones(tmp_path / "phones", 20),
                  fleet_config(tmp_path / "phones", train=BLOW_UP, vanish_probability=0.0), tap)
    try:
        report = fleet.run_round()
    finally:
        fleet.close()

    diverged = [p for p in report.participations if p.outcome == "diverged"]
    assert diverged and all(p.result.divergence for p in diverged)
    assert {p.outcome for p in report.participations} <= {"diverged", "aborted"}
    assert not tap.uploads and not tap.evaluations
    assert len(tap.aborts) == len(report.participations)
    summary = next(r for r in aggregator.status().recent_rounds if r.round == report.round)
    assert summary.status == "failed" and summary.reported == 0 and summary.aborted == len(tap.aborts)
    assert aggregator.model() == initial
