"""Secure rounds of the main job's fleet: how many close, and why each failed one failed.

Runs the main job with secure aggregation (`fedkb up --no-demo --secure-aggregation`: the default fleet of 621
phones, 10 a round, the aggregator a service on loopback on the simulator's clock) for `--time-budget` seconds of
rounds, then reads the aggregator's record of every round (its SQLite database) beside the fleet's (metrics.jsonl)
and prints rounds closed and failed, and every failed round with its cause and the phones that survived it against
the phones it needed. A secure round should fail only when fewer than it needs survive; the last line says whether
that held.

- Survived: the fleet's count (`survived` in metrics.jsonl) of the round's selected phones still in it when it
  ended, not vanished (lost their network), aborted (their conditions changed), diverged or refused. A phone still
  training when the round failed survived: a round that ends before its phones could train is the round's fault.
  But once collection has closed with enough masked inputs, a phone whose input comes after it (late) is out of
  the round, as over-selection means it to be.
- Needed: three, the round's minimum of reports (`--min-report-fraction` of the goal), and a secret's threshold
  plus one for a cohort as small as the survivors (keyboard_model/secagg/graph.py).
- Besides, phones reveal shares only when more than half of each phone that shared and its neighbours confirmed
  the survivors (their check against a lying server); a round failed for want of that majority says so ("no
  majority") and is counted apart: the price of that check, not a fault.

    .venv/bin/python benchmarks/secure_run.py [--time-budget 300] [--out runs/secure-run] [FEDKB UP OPTIONS ...]

Other options go to `fedkb up` as they are (the smoke test's tiny run: `--phones 24 --clients-per-round 3
--in-process ...`). A finished run in --out is read again rather than rerun. The simulation's rounds do not depend
on the machine's speed (its clock is simulated), only how many fit into the budget does.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from keyboard_model.secagg import graph_parameters


@dataclass(frozen=True)
class FailedRound:
    number: int
    cause: str
    selected: int
    reported: int
    late: int
    survived: int
    needed: int

    @classmethod
    def of(cls, record: dict, survived: int, min_report_fraction: float) -> FailedRound:
        """A failed round from the aggregator's `record` and the fleet's count of its phones still in it."""
        need = needed(survived, record["goal"], min_report_fraction)
        if record["reported"] >= need:  # collection closed with enough: the late phones were left out, as meant
            survived -= record["late"]
            need = needed(survived, record["goal"], min_report_fraction)
        return cls(record["round"], record["failure"] or "", record["selected"], record["reported"], record["late"],
                   survived, need)

    @property
    def enough_survived(self) -> bool:
        return self.survived >= self.needed

    @property
    def no_majority(self) -> bool:
        """It failed because no majority confirmed around some phone (aggregator/secure_aggregation.py)."""
        return "no majority" in self.cause

    def __str__(self) -> str:
        flag = ("" if not self.enough_survived else "  <- no majority confirmed" if self.no_majority
                else "  <- FAILED WHILE ENOUGH SURVIVED")
        return (f"- round {self.number}: {self.cause}\n  {self.survived} of {self.selected} selected survived "
                f"({self.reported} reported, {self.late} late); it needed {self.needed}{flag}")


def verdict(failed: list[FailedRound]) -> str:
    """Whether any round failed while enough phones survived; and those that failed for want of a majority."""
    offenders = [f.number for f in failed if f.enough_survived and not f.no_majority]
    unconfirmed = [f.number for f in failed if f.enough_survived and f.no_majority]
    line = (f"verdict: {len(offenders)} round(s) failed while the threshold survived: {', '.join(map(str, offenders))}"
            if offenders else "verdict: none failed while the threshold survived")
    if unconfirmed:
        line += (f"; {len(unconfirmed)} failed with the threshold alive but no majority confirming around some phone "
                 f"(the check against a lying server): {', '.join(map(str, unconfirmed))}")
    return line


def run_main_job(out: Path, budget: float, extra: list[str]) -> None:
    """`fedkb up --no-demo --secure-aggregation` into `out`, unless a finished run is there."""
    if (out / "summary.json").exists():
        print(f"reading the finished run in {out}", flush=True)
        return
    command = [sys.executable, "-m", "fedkb", "up", "--no-demo", "--no-progress", "--secure-aggregation",
               "--time-budget", str(budget), "--out", str(out), *extra]
    print(" ".join(["fedkb", *command[3:]]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def needed(survived: int, goal: int, min_report_fraction: float) -> int:
    """The fewest phones a secure round with `survived` of them left needs, at the least (its cohort may have been
    larger, and so its threshold)."""
    minimum = max(3, math.ceil(goal * min_report_fraction))
    return minimum if survived < 2 else max(minimum, graph_parameters(survived).threshold + 1)


def server_rounds(db_path: Path) -> list[dict]:
    """The aggregator's record of every round, read-only."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT round, status, failure, goal, selected, reported, late FROM "
                                                "rounds ORDER BY round")]


def failed_rounds(out: Path) -> tuple[list[dict], list[FailedRound]]:
    """(every round the aggregator recorded, the failed ones with who survived them)."""
    options = tomllib.loads((out / "run.toml").read_text())
    fleet = {line["round"]: line for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    rounds = server_rounds(out / "aggregator.sqlite")
    failed = []
    for record in (r for r in rounds if r["status"] == "failed"):
        survived = fleet.get(record["round"], {}).get("survived")
        if survived is None:  # a line recovered from the aggregator's record after an interruption, or none
            raise SystemExit(f"the fleet did not see round {record['round']} end: who survived it is unknown")
        failed.append(FailedRound.of(record, survived, options["min_report_fraction"]))
    return rounds, failed


def report(rounds: list[dict], failed: list[FailedRound], budget: float) -> None:
    closed = sum(r["status"] == "closed" for r in rounds)
    print(f"\n{len(rounds)} secure rounds in {budget:g} s of rounds: {closed} closed, {len(failed)} failed")
    for f in failed:
        print(f)
    print(verdict(failed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds of rounds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/secure-run/<budget>s)")
    args, extra = parser.parse_known_args(argv)
    out = args.out or Path("runs/secure-run") / f"{args.time_budget:g}s"
    run_main_job(out, args.time_budget, extra)
    report(*failed_rounds(out), args.time_budget)


if __name__ == "__main__":
    main()
