"""What each privacy switch costs the main job: rounds per hour, bytes up, and what it spends.

Runs the main job (`fedkb up --no-demo`: the default fleet of 621 phones, 10 per round,
the aggregator as a service on loopback) once per setting, each for the same time
budget, and prints one row per setting: rounds closed, rounds per hour (rounds over the
budget), bytes up per round and per phone update (the aggregator's count of accepted
uploads and secure-aggregation messages), top-1 on every held-out position, and the epsilon
and rho the aggregator reported after the last round.

    .venv/bin/python benchmarks/switches.py [--time-budget 540] [--noise-multiplier 0.1] [--only NAME ...]
        [FEDKB UP OPTIONS ...]

The default budget is the main job's own (540 s), so the epsilon and rho printed are those at the end of the
default run with each mechanism. Timing: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "plain": [],
    "secure aggregation": ["--secure-aggregation"],
    "DP-FedAvg": ["--noise-multiplier", "{z}"],
    "DP-FTRL": ["--noise-multiplier", "{z}", "--dp-mechanism", "ftrl"],
    "DP-FTRL, adaptive clip": ["--noise-multiplier", "{z}", "--dp-mechanism", "ftrl", "--clip-quantile", "0.5"],
    "DP-FTRL, adaptive clip, secure": ["--noise-multiplier", "{z}", "--dp-mechanism", "ftrl", "--clip-quantile", "0.5",
                                       "--secure-aggregation"],
}


def run(name: str, flags: list[str], out: Path, budget: float, extra: list[str]) -> dict:
    """Run (or reuse) the main job with `flags`; returns its row."""
    if not (out / "summary.json").exists():
        command = [sys.executable, "-m", "fedkb", "up", "--no-demo", "--no-progress", "--time-budget", str(budget),
                   "--out", str(out), *flags, *extra]
        print(f"{name}: {' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    closed = [line for line in lines if line["status"] == "closed"]
    updates = sum(line["reported"] for line in closed)
    bytes_up = sum(line["bytes_up"] for line in closed)
    last = closed[-1] if closed else {}
    return {"name": name, "rounds": len(closed), "failed": sum(line["failed"] for line in lines),
            "rounds_per_hour": len(closed) * 3600 / budget, "bytes_per_round": bytes_up / max(len(closed), 1),
            "bytes_per_update": bytes_up / max(updates, 1), "top1": summary["final"]["recall_at_1"],
            "epsilon": last.get("epsilon"), "rho": last.get("rho"), "clip": last.get("dp_clip_norm")}


def shown(value: float | None, form: str) -> str:
    return "—" if value is None else format(value, form)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds of rounds per setting")
    parser.add_argument("--noise-multiplier", type=float, default=0.1)
    parser.add_argument("--only", nargs="+", choices=SETTINGS, default=list(SETTINGS), metavar="NAME")
    parser.add_argument("--out", type=Path, default=Path("runs/switches"))
    args, extra = parser.parse_known_args()  # the rest goes to `fedkb up` (the smoke test's tiny fleet)

    rows = []
    for name in args.only:
        flags = [flag.format(z=args.noise_multiplier) for flag in SETTINGS[name]]
        folder = args.out / f"{name.replace(', ', '-').replace(' ', '-')}-{args.time_budget:g}s"
        rows.append(run(name, flags, folder, args.time_budget, extra))
    print(f"\n{args.time_budget:g} s of rounds each, noise multiplier {args.noise_multiplier} where private:\n")
    print("| setting | rounds (failed) | rounds per hour | bytes up per round | per update | top-1 | ε at δ = 1/621 "
          "| ρ-zCDP | last clip norm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['name']} | {row['rounds']} ({row['failed']}) | {row['rounds_per_hour']:,.0f} | "
              f"{row['bytes_per_round'] / 1e6:.2f} MB | {row['bytes_per_update'] / 1e6:.3f} MB | {row['top1']:.2%} | "
              f"{shown(row['epsilon'], '.3g')} | {shown(row['rho'], '.3g')} | {shown(row['clip'], '.3f')} |")


if __name__ == "__main__":
    main()
