"""Plumbing shared by every command line: subcommands, `--version`, `--config FILE`, and errors as one clear line."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from keyboard_model.arguments import existing_file
from keyboard_model.config_file import as_arguments, read_options
from keyboard_model.errors import UserFacingError

Run = Callable[[argparse.Namespace], int]
# (name, add its arguments, run it, one-line help)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Run, str]


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line naming the option, not a usage block of forty options."""

    # Where the words being parsed came from, when not the command line (a --config file).
    source = ""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {self.source}{message}{self._did_you_mean(message)} "
                     f"(see {self.prog} --help)\n")

    def _did_you_mean(self, message: str) -> str:
        """The option meant by a mistyped one, as git and pip suggest: "--roudns" gives "--rounds"."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings]
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
            if word.startswith("-") and close:
                return f"; did you mean {close[0]}?"
        return ""


class CommandParser(Parser):
    """A subcommand's parser: it reports words it does not know itself, naming itself ("fedkb simulate: error:")
    and the option meant, where argparse would leave them to the top-level parser, which knows neither."""

    def parse_known_args(self, args=None, namespace=None):  # argparse's own signature
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_config_argument(parser: argparse.ArgumentParser, shipped: Path) -> None:
    """Let a command take its options from a TOML file too (`keyboard_model/config_file.py`): a path, or the name
    of an experiment in `shipped` (so `--config main` works from any folder, and after `pip install`)."""

    def experiment(value: str) -> Path:
        if Path(value).exists() or Path(value).suffix:
            return existing_file(value)
        named = shipped / f"{value}.toml"
        if named.is_file():
            return named
        names = ", ".join(sorted(path.stem for path in shipped.glob("*.toml")))
        raise argparse.ArgumentTypeError(f"no file {value!r} and no shipped experiment of that name ({names})")

    parser.add_argument("--config", type=experiment, default=None, metavar="FILE.toml|NAME",
                        help="take options from this TOML file (an experiment, or a run folder's run.toml) or from "
                             "a shipped experiment by name "
                             f"({', '.join(sorted(p.stem for p in shipped.glob('*.toml')))}"
                             "); options given on the command line win")


def project_version() -> str:
    try:
        return version("fedkeyboard")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def command_parser(prog: str, description: str, commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name, add_arguments, run, help_text in commands:
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run, prog=sub.prog)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; a command given `--config FILE` takes the file's options first, then those typed."""
    args = parser.parse_args(argv)
    config: Path | None = getattr(args, "config", None)
    if config is None:
        return args
    command = _subcommands(parser)[args.command]
    assert isinstance(command, Parser)  # command_parser makes every subcommand's parser one
    try:
        words = as_arguments(command, read_options(config), config)
    except UserFacingError as error:
        command.error(str(error))
    # The file's options alone first, so that a bad one is reported as the file's.
    command.source = f"--config {config}: "
    try:
        command.parse_args(words)
    finally:
        command.source = ""
    at = list(argv).index(args.command) + 1
    return parser.parse_args([*argv[:at], *words, *argv[at:]])


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def run_command(run: Run, args: argparse.Namespace) -> int:
    """Run a command; an expected failure becomes one line on stderr, "PROG COMMAND: error: ...", as argparse
    words its own, and exit code 2."""
    try:
        return run(args)
    except (UserFacingError, ValueError) as error:
        prog = getattr(args, "prog", None)  # set by command_parser, and by a single command's own parser
        print(f"{prog}: error: {error}" if prog else f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_for(prog: str, description: str, commands: Sequence[Command], argv: list[str] | None = None) -> int:
    parser = command_parser(prog, description, commands)
    try:
        args = parse(parser, sys.argv[1:] if argv is None else argv)
    except UserFacingError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return run_command(args.run, args)
