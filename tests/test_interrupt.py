"""Ctrl-C stops `fedkb simulate` within seconds, whatever its training workers are doing, and leaves none behind;
resumed, the run's records are whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import suppress
from pathlib import Path

import pytest

from aggregator.api.schemas import StatusResponse
from aggregator.inprocess import InProcessClient
from fedkb.cli import main
from keyboard_model.native import cifg_kernel

ROOT = Path(__file__).resolve().parent.parent
# Generous for a loaded two-core machine, where stopping takes about a second. Before the workers were killed on
# the way out, it waited for the phones they had been handed: here, every one trains for tens of seconds.
EXIT_BOUND_S = 15.0


def workers_of(group: int, training: bool) -> list[int]:
    """The simulator's worker processes (by process group, so orphans count too); with `training`, only those that
    have loaded the compiled training kernel, which a worker does at its phone's first training step."""
    found = []
    for process in Path("/proc").iterdir():
        try:
            stat = (process / "stat").read_text()
            in_group = int(stat.rsplit(")", 1)[1].split()[2]) == group
            if in_group and b"spawn_main" in (process / "cmdline").read_bytes():
                if not training or "fedkeyboard_cifg" in (process / "maps").read_text():
                    found.append(int(process.name))
        except (OSError, ValueError, IndexError):
            continue  # not a process, or one that just ended
    return found


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["workers starting", "phones training"])
def test_ctrl_c_exits_within_seconds_with_a_clean_message_and_leaves_no_worker_behind(
    tmp_path: Path, shakespeare, moment
):
    if moment == "phones training" and cifg_kernel() is None:
        pytest.skip("training is detected by the compiled kernel being loaded, which does not build here")
    # 200 local epochs: every phone trains for tens of seconds, on any machine.
    run = subprocess.Popen(
        [sys.executable, "-m", "fedkb", "simulate", "--phones", "12", "--clients-per-round", "2", "--rounds", "100",
         "--epochs", "200", "--workers", "2", "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # As in a terminal: its own process group, and SIGINT not ignored.
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not workers_of(run.pid, training=moment == "phones training"):
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline, f"no {moment}"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        interrupted = time.monotonic()
        _, stderr = run.communicate(timeout=60)
        took = time.monotonic() - interrupted
        left_behind = workers_of(run.pid, training=False)
    finally:
        with suppress(ProcessLookupError):  # nothing of the group is left: the expected case
            os.killpg(run.pid, signal.SIGKILL)
    assert took < EXIT_BOUND_S, f"exited {took:.1f} s after Ctrl-C"
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr
    assert not left_behind


@pytest.mark.slow
def test_a_round_the_aggregator_committed_as_ctrl_c_arrived_has_its_line_once_the_run_resumes(
    tmp_path: Path, shakespeare, monkeypatch, capsys
):
    out = tmp_path / "run"
    # The vectorised executor: phones train in this process, with no pool of workers to start (seconds).
    common = ["simulate", "--phones", "6", "--in-process", "--executor", "vectorised", "--hidden-dim", "16",
              "--embedding-dim", "8", "--out", str(out), "--no-progress"]
    status = InProcessClient.status

    def interrupted_after_round_2(self, recent: int = 20) -> StatusResponse:
        answer = status(self, recent)
        if any(view.round == 2 for view in answer.recent_rounds):
            raise KeyboardInterrupt  # Ctrl-C, the moment the aggregator has committed round 2
        return answer

    with monkeypatch.context() as patched:
        patched.setattr(InProcessClient, "status", interrupted_after_round_2)
        assert main([*common, "--clients-per-round", "2", "--rounds", "3"]) == 130
    assert [line["round"] for line in read_metrics(out)] == [0, 1]
    # Resumed with other options: the aggregator's record of round 2 becomes its line, before round 3's.
    assert main([*common, "--clients-per-round", "2", "--lr", "0.5", "--rounds", "1"]) == 0
    lines = read_metrics(out)
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    assert [line["model_version"] for line in lines[:3]] == [0, 1, 2]
    assert [line.get("recovered", False) for line in lines] == [False, False, True, False]
    recovered = lines[2]
    assert recovered["status"] == "closed" and recovered["reported"] >= 1 and recovered["examples"] > 0
    assert recovered["train_loss"] is None and recovered["participants"] is None  # the fleet's view of it is gone
    assert "recovered the line of round(s) 2" in capsys.readouterr().out
    # run.toml still holds the first phase's options, and the second phase's changes.
    record = tomllib.loads((out / "run.toml").read_text())
    assert (record["rounds"], record["lr"]) == (3, 1.0)
    assert [phase["changed"] for phase in record["record"]["phase"]] == [{"lr": 0.5, "rounds": 1}]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
