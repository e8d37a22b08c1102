"""Every benchmark runs at a tiny size and prints the figures it exists for, so none can rot unnoticed.

Each runs in this process as its command line would run it (`runpy`, the script as `__main__`), with tiny sizes
through its own options, on the default corpus (cached) and, where a benchmark takes one, a finished tiny run. What
is asserted is the shape of its output, each figure it should print: the values at these sizes mean nothing.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

from fedkb.cli import main as fedkb

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?"
# A tiny model for the benchmarks that take the fleet's options.
TINY_MODEL = ["--embedding-dim", "8", "--hidden-dim", "16"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shakespeare) -> Path:
    """A finished `fedkb simulate` run of 12 phones and a tiny model, for the benchmarks that read one."""
    out = tmp_path_factory.mktemp("tiny-run")
    assert fedkb(["simulate", "--in-process", "--no-progress", "--phones", "12", "--rounds", "3",
                  "--clients-per-round", "3", "--eval-phones", "4", "--workers", "1", *TINY_MODEL,
                  "--out", str(out)]) == 0
    return out


def run_benchmark(name: str, argv: list[str], monkeypatch, capsys) -> str:
    """Run benchmarks/`name`.py with `argv` as its command line would; returns what it printed."""
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / f"{name}.py"), *argv])
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as for a script: its neighbours import as top-level modules
    runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


def assert_prints(output: str, *patterns: str) -> None:
    for pattern in patterns:
        assert re.search(pattern.replace("{n}", NUMBER), output), f"no {pattern!r} in:\n{output}"


@pytest.mark.slow
def test_diurnal(tmp_path, tiny_run, monkeypatch, capsys):
    out = run_benchmark("diurnal", ["--phones", "50", "--days", "0.25", "--out", str(tmp_path / "d.png"),
                                    "--run", str(tiny_run)], monkeypatch, capsys)
    assert_prints(out, r"peak: +{n} \({n}%\) at", r"trough: +{n}", r"peak / trough: {n}",
                  r"time per tick for all phones: median {n} ms")
    assert (tmp_path / "d.png").stat().st_size > 0


def test_federated_eval(tmp_path, tiny_run, monkeypatch, capsys):
    out = run_benchmark("federated_eval", ["--run", str(tiny_run), "--plot", str(tmp_path / "f.png")],
                        monkeypatch, capsys)
    assert_prints(out, r"recall@1: {n} model versions; federated minus central: mean {n}",
                  r"recall@3: {n} model versions")


def test_latency(monkeypatch, capsys, tmp_path):
    out = run_benchmark("latency", ["--model", str(tmp_path / "none.safetensors"), "--keystrokes", "20"],
                        monkeypatch, capsys)
    assert_prints(out, r"latency per keystroke: p50 {n} ms  p99 {n} ms  max {n} ms", r"int8 artifact: {n} bytes")


@pytest.mark.slow
def test_demo_latency(monkeypatch, capsys):
    out = run_benchmark("demo_latency", ["--keystrokes", "20"], monkeypatch, capsys)
    assert_prints(out, r"{n} keystrokes through the web demo's HTTP API",
                  r"latency per keystroke: p50 {n} ms  p95 {n} ms  p99 {n} ms")


@pytest.mark.slow
def test_ingest(monkeypatch, capsys):
    out = run_benchmark("ingest", ["--updates", "4", "--concurrency", "2"], monkeypatch, capsys)
    assert_prints(out, r"small round: 1 updates of {n} bytes accepted in {n} s = {n} updates/s; aggregator peak "
                       r"memory {n} MB", r"large round: 4 updates of", r"memory {n} MB for 3 more updates")


@pytest.mark.slow
def test_train_speed(monkeypatch, capsys):
    out = run_benchmark("train_speed", ["--seconds", "0.2", "--workers", "1", "--phone-updates", "1",
                                        "--step-split", "2"], monkeypatch, capsys)
    assert_prints(out, r"fp32 matmul {n} GFLOP/s", r"one phone on {n} threads: {n} tokens/s = {n} GFLOP/s = {n}% of",
                  r"1 phones side by side, one thread each \({n}\): {n} tokens/s",
                  r"one training step .*: {n} ms CPU = embedding \+ input gates {n} ms \({n}%\), recurrence {n} ms",
                  r"output layer \+ loss {n} ms \({n}%\), clip \+ optimiser step {n} ms",
                  r"mean {n} s, median {n} s, max {n} s per phone-update",
                  r"CPU-s per phone by part: load from bytes {n}, reset from the worker's copy {n}, score {n}, "
                  r"train {n}, encode {n}")


def test_eval_share(monkeypatch, capsys):
    out = run_benchmark("eval_share", ["--phones", "4", "--train-phones", "1", "--per-round", "2", "--rounds", "20"],
                        monkeypatch, capsys)
    assert_prints(out, r"4 phones scored: top-1 {n}% over {n} predictions, {n} a phone; scoring {n} CPU-s a phone",
                  r"share 0.3: {n} asked, {n} predictions a round \({n}% of rounds score any\); top-1 off the "
                  r"population's by {n}% a round \(rms\), {n}% over ten rounds; saves {n} CPU-s a phone")


@pytest.mark.slow
def test_scale(tmp_path, monkeypatch, capsys):
    out = run_benchmark("scale", ["--sizes", "2", "--repeats", "1", "--vectorised-threads", "1", "--out",
                                  str(tmp_path)], monkeypatch, capsys)
    assert_prints(out, r"local +cpu +2 +{n} +{n} +{n} +{n}%", r"vectorised +cpu x1 +2 +{n} +{n}",
                  r"2 phones: the executors' per-phone mean losses differ by at most {n}")


@pytest.mark.slow
def test_vs_peers(tmp_path, monkeypatch, capsys):
    """This project's side always; Flower's and pfl's where `bash dev.sh peers` made their environments."""
    peers = [peer for peer in ("flower", "pfl")
             if (BENCHMARKS.parent / ".venv-peers" / peer / "bin" / "python").exists()]
    out = run_benchmark("vs_peers", ["--per-round", "2", "--rounds", "1", "--repeats", "1", "--phones", "20",
                                     "--only", "ours", *peers, "--out", str(tmp_path)], monkeypatch, capsys)
    assert_prints(out, r"2 a round, run 1: fedkeyboard +{n} updates .* = +{n} updates/s, {n} CPU-s/update",
                  r"fedkeyboard this tree +2 +{n} +{n} +{n}",
                  *[rf"2 a round: ours / {label}: {{n}}x the updates/s, {{n}}x the CPU per update"
                    for peer, label in (("flower", "Flower"), ("pfl", "pfl-research")) if peer in peers])


@pytest.mark.slow
def test_fleet(tmp_path, monkeypatch, capsys):
    out = run_benchmark("fleet", ["--phones", "20", "--per-round", "3", "--rounds", "1", "--warm-up", "0",
                                  "--modes", "service", "--out", str(tmp_path)], monkeypatch, capsys)
    assert_prints(out, r"service: 1 rounds of 3 in {n} s = {n} rounds/hour, {n} updates/s; per round {n} MB up",
                  r"framework overhead {n}%", r"a round's wall time: .*training {n} s",
                  r"aggregator memory after each measured round: {n} MB; peak {n} MB")


@pytest.mark.slow
def test_secagg(tmp_path, monkeypatch, capsys):
    out = run_benchmark("secagg", ["--cohort", "5", "--goal", "3", "--rounds", "1", "--phones", "20",
                                   "--out", str(tmp_path)], monkeypatch, capsys)
    assert_prints(out, r"protocol, cohort 5 \(graph degree {n}, threshold {n}\), goal 3",
                  r"per phone: shares {n} ms, masking {n} ms, signing the survivors {n} ms, revealing {n} ms",
                  r"server: unmasking the sum with 2 phones dropped after sharing: {n} s",
                  r"bytes up per reporting phone: {n} MB", r"secure aggregation: +{n} s per round",
                  r"wall time {n}x")


@pytest.mark.slow
def test_quality(tmp_path, tiny_run, monkeypatch, capsys):
    out = run_benchmark("quality", ["--federated-run", str(tiny_run), "--out", str(tmp_path), "--server-epochs",
                                    "1", "--oracle-epochs", "1", "--keystrokes", "20"], monkeypatch, capsys)
    assert_prints(out, r"\| n-gram \(KN trigram, proxy\) \| {n}% \| {n}% \| {n} \|",
                  r"\| server CIFG \(proxy\) \| {n}%", r"\| centralised oracle \(CIFG\) \| {n}%",
                  r"\| federated CIFG, int8 artifact \| {n}% \| {n}%",
                  r"\| federated CIFG \| {n}% \| {n}% \| {n}% \| {n} ms \| {n} ms \| {n} ms \| {n} bytes",
                  r"federated / n-gram top-1: {n}", r"int8 artifact: {n} bytes \(target <= 1.6 MB\); top-1 {n}")


@pytest.mark.slow
def test_privacy(tmp_path, monkeypatch, capsys):
    out = run_benchmark("privacy", ["--rounds", "1", "--phones", "30", "--noise", "0.1", "--mechanisms", "fedavg",
                                    "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--workers",
                                    "1", "--eval-phones", "4", *TINY_MODEL], monkeypatch, capsys)
    assert_prints(out, r"no differential privacy: top-1 {n}%", r"DP-FedAvg z_sim 0.1: top-1 {n}%",
                  r"\| 0.1 \| DP-FedAvg \| {n} \| {n}% \| {n}% \|.*\| {n} \({n}\) \|",
                  r"## Recommendation")
    assert (tmp_path / "docs" / "privacy.md").exists()


@pytest.mark.slow
def test_switches(tmp_path, monkeypatch, capsys):
    out = run_benchmark("switches", ["--time-budget", "2", "--only", "plain", "--out", str(tmp_path), "--phones",
                                     "12", "--clients-per-round", "3", "--in-process", "--workers", "1",
                                     *TINY_MODEL], monkeypatch, capsys)
    assert_prints(out, r"\| plain \| {n} \({n}\) \| {n} \| {n} MB \| {n} MB \| {n}% \|")


@pytest.mark.slow
def test_secure_run(tmp_path, monkeypatch, capsys):
    out = run_benchmark("secure_run", ["--time-budget", "2", "--out", str(tmp_path), "--phones", "12",
                                       "--clients-per-round", "3", "--in-process", "--workers", "1", *TINY_MODEL],
                        monkeypatch, capsys)
    assert_prints(out, r"{n} secure rounds in 2 s of rounds: {n} closed, {n} failed",
                  r"verdict: (none failed while the threshold survived|{n} round\(s\) failed while)")


def test_int8_downloads(shakespeare, monkeypatch, capsys):
    out = run_benchmark("int8_downloads", ["--tiny", "--seeds", "0", "1", "--rounds", "1", "--per-round", "2",
                                           "--held-out", "50", "--control"], monkeypatch, capsys)
    assert_prints(out, r"\| 1 \| {n} \| {n} \| {n} \| {n}% \| {n} / {n} \| {n} \|",
                  r"int8 - float32, points: mean {n}, std {n}, 95% paired t interval \[{n}, {n}\]",
                  r"control - float32, points: mean {n}", r"float32 across seeds: mean {n}, std {n}")


@pytest.mark.slow
def test_upload_cost(monkeypatch, capsys):
    out = run_benchmark("upload_cost", ["--uploads", "2", "--phones", "1", "--dp-rounds", "2", "--min-separation", "1",
                                        "--commits", "2"], monkeypatch, capsys)
    assert_prints(out, r"train_local: {n} CPU-s per phone", r"upload, plain: {n} CPU-ms per upload",
                  r"upload, private \(clipped\): {n} CPU-ms per upload", r"DP-FTRL release: {n} CPU-s per round",
                  r"a phone's ring encoding: {n} CPU-s", r"a round's commit \(model and server momentum\): {n} ms wall")


@pytest.mark.slow
def test_soak(tmp_path, monkeypatch, capsys):
    out = run_benchmark("soak", ["--minutes", "0.2", "--kill-every", "0.06", "--out", str(tmp_path), "--phones", "24",
                                 "--clients-per-round", "3", "--dp-mechanism", "fedavg", "--workers", "1",
                                 *TINY_MODEL], monkeypatch, capsys)
    # At this size, and on a loaded machine, lying and vanishing phones may leave no round to close.
    assert_prints(out, r"0.2 minutes: {n} rounds, {n} closed, {n} failed; the aggregator was killed [1-9]\d* times",
                  r"largest released update norm: ({n}|none \(no round closed\)) \(bound: --max-update-norm 20\)",
                  r"clip norm: ({n} to {n}|none) over the closed rounds",
                  r"aggregator RSS before each kill \(MB\): {n}",
                  r"lying phone phone-\d+ \(impossible counts\)", r"lying phone phone-\d+ \(an all-zero key\)",
                  r"verdict: ", r"database whole: rounds 1\.\.\d+ without a gap")


def test_robust(monkeypatch, capsys):
    out = run_benchmark("robust", ["--phones", "5", "--poisoning", "0", "1"], monkeypatch, capsys)
    assert_prints(out, r"5 phones a round, honest updates of norm {n}", r"\| rule \| 0 poisoning \| 1 poisoning \|",
                  r"\| mean \| {n} \| {n} \|", r"\| median \| {n} \| {n} \|", r"\| trimmed_mean \| {n} \| {n} \|")


@pytest.mark.slow
def test_audit(tmp_path, monkeypatch, capsys):
    out = run_benchmark("audit", ["--rounds", "2", "--phones", "12", "--canaries", "3", "--canary-clients", "4",
                                  "--settings", "DP-FedAvg z=1", "--out", str(tmp_path / "runs"), "--docs",
                                  str(tmp_path / "docs"), "--workers", "1", "--eval-phones", "4", "--clients-per-round",
                                  "3", *TINY_MODEL],
                        monkeypatch, capsys)
    # Proven, empirical (interval) and lower-bound epsilon; exposure at 1, 4 and 16 copies and never typed; the
    # suggestion rate, the recall, and the rounds that closed.
    row = (r"\| DP-FedAvg z=1 \| SECURE \| {n} \| {n} \({n}–{n}\) \| {n} \| " + r"{n} bits \| " * 4
           + r"{n}% \| {n}% \| 2/2 \|")
    assert_prints(out, row.replace("SECURE", "no"), row.replace("SECURE", "yes"))
    assert "typed 16x" in (tmp_path / "docs" / "audit-table.md").read_text()


@pytest.mark.slow
def test_new_words(tiny_run, monkeypatch, capsys):
    # The tiny run stands in for both runs: the smoke test checks what is printed, not what discovery finds.
    out = run_benchmark("new_words", [str(tiny_run), "--discovered", str(tiny_run), "--epsilons", "8",
                                      "--k", "2", "--repeats", "1"], monkeypatch, capsys)
    assert_prints(out, r"12 phones; unknown words typed by at least k phones: k=2: {n}",
                  r" 8\.00 +{n} +10 +{n} +{n} +{n} +{n} +0\n", r"<unk> share",
                  r" +{n} +{n}% +{n}% +{n}%\n")


@pytest.mark.slow
def test_personal(tiny_run, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="fedkb simulate"):
        run_benchmark("personal", [], monkeypatch, capsys)
    out = run_benchmark("personal", [str(tiny_run), "--phones", "3", "--settings", "all:0.1:1", "bias:1:1"],
                        monkeypatch, capsys)
    row = r"\| SETTING \| {n}% \| {n}% \| {n}% \| {n} pts \| {n} pts \| {n}% → {n}% \| {n} s \|"
    assert_prints(out, r"[1-3] of 3 phones \({n} with no held-out word left out\), {n} held-out positions",
                  row.replace("SETTING", "all:0.1:1"), row.replace("SETTING", "bias:1:1"))
