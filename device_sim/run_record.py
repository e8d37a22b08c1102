"""`run.toml`: what a run folder was made with, written when the run starts.

It holds every option of the run, resolved (defaults included), at its top level, so that
`fedkb simulate --config RUN/run.toml` runs the same experiment again; and a `[record]`
table with the fedkeyboard version, the command, when it started, and the prepared
corpus (its folder and a checksum of its files). `fedkb eval RUN --table` takes the corpus
from here, and a run resumed into the folder is refused if its corpus is another one, and
says which options differ from the recorded ones.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from device_sim.corpus import PreparedCorpus
from keyboard_model.commands import project_version
from keyboard_model.config_file import RECORD_TABLE
from keyboard_model.errors import UserFacingError
from keyboard_model.files import write_atomically

RUN_RECORD = "run.toml"


@dataclass(frozen=True)
class RunRecord:
    options: dict[str, object]
    corpus_checksum: str
    corpus_path: str
    command: str

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        """The folder's record, or None if the run predates records (or there is no run)."""
        path = run_dir / RUN_RECORD
        if not path.exists():
            return None
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            record = data.pop(RECORD_TABLE)
            return cls(data, record["corpus_checksum"], record["corpus_path"], record["command"])
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as error:
            raise UserFacingError(f"{path} is not a run record ({error}); move it away to start the run afresh") from None

    def write(self, run_dir: Path) -> None:
        record = {"fedkeyboard": project_version(), "command": self.command, "corpus_path": self.corpus_path,
                  "corpus_checksum": self.corpus_checksum, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        text = (f"# The options `fedkb {self.command}` ran with (defaults included); "
                f"`fedkb simulate --config {run_dir / RUN_RECORD}` runs them again.\n")
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
    """Record the run about to start in `run_dir`; a resumed run must have the recorded corpus, and is told which
    options differ from the recorded ones."""
    new = RunRecord(recordable(options), corpus_checksum(corpus), str(corpus.path), command)
    old = RunRecord.read(run_dir)
    if old is not None:
        if old.corpus_checksum != new.corpus_checksum:
            raise UserFacingError(
                f"{run_dir} holds a run on another corpus ({old.corpus_path}, checksum {old.corpus_checksum[:12]}); "
                f"this one is {new.corpus_path} ({new.corpus_checksum[:12]}): give another --out to start a new run")
        changed = sorted(name for name in old.options.keys() | new.options.keys()
                         if old.options.get(name) != new.options.get(name))
        if changed:
            log(f"resuming {run_dir} with options that differ from its {RUN_RECORD}: " + "; ".join(
                f"--{name.replace('_', '-')} {new.options.get(name, 'unset')} (was {old.options.get(name, 'unset')})"
                for name in changed))
    run_dir.mkdir(parents=True, exist_ok=True)
    new.write(run_dir)
