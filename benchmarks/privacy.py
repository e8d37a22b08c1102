"""Differential privacy's price in quality, and how many phones make it affordable.

Trains the default fleet (621 phones, 10 per round, in-process) for `--rounds` rounds without differential
privacy, then with it at several noise multipliers z, and scores every final model on all held-out messages.

What the noise does depends on its spread on the mean update, z * clip / (phones per round). A run here with
z_sim and 10 phones per round has the noise of a deployment with z and 10 * z / z_sim phones per round, and the
mean of the clipped updates is about the same (more phones only average it better). So the runs map out top-1
recall against the noise on the mean, and each translates into the phones per round a deployment with a given z
would need for that quality; its epsilon comes from the same accountant the service uses.

Writes `docs/privacy/privacy.md` (the table) and `docs/privacy/recall_vs_epsilon.png`.

    .venv/bin/python benchmarks/privacy.py [--rounds 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from aggregator.privacy import PrivacyEvent, epsilon

PER_ROUND = 10
FLEET = 621
NOISE = [0.001, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0]
DEPLOYMENT_Z = [0.5, 1.0, 2.0]
# A deployment samples each phone with this probability per round (McMahan et al. 2018 used about 1%).
DEPLOYMENT_SAMPLING = 0.01


def train(out: Path, rounds: int, noise: float | None) -> dict:
    """Run (or reuse) one simulation; returns its final top-1 and top-3 and the epsilon it reported."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        command = [sys.executable, "-m", "device_sim", "simulate", "--in-process", "--no-progress",
                   "--rounds", str(rounds), "--clients-per-round", str(PER_ROUND), "--out", str(out)]
        if noise is not None:
            command += ["--noise-multiplier", str(noise)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_path.read_text())
    last = json.loads(out.joinpath("metrics.jsonl").read_text().splitlines()[-1])
    return {"top1": summary["final"]["recall_at_1"], "top3": summary["final"]["recall_at_3"],
            "epsilon": last.get("epsilon"), "rounds": summary["rounds_completed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--docs", type=Path, default=Path("docs/privacy"))
    args = parser.parse_args()

    reference = train(args.out / "none", args.rounds, None)
    print(f"no differential privacy: top-1 {reference['top1']:.2%}, top-3 {reference['top3']:.2%}", flush=True)
    runs = {}
    for z in NOISE:
        runs[z] = train(args.out / f"z{z}", args.rounds, z)
        loss = 1 - runs[z]["top1"] / reference["top1"]
        print(f"z_sim {z}: top-1 {runs[z]['top1']:.2%} ({loss:+.0%} below the reference), "
              f"epsilon {runs[z]['epsilon']:.3g} on this fleet", flush=True)

    lines = [
        f"# Differential privacy: quality against noise, {args.rounds} rounds of {PER_ROUND} phones",
        "",
        f"Made by `benchmarks/privacy.py --rounds {args.rounds}`. Without differential privacy: top-1 "
        f"{reference['top1']:.2%}, top-3 {reference['top3']:.2%}. Clip norm 1.0, noise added once per round to the "
        f"sum, divided by the goal of {PER_ROUND}.",
        "",
        "| noise multiplier here (z_sim) | noise on the mean | top-1 | top-3 | top-1 loss | epsilon on this fleet "
        f"(q = {PER_ROUND}/{FLEET}, delta 1/{FLEET}) | "
        + " | ".join(f"phones per round at z = {z}" for z in DEPLOYMENT_Z) + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in DEPLOYMENT_Z) + " |",
    ]
    for z, run in runs.items():
        needed = " | ".join(f"{PER_ROUND * deploy / z:,.0f}" for deploy in DEPLOYMENT_Z)
        lines.append(f"| {z} | {z / PER_ROUND:.4f} | {run['top1']:.2%} | {run['top3']:.2%} | "
                     f"{1 - run['top1'] / reference['top1']:.0%} | {run['epsilon']:.3g} | {needed} |")
    lines += ["", f"A deployment that samples each phone with probability {DEPLOYMENT_SAMPLING:.0%} per round needs "
              f"{1 / DEPLOYMENT_SAMPLING:.0f} times the phones per round in all, and after {args.rounds} rounds "
              "spends, at delta 1e-6:", ""]
    for deploy in DEPLOYMENT_Z:
        spent = epsilon([PrivacyEvent(DEPLOYMENT_SAMPLING, deploy)] * args.rounds, 1e-6)
        lines.append(f"- z = {deploy}: epsilon {spent:.3g} (at delta 1e-6)")
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "privacy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    draw(reference, runs, args.docs / "recall_vs_epsilon.png")


def draw(reference: dict, runs: dict[float, dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only for the plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (by_noise, by_epsilon) = plt.subplots(1, 2, figsize=(11, 4))
    noise = sorted(runs)
    by_noise.semilogx([z / PER_ROUND for z in noise], [runs[z]["top1"] for z in noise], "o-", label="with DP")
    by_noise.axhline(reference["top1"], color="grey", linestyle="--", label="no DP")
    by_noise.set_xlabel("noise std on the mean update (z * clip / phones per round)")
    by_noise.set_ylabel("top-1 recall")
    by_noise.legend()
    eps = [runs[z]["epsilon"] for z in noise]
    by_epsilon.semilogx(eps, [runs[z]["top1"] for z in noise], "o-")
    for z, e in zip(noise, eps):
        by_epsilon.annotate(f"z={z}", (e, runs[z]["top1"]), fontsize=8)
    by_epsilon.axhline(reference["top1"], color="grey", linestyle="--")
    by_epsilon.set_xlabel(f"epsilon on this fleet ({PER_ROUND} of {FLEET} phones per round, delta 1/{FLEET})")
    by_epsilon.set_ylabel("top-1 recall")
    for axes in (by_noise, by_epsilon):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
