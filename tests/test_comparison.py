"""The comparison table: the same positions for every row, baselines trained once and cached."""

from __future__ import annotations

from pathlib import Path

from device_sim.comparison import ComparisonConfig, comparison_table, markdown_table
from device_sim.phone import Phone
from keyboard_model.evaluate import evaluate
from keyboard_model.model import build_model
from keyboard_model.transformer import TransformerConfig
from keyboard_model.weights import model_from_bytes
from tests.conftest import SMALL_TEXT


def make_phones(folder: Path) -> list[Phone]:
    return [
        Phone.create(f"phone-{n}", folder / f"phone-{n}", [(float(t), SMALL_TEXT[(n + t) % len(SMALL_TEXT)]) for t in range(10)])
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

    assert [row.model.split(" ")[0] for row in rows] == ["n-gram", "server", "federated", "centralised"]
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
    comparison_table(federated, small_tokenizer, phones, proxy, ComparisonConfig(config.baselines_dir, 2, 1), log=log.append)
    assert len(list((tmp_path / "baselines").glob("*.safetensors"))) == 3

    table = markdown_table(rows).splitlines()
    assert table[0] == "| model | top-1 recall | top-3 recall | perplexity |" and len(table) == 6


def test_a_model_of_another_architecture_is_shown_beside_with_its_own_baselines(tmp_path: Path, small_tokenizer,
                                                                               small_model_config):
    phones = make_phones(tmp_path / "phones")
    cifg = build_model(small_model_config, seed=7)
    transformer = build_model(TransformerConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=8, layers=1,
                                                heads=2, context=6), seed=7)
    config = ComparisonConfig(tmp_path / "baselines", server_epochs=1, oracle_epochs=1)

    rows = comparison_table(cifg, small_tokenizer, phones, SMALL_TEXT[:3], config, log=lambda _: None,
                            beside=[transformer])

    assert [row.model for row in rows[4:]] == ["server Transformer (proxy)", "federated Transformer",
                                               "centralised oracle (Transformer)"]
    held_out = [m for phone in phones for m in phone.held_out(small_tokenizer)]
    assert rows[5].counts == evaluate(transformer, small_tokenizer, held_out)
    cached = [model_from_bytes(path.read_bytes())[0] for path in (tmp_path / "baselines").glob("*.safetensors")]
    assert sorted(type(model).__name__ for model in cached) == ["CIFGLSTM", "CIFGLSTM", "CausalTransformer",
                                                               "CausalTransformer"]
