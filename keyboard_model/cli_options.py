"""Command-line options for the model's architecture and sizes, shared by every command that builds a model."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keyboard_model.architecture import ArchitectureConfig

# The choices and defaults, written out: keyboard_model.architecture and .model, which define them, import torch,
# and `--help` must answer at once. tests/test_cli.py checks them against ARCHITECTURES and ModelConfig.
ARCHITECTURE_NAMES = ("cifg", "transformer")
DEFAULT_ARCHITECTURE = "cifg"
DEFAULT_EMBEDDING_DIM = 96
DEFAULT_HIDDEN_DIM = 670


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model sizes (vocabulary size comes from the tokenizer)")
    group.add_argument("--architecture", choices=ARCHITECTURE_NAMES, default=DEFAULT_ARCHITECTURE,
                       help="the network: the CIFG-LSTM of Hard et al. 2018, or a small causal Transformer of about "
                            "its size (default: %(default)s)")
    group.add_argument("--embedding-dim", type=int, default=DEFAULT_EMBEDDING_DIM,
                       help="word embedding width, also the projection width (CIFG) or every layer's width "
                            "(Transformer) (default: %(default)s)")
    group.add_argument("--hidden-dim", type=int, default=DEFAULT_HIDDEN_DIM,
                       help="CIFG-LSTM cells; the CIFG only (default: %(default)s)")


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ArchitectureConfig:
    """The chosen architecture's config, with those of the command line's sizes that it has."""
    from keyboard_model.architecture import architecture

    config_class = architecture(args.architecture).config_class
    # The projection is as wide as the embedding: tying reads it against the embedding matrix.
    sizes = {"vocab_size": vocab_size, "embedding_dim": args.embedding_dim, "hidden_dim": args.hidden_dim,
             "projection_dim": args.embedding_dim}
    accepted = {field.name for field in fields(config_class)}
    return config_class(**{name: value for name, value in sizes.items() if name in accepted})
