"""The fleet at scale: thousands of provisioned phones, hundreds per round, on this machine.

Provisions `--phones` phones (more than the corpus has users: phone k replays user
k mod users' history) and runs rounds in both modes, in-process and service (each
phone a real HTTP client of `python -m aggregator` on loopback), plain or with secure
aggregation (`--secure off|on|both`). For each it prints rounds per hour, updates per
second, bytes per round, where a round's wall time goes (device_sim/fleet.py's
activities: check-ins, downloads, training, uploads, secure steps, clock ticks), the
aggregator's memory after every measured round (service mode; Linux's /proc), and the
framework's overhead: the share of a round's wall time in which the training workers
were not doing phones' local work (everything but the phones' own evaluation and
training: check-ins, eligibility, downloads, uploads, aggregation, waiting).

    .venv/bin/python benchmarks/fleet.py [--phones 10000] [--per-round 100] [--rounds 4]
    .venv/bin/python benchmarks/fleet.py --phones 100000 --per-round 500 --rounds 3 --warm-up 2 \\
        --modes service --secure both
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.api.client import AggregatorClient
from aggregator.inprocess import InProcessClient
from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import Fleet, FleetConfig, provision
from keyboard_model.model import ModelConfig

TARGETS = {"in-process": 0.15, "service": 0.30}


@dataclass
class ModeResult:
    mode: str
    rounds: int
    wall_s: float
    training_s: float
    workers: int
    updates: int
    bytes_up: int
    bytes_down: int
    checkins_per_round: float
    wall_by_activity: Counter = field(default_factory=Counter)
    # The aggregator's resident memory after each measured round, and its peak (MB; service mode only).
    memory_mb: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    # Phones told they were late, and the workers' seconds spent training those of them whose work was computed anyway.
    late: int = 0
    late_training_s: float = 0.0

    @property
    def overhead(self) -> float:
        return 1.0 - self.training_s / (self.workers * self.wall_s)


def memory_mb(pid: int, field_name: str) -> float:
    """A process's resident memory (VmRSS) or its peak (VmHWM), in MB, from Linux's /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field_name}")


def run_mode(mode: str, secure: bool, corpus, phones, args) -> ModeResult:
    name = f"{mode}{' secure' if secure else ''}"
    workdir = args.out / name.replace(" ", "-")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = local_aggregator_config(
        workdir, corpus.tokenizer_path, model=ModelConfig(vocab_size=corpus.tokenizer().vocab_size),
        clients_per_round=args.per_round, round_deadline_s=3600.0, simulated_clock=True, secure_aggregation=secure,
    )
    with ExitStack() as stack:
        pid = None
        if mode == "service":
            service = stack.enter_context(LocalAggregator(config))
            client, pid = AggregatorClient(service.url, operator_token=config.operator_token), service.process.pid
        else:
            client = InProcessClient(config)
        fleet = Fleet(phones, FleetConfig(phones_dir=args.out / "phones", seed=args.seed), client)
        stack.callback(fleet.close)
        for number in range(args.warm_up):  # worker processes start, phones enrol, pace steering settles
            report = fleet.run_round()
            print(f"  {name}: warm-up round {number + 1} of {args.warm_up}, {report.checkins:,} check-ins", flush=True)
        started, reports, memory = time.perf_counter(), [], []
        for number in range(args.rounds):
            reports.append(fleet.run_round())
            if pid is not None:
                memory.append(memory_mb(pid, "VmRSS"))
            print(f"  {name}: measured round {number + 1} of {args.rounds}, "
                  f"{time.perf_counter() - started:.0f} s so far", flush=True)
        wall = time.perf_counter() - started
        measured = {report.round for report in reports}
        summaries = [s for s in client.status().recent_rounds if s.round in measured]
        failed = [s.round for s in summaries if s.status != "closed"]
        if failed:
            print(f"  {name}: rounds {failed} did not close")
        return ModeResult(
            name, args.rounds, wall, sum(r.training_s for r in reports), fleet.executor.workers,
            sum(len(r.participants) for r in reports), sum(s.bytes_up for s in summaries),
            sum(s.bytes_down for s in summaries), sum(r.checkins for r in reports) / args.rounds,
            sum((Counter(r.wall_s) for r in reports), Counter()), memory,
            memory_mb(pid, "VmHWM") if pid is not None else None,
            sum(r.count("late") for r in reports),
            sum(p.training_s for r in reports for p in r.participations if p.outcome == "late"),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=100, help="the round's goal (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per mode (default: %(default)s)")
    parser.add_argument("--warm-up", type=int, default=1,
                        help="rounds before measuring: workers start, phones enrol, pace steering spreads the "
                             "population's check-ins (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=sorted(TARGETS), default=["in-process", "service"])
    parser.add_argument("--secure", choices=("off", "on", "both"), default="off",
                        help="run plain rounds, rounds with secure aggregation, or both (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/fleet-benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = prepare(CorpusConfig())
    started = time.perf_counter()
    phones = provision(corpus, args.out / "phones", args.phones, args.seed)
    print(f"{len(phones):,} phones provisioned (or reused) in {time.perf_counter() - started:.0f} s")
    secure_settings = {"off": [False], "on": [True], "both": [False, True]}[args.secure]
    results = {}
    for mode in args.modes:
        for secure in secure_settings:
            results[mode, secure] = result = run_mode(mode, secure, corpus, phones, args)
            report(result, args.per_round)
    for mode in args.modes:
        if (mode, False) in results and (mode, True) in results:
            ratio = results[mode, True].wall_s / results[mode, False].wall_s
            print(f"{mode}: a secure round takes {ratio:.2f}x a plain one (target <= 2x: "
                  f"{'met' if ratio <= 2.0 else 'NOT met'})")


def report(result: ModeResult, per_round: int) -> None:
    mode = result.mode.split()[0]
    print(f"{result.mode}: {result.rounds} rounds of {per_round} in {result.wall_s:.1f} s = "
          f"{3600 * result.rounds / result.wall_s:.0f} rounds/hour, {result.updates / result.wall_s:.1f} updates/s; "
          f"per round {result.bytes_up / result.rounds / 1e6:.1f} MB up, "
          f"{result.bytes_down / result.rounds / 1e6:.1f} MB "
          f"down, {result.checkins_per_round:.0f} check-ins")
    print(f"  {result.workers} training workers busy {result.training_s:.1f} s "
          f"of {result.workers * result.wall_s:.1f} s: "
          f"framework overhead {result.overhead:.0%} (target <= {TARGETS[mode]:.0%}: "
          f"{'met' if result.overhead <= TARGETS[mode] else 'NOT met'})")
    print(f"  {result.late} phones late, {result.late_training_s:.1f} workers' seconds spent training them in vain")
    per_round_s = {k: v / result.rounds for k, v in result.wall_by_activity.most_common()}
    print("  a round's wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in per_round_s.items()))
    if result.memory_mb:
        print("  aggregator memory after each measured round: "
              + ", ".join(f"{m:.0f}" for m in result.memory_mb) + f" MB; peak {result.peak_memory_mb:.0f} MB")


if __name__ == "__main__":
    main()
