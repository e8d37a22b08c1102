"""What a person's typed secret, and one client, risk under each privacy setting: the empirical audit's table.

Runs the same fleet (`--phones` phones, 10 a round, in process) for `--rounds` rounds without differential privacy,
with DP-FedAvg and with DP-FTRL at two noise multipliers, each without and with secure aggregation, every run with
canary phrases (`--canaries`, typed 1, 4 and 16 times by one phone each: device_sim/canaries.py) and canary clients
(`--canary-clients`: aggregator/canary_clients.py). For each it prints, and writes into
`docs/privacy/audit-table.md`:
the exposure of the secrets by repetitions against never-typed ones, how often the keyboard's first suggestion is a
secret's next word, the canary clients' empirical epsilon with its interval and lower bound, the accountant's
epsilon, and the final top-1 recall. The file is rewritten after every run, so an interrupted benchmark leaves the
rows it has; a run whose folder holds its summary is not run again.

    .venv/bin/python benchmarks/audit.py [--rounds 100] [--phones 100] [--settings NAME ...] [--plain-only]
        [--out DIR] [--docs DIR] [FEDKB SIMULATE OPTIONS ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PER_ROUND = 10
# z = 0.03 still learns at 10 phones a round; z = 1.0 is the noise a private deployment needs, which at 10 a round
# leaves nothing learnt (docs/privacy/privacy.md).
NOISE = (0.03, 1.0)
SETTINGS: dict[str, list[str]] = {
    "no DP": [],
    **{f"DP-FedAvg z={z:g}": ["--noise-multiplier", str(z)] for z in NOISE},
    **{f"DP-FTRL z={z:g}": ["--noise-multiplier", str(z), "--dp-mechanism", "ftrl"] for z in NOISE},
}
REPEATS = (1, 4, 16)
# Every figure at one delta, the accountant's and both audits' (without it, 1 / population: 0.01 for 100 phones, at
# which the one-run lower bound on 100 canaries can prove nothing).
DELTA = 1e-5


def run(out: Path, setting: str, secure: bool, args: argparse.Namespace, extra: list[str]) -> dict:
    """Run (or reuse) one simulation; returns its row of the table."""
    if not (out / "summary.json").exists():
        command = [sys.executable, "-m", "fedkb", "simulate", "--in-process", "--no-progress", "--out", str(out),
                   "--rounds", str(args.rounds), "--phones", str(args.phones), "--clients-per-round", str(PER_ROUND),
                   "--eval-every", str(args.rounds), "--canaries", str(args.canaries),
                   "--canary-repeats", *map(str, REPEATS), "--canary-clients", str(args.canary_clients),
                   "--audit-every", str(args.rounds), "--dp-delta", str(DELTA), *SETTINGS[setting], *extra]
        if "ftrl" in SETTINGS[setting]:
            command += ["--dp-rounds", str(args.rounds), "--min-separation", str(args.min_separation)]
        if secure:
            command.append("--secure-aggregation")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    # The audit of the run's last model (its round may be earlier than the last line's, when the last rounds failed).
    audit = summary["privacy_audit"] or {}
    return {"setting": setting, "secure": secure, "top1": summary["final"]["recall_at_1"],
            "closed": f"{summary['rounds_completed'] - summary['rounds_failed']}/{summary['rounds_completed']}",
            "epsilon": (summary["privacy_spent"] or {}).get("epsilon"),
            "delta": audit.get("audit_delta"),
            "empirical": audit.get("audit_epsilon"), "empirical_low": audit.get("audit_epsilon_low"),
            "empirical_high": audit.get("audit_epsilon_high"), "lower_bound": audit.get("audit_epsilon_lower_bound"),
            "canaries": summary["canaries"]["by_repetitions"],
            "phrase_bound": summary["canaries"]["epsilon_lower_bound"]["epsilon"]}


def shown(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def table(rows: list[dict]) -> list[str]:
    levels = [level["canaries"] for level in rows[0]["canaries"]]
    head = ["setting", "secure agg.", "proven ε", "empirical ε (95% interval)", "lower bound",
            *(f"exposure, {name}" for name in levels), "secret's next word first (16x)", "top-1 recall",
            "rounds closed"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        by_name = {level["canaries"]: level for level in row["canaries"]}
        most = by_name[f"typed {max(REPEATS)}x"]["word_top1_rate"]
        empirical = (f"{shown(row['empirical'])} ({shown(row['empirical_low'])}–{shown(row['empirical_high'])})"
                     if row["empirical"] is not None else "—")
        cells = [row["setting"], "yes" if row["secure"] else "no",
                 "none (no DP)" if row["epsilon"] is None else shown(row["epsilon"]), empirical,
                 shown(row["lower_bound"]),
                 *(f"{shown(by_name[name]['mean_exposure'], 2)} bits" for name in levels),
                 "—" if most is None else f"{most:.0%}", f"{row['top1']:.2%}", row["closed"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_doc(rows: list[dict], args: argparse.Namespace) -> None:
    space = rows[0]["canaries"]
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "audit-table.md").write_text("\n".join([
        "# The audit's table (generated)", "",
        f"Written by `benchmarks/audit.py --rounds {args.rounds} --phones {args.phones} --canaries {args.canaries} "
        f"--canary-clients {args.canary_clients}`: {args.phones} phones, {PER_ROUND} a round, {args.rounds} rounds "
        f"in process; {args.canaries} secrets planted (typed {', '.join(map(str, REPEATS))} times by one phone "
        f"each) and as many never typed; {args.canary_clients} canary clients and as many held out. Exposure is in "
        f"bits (a never-typed secret scores about 1.4); every ε is at δ = {DELTA:g}. "
        f"Levels: {', '.join(level['canaries'] for level in space)}.", "",
        *table(rows), ""]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--phones", type=int, default=100)
    parser.add_argument("--canaries", type=int, default=30)
    parser.add_argument("--canary-clients", type=int, default=50)
    parser.add_argument("--min-separation", type=int, default=5)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--plain-only", action="store_true", help="skip the runs with secure aggregation")
    parser.add_argument("--out", type=Path, default=Path("runs/audit"))
    parser.add_argument("--docs", type=Path, default=Path("docs/privacy"))
    args, extra = parser.parse_known_args(argv)
    rows = []
    for secure in (False,) if args.plain_only else (False, True):
        for setting in args.settings:
            folder = args.out / f"{setting.replace(' ', '_').replace('=', '')}{'_secure' if secure else ''}"
            rows.append(run(folder, setting, secure, args, extra))
            print("\n".join(table(rows[-1:])[2:]), flush=True)
            write_doc(rows, args)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
