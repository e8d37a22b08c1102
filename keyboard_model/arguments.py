"""argparse types that check a value where it is parsed, so that a bad option is one line naming it, before any work.

argparse reports a type's `ArgumentTypeError` as "argument --rounds: must be at least 1,
got 0"; every command's parser (`keyboard_model.commands`) prints that one line.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
from collections.abc import Callable
from pathlib import Path


def number(kind: type[int] | type[float], accepts: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """A number of `kind` for which `accepts(value)` holds; `rule` says which in the error ("at least 1")."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"  # argparse names a type's function in some of its messages
    return parse


def at_least(lowest: int) -> Callable[[str], int]:
    """A whole number no smaller than `lowest`."""
    return number(int, lambda value: value >= lowest, f"at least {lowest}")  # type: ignore[return-value]  # int


positive_int = at_least(1)
positive_float = number(float, lambda value: value > 0, "more than 0")
non_negative_float = number(float, lambda value: value >= 0, "0 or more")
multiple = number(float, lambda value: value >= 1, "at least 1")
probability = number(float, lambda value: 0 <= value < 1, "at least 0 and below 1")
fraction = number(float, lambda value: 0 < value <= 1, "more than 0 and at most 1")
quantile = number(float, lambda value: 0 < value < 1, "between 0 and 1, both excluded")
port = number(int, lambda value: 0 <= value <= 65_535, "a port from 1 to 65535 (or 0 for any free one)")

# The longest an operator may have a service wait for anything: a round, a phase, a refresh. Past it a wait is a
# mistake (1e308 seconds overflows the clocks it is added to).
LONGEST_WAIT_S = 7 * 24 * 3600


def seconds(shortest: float, longest: float = LONGEST_WAIT_S) -> Callable[[str], float]:
    """A duration in seconds from `shortest` to `longest`, both included."""
    return number(float, lambda value: shortest <= value <= longest, f"from {shortest:g} to {longest:g} seconds")


def existing_file(text: str) -> Path:
    path = _not_a_folder(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    return path


def new_file(text: str) -> Path:
    """A file to write into: it may not exist yet, but it must not be a folder, and its folder can be made."""
    path = _not_a_folder(text)
    folder(str(path.parent))
    return path


def folder(text: str) -> Path:
    """A folder to write into: it may not exist yet, but it must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; give a folder (it is made if missing)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be made")
            break
    return path


def network(text: str) -> str:
    """An address range such as 10.0.0.0/8, or 'none'."""
    if text != "none":
        try:
            ipaddress.ip_network(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError("expected an address range such as 10.0.0.0/8, or none: "
                                             f"{error}") from None
    return text


def _not_a_folder(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file")
    return path
