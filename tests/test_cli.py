"""The command line as a newcomer uses it: real processes, real files, clear errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from aggregator.process import free_port
from tests.conftest import SMALL_TEXT
from keyboard_model.weights import model_from_bytes

ROOT = Path(__file__).resolve().parent.parent


def fedkb(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedkb", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, cwd=ROOT,
    )


def test_simulate_writes_one_metrics_line_per_round_and_the_final_model(tmp_path: Path, shakespeare):
    out = tmp_path / "run"
    result = fedkb("simulate", "--phones", "20", "--clients-per-round", "5", "--rounds", "3", "--out", str(out),
                   "--no-progress", "--eval-every", "2", "--lr-steps", "0.5:0.25")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    for line in lines[1:]:
        assert line["participants"] == 5
        assert line["train_loss"] > 0
        assert 0 <= line["fed_recall_at_1"] <= line["fed_recall_at_3"] <= 1
    # The central score after every second round and after the last; the local rate steps down half-way.
    assert [line["recall_at_1"] is None for line in lines] == [False, True, False, False]
    assert all(0 <= line["recall_at_1"] <= line["recall_at_3"] <= 1 for line in lines if line["recall_at_1"] is not None)
    assert [line["local_learning_rate"] for line in lines] == [None, 1.0, 1.0, 0.25]
    assert lines[-1]["model_version"] == 3
    assert len(list((out / "phones").glob("phone-*/history.sqlite"))) == 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["model_version"] == 3

    scored = fedkb("eval", "--model", str(out / "model.safetensors"))
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["model_version"] == 3 and report["phones"] == 20
    assert report["recall_at_1"] == pytest.approx(summary["final"]["recall_at_1"])


def test_eval_table_compares_the_run_with_baselines_trained_on_the_same_corpus(tmp_path: Path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"user": f"user-{u}", "text": SMALL_TEXT[(u + n) % len(SMALL_TEXT)], "ts": n}) + "\n"
        for u in range(4) for n in range(10)
    ))
    (tmp_path / "proxy.txt").write_text("\n".join(SMALL_TEXT) + "\n")
    corpus_args = ["--corpus", str(corpus), "--proxy-text", str(tmp_path / "proxy.txt"),
                   "--data-dir", str(tmp_path / "data"), "--min-messages", "5"]
    out = tmp_path / "run"
    trained = fedkb("simulate", *corpus_args, "--embedding-dim", "8", "--hidden-dim", "16", "--clients-per-round", "2",
                    "--rounds", "2", "--in-process", "--out", str(out), "--no-progress")
    assert trained.returncode == 0, trained.stderr
    scored = fedkb("eval", "--model", str(out / "model.safetensors"))
    assert scored.returncode == 0, scored.stderr

    table = fedkb("eval", "--model", str(out / "model.safetensors"), "--table", "--server-epochs", "1",
                  "--oracle-epochs", "2", *corpus_args)

    assert table.returncode == 0, table.stderr
    rows = [line.split(" | ") for line in table.stdout.splitlines() if line.startswith("| ")][2:]
    assert [row[0] for row in rows] == ["| n-gram (KN trigram, proxy)", "| server CIFG (proxy)", "| federated CIFG",
                                        "| centralised oracle (CIFG)"]
    assert rows[2][1] == f"{100 * json.loads(scored.stdout)['recall_at_1']:.2f}%"
    assert len(list((out / "baselines").glob("*.safetensors"))) == 2


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
        (["simulate", "--lr-steps", "1.5:0.1", "--out", "{tmp}/x"], "argument --lr-steps: the fraction must be in"),
        (["simulate", "--eval-every", "0", "--out", "{tmp}/x"], "argument --eval-every: must be at least 1"),
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


def test_ctrl_c_stops_the_run_and_its_aggregator_leaving_whole_files(tmp_path: Path, shakespeare):
    out = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "fedkb", "simulate", "--phones", "12", "--clients-per-round", "3", "--rounds", "500",
         "--out", str(out), "--no-progress", "--hidden-dim", "32", "--embedding-dim", "16"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As in a terminal: its own process group, and SIGINT not ignored (a shell's background job inherits
        # SIGINT ignored, and Python then never raises KeyboardInterrupt).
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline, "no rounds were logged"
            time.sleep(0.2)
        started = next(line for line in iter(run.stdout.readline, "") if "started an aggregator" in line)
        aggregator_url = started.split()[4]
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{aggregator_url}/status", timeout=2)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(len(lines)))
    _, version = model_from_bytes((out / "model.safetensors").read_bytes())
    assert version >= len(lines) - 1
    assert not list(out.glob(".*.tmp"))


def test_an_aggregator_database_of_another_model_is_refused_clearly(tmp_path: Path, small_tokenizer_path):
    with socket.socket() as busy:
        # A port that is taken: each start opens the database, then cannot serve, and exits.
        busy.bind(("127.0.0.1", 0))
        busy.listen()

        def aggregator(hidden: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "aggregator", "--db", str(tmp_path / "a.sqlite"), "--tokenizer",
                 str(small_tokenizer_path), "--hidden-dim", hidden, "--embedding-dim", "8",
                 "--port", str(busy.getsockname()[1])],
                capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120,
            )

        first = aggregator("16")  # creates the database with version 0 of a 16-cell model
        assert first.returncode != 0 and "address already in use" in first.stderr
        result = aggregator("32")
    assert result.returncode == 2
    assert "holds a model that does not fit" in result.stderr and "Traceback" not in result.stderr


def test_running_again_into_the_same_folder_resumes(tmp_path: Path, shakespeare):
    args = ["simulate", "--phones", "6", "--clients-per-round", "2", "--rounds", "2", "--out", str(tmp_path / "run"),
            "--no-progress", "--hidden-dim", "16", "--embedding-dim", "8"]
    assert fedkb(*args).returncode == 0
    again = fedkb(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming the run" in again.stdout
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3, 4]
    assert [line["model_version"] for line in lines] == [0, 1, 2, 3, 4]


def test_in_process_and_service_mode_train_the_same_model(tmp_path: Path, shakespeare):
    common = ["simulate", "--phones", "8", "--clients-per-round", "3", "--rounds", "3", "--no-progress",
              "--hidden-dim", "16", "--embedding-dim", "8", "--seed", "5"]
    for mode, extra in (("service", []), ("in-process", ["--in-process"])):
        result = fedkb(*common, "--out", str(tmp_path / mode), *extra)
        assert result.returncode == 0, result.stderr
    service, service_version = model_from_bytes((tmp_path / "service" / "model.safetensors").read_bytes())
    in_process, version = model_from_bytes((tmp_path / "in-process" / "model.safetensors").read_bytes())
    # With 8 phones a round can fail at its (simulated) deadline; it must fail the same way in both modes.
    assert service_version == version >= 1
    for (name, a), b in zip(service.state_dict().items(), in_process.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
