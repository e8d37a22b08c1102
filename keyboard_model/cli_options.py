"""Command-line options for the model's sizes, shared by every command that builds a model."""

from __future__ import annotations

import argparse

from keyboard_model.model import ModelConfig

DEFAULT = ModelConfig()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model sizes (vocabulary size comes from the tokenizer)")
    group.add_argument("--embedding-dim", type=int, default=DEFAULT.embedding_dim,
                       help="word embedding width, also the projection width (default: %(default)s)")
    group.add_argument("--hidden-dim", type=int, default=DEFAULT.hidden_dim, help="CIFG-LSTM cells (default: %(default)s)")


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, embedding_dim=args.embedding_dim, hidden_dim=args.hidden_dim,
        projection_dim=args.embedding_dim,
    )
