"""`python -m keyboard_model {suggest,export}`: try a saved model's suggestions, or export it for phones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from keyboard_model.commands import main_for
from keyboard_model.errors import UserFacingError

# The model's modules import torch, which takes seconds: each command imports them when it runs, so that `--help`
# and a refused option answer at once.
if TYPE_CHECKING:
    from keyboard_model.architecture import NextWordModel
    from keyboard_model.tokenizer import KeyboardTokenizer


def add_model_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path("runs/up/model.safetensors"),
                        help="a saved model.safetensors (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer.json (default: beside the model)")


def add_suggest_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_file_arguments(parser)
    parser.add_argument("text", nargs="*",
                        help="texts to complete; with none, each line of standard input is one text")


def load_saved(args: argparse.Namespace) -> tuple[NextWordModel, int, KeyboardTokenizer]:
    """The model of --model and the tokenizer of --tokenizer (default: beside the model)."""
    from keyboard_model.tokenizer import KeyboardTokenizer
    from keyboard_model.weights import model_from_bytes

    tokenizer_path = args.tokenizer or args.model.parent / "tokenizer.json"
    for path in (args.model, tokenizer_path):
        if not path.exists():
            raise UserFacingError(f"{path} does not exist (train one with `fedkb simulate` or `fedkb up`)")
    model, version = model_from_bytes(args.model.read_bytes())
    return model, version, KeyboardTokenizer.from_file(tokenizer_path)


def run_suggest(args: argparse.Namespace) -> int:
    from keyboard_model.casing import shown_words
    from keyboard_model.suggest import Suggester

    model, version, tokenizer = load_saved(args)
    suggester = Suggester(model, tokenizer)
    texts = args.text or (line.rstrip("\n") for line in sys.stdin)
    for text in texts:
        # As the keyboard shows them: "I", and a sentence's first word, capitalised.
        shown = shown_words(text, suggester.suggest(text))
        print(f"{text!r} -> {' | '.join(shown)}  (model v{version})", flush=True)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_file_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/up/keyboard.fkb"),
                        help="where to write the int8 artifact (default: %(default)s)")


def run_export(args: argparse.Namespace) -> int:
    from keyboard_model import artifact

    model, version, tokenizer = load_saved(args)
    manifest = artifact.export(model, tokenizer, args.out, version)
    print(f"{args.out}: {args.out.stat().st_size:,} bytes, model version {manifest['model_version']}, "
          f"int8 tensors {', '.join(manifest['int8_tensors'])}")
    return 0


COMMANDS = (
    ("suggest", add_suggest_arguments, run_suggest, "print a saved model's three suggestions for some text"),
    ("export", add_export_arguments, run_export, "write a saved model as the small int8 on-device artifact"),
)


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m keyboard_model", "The keyboard's language model.", COMMANDS, argv)
