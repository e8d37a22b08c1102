"""A run's per-round record: `metrics.jsonl` in the run folder, and the same numbers as TensorBoard scalars.

`metrics.jsonl` holds one JSON object per round, each line written whole and flushed, so
an interrupted run leaves only complete lines; a run resumed into the same folder appends
to it. `tensorboard/` holds event files (the `tensorboard` package's format, which
TensorBoard, MLflow and others read): every number of a round's line, tagged by its key
(`wall_s_by_activity/training` for a nested one), at the round as step. A resumed run adds
an event file; TensorBoard reads a folder's files as one run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

from keyboard_model.files import write_atomically

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """Appends round lines to `out_dir/metrics.jsonl` and `out_dir/tensorboard/`."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / METRICS_FILE
        self.resuming = _keep_whole_lines(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        # flush_secs: a crash loses at most this much of the scalars; metrics.jsonl loses nothing.
        self._writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), flush_secs=10)

    def append(self, line: dict) -> None:
        """Write one round's line (`line["round"]` is its step); NaN and infinities become null, as JSON has none."""
        whole = json_safe(line)
        assert isinstance(whole, dict)
        self._file.write(json.dumps(whole, allow_nan=False) + "\n")
        self._file.flush()
        for tag, value in _scalars(whole):
            self._writer.add_scalar(tag, value, global_step=line["round"])

    def close(self) -> None:
        self._file.close()
        self._writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def read_lines(path: Path) -> list[dict]:
    """The whole lines of a metrics file (a last line cut short by a crash is left out)."""
    data = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in data[: data.rfind("\n") + 1].splitlines() if line]


def _scalars(line: dict, prefix: str = "") -> list[tuple[str, float]]:
    scalars = []
    for key, value in line.items():
        if isinstance(value, dict):
            scalars += _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
            scalars.append((prefix + key, float(value)))
    return scalars


def _keep_whole_lines(path: Path) -> bool:
    """True if `path` already holds metrics; drops a last line cut short by a crash."""
    if not path.exists():
        return False
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if whole != data:
        write_atomically(path, whole)
    return bool(whole)


def json_safe(value: object) -> object:
    """`value` with NaN and infinities, at any depth of dicts and lists, as None: JSON has neither (browsers refuse
    them), so an undefined or unbounded metric is written as null."""
    if isinstance(value, dict):
        return {key: json_safe(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [json_safe(inner) for inner in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
