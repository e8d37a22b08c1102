"""An architecture is one module and one record in ARCHITECTURES: a toy one, registered here, trains in federated
rounds on the vectorised executor, and the command line sets every architecture's sizes from its config's fields."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import pytest
import torch
from torch import nn

from device_sim.executor import SerialExecutor
from device_sim.vectorised import VectorisedCohort
from keyboard_model.architecture import ARCHITECTURES, Architecture, build_model
from keyboard_model.cli_options import add_model_arguments, model_config_from_args
from keyboard_model.errors import UserFacingError
from keyboard_model.model import CIFGLSTM, TiedOutputCrossEntropy
from keyboard_model.transformer import TransformerConfig
from tests.helpers import close, outcome, run_fleet


@dataclass(frozen=True)
class BigramConfig:
    architecture: ClassVar[str] = "bigram"

    vocab_size: int = 10_000
    embedding_dim: int = 8

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Bigram(nn.Module):
    """Each position's features from its own token only: the smallest model the seam admits."""

    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.mix = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.embedding(tokens)))

    def output_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.embedding.weight.T + self.output_bias

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        keep = targets != ignore_index
        return TiedOutputCrossEntropy.apply(self.features(tokens)[keep], self.embedding.weight, self.output_bias,
                                            targets[keep])

    def initial_state(self, batch_size: int) -> None:
        return None

    def step(self, tokens: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return self.features(tokens[:, None])[:, 0], None


def bigram_flops_per_token(config: BigramConfig) -> int:
    return 3 * 2 * (config.embedding_dim**2 + config.embedding_dim * config.vocab_size)


@pytest.fixture
def bigram(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "bigram", Architecture(
        "Bigram", f"{__name__}:BigramConfig", f"{__name__}:Bigram", f"{__name__}:bigram_flops_per_token",
        {"embedding_dim": "its width"}))


def test_a_registered_architecture_trains_in_rounds_on_the_vectorised_executor(
    bigram, tmp_path, small_tokenizer_path, small_tokenizer
):
    config = BigramConfig(vocab_size=small_tokenizer.vocab_size)
    together, reports = run_fleet(tmp_path / "vectorised", small_tokenizer_path, config,
                                  VectorisedCohort(small_tokenizer), rounds=2)
    alone, expected = run_fleet(tmp_path / "one-by-one", small_tokenizer_path, config, SerialExecutor(small_tokenizer),
                                rounds=2)
    assert isinstance(together, Bigram) and [len(report.participants) for report in reports] == [3, 3]
    for report, same in zip(reports, expected):
        assert [outcome(p) for p in report.participations] == [outcome(p) for p in same.participations]
    initial = build_model(config).state_dict()
    for name, tensor in alone.state_dict().items():
        assert close(together.state_dict()[name], tensor), name
        assert not torch.equal(tensor, initial[name]), name


def test_each_records_sizes_are_its_configs_fields_and_a_registered_one_is_offered(bigram):
    for name, record in ARCHITECTURES.items():
        assert set(record.sizes) == {f.name for f in fields(record.config_class)} - {"vocab_size"}, name
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    chosen = parser.parse_args(["--architecture", "bigram", "--embedding-dim", "4"])
    assert model_config_from_args(chosen, 50) == BigramConfig(vocab_size=50, embedding_dim=4)
    assert "Bigram: its width" in " ".join(parser.format_help().split())


def test_every_size_of_every_architecture_is_an_option():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--architecture", "transformer", "--layers", "2", "--heads", "2", "--context", "8"])
    assert model_config_from_args(args, 50) == TransformerConfig(vocab_size=50, layers=2, heads=2, context=8)
    # The CIFG's projection follows its embedding, as tying needs.
    cifg = build_model(model_config_from_args(parser.parse_args(["--embedding-dim", "16"]), 50))
    assert isinstance(cifg, CIFGLSTM) and cifg.config.projection_dim == 16
    with pytest.raises(UserFacingError, match="--architecture cifg has no --layers"):
        model_config_from_args(parser.parse_args(["--layers", "2"]), 50)
    with pytest.raises(UserFacingError, match="multiple of heads"):
        model_config_from_args(parser.parse_args(["--architecture", "transformer", "--heads", "5"]), 50)


def test_each_architecture_counts_its_own_training_flops():
    cifg, transformer = (ARCHITECTURES[name] for name in ("cifg", "transformer"))
    small, deep = TransformerConfig(vocab_size=50, layers=1), TransformerConfig(vocab_size=50, layers=2)
    assert transformer.training_flops_per_token(deep) > transformer.training_flops_per_token(small)
    assert cifg.training_flops_per_token(cifg.config_class(vocab_size=50)) > 0
