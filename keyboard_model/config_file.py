"""Options from a TOML file, as Flower's run-config: `fedkb simulate --config exp.toml`.

The file holds a command's options by name, `rounds = 515` or `time-budget = 540.0`, at
its top level or in a `[tool.fedkb]` table (so a project's pyproject.toml can hold them).
A run record (`run.toml`, which every run writes into its folder) is such a file too: its
`[record]` table says where the run came from and is not read as options.

The file's options become command-line words placed before the ones typed, so argparse
checks them exactly as it checks flags, and a flag typed on the command line wins over the
file (a repeatable option, such as `--trusted-network`, adds to the file's instead).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from keyboard_model.errors import UserFacingError

# The run record's own table: where and from what a run was made, not options.
RECORD_TABLE = "record"
# Options a file cannot hold: a file naming another file would be a chain to follow.
NOT_FROM_A_FILE = {"help", "version", "config"}


def read_options(path: Path) -> dict[str, object]:
    """The options table of a TOML file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserFacingError(f"--config {path}: {error}") from None
    tool = data.get("tool")
    if isinstance(tool, dict) and "fedkb" in tool:
        data = tool["fedkb"]
    return {key: value for key, value in data.items() if key != RECORD_TABLE}


def as_arguments(parser: argparse.ArgumentParser, options: dict[str, object], source: Path) -> list[str]:
    """`options` as the words of `parser`'s command line, e.g. {"rounds": 5} as ["--rounds", "5"]."""
    by_dest = {action.dest: action for action in parser._actions if action.option_strings}
    words: list[str] = []
    for key, value in options.items():
        action = by_dest.get(key.replace("-", "_"))
        if action is None or action.dest in NOT_FROM_A_FILE:
            raise UserFacingError(f"--config {source}: {parser.prog} has no option {key!r} (see --help)")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch such as --in-process
            if not isinstance(value, bool):
                raise UserFacingError(f"--config {source}: {key} is a switch; give true or false, not {value!r}")
            if value != action.default:
                words.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value if isinstance(value, list) else [value]:
                words += [flag, str(item)]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise UserFacingError(f"--config {source}: {key} takes a value, not a table")
        else:
            words += [flag, str(value)]
    return words
