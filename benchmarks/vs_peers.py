"""This project against Flower and pfl-research on the same phones' work, same machine, interleaved.

Three ways to run the same rounds of federated averaging over the same phones:
- ours: the simulated fleet with its in-process aggregator on the local process pool, as `fedkb simulate
  --in-process` runs it (benchmarks/peers/ours_driver.py). The fleet picks its phones (check-ins, selection; some
  vanish, abort or come late: their work is its cost); the phones whose updates each round counted become the
  schedule the peers then follow;
- Flower: a ClientApp and a ServerApp (FedAvg) on Flower's Ray simulation (benchmarks/peers/flower_driver.py);
- pfl: pfl-research's SimulatedBackend with its PyTorch model and FedAvg, under torchrun with one process per worker
  (benchmarks/peers/pfl_driver.py).
Every phone's work is the same: this project's model, the phone's history from the default corpus, and the phone's
whole local work (scoring the downloaded model on held-out messages, `train_local`, the guard, the int8 encoding;
device_sim/session.py); each framework moves the model and the update its own way and averages them itself. Each
runs one unmeasured warm-up round, then `--rounds` measured ones, in a process of its own (the peers in their own
environments, made by `bash dev.sh peers`), one worker per core. The runs go ours, Flower, pfl, ours, Flower, pfl...
so that load from elsewhere falls on each alike.

Printed per run and, summed over the repeats, per framework and phones a round: phone-updates per second (wall) and
CPU seconds per update (user and system of the framework's whole process tree over the measured rounds: workers,
Ray, torchrun's ranks), with the ratios ours / Flower and ours / pfl (updates/s: above 1 is faster; CPU per update:
below 1 is cheaper), and the load average.

    .venv/bin/python benchmarks/vs_peers.py [--per-round 10 100] [--rounds 3] [--repeats 2] [--only ours flower pfl]
        [--phones 1000] [--workers N] [--out /tmp/fedkb-vs-peers]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import provision

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = ROOT / "benchmarks" / "peers"
FRAMEWORKS = ("ours", "flower", "pfl")
LABELS = {"ours": "fedkeyboard", "flower": "Flower", "pfl": "pfl-research"}


@dataclass(frozen=True)
class Run:
    framework: str
    per_round: int
    updates: int
    wall_s: float
    cpu_s: float
    version: str


def python_of(framework: str) -> Path:
    """The interpreter a framework's driver runs with: this one for ours, the peer's environment's for a peer."""
    return Path(sys.executable) if framework == "ours" else ROOT / ".venv-peers" / framework / "bin" / "python"


def command(framework: str, workers: int, job: Path) -> list[str]:
    python, driver = (str(python_of(framework)),
                      str(DRIVERS / f"{'ours' if framework == 'ours' else framework}_driver.py"))
    if framework == "pfl" and workers > 1:
        # pfl's way to use several processes; --standalone keeps the rendezvous on this machine.
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}", driver, str(job)]
    return [python, driver, str(job)]


def run_driver(framework: str, job: dict, workers: int, folder: Path, timeout_s: float) -> dict:
    """Run a framework's driver on `job`, stopped after `timeout_s`; its one JSON line. Its log goes to
    `folder`/<framework>.log."""
    folder.mkdir(parents=True, exist_ok=True)
    job_path, log_path = folder / f"{framework}-job.json", folder / f"{framework}.log"
    job_path.write_text(json.dumps(job))
    # gloo (pfl's torch.distributed) on the loopback interface only.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    with log_path.open("w") as log:
        # A session of its own, so that a driver that hangs, or is interrupted by Ctrl-C here, is stopped with
        # everything it started (pool workers, Ray, torchrun's ranks).
        driver = subprocess.Popen(command(framework, workers, job_path), stdout=subprocess.PIPE, stderr=log, text=True,
                                  env=env, cwd=ROOT, start_new_session=True)
        try:
            stdout, _ = driver.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            stdout, _ = driver.communicate()
        except BaseException:
            os.killpg(driver.pid, signal.SIGKILL)
            raise
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if driver.returncode != 0 or not lines:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{LABELS[framework]} failed (exit {driver.returncode}); the end of {log_path}:\n{tail}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-round", type=int, nargs="+", default=[10, 100], help="phones a round (default: 10 100)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each framework per size (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS),
                        help="frameworks to run (default: all; the peers follow ours' phones, so ours always runs)")
    parser.add_argument("--phones", type=int, default=1000, help="phones in the fleet (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="training workers of each framework (default: one per core, %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedkb-vs-peers"))
    args = parser.parse_args()

    peers = []
    for framework in ("flower", "pfl"):
        if framework not in args.only:
            continue
        if python_of(framework).exists():
            peers.append(framework)
        else:
            print(f"{LABELS[framework]}: no environment at {python_of(framework).parent.parent}; make it with "
                  f"`bash dev.sh peers`. Running the rest.")
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    phones_dir = args.out / f"phones-{args.phones}"
    provision(corpus, phones_dir, args.phones, seed=0)
    print(f"machine: {os.cpu_count()} cores, {args.workers} workers per framework; {args.phones} phones of the default "
          f"corpus; {args.rounds} measured rounds per run after one warm-up; load average {os.getloadavg()[0]:.1f}",
          flush=True)

    runs: list[Run] = []
    for per_round in args.per_round:
        for repeat in range(args.repeats):
            folder = args.out / f"{per_round}-a-round-{repeat}"
            ours = run_driver("ours", {"phones_dir": str(phones_dir), "tokenizer_path": str(corpus.tokenizer_path),
                                       "per_round": per_round, "rounds": args.rounds, "workers": args.workers,
                                       "seed": repeat, "workdir": str(folder / "aggregator")}, args.workers, folder,
                              args.timeout)
            results = {"ours": ours}
            job = {"phones_dir": str(phones_dir), "tokenizer_path": str(corpus.tokenizer_path),
                   "workers": args.workers, "rounds": ours["schedule"]}
            for framework in peers:
                results[framework] = run_driver(framework, job, args.workers, folder, args.timeout)
            for framework, result in results.items():
                run = Run(framework, per_round, result["updates"], result["wall_s"], result["cpu_s"], result["version"])
                runs.append(run)
                extra = f" ({result['trained']} phones trained)" if framework == "ours" else ""
                print(f"  {per_round} a round, run {repeat + 1}: {LABELS[framework]:<13}{run.updates:>5} updates"
                      f"{extra} in {run.wall_s:7.1f} s = {run.updates / run.wall_s:6.2f} updates/s, "
                      f"{run.cpu_s / run.updates:.3f} CPU-s/update; load {os.getloadavg()[0]:.1f}", flush=True)
    summarise(runs, args.per_round)


def summarise(runs: list[Run], sizes: list[int]) -> None:
    print(f"\nload average at the end: {' '.join(f'{load:.1f}' for load in os.getloadavg())}")
    print(f"{'framework':<24}{'a round':>8}{'updates':>9}{'updates/s':>11}{'CPU-s/update':>14}")
    totals: dict[tuple[str, int], tuple[float, float]] = {}
    for framework in FRAMEWORKS:
        for size in sizes:
            mine = [run for run in runs if (run.framework, run.per_round) == (framework, size)]
            if not mine:
                continue
            updates = sum(run.updates for run in mine)
            rate, cpu = updates / sum(run.wall_s for run in mine), sum(run.cpu_s for run in mine) / updates
            totals[framework, size] = rate, cpu
            print(f"{LABELS[framework] + ' ' + mine[0].version:<24}{size:>8}{updates:>9}{rate:>11.2f}{cpu:>14.3f}")
    for peer in ("flower", "pfl"):
        for size in sizes:
            if (peer, size) in totals:
                (rate, cpu), (peer_rate, peer_cpu) = totals["ours", size], totals[peer, size]
                print(f"{size} a round: ours / {LABELS[peer]}: {rate / peer_rate:.2f}x the updates/s, "
                      f"{cpu / peer_cpu:.2f}x the CPU per update")


if __name__ == "__main__":
    main()
