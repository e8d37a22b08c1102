"""Plumbing shared by every command line: subcommands, and errors shown as one clear line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from keyboard_model.errors import UserFacingError

Run = Callable[[argparse.Namespace], int]
# (name, add its arguments, run it, one-line help)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Run, str]


def command_parser(prog: str, description: str, commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add_arguments, run, help_text in commands:
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def run_command(run: Run, args: argparse.Namespace) -> int:
    """Run a command; an expected failure becomes one line on stderr and exit code 2."""
    try:
        return run(args)
    except (UserFacingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_for(prog: str, description: str, commands: Sequence[Command], argv: list[str] | None = None) -> int:
    args = command_parser(prog, description, commands).parse_args(argv)
    return run_command(args.run, args)
