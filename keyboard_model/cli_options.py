"""Command-line options for the model's architecture and sizes, shared by every command that builds a model."""

from __future__ import annotations

import argparse

from keyboard_model.architecture import ARCHITECTURES, DEFAULT_ARCHITECTURE, ArchitectureConfig
from keyboard_model.model import ModelConfig
from keyboard_model.transformer import TransformerConfig

DEFAULT = ModelConfig()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model sizes (vocabulary size comes from the tokenizer)")
    group.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                       help="the network: the CIFG-LSTM of Hard et al. 2018, or a small causal Transformer of about "
                            "its size (default: %(default)s)")
    group.add_argument("--embedding-dim", type=int, default=DEFAULT.embedding_dim,
                       help="word embedding width, also the projection width (CIFG) or every layer's width "
                            "(Transformer) (default: %(default)s)")
    group.add_argument("--hidden-dim", type=int, default=DEFAULT.hidden_dim,
                       help="CIFG-LSTM cells; the CIFG only (default: %(default)s)")


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ArchitectureConfig:
    if args.architecture == "transformer":
        return TransformerConfig(vocab_size=vocab_size, embedding_dim=args.embedding_dim)
    return ModelConfig(
        vocab_size=vocab_size, embedding_dim=args.embedding_dim, hidden_dim=args.hidden_dim,
        projection_dim=args.embedding_dim,
    )
