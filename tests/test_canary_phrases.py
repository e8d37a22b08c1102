"""Canary phrases, the Secret Sharer way (device_sim/canaries.py, issue 27): they are typed into the chosen phones'
histories only, once however often a run is resumed; a canary typed many times is memorised without DP and not
under strong noise; and `fedkb audit` reports on a run folder that was stopped and resumed."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import closing
from functools import partial
from pathlib import Path

import pytest

from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from device_sim import cli as device_cli
from device_sim.canaries import CANARIES_FILE, PLANTED_AT, CanaryConfig, CanaryError, plant_canaries
from device_sim.corpus import CorpusConfig, PreparedCorpus, prepare
from device_sim.eligibility import EligibilityConfig
from device_sim.executors import ExecutorSettings, make_executor
from device_sim.fleet import FleetConfig, provision
from device_sim.history import TypingHistory
from device_sim.phone import Phone
from device_sim.simulation import SimulationConfig, run_simulation
from fedkb.cli import main
from keyboard_model.exposure import NUMBER_WORDS, CanaryFormat
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from tests.conftest import SMALL_TEXT

# The number words appear in everyday lines too, so the model knows them as words, not only as secrets.
EVERYDAY = [*SMALL_TEXT, *(f"{a} and {b} make a pair" for a in NUMBER_WORDS for b in NUMBER_WORDS[:3])]
PHONES = 6
SHORT = CanaryFormat(length=3)  # 1,000 secrets: every one is scored


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> PreparedCorpus:
    """Six users with 14, 16, ... 24 everyday messages, and a tokenizer that knows the canaries' words."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [{"user": f"user-{u}", "text": EVERYDAY[(7 * u + n) % len(EVERYDAY)], "ts": n}
             for u in range(PHONES) for n in range(14 + 2 * u)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "proxy.txt").write_text("\n".join([*EVERYDAY, SHORT.prefix]) + "\n")
    return prepare(CorpusConfig(data_dir=folder / "data", user_corpus=folder / "corpus.jsonl",
                                proxy_text=folder / "proxy.txt", min_messages=5), log=lambda _: None)


@pytest.fixture
def phones(tmp_path: Path, corpus: PreparedCorpus) -> list[Phone]:
    return provision(corpus, tmp_path / "phones", None, seed=0, typing_days=1.0, log=lambda _: None)


def planted_rows(phone: Phone) -> Counter[tuple[float, str]]:
    history = TypingHistory(phone.history_path)
    try:
        return Counter(row for row in history.rows() if row[1].startswith(SHORT.prefix))
    finally:
        history.close()


def test_canaries_are_typed_by_their_phones_only_before_the_run_and_once_however_often_it_resumes(
    tmp_path: Path, corpus: PreparedCorpus, phones: list[Phone]
):
    tokenizer = KeyboardTokenizer.from_file(corpus.tokenizer_path)
    config = CanaryConfig(count=2, repetitions=(1, 4), phones_per_canary=2, seed=5, format=SHORT)
    before = {phone.phone_id: phone.messages() for phone in phones}

    canaries = plant_canaries(tmp_path, phones, config, tokenizer, max_messages=400)

    record = json.loads((tmp_path / CANARIES_FILE).read_text())
    assert record["complete"] and record["config"] == config.to_dict()
    assert sorted(canary["repetitions"] for canary in record["planted"]) == [1, 4]
    typed_by = {phone_id: canary for canary in record["planted"] for phone_id in canary["phones"]}
    assert len(typed_by) == 4  # two distinct phones a canary, none typing two
    secrets = [tuple(canary["secret"]) for canary in record["planted"]] + [tuple(s) for s in record["held_out"]]
    assert len(set(secrets)) == 4 and all(len(secret) == 3 for secret in secrets)
    for phone in phones:
        canary = typed_by.get(phone.phone_id)
        expected = {} if canary is None else {canary["phrase"]: canary["repetitions"]}
        at_start = phone.messages(now=0.0)[0]  # what it can train on in the first round
        assert Counter(text for text in at_start if text.startswith(SHORT.prefix)) == expected
        training, held_out = phone.messages()
        everyday = [text for text in training if not text.startswith(SHORT.prefix)]
        assert len(everyday) == len(training) - sum(expected.values())
        # It holds out what it held out before, and the newest of its training messages that the copies pushed
        # into its newest 20%; never a canary.
        trained_before, held_out_before = before[phone.phone_id]
        assert everyday == trained_before[:len(everyday)]
        assert held_out == trained_before[len(everyday):] + held_out_before
    # A resumed run plants nothing twice.
    rows = {phone.phone_id: planted_rows(phone) for phone in phones}
    assert plant_canaries(tmp_path, phones, config, tokenizer, max_messages=400) == canaries
    assert {phone.phone_id: planted_rows(phone) for phone in phones} == rows
    assert all(ts == PLANTED_AT for counts in rows.values() for ts, _ in counts)


def test_planting_refuses_other_options_on_resume_and_fleets_too_small_for_it(
    tmp_path: Path, corpus: PreparedCorpus, phones: list[Phone]
):
    tokenizer = KeyboardTokenizer.from_file(corpus.tokenizer_path)
    config = CanaryConfig(count=2, repetitions=(4,), seed=1, format=SHORT)
    with pytest.raises(CanaryError, match="need 8 phones, each holding one canary; the fleet has 6"):
        plant_canaries(tmp_path, phones, CanaryConfig(count=4, phones_per_canary=2, format=SHORT), tokenizer, 400)
    with pytest.raises(CanaryError, match="must be in the run's vocabulary.*'zebra'"):
        plant_canaries(tmp_path, phones, CanaryConfig(count=1, format=CanaryFormat(alphabet=("one", "zebra"))),
                       tokenizer, 400)
    # A phone trains on its newest --max-messages: with 16, only the phones of 14 and 16 messages train on all 4
    # copies of a canary typed before them (20 messages, 4 held out, 16 for training).
    with pytest.raises(CanaryError, match="too few phones train on every copy of a canary typed 4 times"):
        plant_canaries(tmp_path, phones, CanaryConfig(count=3, repetitions=(4,), format=SHORT), tokenizer, 16)
    assert not (tmp_path / CANARIES_FILE).exists()  # refused before anything was written
    canaries = plant_canaries(tmp_path, phones, config, tokenizer, max_messages=16)
    assert {phone for canary in canaries.planted for phone in canary.phones} == {"phone-00000", "phone-00001"}

    for other in (CanaryConfig(count=3, repetitions=(4,), seed=1, format=SHORT), None):
        with pytest.raises(CanaryError, match="planted canaries with --canaries 2 --canary-repeats 4"):
            plant_canaries(tmp_path, phones, other, tokenizer, max_messages=16)
    (tmp_path / CANARIES_FILE).unlink()
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(CanaryError, match="began without canaries"):
        plant_canaries(tmp_path, phones, config, tokenizer, max_messages=16)


def test_a_run_stopped_while_planting_plants_the_rest_when_resumed_and_each_phone_holds_its_copies_once(
    tmp_path: Path, corpus: PreparedCorpus, phones: list[Phone], monkeypatch
):
    tokenizer = KeyboardTokenizer.from_file(corpus.tokenizer_path)
    config = CanaryConfig(count=3, repetitions=(1, 4, 16), seed=2, format=SHORT)
    add = TypingHistory.add
    calls = []

    def crash_at_the_second_phone(self, messages):
        calls.append(self.path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        add(self, messages)

    with monkeypatch.context() as patched:
        patched.setattr(TypingHistory, "add", crash_at_the_second_phone)
        with pytest.raises(KeyboardInterrupt):
            plant_canaries(tmp_path, phones, config, tokenizer, max_messages=400)
    assert not json.loads((tmp_path / CANARIES_FILE).read_text())["complete"]
    assert sum(bool(planted_rows(phone)) for phone in phones) == 1

    canaries = plant_canaries(tmp_path, phones, config, tokenizer, max_messages=400)

    assert canaries.complete and json.loads((tmp_path / CANARIES_FILE).read_text())["complete"]
    by_phone = {phone: canary for canary in canaries.planted for phone in canary.phones}
    for phone in phones:
        canary = by_phone.get(phone.phone_id)
        expected = {} if canary is None else {(PLANTED_AT, SHORT.phrase(canary.secret)): canary.repetitions}
        assert planted_rows(phone) == expected


# Memorisation that a few seconds of training make measurable: every phone in every round (always eligible, none
# vanishing), 5 local epochs, plain FedAvg; three canaries typed 32 times, each by one phone of six. Typed 16 times,
# or six canaries on the six phones, some of them stayed near a never-typed secret's exposure in some seeds.
ALWAYS_ELIGIBLE = EligibilityConfig(**{f"p_{condition}_{period}": 1.0 for condition in ("idle", "charging", "unmetered")
                                       for period in ("day", "night")})
MEMORISED = CanaryConfig(count=3, repetitions=(32,), seed=0, format=SHORT)


def train_with_canaries(out: Path, corpus: PreparedCorpus, **privacy) -> dict:
    """Ten rounds; the summary (its `canaries`: the report on the final model)."""
    out.mkdir()
    fleet = FleetConfig(phones_dir=out / "phones", train=LocalTrainConfig(epochs=5, batch_size=8),
                        eligibility=ALWAYS_ELIGIBLE, vanish_probability=0.0, update_compression="none")
    aggregator = local_aggregator_config(
        out, corpus.tokenizer_path, model=ModelConfig(vocab_size=corpus.manifest["vocab_size"], embedding_dim=16,
                                                      hidden_dim=32),
        clients_per_round=PHONES, server_optimizer="fedavg", simulated_clock=True, round_deadline_s=3600.0,
        selection_window_s=0.0, **privacy)
    with closing(InProcessClient(aggregator)) as client:
        summary = run_simulation(corpus, SimulationConfig(out_dir=out, rounds=10, fleet=fleet, eval_every=10,
                                                          canaries=MEMORISED),
                                 client, show_progress=False, executor=partial(make_executor, "vectorised",
                                                                               settings=ExecutorSettings()))
    return summary.to_dict()


def levels(report: dict) -> dict[str, dict]:
    return {row["canaries"]: row for row in report["by_repetitions"]}


def test_a_canary_typed_many_times_by_one_phone_is_memorised_without_dp_and_suggested(
    tmp_path: Path, corpus: PreparedCorpus
):
    summary = train_with_canaries(tmp_path / "run", corpus)

    assert summary["rounds_completed"] == 10 and summary["rounds_failed"] == 0
    report = summary["canaries"]
    planted, held_out = levels(report)["typed 32x"], levels(report)["held out (never typed)"]
    assert (planted["count"], held_out["count"]) == (3, 3)
    # Of 1,000 secrets, log2(1000) = 10 bits at most; one never typed averages 1.4 bits. In five seeds the planted
    # ones averaged 7.9 to 9.0 bits, the held-out ones 0.4 to 1.6.
    assert planted["mean_exposure"] >= 6 and held_out["mean_exposure"] <= 3
    assert min(row["exposure"] for row in report["planted"]) > max(row["exposure"] for row in report["held_out"])
    # The keyboard offers the planted secrets' words after the prefix, and not the held-out ones'.
    assert planted["word_top3_rate"] >= held_out["word_top3_rate"] + 0.3
    # The phones typed the phrases; the aggregator never saw one.
    aggregator_files = b"".join(path.read_bytes() for path in (tmp_path / "run").glob("aggregator.sqlite*"))
    assert not any(SHORT.phrase(tuple(row["secret"])).encode() in aggregator_files for row in report["planted"])


def test_with_strong_noise_the_same_canaries_fall_to_the_held_out_level(tmp_path: Path, corpus: PreparedCorpus):
    # Noise of 4 times a clip norm of 0.5 on the six phones' sum: epsilon below 1 (at delta 1/6) after ten rounds.
    # Twice the noise at weaker epsilon, a planted canary still reached 6 bits now and then.
    summary = train_with_canaries(tmp_path / "run", corpus, noise_multiplier=4.0, clip_norm=0.5)

    assert summary["privacy_spent"]["epsilon"] < 2
    report = summary["canaries"]
    planted = levels(report)["typed 32x"]
    # In five runs (the noise is drawn afresh each time, whatever the seed) the planted canaries averaged 0.9 to 1.7
    # bits, as never-typed secrets do (1.4). The suggestion rates of nine words are too coarse to compare with the
    # held-out ones' here: what is asserted is that no secret is offered whole.
    assert planted["mean_exposure"] <= 4
    assert planted["secret_top1_rate"] == 0


def test_canary_options_are_checked_before_any_work_and_default_to_the_configs():
    assert device_cli.canary_config_from_args(_parse(["simulate", "--canaries", "2"])) == CanaryConfig(count=2)
    assert _parse(["simulate"]).canaries is None
    assert device_cli.canary_config_from_args(_parse(["simulate"])) is None


@pytest.mark.parametrize("options, message", [
    (["--canary-phones", "2"], "--canary-repeats, --canary-phones and --canary-length go with --canaries N"),
    (["--canaries", "6", "--canary-length", "1"], "6 planted and 6 held-out secrets need 12 distinct secrets; "
                                                  "the format has 10"),
])
def test_canary_options_that_do_not_go_together_are_refused_before_the_run_folder_is_made(
    tmp_path: Path, options: list[str], message: str, capsys
):
    assert main(["simulate", "--in-process", "--out", str(tmp_path / "run"), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _parse(argv: list[str]):
    from fedkb.cli import COMMANDS
    from keyboard_model.commands import command_parser, parse

    return parse(command_parser("fedkb", "", COMMANDS), argv)


def test_an_audit_works_on_a_stopped_run_and_after_it_resumed_and_a_resume_with_other_canaries_is_refused(
    tmp_path: Path, corpus: PreparedCorpus, monkeypatch, capsys
):
    out = tmp_path / "run"
    data = corpus.path.parent.parent  # the module's data folder: the corpus is prepared already
    common = ["simulate", "--corpus", str(data.parent / "corpus.jsonl"), "--proxy-text", str(data.parent / "proxy.txt"),
              "--data-dir", str(data), "--min-messages", "5", "--in-process", "--executor", "vectorised",
              "--embedding-dim", "8", "--hidden-dim", "16", "--clients-per-round", "2", "--out", str(out),
              "--no-progress", "--canaries", "2", "--canary-repeats", "1", "4", "--canary-length", "3"]
    status = InProcessClient.status

    def interrupted_after_round_1(self, recent: int = 20):
        answer = status(self, recent)
        if any(view.round == 1 for view in answer.recent_rounds):
            raise KeyboardInterrupt  # Ctrl-C once the aggregator has committed round 1
        return answer

    with monkeypatch.context() as patched:
        patched.setattr(InProcessClient, "status", interrupted_after_round_1)
        assert main([*common, "--rounds", "3"]) == 130
    assert not (out / "summary.json").exists()
    capsys.readouterr()

    # Stopped: the latest saved model is audited.
    assert main(["audit", str(out), "--out", str(tmp_path / "stopped.png")]) == 0
    stopped = capsys.readouterr().out
    assert "typed 1x" in stopped and "typed 4x" in stopped and "held out (never typed)" in stopped
    assert (tmp_path / "stopped.png").stat().st_size > 10_000
    copies = {phone: planted_rows(Phone(phone, out / "phones" / phone)) for phone in _fleet(out)}

    # Resumed with more rounds: nothing is planted twice, the summary holds the report, the audit draws it.
    assert main([*common, "--rounds", "2"]) == 0
    finished = capsys.readouterr().out
    assert "canary phrases, exposure in bits" in finished
    assert {phone: planted_rows(Phone(phone, out / "phones" / phone)) for phone in _fleet(out)} == copies
    assert sum(sum(rows.values()) for rows in copies.values()) == 1 + 4
    summary = json.loads((out / "summary.json").read_text())
    assert [row["canaries"] for row in summary["canaries"]["by_repetitions"]] == [
        "typed 1x", "typed 4x", "held out (never typed)"]
    # A line of the canary clients' audit, as the aggregator writes it, is reported beside the accountant's epsilon.
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"round": 9, "epsilon": None, "audit_epsilon": 1.5, "audit_epsilon_low": 0.9,
                                  "audit_epsilon_high": 2.25, "audit_epsilon_lower_bound": 0.45, "audit_delta": 1e-3,
                                  "audit_canaries": 4, "audit_score_in": 0.1, "audit_score_out": 0.001}) + "\n")
    assert main(["audit", str(out)]) == 0
    audited = capsys.readouterr().out
    assert "typed 4x" in audited
    assert "empirical epsilon 1.5 at delta 1.0e-03, 95% interval 0.9 to 2.25" in audited
    assert "epsilon >= 0.45" in audited and "no DP, so no proven bound" in audited
    assert "inserted 0.1000, held out 0.0010" in audited
    assert (out / "audit.png").stat().st_size > 10_000

    assert main([*common[:-7], "--canaries", "3", "--rounds", "1"]) == 2
    assert "planted canaries with --canaries 2 --canary-repeats 1 4" in capsys.readouterr().err


def test_an_audit_needs_a_run_folder_with_something_to_audit(tmp_path: Path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    assert "is not a run folder: it has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "audit_epsilon": null}\n')
    assert main(["audit", str(tmp_path)]) == 2
    assert "nothing to audit" in capsys.readouterr().err


def _fleet(out: Path) -> list[str]:
    return json.loads((out / "phones" / "fleet.json").read_text())["phone_ids"]
