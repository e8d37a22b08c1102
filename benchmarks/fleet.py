"""The fleet at scale: thousands of provisioned phones, a hundred or more per round, on this machine.

Provisions `--phones` phones (more than the corpus has users: phone k replays user
k mod users' history) and runs rounds in both modes, in-process and service (each
phone a real HTTP client of `python -m aggregator` on loopback). For each mode it
prints rounds per hour, updates per second, bytes per round, and the framework's
overhead: the share of a round's wall time in which the training workers were not
doing phones' local work (everything but the phones' own evaluation and training: check-ins,
eligibility, downloads, uploads, aggregation, waiting).

    .venv/bin/python benchmarks/fleet.py [--phones 10000] [--per-round 100] [--rounds 4]
"""

from __future__ import annotations

import argparse
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from aggregator.process import LocalAggregator, local_aggregator_config
from aggregator.api.client import AggregatorClient
from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import Fleet, FleetConfig, provision
from aggregator.inprocess import InProcessClient
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

    @property
    def overhead(self) -> float:
        return 1.0 - self.training_s / (self.workers * self.wall_s)


def run_mode(mode: str, corpus, phones, args) -> ModeResult:
    workdir = args.out / mode
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = local_aggregator_config(
        workdir, corpus.tokenizer_path, model=ModelConfig(vocab_size=corpus.tokenizer().vocab_size),
        clients_per_round=args.per_round, round_deadline_s=3600.0, simulated_clock=True,
    )
    with ExitStack() as stack:
        if mode == "service":
            client = AggregatorClient(stack.enter_context(LocalAggregator(config)).url,
                                      operator_token=config.operator_token)
        else:
            client = InProcessClient(config)
        fleet = Fleet(phones, FleetConfig(phones_dir=args.out / "phones", seed=args.seed), client)
        stack.callback(fleet.close)
        fleet.run_round()  # warm-up: worker processes start, phones enrol
        started = time.perf_counter()
        reports = [fleet.run_round() for _ in range(args.rounds)]
        wall = time.perf_counter() - started
        measured = {report.round for report in reports}
        summaries = [s for s in client.status().recent_rounds if s.round in measured]
        return ModeResult(
            mode, args.rounds, wall, sum(r.training_s for r in reports), fleet.executor.workers,
            sum(len(r.participants) for r in reports), sum(s.bytes_up for s in summaries),
            sum(s.bytes_down for s in summaries), sum(r.checkins for r in reports) / args.rounds,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=100, help="the round's goal (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per mode, after one warm-up")
    parser.add_argument("--modes", nargs="+", choices=sorted(TARGETS), default=["in-process", "service"])
    parser.add_argument("--out", type=Path, default=Path("runs/fleet-benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = prepare(CorpusConfig())
    started = time.perf_counter()
    phones = provision(corpus, args.out / "phones", args.phones, args.seed)
    print(f"{len(phones):,} phones provisioned (or reused) in {time.perf_counter() - started:.0f} s")
    for mode in args.modes:
        result = run_mode(mode, corpus, phones, args)
        print(f"{mode}: {result.rounds} rounds of {args.per_round} in {result.wall_s:.1f} s = "
              f"{3600 * result.rounds / result.wall_s:.0f} rounds/hour, {result.updates / result.wall_s:.1f} updates/s; "
              f"per round {result.bytes_up / result.rounds / 1e6:.1f} MB up, {result.bytes_down / result.rounds / 1e6:.1f} MB "
              f"down, {result.checkins_per_round:.0f} check-ins")
        print(f"  {result.workers} training workers busy {result.training_s:.1f} s of {result.workers * result.wall_s:.1f} s: "
              f"framework overhead {result.overhead:.0%} (target <= {TARGETS[mode]:.0%}: "
              f"{'met' if result.overhead <= TARGETS[mode] else 'NOT met'})")


if __name__ == "__main__":
    main()
