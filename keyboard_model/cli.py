"""`python -m keyboard_model suggest`: try a saved model's suggestions from the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyboard_model.commands import main_for
from keyboard_model.errors import UserFacingError
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import model_from_bytes


def add_suggest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path("runs/up/model.safetensors"),
                        help="a saved model.safetensors (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer.json (default: beside the model)")
    parser.add_argument("text", nargs="*",
                        help="texts to complete; with none, each line of standard input is one text")


def run_suggest(args: argparse.Namespace) -> int:
    tokenizer_path = args.tokenizer or args.model.parent / "tokenizer.json"
    for path in (args.model, tokenizer_path):
        if not path.exists():
            raise UserFacingError(f"{path} does not exist (train one with `fedkb simulate` or `fedkb up`)")
    model, version = model_from_bytes(args.model.read_bytes())
    suggester = Suggester(model, KeyboardTokenizer.from_file(tokenizer_path))
    texts = args.text or (line.rstrip("\n") for line in sys.stdin)
    for text in texts:
        print(f"{text!r} -> {' | '.join(suggester.suggest(text))}  (model v{version})", flush=True)
    return 0


COMMANDS = (("suggest", add_suggest_arguments, run_suggest, "print a saved model's three suggestions for some text"),)


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m keyboard_model", "The keyboard's language model.", COMMANDS, argv)
