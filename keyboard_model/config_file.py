"""Options from a TOML file, as Flower's run-config: `fedkb simulate --config exp.toml`.

The file holds a command's options by name, `rounds = 515` or `time-budget = 540.0`, at
its top level or in a `[tool.fedkb]` table (so a project's pyproject.toml can hold them).
A run record (`run.toml`, which every run writes into its folder) is such a file too: its
`[record]` table says where the run came from and is not read as options.

The file's options become command-line words placed before the ones typed, so argparse
checks them exactly as it checks flags, and a flag typed on the command line wins over the
file (a repeatable option, such as `--trusted-network`, adds to the file's instead). A value
never becomes a flag: one value is joined to its flag (`--out=VALUE`), only an option that
takes several values or repeats takes a list, and no element of a list may start with "-".
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
    except RecursionError:  # tomllib parses nested arrays and tables by recursion
        raise UserFacingError(f"--config {path}: values are nested too deeply to be options") from None
    tool = data.get("tool")
    if isinstance(tool, dict) and "fedkb" in tool:
        data = tool["fedkb"]
        if not isinstance(data, dict):
            raise UserFacingError(f"--config {path}: tool.fedkb must be a table of options, not {_shown(data)}")
    return {key: value for key, value in data.items() if key != RECORD_TABLE}


def as_arguments(parser: argparse.ArgumentParser, options: dict[str, object], source: Path) -> list[str]:
    """`options` as the words of `parser`'s command line, e.g. {"rounds": 5} as ["--rounds=5"]."""
    by_dest = {action.dest: action for action in parser._actions if action.option_strings}
    words: list[str] = []
    for key, value in options.items():
        action = by_dest.get(key.replace("-", "_"))
        if action is None or action.dest in NOT_FROM_A_FILE:
            raise UserFacingError(f"--config {source}: {parser.prog} has no option {key!r}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch such as --in-process
            if not isinstance(value, bool):
                raise UserFacingError(f"--config {source}: {key} is a switch; give true or false, not {value!r}")
            if value != action.default:
                words.append(flag)
        elif isinstance(action, argparse._AppendAction):  # repeated: one flag for each value
            words += [f"{flag}={_word(item, key, source)}" for item in _items(value)]
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = [_word(item, key, source) for item in _items(value)]
            if not items and not action.default:  # none, as a run record writes an unset list
                continue
            if any(item.startswith("-") for item in items):
                raise UserFacingError(f"--config {source}: {key}: no value in a list may start with '-', which would "
                                      f"be read as an option")
            words += [flag, *items]
        elif isinstance(value, list):
            raise UserFacingError(f"--config {source}: {key} takes one value, not a list")
        else:
            words.append(f"{flag}={_word(value, key, source)}")
    return words


def _items(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]


def _word(value: object, key: str, source: Path) -> str:
    """One value as the command line would give it: a number or text, nothing nested."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserFacingError(f"--config {source}: {key} takes a number or text, not {_shown(value)}")
    return str(value)


def _shown(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)
