"""The command line as a newcomer uses it: real processes, real files, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.process import free_port

ROOT = Path(__file__).resolve().parent.parent


def fedkb(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedkb", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, cwd=ROOT,
    )


def test_simulate_writes_one_metrics_line_per_round_and_the_final_model(tmp_path: Path, shakespeare):
    out = tmp_path / "run"
    result = fedkb("simulate", "--phones", "20", "--clients-per-round", "5", "--rounds", "3", "--out", str(out),
                   "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    for line in lines[1:]:
        assert line["participants"] == 5
        assert line["train_loss"] > 0
        assert 0 <= line["recall_at_1"] <= line["recall_at_3"] <= 1
    assert lines[-1]["model_version"] == 3
    assert len(list((out / "phones").glob("phone-*/history.sqlite"))) == 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["model_version"] == 3

    scored = fedkb("eval", "--model", str(out / "model.safetensors"))
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["model_version"] == 3 and report["phones"] == 20
    assert report["recall_at_1"] == pytest.approx(summary["final"]["recall_at_1"])


def test_every_command_explains_its_options():
    for command in ("data", "aggregator", "simulate", "eval", "demo", "up"):
        result = fedkb(command, "--help")
        assert result.returncode == 0 and "usage: fedkb " + command in result.stdout
    for package in ("aggregator", "device_sim", "web_demo", "fedkb", "keyboard_model"):
        result = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, (package, result.stderr)


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "--aggregator", "http://127.0.0.1:{port}", "--rounds", "1", "--out", "{tmp}/x", "--no-progress"],
         "no aggregator is answering at http://127.0.0.1:{port}"),
        (["data", "--corpus", "{tmp}/missing.jsonl", "--proxy-text", "{tmp}/proxy.txt", "--data-dir", "{tmp}/data"],
         "missing.jsonl does not exist"),
        (["data", "--corpus", "{tmp}/broken.jsonl", "--proxy-text", "{tmp}/proxy.txt", "--data-dir", "{tmp}/data"],
         "broken.jsonl:1"),
        (["eval", "--model", "{tmp}/nothing.safetensors"], "nothing.safetensors does not exist"),
        (["simulate", "--phones", "0", "--out", "{tmp}/x", "--no-progress"], "num_phones must be at least 1"),
    ],
)
def test_bad_input_gets_a_clear_message_not_a_traceback(tmp_path: Path, shakespeare, args, message):
    (tmp_path / "broken.jsonl").write_text("this is not json\n")
    (tmp_path / "proxy.txt").write_text("some public words\n")
    port = str(free_port())  # nothing listens there
    result = fedkb(*[a.format(tmp=tmp_path, port=port) for a in args])
    assert result.returncode == 2, result.stderr
    assert message.format(tmp=tmp_path, port=port) in result.stderr
    assert "Traceback" not in result.stderr
