"""Command-line options for the model's architecture and sizes, shared by every command that builds a model.

Each size option is a field of an architecture's config (`--hidden-dim` sets `hidden_dim`); one left out keeps the
config's own default, and one the chosen architecture does not have is refused.
"""

from __future__ import annotations

import argparse

from keyboard_model.architecture import ARCHITECTURES, DEFAULT_ARCHITECTURE, ArchitectureConfig, architecture
from keyboard_model.arguments import positive_int
from keyboard_model.errors import UserFacingError


def size_options() -> dict[str, str]:
    """Every size of every architecture, each one option, with its help for each architecture that has it."""
    helps: dict[str, list[str]] = {}
    for record in ARCHITECTURES.values():
        for size, help_text in record.sizes.items():
            helps.setdefault(size, []).append(f"{record.label}: {help_text}")
    return {size: "; ".join(texts) for size, texts in helps.items()}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model sizes (vocabulary size comes from the tokenizer)")
    labels = ", ".join(f"{name} ({record.label})" for name, record in ARCHITECTURES.items())
    group.add_argument("--architecture", choices=list(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                       help=f"the network, one of {labels} (default: %(default)s)")
    for name, help_text in size_options().items():
        group.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=None, help=help_text)


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ArchitectureConfig:
    """The chosen architecture's config, with the sizes given on the command line."""
    chosen = architecture(args.architecture)
    given = {name: getattr(args, name) for name in size_options() if getattr(args, name) is not None}
    sizes = set(chosen.sizes)
    if given.keys() - sizes:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given.keys() - sizes))
        raise UserFacingError(f"--architecture {args.architecture} has no {options}")
    try:
        return chosen.config_class(vocab_size=vocab_size, **given)
    except ValueError as error:
        raise UserFacingError(str(error)) from None

