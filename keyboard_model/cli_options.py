"""Command-line options for the model's architecture and sizes, shared by every command that builds a model.

Each size option is a field of an architecture's config (`--hidden-dim` sets `hidden_dim`); one left out keeps the
config's own default, and one the chosen architecture does not have is refused.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING

from keyboard_model.arguments import positive_int
from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from keyboard_model.architecture import ArchitectureConfig

# The choices and the sizes' help, written out: keyboard_model.architecture, which defines the architectures, imports
# torch, and `--help` must answer at once. tests/test_cli.py checks them against ARCHITECTURES: every field of every
# registered config (but vocab_size, the tokenizer's) has its line here.
ARCHITECTURE_NAMES = ("cifg", "transformer")
DEFAULT_ARCHITECTURE = "cifg"
SIZE_OPTIONS = {
    "embedding_dim": "word embedding width, also every Transformer layer's width (default: 96)",
    "hidden_dim": "CIFG-LSTM cells (default: 670)",
    "projection_dim": "the CIFG's projection width; tying needs it equal to --embedding-dim (default: that)",
    "layers": "Transformer blocks (default: 4)",
    "heads": "Transformer attention heads; --embedding-dim must be a multiple (default: 4)",
    "context": "tokens a Transformer position sees, the training sequence length (default: 20)",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model sizes (vocabulary size comes from the tokenizer)")
    group.add_argument("--architecture", choices=ARCHITECTURE_NAMES, default=DEFAULT_ARCHITECTURE,
                       help="the network: the CIFG-LSTM of Hard et al. 2018, or a small causal Transformer of about "
                            "its size (default: %(default)s)")
    for name, help_text in SIZE_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=None, help=help_text)


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ArchitectureConfig:
    """The chosen architecture's config, with the sizes given on the command line."""
    from keyboard_model.architecture import architecture

    config_class = architecture(args.architecture).config_class
    given = {name: getattr(args, name) for name in SIZE_OPTIONS if getattr(args, name) is not None}
    sizes = {field.name for field in fields(config_class)}
    if given.keys() - sizes:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given.keys() - sizes))
        raise UserFacingError(f"--architecture {args.architecture} has no {options}")
    try:
        return config_class(vocab_size=vocab_size, **given)
    except ValueError as error:
        raise UserFacingError(str(error)) from None

