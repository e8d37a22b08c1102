"""`run.toml`: what a run folder was made with, and every later start of the run in it.

Its top level holds every option of the run's first phase, resolved (defaults included), so
that `fedkb simulate --config RUN/run.toml` runs the same experiment again; a `[record]`
table holds the fedkeyboard version, the command, when it started, and the prepared corpus
(its folder and a checksum of its files). Each later start of the run, resumed into the
folder, adds a `[[record.phase]]` table: when it started, its command and version, and the
options it ran with where they differ from the first phase's (`changed`, and `unset` for
those it left unset). The file is rewritten whole each time, so nothing recorded is lost.
`fedkb eval RUN --table` takes the corpus from here, and a run resumed into the folder is
refused if its corpus is another one, and says which options differ from its last phase's.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from device_sim.corpus import PreparedCorpus
from keyboard_model.commands import project_version
from keyboard_model.config_file import RECORD_TABLE
from keyboard_model.errors import UserFacingError
from keyboard_model.files import write_atomically

RUN_RECORD = "run.toml"
# The record's list of later phases: inside the record table, so that `--config run.toml` reads none of it as options.
PHASE_KEY = "phase"


@dataclass(frozen=True)
class Phase:
    """A start of the run after its first: when, by which command and version, and with which options."""

    started: str
    command: str
    fedkeyboard: str
    # The options it set otherwise than the first phase, with its values...
    changed: dict[str, object]
    # ...and those the first phase set and it left unset (TOML has no null to write them as).
    unset: tuple[str, ...] = ()

    @classmethod
    def starting_now(cls, command: str, first: dict[str, object], options: dict[str, object]) -> Phase:
        return cls(_now(), command, project_version(),
                   {name: value for name, value in options.items() if first.get(name) != value},
                   tuple(sorted(first.keys() - options.keys())))

    def options(self, first: dict[str, object]) -> dict[str, object]:
        """The options this phase ran with."""
        return {name: value for name, value in {**first, **self.changed}.items() if name not in self.unset}

    def table(self) -> dict[str, object]:
        return {"started": self.started, "command": self.command, "fedkeyboard": self.fedkeyboard,
                "unset": list(self.unset), "changed": self.changed}


@dataclass(frozen=True)
class RunRecord:
    # The first phase's options: what `--config run.toml` runs again.
    options: dict[str, object]
    corpus_checksum: str
    corpus_path: str
    command: str
    started: str
    fedkeyboard: str
    # The later phases, oldest first.
    phases: tuple[Phase, ...] = ()

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        """The folder's record, or None if the run predates records (or there is no run)."""
        path = run_dir / RUN_RECORD
        if not path.exists():
            return None
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            record = data.pop(RECORD_TABLE)
            phases = tuple(Phase(phase["started"], phase["command"], phase["fedkeyboard"], dict(phase["changed"]),
                                 tuple(phase["unset"])) for phase in record.get(PHASE_KEY, []))
            return cls(data, record["corpus_checksum"], record["corpus_path"], record["command"], record["started"],
                       record["fedkeyboard"], phases)
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
            raise UserFacingError(f"{path} is not a run record ({error}); "
                                  "move it away to start the run afresh") from None

    def latest_options(self) -> dict[str, object]:
        """The options the run last ran with."""
        return self.phases[-1].options(self.options) if self.phases else self.options

    def write(self, run_dir: Path) -> None:
        record: dict[str, object] = {
            "fedkeyboard": self.fedkeyboard, "command": self.command, "corpus_path": self.corpus_path,
            "corpus_checksum": self.corpus_checksum, "started": self.started}
        if self.phases:
            record[PHASE_KEY] = [phase.table() for phase in self.phases]
        text = (f"# The options `fedkb {self.command}` first ran with (defaults included); "
                f"`fedkb simulate --config {run_dir / RUN_RECORD}` runs them again.\n"
                f"# Each later start of the run in this folder is a [[record.{PHASE_KEY}]], with the options it "
                "changed.\n")
        text += tomli_w.dumps({**self.options, RECORD_TABLE: record})
        write_atomically(run_dir / RUN_RECORD, text.encode("utf-8"))


def corpus_checksum(corpus: PreparedCorpus) -> str:
    """One checksum of the prepared corpus's files (messages, proxy text, tokenizer)."""
    return hashlib.sha256(json.dumps(corpus.manifest["sha256"], sort_keys=True).encode()).hexdigest()


def recordable(options: dict[str, object]) -> dict[str, object]:
    """`options` as TOML holds them: paths as text, tuples as lists, and no unset (None) options, TOML has no null."""
    def plain(value: object) -> object:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        return value

    return {name: plain(value) for name, value in sorted(options.items()) if value is not None}


def start_record(run_dir: Path, command: str, options: dict[str, object], corpus: PreparedCorpus,
                 log=print) -> None:
    """Record the run about to start in `run_dir`: its first phase, or a later one of a run resumed there, which must
    have the recorded corpus and is told which options differ from the last phase's."""
    options = recordable(options)
    checksum = corpus_checksum(corpus)
    old = RunRecord.read(run_dir)
    if old is None:
        new = RunRecord(options, checksum, str(corpus.path), command, _now(), project_version())
    else:
        if old.corpus_checksum != checksum:
            raise UserFacingError(
                f"{run_dir} holds a run on another corpus ({old.corpus_path}, checksum {old.corpus_checksum[:12]}); "
                f"this one is {corpus.path} ({checksum[:12]}): give another --out to start a new run")
        last = old.latest_options()
        changed = sorted(name for name in last.keys() | options.keys() if last.get(name) != options.get(name))
        if changed:
            log(f"resuming {run_dir} with options that differ from the last time it ran (its {RUN_RECORD} keeps "
                "both): " + "; ".join(f"--{name.replace('_', '-')} {_shown(options.get(name))} "
                                      f"(was {_shown(last.get(name))})" for name in changed))
        new = replace(old, phases=(*old.phases, Phase.starting_now(command, old.options, options)))
    run_dir.mkdir(parents=True, exist_ok=True)
    new.write(run_dir)


def _shown(value: object) -> str:
    """An option's value as the warning shows it: a switch (such as --in-process) as on or off."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
