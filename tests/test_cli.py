"""The command line as a newcomer uses it: real processes, real files, clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aggregator.process import free_port
from device_sim.cli import simulation_config_from_args
from fedkb.cli import COMMANDS, main
from fedkb.plot import references
from keyboard_model.commands import command_parser, parse
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import model_from_bytes
from tests.conftest import SMALL_TEXT
from tests.helpers import ROOT, fedkb


@pytest.mark.slow
def test_simulate_writes_one_metrics_line_per_round_and_the_final_model(tmp_path: Path, shakespeare):
    out = tmp_path / "run"
    # With the aggregator's canary clients, audited every second round: service mode asks the child aggregator for
    # the last model's audit with the operator's token.
    result = fedkb("simulate", "--phones", "20", "--clients-per-round", "5", "--rounds", "3", "--out", str(out),
                   "--no-progress", "--eval-every", "2", "--lr-steps", "0.5:0.25", "--canary-clients", "6",
                   "--audit-every", "2")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    for line in lines[1:]:
        assert line["participants"] == 5
        assert line["train_loss"] > 0
        assert 0 <= line["fed_recall_at_1"] <= line["fed_recall_at_3"] <= 1
    # The central score after every second round and after the last; the local rate steps down half-way.
    assert [line["recall_at_1"] is None for line in lines] == [False, True, False, False]
    assert all(0 <= line["recall_at_1"] <= line["recall_at_3"] <= 1
               for line in lines if line["recall_at_1"] is not None)
    assert [line["local_learning_rate"] for line in lines] == [None, 1.0, 1.0, 0.25]
    assert lines[-1]["model_version"] == 3
    assert len(list((out / "phones").glob("phone-*/history.sqlite"))) == 20
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_refuse)  # no NaN: browsers read it
    assert summary["rounds_completed"] == 3 and summary["model_version"] == 3 and summary["rounds_failed"] == 0
    assert summary["initial"] == {key: lines[0][key] for key in summary["initial"]}
    # The last screen puts the model beside the n-gram, scored on the same positions, and the target.
    assert "n-gram (KN trigram, proxy)" in result.stdout and "x the n-gram's top-1" in result.stdout
    assert "target: 1.2x the n-gram's top-1" in result.stdout
    # No differential privacy: no privacy figure anywhere (a 0 would read as perfect privacy).
    assert all(line[name] is None for line in lines for name in ("epsilon", "dp_delta", "rho"))
    assert summary["privacy_spent"] is None and "privacy spent" not in result.stdout
    # The same rounds as TensorBoard scalars, read back with TensorBoard's own reader.
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train_loss")
    assert [event.step for event in losses] == [1, 2, 3]
    assert [event.value for event in losses] == pytest.approx([line["train_loss"] for line in lines[1:]])
    assert [event.step for event in events.Scalars("recall_at_1")] == [0, 2, 3]
    assert "wall_s_by_activity/training" in events.Tags()["scalars"]
    # The empirical privacy audit: every second round and the last, whatever the interval, in every record.
    assert [line["round"] for line in lines if line["audit_epsilon"] is not None] == [2, 3]
    assert [event.step for event in events.Scalars("audit_epsilon")] == [2, 3]
    assert summary["privacy_audit"]["round"] == 3
    assert summary["privacy_audit"]["audit_epsilon"] == lines[-1]["audit_epsilon"] >= 0
    assert "canary clients, round 3 (6 inserted" in result.stdout and "no DP, so no proven bound" in result.stdout
    assert not {"epsilon", "dp_delta", "rho"} & set(events.Tags()["scalars"])

    drawn = fedkb("plot", str(out), "--out", str(tmp_path / "plots" / "run.png"))
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "plots" / "run.png").read_bytes().startswith(b"\x89PNG")

    scored = fedkb("eval", "--model", str(out / "model.safetensors"))
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["model_version"] == 3 and report["phones"] == 20
    assert report["recall_at_1"] == pytest.approx(summary["final"]["recall_at_1"])


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@pytest.mark.slow
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

    # The run folder is all it needs: the corpus comes from its run record, not from options given now.
    table = fedkb("eval", str(out), "--table", "--server-epochs", "1", "--oracle-epochs", "2")

    assert table.returncode == 0, table.stderr
    rows = [line.split(" | ") for line in table.stdout.splitlines() if line.startswith("| ")][2:]
    labels = [re.sub(r"\d+ phones", "N phones", row[0]) for row in rows]
    assert labels == ["| n-gram (KN trigram, proxy)", "| server CIFG (proxy)", "| federated CIFG",
                      "| centralised oracle (CIFG)", "| federated CIFG, same N phones",
                      "| personalised CIFG, N phones (each on its own messages)"]
    assert rows[2][1] == f"{100 * json.loads(scored.stdout)['recall_at_1']:.2f}%"
    assert len(list((out / "baselines").glob("*.safetensors"))) == 2
    saved = json.loads((out / "table.json").read_text(), parse_constant=_refuse)
    assert [row["model"] for row in saved["rows"]] == [row[0].removeprefix("| ") for row in rows]
    # `fedkb plot` draws the n-gram and the oracle from it as reference lines.
    assert [name for name, _ in references(out)] == ["n-gram (KN trigram, proxy)", "centralised oracle (CIFG)"]
    # Another corpus given now is refused rather than quietly used for the baselines.
    other = fedkb("eval", str(out), "--table", "--corpus", str(corpus))
    assert other.returncode == 2 and "leave out --corpus" in other.stderr


@pytest.mark.slow
def test_a_config_file_runs_the_same_experiment_as_its_flags(tmp_path: Path, shakespeare):
    flags = ["--phones", "6", "--clients-per-round", "2", "--rounds", "2", "--hidden-dim", "16", "--embedding-dim", "8",
             "--in-process", "--lr-steps", "0.5:0.5", "--seed", "3"]
    by_flags = fedkb("simulate", *flags, "--out", str(tmp_path / "flags"), "--no-progress")
    assert by_flags.returncode == 0, by_flags.stderr
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(
        "[tool.fedkb]\nphones = 6\nclients-per-round = 2\nrounds = 9\nhidden_dim = 16\nembedding-dim = 8\n"
        "in-process = true\nlr-steps = ['0.5:0.5']\nseed = 3\n"
    )
    # --rounds typed on the command line wins over the file's 9.
    by_file = fedkb("simulate", "--config", str(experiment), "--rounds", "2", "--out", str(tmp_path / "file"),
                    "--no-progress")
    assert by_file.returncode == 0, by_file.stderr
    model = {run: (tmp_path / run / "model.safetensors").read_bytes() for run in ("flags", "file")}
    assert model["file"] == model["flags"]
    records = {run: tomllib.loads((tmp_path / run / "run.toml").read_text()) for run in ("flags", "file")}
    assert records["file"]["rounds"] == 2 and records["file"]["lr_steps"] == ["0.5:0.5"]
    assert records["file"]["seed"] == 3
    assert records["file"]["record"]["corpus_checksum"] == records["flags"]["record"]["corpus_checksum"]
    # And the first run's record, given as a config, resolves to the very options that run had (so, as above, the
    # same model): the same namespace as its flags, but for --out.
    parser = command_parser("fedkb", "", COMMANDS)
    again = parse(parser, ["simulate", "--config", str(tmp_path / "flags" / "run.toml"), "--out", str(tmp_path / "x")])
    original = parse(parser, ["simulate", *flags, "--out", str(tmp_path / "x"), "--no-progress"])
    assert {**vars(again), "config": None} == vars(original)


@pytest.mark.parametrize("experiment", sorted((ROOT / "fedkb" / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_the_shipped_experiments_are_valid_configs(experiment: Path):
    parser = command_parser("fedkb", "", COMMANDS)
    args = parse(parser, ["simulate", "--config", str(experiment)])
    # Each writes a folder of its own: none resumes `fedkb up`'s run (runs/up).
    assert args.out == Path("runs") / experiment.stem
    # Named, from any folder (and after `pip install`, the files being package data): the same options.
    assert parse(parser, ["simulate", "--config", experiment.stem]) == args
    if experiment.stem == "long":  # the README's three phases: rate 0.3 from round 515, 0.1 from round 665
        config = simulation_config_from_args(args)
        rates = [config.learning_rate(index / config.rounds) for index in range(config.rounds)]
        assert rates.index(0.3) == 515 and rates.index(0.1) == 665 and rates[0] is None


@pytest.mark.slow
def test_a_run_whose_updates_are_all_refused_goes_on_and_says_so(tmp_path: Path, shakespeare):
    # A norm bound no update meets: the aggregator refuses every upload (422), so no round can close.
    result = fedkb("simulate", "--phones", "6", "--clients-per-round", "2", "--rounds", "2", "--in-process",
                   "--hidden-dim", "16", "--embedding-dim", "8", "--max-update-norm", "0.001", "--clip-norm", "0.001",
                   "--out", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "the aggregator refused" in result.stdout
    assert "2 rounds (2 failed), model version 0" in result.stdout
    assert "no round of this run closed" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["failed"] and line["refused"] >= 1 for line in lines[1:])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=_refuse)
    assert summary["rounds_failed"] == 2


def test_version():
    result = fedkb("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fedkb {importlib.metadata.version('fedkeyboard')}"


def test_the_options_written_out_for_a_quick_help_are_the_configs_defaults(tmp_path: Path):
    """The parsers write their defaults and choices out, so that `--help` need not import torch
    (tests/test_cli_startup.py): with no option given they must make exactly the components' own defaults."""
    from aggregator import cli as aggregator_cli
    from aggregator.config import DP_MECHANISMS, AggregatorConfig
    from aggregator.strategies import STRATEGIES
    from device_sim import cli as device_cli
    from device_sim.comparison import ComparisonConfig
    from device_sim.fleet import FleetConfig
    from device_sim.simulation import SimulationConfig
    from device_sim.vectorised import DEFAULT_PHONES_PER_PASS
    from keyboard_model import cli_options
    from keyboard_model.model import ModelConfig
    from keyboard_model.update_codec import SCHEMES
    from keyboard_model.weights import MODEL_ENCODINGS

    parser = command_parser("fedkb", "", COMMANDS)
    simulate = parse(parser, ["simulate"])
    assert simulation_config_from_args(simulate) == SimulationConfig(
        out_dir=simulate.out, fleet=FleetConfig(phones_dir=simulate.out / "phones"))
    tokenizer = tmp_path / "tokenizer.json"
    served = parse(parser, ["aggregator"])
    assert AggregatorConfig(db_path=served.db, tokenizer_path=tokenizer, host=served.host, port=served.port,
                            **aggregator_cli.round_settings(served)) == AggregatorConfig(aggregator_cli.DB_PATH,
                                                                                         tokenizer)
    assert cli_options.model_config_from_args(served, ModelConfig().vocab_size) == ModelConfig()
    evaluated = parse(parser, ["eval"])
    defaults = ComparisonConfig(baselines_dir=tmp_path)
    assert (evaluated.server_epochs, evaluated.oracle_epochs) == (defaults.server_epochs, defaults.oracle_epochs)
    assert aggregator_cli.SERVER_LEARNING_RATES == {name: s().server_learning_rate for name, s in STRATEGIES.items()}
    assert (aggregator_cli.DP_MECHANISMS, aggregator_cli.MODEL_ENCODINGS) == (DP_MECHANISMS, MODEL_ENCODINGS)
    assert device_cli.UPDATE_COMPRESSIONS == SCHEMES
    assert device_cli.DEFAULT_PHONES_PER_PASS == DEFAULT_PHONES_PER_PASS


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
        (["simulate", "--phones", "0", "--out", "{tmp}/x"], "argument --phones: must be at least 1, got 0"),
        (["simulate", "--rounds", "-3", "--out", "{tmp}/x"], "argument --rounds: must be at least 1, got -3"),
        (["simulate", "--rounds", "0", "--out", "{tmp}/x"], "argument --rounds: must be at least 1, got 0"),
        (["up", "--time-budget", "-5", "--out", "{tmp}/x"], "argument --time-budget: must be more than 0, got -5"),
        (["simulate", "--lr", "-1", "--out", "{tmp}/x"], "argument --lr: must be more than 0, got -1"),
        (["simulate", "--out", "{tmp}/proxy.txt"], "argument --out: {tmp}/proxy.txt is a file"),
        (["simulate", "--corpus", "{tmp}", "--out", "{tmp}/x"], "argument --corpus: {tmp} is a folder"),
        (["data", "--corpus", "{tmp}/binary.jsonl", "--proxy-text", "{tmp}/proxy.txt", "--data-dir", "{tmp}/data"],
         "binary.jsonl:1: not UTF-8 text"),
        (["aggregator", "--port", "70000"], "argument --port: must be a port from 1 to 65535"),
        (["simulate", "--clip-norm", "30", "--out", "{tmp}/x"], "--clip-norm (30.0) must be at most --max-update-norm"),
        (["simulate", "--lr-steps", "1.5:0.1", "--out", "{tmp}/x"], "argument --lr-steps: the fraction must be in"),
        (["simulate", "--clip-quantile", "1", "--noise-multiplier", "0.1", "--out", "{tmp}/x"],
         "argument --clip-quantile: must be between 0 and 1, both excluded, got 1"),
        (["simulate", "--clip-quantile", "0.5", "--out", "{tmp}/x"], "--clip-quantile (adaptive clipping) needs"),
        (["simulate", "--clip-quantile", "0.5", "--noise-multiplier", "1", "--out", "{tmp}/x"],
         "--clip-count-stddev (0.5) must be more than half of --noise-multiplier (1.0)"),
        (["simulate", "--eval-every", "0", "--out", "{tmp}/x"], "argument --eval-every: must be at least 1"),
        (["simulate", "--config", "{tmp}/typo.toml", "--out", "{tmp}/x"], "fedkb simulate has no option 'roundz'"),
        (["simulate", "--config", "{tmp}/negative.toml", "--out", "{tmp}/x"],
         "--config {tmp}/negative.toml: argument --rounds: must be at least 1, got -2"),
        (["simulate", "--config", "{tmp}/deep.toml", "--out", "{tmp}/x"],
         "--config {tmp}/deep.toml: values are nested too deeply to be options"),
        (["simulate", "--config", "{tmp}/tool.toml", "--out", "{tmp}/x"],
         "--config {tmp}/tool.toml: tool.fedkb must be a table of options, not 5"),
        # A value never becomes another option: neither a list given to a one-value option...
        (["simulate", "--config", "{tmp}/injected.toml"],
         "--config {tmp}/injected.toml: out takes one value, not a list"),
        # ...nor an element of a list that an option of several values takes.
        (["simulate", "--config", "{tmp}/injected-steps.toml", "--out", "{tmp}/x"],
         "--config {tmp}/injected-steps.toml: lr-steps: no value in a list may start with '-'"),
        (["simulate", "--config", "{tmp}/table.toml", "--out", "{tmp}/x"],
         "--config {tmp}/table.toml: seed takes a number or text, not a table"),
        (["simulate", "--config", "{tmp}/forever.toml", "--out", "{tmp}/x"],
         "--config {tmp}/forever.toml: argument --round-deadline: must be from 1 to 604800 seconds, got 1e+308"),
        (["simulate", "--config", "{tmp}/instant.toml", "--out", "{tmp}/x"],
         "--config {tmp}/instant.toml: argument --secagg-phase: must be from 1 to 604800 seconds, got 1e-300"),
        (["simulate", "--round-deadline", "1e308", "--out", "{tmp}/x"],
         "argument --round-deadline: must be from 1 to 604800 seconds, got 1e308"),
        (["aggregator", "--secagg-phase", "1e-300"], "argument --secagg-phase: must be from 1 to 604800 seconds"),
        # A mistyped option is answered with the one meant, as git and pip do.
        (["simulate", "--roudns", "3", "--out", "{tmp}/x"],
         "unrecognized arguments: --roudns 3; did you mean --rounds?"),
        (["simulate", "--config", "mian", "--out", "{tmp}/x"],
         "no file 'mian' and no shipped experiment of that name (gboard, long, main, private, secure)"),
    ],
)
def test_bad_input_gets_a_clear_message_not_a_traceback(tmp_path: Path, shakespeare, capsys, args, message):
    (tmp_path / "broken.jsonl").write_text("this is not json\n")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "proxy.txt").write_text("some public words\n")
    (tmp_path / "typo.toml").write_text("roundz = 5\n")
    (tmp_path / "negative.toml").write_text("rounds = -2\n")
    (tmp_path / "deep.toml").write_text("rounds = " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "tool.toml").write_text("[tool]\nfedkb = 5\n")
    (tmp_path / "injected.toml").write_text(f"out = ['{tmp_path}/x', '--aggregator', 'http://127.0.0.1:9']\n")
    (tmp_path / "injected-steps.toml").write_text("lr-steps = ['0.5:0.5', '--aggregator', 'http://127.0.0.1:9']\n")
    (tmp_path / "table.toml").write_text("seed = {value = 3}\n")
    (tmp_path / "forever.toml").write_text("round-deadline = 1e308\n")
    (tmp_path / "instant.toml").write_text("secagg-phase = 1e-300\n")
    port = str(free_port())  # nothing listens there
    # In this process, as `fedkb` runs it (a process each would spend most of the test importing torch); an
    # exception that escaped would fail the test with its traceback.
    try:
        code = main([a.format(tmp=tmp_path, port=port) for a in args])
    except SystemExit as exit_:  # argparse's way out
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert message.format(tmp=tmp_path, port=port) in stderr
    # Every error in the same words, whether argparse or the command found it.
    assert stderr.startswith(f"fedkb {args[0]}: error: "), stderr
    # One line, naming the option, and nothing done: no run folder made.
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_aggregator_database_of_another_model_is_refused_clearly(tmp_path: Path, small_tokenizer_path):
    def aggregator(hidden: str, port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator", "--db", str(tmp_path / "a.sqlite"), "--tokenizer",
             str(small_tokenizer_path), "--hidden-dim", hidden, "--embedding-dim", "8", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
        )

    first = aggregator("16", free_port())  # creates the database with version 0 of a 16-cell model
    try:
        assert "serving on" in first.stdout.readline()
    finally:
        first.terminate()
        first.communicate(timeout=60)
    second = aggregator("32", free_port())
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 2
    assert "holds a model that does not fit" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_a_port_in_use_is_reported_before_any_work(tmp_path: Path, small_tokenizer_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        aggregator = subprocess.run(
            [sys.executable, "-m", "aggregator", "--db", str(tmp_path / "a.sqlite"), "--tokenizer",
             str(small_tokenizer_path), "--port", taken],
            capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120,
        )
        # `up` would train for ten minutes before serving the demo: it must stop before making its run folder.
        up = fedkb("up", "--demo-port", taken, "--out", str(tmp_path / "up"), timeout=120)
    assert aggregator.returncode == 2 and f"--port: cannot listen on 127.0.0.1:{taken}" in aggregator.stderr
    assert "serving on" not in aggregator.stdout
    assert not (tmp_path / "a.sqlite").exists()
    assert up.returncode == 2 and f"--demo-port: cannot listen on 127.0.0.1:{taken}" in up.stderr
    assert not (tmp_path / "up").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_child_aggregator_is_started_with_every_setting_of_its_config(tmp_path, small_tokenizer_path):
    """`fedkb simulate` and `fedkb up` start their aggregator as `python -m aggregator` with flags: a setting left off
    the command line would silently run at its default (canary clients once were)."""
    from aggregator.cli import add_arguments, config_from_args
    from aggregator.config import AggregatorConfig
    from aggregator.process import LocalAggregator, local_aggregator_config
    from keyboard_model.model import ModelConfig

    private = dict(
        model=ModelConfig(vocab_size=KeyboardTokenizer.from_file(small_tokenizer_path).vocab_size, embedding_dim=12,
                          hidden_dim=20, projection_dim=12),
        clients_per_round=7, over_selection=1.5, round_deadline_s=99.0, min_report_fraction=0.7,
        server_optimizer="fedadam", server_learning_rate=0.03, serving_average=0.5, trim_fraction=0.2,
        max_examples_per_update=123, max_update_norm=9.0, max_eval_positions=77, eval_share=0.6,
        noise_multiplier=0.7, clip_norm=0.4, clip_quantile=0.6, clip_learning_rate=0.3, clip_count_stddev=2.0,
        population=70, dp_delta=1e-4, dp_mechanism="ftrl", min_separation=3, dp_rounds=40, canary_clients=5,
        audit_every=4, download_encoding="int8", secure_aggregation=True, secagg_phase_s=33.0, secagg_ring_bits=16,
        simulated_clock=True, selection_window_s=2.0, trusted_networks=("10.0.0.0/8",), enrolments_per_minute=3,
        checkins_per_minute=4, seed=9, keep_models=2, keep_every=6,
    )
    plain = dict(aggregation_rule="median")  # robust rules are for plain rounds only
    # Discovery does not go with secure aggregation, canary clients or DP-FTRL.
    discovering = dict(discover_every=3, discovery_epsilon=5.0, discovery_delta=1e-5, discovery_max_word_length=9,
                       discovery_theta=6, discovery_sampling_rate=0.1)
    # Not on the command line: the listener is handed over, credentials go in the environment, and these are fixed.
    elsewhere = {"db_path", "tokenizer_path", "host", "port", "operator_token", "enrolment_secret", "retry_after_s",
                 "max_json_bytes", "initial_model"}
    defaults = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tested = set()
    for changed in (private, plain, discovering):
        config = local_aggregator_config(tmp_path, small_tokenizer_path, **changed)
        tested |= {name for name in changed if getattr(config, name) != getattr(defaults, name)}
        child_process = LocalAggregator(config)  # never started: only its command is read
        command = child_process.command(listen_fd=3)
        child_process.__exit__(None, None, None)
        assert command[1:3] == ["-m", "aggregator"]
        child = config_from_args(parser.parse_args(command[3:]), small_tokenizer_path)
        for name in changed:
            assert getattr(child, name) == getattr(config, name), name
    untested = {f.name for f in dataclasses.fields(AggregatorConfig)} - elsewhere - tested
    assert not untested, f"give these a value other than the default here: {untested}"
