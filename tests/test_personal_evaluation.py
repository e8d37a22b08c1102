"""Personal models on the phones, and their federated evaluation: the copy stays on the phone, the upload is what it
was, and each round records the distribution of the phones' gains (Wang et al. 2019)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from aggregator.api.schemas import EvaluationReport
from aggregator.inprocess import InProcessClient
from aggregator.personal_evaluation import paired_counts, personal_record
from aggregator.process import local_aggregator_config
from device_sim.fleet import typing_times
from device_sim.phone import Phone
from keyboard_model.architecture import build_model
from keyboard_model.evaluate import EvalCounts
from keyboard_model.personal import PersonalConfig, personal_gains
from keyboard_model.train import LocalTrainConfig
from keyboard_model.update_codec import decode_update
from keyboard_model.weights import model_from_bytes, model_to_bytes, parameter_shapes
from tests.conftest import SMALL_TEXT

NOW = 2 * 86_400.0  # simulated seconds: the phone has typed its training messages by then


def phone(folder, name: str) -> Phone:
    return Phone.create(name, folder / name, typing_times([SMALL_TEXT[t % len(SMALL_TEXT)] for t in range(10)], 1.0))


def test_the_personal_model_stays_on_the_phone_and_the_upload_is_unchanged(tmp_path, small_tokenizer,
                                                                          small_model_config):
    downloaded = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 5, small_model_config)
    # Two phones with the same history and seed, one keeping a personal model: int8's stochastic rounding included.
    plain, personal = phone(tmp_path, "plain"), phone(tmp_path, "personal")
    without, with_personal = (p.local_work(downloaded, small_tokenizer, LocalTrainConfig(), 3, "int8", NOW,
                                           personal=config)
                              for p, config in ((plain, None), (personal, PersonalConfig())))

    assert with_personal.upload == without.upload
    shapes = parameter_shapes(build_model(small_model_config).state_dict())
    (delta, metadata), (plain_delta, plain_metadata) = (decode_update(w.upload, shapes) for w in (with_personal,
                                                                                                  without))
    assert set(delta) == set(shapes) and metadata == plain_metadata  # the delta and its metadata, nothing more
    assert all(torch.equal(delta[name], plain_delta[name]) for name in shapes)
    # The global model was scored as it came; the personal model's hits ride beside its counts in the evaluation.
    scored = with_personal.evaluation.model_dump(exclude={"personal_hits_at_1", "personal_hits_at_3"})
    assert scored == without.evaluation.model_dump(exclude={"personal_hits_at_1", "personal_hits_at_3"})
    assert without.evaluation.personal_hits_at_1 is None and with_personal.evaluation.personal_hits_at_1 is not None

    # The copy is in the phone's folder, with the global version it came from, and differs from the global model.
    assert not plain.personal_path.exists() and plain.personal_model() is None
    kept, version = personal.personal_model()
    global_model, _ = model_from_bytes(downloaded)
    assert version == 5
    assert any(not torch.equal(kept.state_dict()[name], tensor) for name, tensor in global_model.state_dict().items())


def test_a_phone_not_asked_to_score_keeps_no_new_personal_model(tmp_path, small_tokenizer, small_model_config):
    downloaded = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 5, small_model_config)
    kept = phone(tmp_path, "p")
    work = kept.local_work(downloaded, small_tokenizer, LocalTrainConfig(), 3, "none", NOW, evaluate=False,
                           personal=PersonalConfig())
    assert work.evaluation is None and not kept.personal_path.exists()


class RecordingPart:
    """A secure round's part of a phone that records what it was asked to mask."""

    def __init__(self) -> None:
        self.masked = []

    def masked_upload(self, delta, evaluation, within_clip, state, seed) -> bytes:
        self.masked.append(evaluation)
        return b"masked"


def test_in_a_secure_round_the_personal_model_is_kept_but_nothing_of_it_is_masked(tmp_path, small_tokenizer,
                                                                                  small_model_config):
    part, kept = RecordingPart(), phone(tmp_path, "p")
    downloaded = model_to_bytes(build_model(small_model_config, seed=1).state_dict(), 5, small_model_config)
    for config in (None, PersonalConfig()):
        kept.local_work(downloaded, small_tokenizer, LocalTrainConfig(), 3, "int8", NOW, secure=(part, None),
                        personal=config)
    plain, with_personal = part.masked
    assert with_personal == plain and with_personal.personal_hits_at_1 is None  # the same three counts, and no more
    assert kept.personal_path.exists()


def test_the_distribution_of_gains_counts_phones_helped_and_hurt_and_takes_the_median():
    def pair(positions: int, global_hits: int, personal_hits: int) -> tuple[EvalCounts, EvalCounts]:
        return (EvalCounts(global_hits, global_hits, positions), EvalCounts(personal_hits, personal_hits, positions))

    # Gains in points: +10, -5, 0, +20.
    gains = personal_gains([pair(100, 10, 20), pair(20, 4, 3), pair(50, 5, 5), pair(10, 1, 3)])
    assert (gains.phones, gains.helped, gains.hurt) == (4, 0.5, 0.25)
    assert gains.median_gain_points == pytest.approx(5.0)
    assert gains.personal == EvalCounts(31, 31, 180)
    assert personal_gains([]) is None
    with pytest.raises(ValueError, match="same positions"):
        personal_gains([(EvalCounts(1, 1, 10), EvalCounts(1, 1, 11))])
    assert personal_record([]) == {"personal_devices": 0, **dict.fromkeys(
        ("personal_helped", "personal_hurt", "personal_median_gain", "personal_positions", "personal_hits_at_1",
         "personal_hits_at_3"))}


def test_inconsistent_personal_counts_are_refused():
    good = {"model_version": 0, "positions": 100, "hits_at_1": 30, "hits_at_3": 50}
    assert paired_counts(EvaluationReport(**good)) is None
    assert paired_counts(EvaluationReport(**good, personal_hits_at_1=35, personal_hits_at_3=55)) == (
        EvalCounts(30, 50, 100), EvalCounts(35, 55, 100))
    for lie in ({"personal_hits_at_1": 35},  # one without the other
                {"personal_hits_at_1": 35, "personal_hits_at_3": 101},  # more hits than the positions scored
                {"personal_hits_at_1": 60, "personal_hits_at_3": 55},  # top-1 above top-3
                {"personal_hits_at_1": -1, "personal_hits_at_3": 5},
                {"personal_hits_at_1": 1, "personal_hits_at_3": 5, "personal_positions": 10}):  # nothing else
        with pytest.raises(ValidationError):
            EvaluationReport.model_validate(good | lie)


def test_a_rounds_summary_carries_the_distribution_its_phones_report(tmp_path, small_tokenizer,
                                                                     small_tokenizer_path, small_model_config):
    client = InProcessClient(local_aggregator_config(
        tmp_path / "aggregator", small_tokenizer_path, model=small_model_config, clients_per_round=3,
        over_selection=1.0, selection_window_s=0.0, eval_share=1.0))
    phones = [phone(tmp_path, f"phone-{n}") for n in range(3)]
    decisions = [p.check_in(client) for p in phones]
    assert all(d.action == "train" and d.evaluate for d in decisions)
    # One phone reports by hand, so that the round holds a phone helped and one hurt whatever the small model learns.
    hurt = EvaluationReport(model_version=0, positions=10, hits_at_1=5, hits_at_3=6, personal_hits_at_1=4,
                            personal_hits_at_3=6)
    client.report_evaluation(decisions[0].round, decisions[0].upload_token, hurt)
    works = [p.local_work(client.model(), small_tokenizer, LocalTrainConfig(), n, "int8", NOW,
                          personal=PersonalConfig() if n == 1 else None) for n, p in enumerate(phones)]
    for p, decision, work in list(zip(phones, decisions, works))[1:]:
        p.send(client, decision.round, decision.upload_token, work)
    client.upload(decisions[0].round, decisions[0].upload_token, works[0].upload)

    (summary,) = client.status().recent_rounds
    personal = works[1].evaluation
    expected = personal_gains([paired_counts(hurt), paired_counts(personal)])
    assert summary.status == "closed" and summary.eval_devices == 3
    assert (summary.personal_devices, summary.personal_helped, summary.personal_hurt) == (
        2, expected.helped, expected.hurt)
    assert summary.personal_median_gain == pytest.approx(expected.median_gain_points)
    assert summary.personal_positions == 10 + personal.positions
    assert summary.personal_recall_at_1 == pytest.approx((4 + personal.personal_hits_at_1) / (10 + personal.positions))
