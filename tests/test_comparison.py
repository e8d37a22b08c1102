"""The comparison table: the same positions for every row, baselines trained once and cached."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from device_sim.cli import print_summary
from device_sim.comparison import (
    NGRAM_ROW,
    ComparisonConfig,
    TableRow,
    cheap_rows,
    comparison_table,
    markdown_table,
    personal_sample,
)
from device_sim.phone import Phone
from device_sim.simulation import SimulationSummary
from keyboard_model.architecture import build_model
from keyboard_model.evaluate import EvalCounts, evaluate
from keyboard_model.ngram import KneserNeyTrigram
from keyboard_model.personal import PersonalConfig, score_personalised
from keyboard_model.transformer import TransformerConfig
from keyboard_model.weights import model_from_bytes
from tests.conftest import SMALL_TEXT


def make_phones(folder: Path) -> list[Phone]:
    return [
        Phone.create(f"phone-{n}", folder / f"phone-{n}",
                     [(float(t), SMALL_TEXT[(n + t) % len(SMALL_TEXT)]) for t in range(10)])
        for n in range(3)
    ]


def test_every_row_is_scored_on_the_phones_held_out_messages_and_baselines_are_cached(
    tmp_path: Path, small_tokenizer, small_model_config
):
    phones = make_phones(tmp_path / "phones")
    federated = build_model(small_model_config, seed=7)
    config = ComparisonConfig(tmp_path / "baselines", server_epochs=2, oracle_epochs=3)
    proxy = SMALL_TEXT[:3]
    log: list[str] = []

    rows = comparison_table(federated, small_tokenizer, phones, proxy, config, log=log.append)

    assert [row.model.split(" ")[0] for row in rows] == ["n-gram", "server", "federated", "centralised", "federated",
                                                         "personalised"]
    assert rows[4].model.endswith("same 3 phones")  # the sample is every phone: all rows score the same positions
    held_out = [m for phone in phones for m in phone.held_out(small_tokenizer)]
    assert rows[2].counts == evaluate(federated, small_tokenizer, held_out)
    assert {row.counts.positions for row in rows} == {rows[2].counts.positions} and rows[2].counts.positions > 0
    assert any("oracle model: epoch 3/3" in line for line in log)
    assert len(list((tmp_path / "baselines").glob("*.safetensors"))) == 2

    log.clear()
    again = comparison_table(federated, small_tokenizer, phones, proxy, config, log=log.append)
    assert [row.counts for row in again] == [row.counts for row in rows]
    assert sum("cached" in line for line in log) == 2 and not any("epoch" in line for line in log)

    # Other training settings are another baseline, not the cached one.
    comparison_table(federated, small_tokenizer, phones, proxy, ComparisonConfig(config.baselines_dir, 2, 1),
                     log=log.append)
    assert len(list((tmp_path / "baselines").glob("*.safetensors"))) == 3

    table = markdown_table(rows).splitlines()
    assert table[0] == "| model | top-1 recall | top-3 recall | perplexity |" and len(table) == 8


def test_a_model_of_another_architecture_is_shown_beside_with_its_own_baselines(tmp_path: Path, small_tokenizer,
                                                                               small_model_config):
    phones = make_phones(tmp_path / "phones")
    cifg = build_model(small_model_config, seed=7)
    transformer = build_model(TransformerConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=8, layers=1,
                                                heads=2, context=6), seed=7)
    config = ComparisonConfig(tmp_path / "baselines", server_epochs=1, oracle_epochs=1, personal_phones=0)

    rows = comparison_table(cifg, small_tokenizer, phones, SMALL_TEXT[:3], config, log=lambda _: None,
                            beside=[transformer])

    assert [row.model for row in rows[4:]] == ["server Transformer (proxy)", "federated Transformer",
                                               "centralised oracle (Transformer)"]
    held_out = [m for phone in phones for m in phone.held_out(small_tokenizer)]
    assert rows[5].counts == evaluate(transformer, small_tokenizer, held_out)
    cached = [model_from_bytes(path.read_bytes())[0] for path in (tmp_path / "baselines").glob("*.safetensors")]
    assert sorted(type(model).__name__ for model in cached) == ["CIFGLSTM", "CIFGLSTM", "CausalTransformer",
                                                               "CausalTransformer"]



def test_personal_models_are_scored_on_a_sample_each_on_its_own_phones_messages(tmp_path: Path, small_tokenizer,
                                                                               small_model_config):
    phones = make_phones(tmp_path / "phones")
    federated = build_model(small_model_config, seed=7)
    config = ComparisonConfig(tmp_path / "baselines", server_epochs=1, oracle_epochs=1, personal_phones=2,
                              personal=PersonalConfig(epochs=1))
    # The run's vocabulary is the corpus's and 2 discovered words.
    rows = comparison_table(federated, small_tokenizer, phones, SMALL_TEXT[:3], config, log=lambda _: None,
                            corpus_vocab_size=small_tokenizer.vocab_size - 2)

    assert [row.model for row in rows[1:]] == [
        "server CIFG (proxy)", "federated CIFG (vocabulary + 2 discovered words)", "centralised oracle (CIFG)",
        "federated CIFG (vocabulary + 2 discovered words), same 2 phones",
        "personalised CIFG, 2 phones (each on its own messages)"]
    sample = personal_sample(phones, config)
    assert len(sample) == 2 and sample == personal_sample(phones, config)  # drawn with a fixed seed
    held_out = [m for phone in sample for m in phone.held_out(small_tokenizer)]
    same_phones, personalised = rows[4].counts, rows[5].counts
    pooled = evaluate(federated, small_tokenizer, held_out)  # scored phone by phone: the sums differ in float rounding
    assert (same_phones.hits_at_1, same_phones.hits_at_3, same_phones.positions) == (
        pooled.hits_at_1, pooled.hits_at_3, pooled.positions)
    assert personalised.positions == same_phones.positions > 0
    assert same_phones.positions < rows[2].counts.positions  # the sample's positions, not the fleet's
    # Each phone's personal copy learns from its own training messages only, and reads its own held-out ones.
    first = sample[0]
    own = score_personalised(federated, small_tokenizer, small_tokenizer.encode_batch(first.messages()[0]),
                             first.held_out(small_tokenizer), config.personal, seed=config.personal_seed)
    assert own.shared == evaluate(federated, small_tokenizer, first.held_out(small_tokenizer))
    assert own.personal.positions <= personalised.positions
    assert comparison_table(federated, small_tokenizer, phones, SMALL_TEXT[:3], config, log=lambda _: None,
                            corpus_vocab_size=small_tokenizer.vocab_size)[2].model == "federated CIFG"


def test_the_cheap_rows_are_computed_once_and_a_damaged_cache_again(tmp_path: Path, small_tokenizer, monkeypatch):
    proxy = small_tokenizer.encode_batch(SMALL_TEXT[:3])
    held_out = small_tokenizer.encode_batch(SMALL_TEXT[3:])
    scorings = []
    score = KneserNeyTrigram.evaluate
    monkeypatch.setattr(KneserNeyTrigram, "evaluate",
                        lambda *args, **kwargs: scorings.append(1) or score(*args, **kwargs))
    log: list[str] = []

    def rows() -> list[TableRow]:
        return cheap_rows(small_tokenizer, proxy, held_out, tmp_path / "cache", log.append, show_progress=False)

    first = rows()
    assert [row.model.split(" (")[0] for row in first] == ["n-gram", "most frequent"]
    assert first[0].counts == score(KneserNeyTrigram(proxy, small_tokenizer.vocab_size), small_tokenizer, held_out)
    assert first[0].counts.positions == first[1].counts.positions > 0
    assert rows() == first and len(scorings) == 1  # the second time from the cache
    # Another held-out set is another cache entry.
    assert cheap_rows(small_tokenizer, proxy, held_out[1:], tmp_path / "cache", show_progress=False) != first
    assert len(scorings) == 2
    cached = next(path for path in (tmp_path / "cache").iterdir() if json.loads(path.read_text()) == [
        {"model": row.model, "counts": asdict(row.counts)} for row in first])
    cached.write_text(cached.read_text()[:20])
    assert rows() == first and len(scorings) == 3
    assert any("damaged" in line for line in log)
    assert rows() == first and len(scorings) == 3  # written whole again


def test_the_last_screen_puts_the_federated_model_beside_the_n_gram_and_the_target(tmp_path: Path, capsys):
    summary = SimulationSummary(
        rounds_completed=110, rounds_failed=0, model_version=110, initial={"recall_at_1": 0.0, "recall_at_3": 0.0},
        initial_sample_phones=32, final={"recall_at_1": 0.1, "recall_at_3": 0.19}, most_frequent_baseline={},
        most_frequent_words=["the", "and", "to"], eval_positions=10_000, wall_time_s=600.0,
    )
    baselines = [TableRow(NGRAM_ROW, EvalCounts(hits_at_1=956, hits_at_3=1822, positions=10_000)),
                 TableRow("most frequent (the, and, to)", EvalCounts(hits_at_1=305, hits_at_3=845, positions=10_000))]

    print_summary(summary, tmp_path, baselines, time_budget_s=540.0, reference_rounds=206)

    screen = capsys.readouterr().out
    assert "110 rounds in the 540 s budget (206 in the README's run on a quiet 2-core machine)" in screen
    assert re.search(r"n-gram \(KN trigram, proxy\) +9\.56% +18\.22%", screen)
    assert re.search(r"most frequent \(the, and, to\) +3\.05% +8\.45%", screen)
    assert re.search(r"federated model +10\.00% +19\.00% +1\.05x the n-gram's top-1", screen)
    assert re.search(r"target: 1\.2x the n-gram's top-1, as Gboard's +11\.47%", screen)
    assert re.search(r"Gboard's federated CIFG \(Hard et al\. 2018\) +16\.40% +27\.00% "
                     r"+1\.26x its n-gram's 13\.0%", screen)
