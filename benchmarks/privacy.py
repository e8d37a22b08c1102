"""Differential privacy's price in quality, and how many phones make it affordable, for DP-FedAvg and DP-FTRL.

Trains the default fleet (621 phones, 10 per round, in-process) for `--rounds` rounds without differential
privacy, then with DP-FedAvg and with DP-FTRL (`--dp-mechanism ftrl`, its BLT optimised for the run's rounds) at
several noise multipliers z, and scores every final model on all held-out messages.

What the noise does depends on its spread on the mean update, z * clip / (phones per round). A run here with
z_sim and 10 phones per round has the noise of a deployment with z and 10 * z / z_sim phones per round, and the
mean of the clipped updates is about the same (more phones only average it better). So the runs map out top-1
recall against the noise on the mean, and each translates into the phones per round a deployment with a given z
would need for that quality; its epsilon comes from the same accountants the service uses.

Writes `docs/privacy/privacy.md` (the table and a recommendation worked out from it) and
`docs/privacy/recall_vs_epsilon.png`, again after every run, so an interrupted benchmark leaves the rows it has.

    .venv/bin/python benchmarks/privacy.py [--rounds 60] [--min-separation 10]
        [--phones 621] [--noise Z ...] [--mechanisms fedavg ftrl] [FEDKB SIMULATE OPTIONS ...]

`--phones`, `--noise` and `--mechanisms` make a smaller benchmark (the smoke test's): fewer phones, only these
noise multipliers, only these mechanisms.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

from aggregator import ftrl
from aggregator.privacy import PrivacyEvent, epsilon

PER_ROUND = 10
FLEET = 621
NOISE = [0.001, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0]
# DP-FTRL at the levels where DP-FedAvg goes from learning to not learning, and beyond.
FTRL_NOISE = [0.01, 0.03, 0.1, 0.3, 1.0]
# The order the runs are made in: the levels where the mechanisms part first, DP-FTRL before DP-FedAvg at each, so
# that an interrupted benchmark has the informative rows.
RUN_ORDER = [0.1, 0.03, 0.3, 1.0, 0.01, 0.05, 0.001]
DEPLOYMENT_Z = [0.5, 1.0, 2.0]
# A deployment samples each phone with this probability per round (McMahan et al. 2018 used about 1%).
DEPLOYMENT_SAMPLING = 0.01
# The recommendation's target: epsilon at most 10 at delta 1e-6 over 1000 rounds. 1000 rounds is a production
# training run (and the aggregator's default --dp-rounds); delta 1e-6 is below 1 / population for any population up
# to a million; epsilon 10 is about the loosest guarantee deployments publish (Gboard's DP-FTRL models report
# rho-zCDP between 0.2 and 2, epsilon below 10 at delta 1e-10).
TARGET_EPSILON = 10.0
TARGET_DELTA = 1e-6
TARGET_ROUNDS = 1000
# Top-1 within 15% of the run without DP: clipping alone costs most of 10% here, so a tighter bar would measure the
# clipping, not the noise.
QUALITY_TOLERANCE = 0.15
MECHANISMS = {"fedavg": "DP-FedAvg", "ftrl": "DP-FTRL"}


def train(out: Path, rounds: int, noise: float | None, mechanism: str = "fedavg", min_separation: int = 10,
          phones: int = FLEET, extra: Sequence[str] = ()) -> dict:
    """Run (or reuse) one simulation of `phones` phones (with `extra` options of `fedkb simulate`); returns its
    final top-1 and top-3, the epsilon (and for DP-FTRL rho) it reported, and the participation it produced."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        command = [sys.executable, "-m", "fedkb", "simulate", "--in-process", "--no-progress",
                   "--rounds", str(rounds), "--clients-per-round", str(PER_ROUND), "--phones", str(phones),
                   "--out", str(out), *extra]
        if noise is not None:
            command += ["--noise-multiplier", str(noise), "--dp-mechanism", mechanism]
        if mechanism == "ftrl":
            command += ["--dp-rounds", str(rounds), "--min-separation", str(min_separation)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(summary_path.read_text())
    lines = [json.loads(line) for line in out.joinpath("metrics.jsonl").read_text().splitlines()]
    rounds_run = [line for line in lines if line["round"] > 0]
    return {"top1": summary["final"]["recall_at_1"], "top3": summary["final"]["recall_at_3"],
            # As the last release left them: a round that failed releases nothing and reports neither.
            **{key: next((line[key] for line in reversed(lines) if line.get(key) is not None), None)
               for key in ("epsilon", "rho")},
            "rounds": summary["rounds_completed"],
            "closed": sum(line["status"] == "closed" for line in rounds_run),
            "failed": sum(line["failed"] for line in rounds_run),
            "eligible": sum(line["eligible"] for line in rounds_run) / max(len(rounds_run), 1) / phones,
            **participation(out / "aggregator.sqlite")}


def participation(db_path: Path) -> dict:
    """How many phones reported in a released round, and the most released rounds any one of them reported in."""
    with closing(sqlite3.connect(db_path)) as db:
        counts = [n for (n,) in db.execute(
            "select count(*) from selections s join rounds r on s.round = r.round "
            "where s.status = 'reported' and r.status = 'closed' group by s.device_id")]
    return {"phones": len(counts), "max_per_phone": max(counts, default=0)}


def shown(value: float | None) -> str:
    """A privacy figure, or a dash where nothing was released."""
    return "—" if value is None else f"{value:.3g}"


def top1_loss(run: dict, reference: dict) -> str:
    """How much of the reference's top-1 a run lost; none to lose when the reference learnt nothing (a tiny run)."""
    return "—" if reference["top1"] == 0 else f"{1 - run['top1'] / reference['top1']:+.0%}"


def boundary(ok: Callable[[float], bool], low: float, high: float) -> float:
    """Where a monotone `ok` changes between low and high (geometric bisection; ok(low) and ok(high) differ), to
    within a factor of 1.001: the end of the last interval on the side where ok holds."""
    ok_high = ok(high)
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if ok(middle) == ok_high:
            high = middle
        else:
            low = middle
    return high if ok_high else low


def quiet_enough(reference: dict, runs: dict[float, dict]) -> float | None:
    """The largest z_sim whose top-1 is within QUALITY_TOLERANCE of the run without DP (None if none is)."""
    good = [z for z, run in runs.items() if run["top1"] >= (1 - QUALITY_TOLERANCE) * reference["top1"]]
    return max(good, default=None)


@functools.lru_cache
def fedavg_deployment(z_sim: float) -> dict:
    """The smallest population with which DP-FedAvg, sampling uniformly, spends TARGET_EPSILON over TARGET_ROUNDS
    rounds with the noise on the mean of a run at z_sim: for each z, the largest sampling rate within budget."""
    options = []
    for z in DEPLOYMENT_Z:
        def within(q: float, z: float = z) -> bool:
            return epsilon([PrivacyEvent(q, z)] * TARGET_ROUNDS, TARGET_DELTA) <= TARGET_EPSILON
        per_round = math.ceil(PER_ROUND * z / z_sim)
        q = 1.0 if within(1.0) else boundary(within, 1e-9, 1.0)
        options.append({"z": z, "per_round": per_round, "sampling": q, "population": math.ceil(per_round / q)})
    return min(options, key=lambda option: option["population"])


@functools.lru_cache
def ftrl_noise_needed(min_separation: int) -> tuple[float, float]:
    """(the smallest z that spends TARGET_EPSILON over TARGET_ROUNDS releases with a BLT for them, no sampling
    assumed; the sensitivity^2 it is for). Minutes: the BLT is optimised for TARGET_ROUNDS."""
    blt = ftrl.optimised_blt(TARGET_ROUNDS, min_separation)
    sens_sq = ftrl.sensitivity_squared(blt, TARGET_ROUNDS, min_separation)
    return boundary(lambda z: ftrl.epsilon(sens_sq, z, TARGET_DELTA) <= TARGET_EPSILON, 1e-3, 1e3), sens_sq


def ftrl_deployment(z_sim: float, min_separation: int, eligible: float) -> dict:
    """DP-FTRL with a BLT for TARGET_ROUNDS rounds and this separation: the smallest z within the target, the
    phones per round N that give the noise on the mean of a run at z_sim, and the population that lets each phone
    take part once per `min_separation` rounds when only a fraction `eligible` of the phones can check in at a time:
    the N * b who reported lately sit out, and N more must be eligible among the rest, so population
    >= N * (b + 1 / eligible)."""
    z, sens_sq = ftrl_noise_needed(min_separation)
    per_round = math.ceil(PER_ROUND * z / z_sim)
    return {"z": z, "rho": ftrl.rho(sens_sq, z), "sensitivity_squared": sens_sq, "per_round": per_round,
            "population": math.ceil(per_round * (min_separation + 1 / eligible))}


def recommendation(reference: dict, runs: dict[str, dict[float, dict]], min_separation: int) -> list[str]:
    """Which mechanism, and what fleet, reaches the target with top-1 within the tolerance, from the runs."""
    lines = ["## Recommendation (worked out from the runs above)", "",
             f"Target: epsilon <= {TARGET_EPSILON:g} at delta {TARGET_DELTA:g} over {TARGET_ROUNDS} rounds, with "
             f"top-1 at least {1 - QUALITY_TOLERANCE:.0%} of the run without DP "
             f"({(1 - QUALITY_TOLERANCE) * reference['top1']:.2%}). Why this target: {TARGET_ROUNDS} rounds is a "
             "production training run (and `--dp-rounds`' default), delta 1e-6 is below 1/population up to a "
             "million phones, and epsilon 10 is about the loosest guarantee deployed models publish.", ""]
    eligible = sum(run["eligible"] for by_z in runs.values() for run in by_z.values()) / sum(map(len, runs.values()))
    needs = {}
    for mechanism, by_z in runs.items():
        if not by_z:
            continue  # not run yet
        z_sim = quiet_enough(reference, by_z)
        name = MECHANISMS[mechanism]
        if z_sim is None:
            lines.append(f"- **{name}**: no run here kept top-1 within {QUALITY_TOLERANCE:.0%}; no deployment "
                         "follows from these runs.")
            continue
        if mechanism == "fedavg":
            plan = fedavg_deployment(z_sim)
            lines.append(
                f"- **{name}**: the noisiest run within the tolerance is z_sim = {z_sim:g} (noise "
                f"{z_sim / PER_ROUND:.4g} on the mean). Best of z in {DEPLOYMENT_Z}: z = {plan['z']:g} needs "
                f"{plan['per_round']:,} phones per round, and the target allows sampling each phone with probability "
                f"at most {plan['sampling']:.3g} per round: a population of **{plan['population']:,}**, if every "
                "phone could be sampled every round.")
        else:
            plan = ftrl_deployment(z_sim, min_separation, eligible)
            lines.append(
                f"- **{name}** (B = {min_separation}, BLT for {TARGET_ROUNDS} rounds): the noisiest run within the "
                f"tolerance is z_sim = {z_sim:g} (noise {z_sim / PER_ROUND:.4g} on the mean). The target needs "
                f"z >= {plan['z']:.3g} (sensitivity^2 {plan['sensitivity_squared']:.3g}, rho-zCDP "
                f"{plan['rho']:.3g}), so {plan['per_round']:,} phones per round, and with {eligible:.0%} of the "
                f"phones eligible at a round (these runs' mean) a population of at least **{plan['population']:,}** "
                f"(N x (B + 1/eligible)), with no sampling assumption.")
        needs[mechanism] = plan["population"]
    lines.append("")
    if not needs:
        lines.append("Neither mechanism kept the quality at any noise level run here: run more rounds or lower noise.")
    elif "ftrl" in needs and ("fedavg" not in needs or needs["ftrl"] <= needs["fedavg"]):
        lines.append(f"**Use DP-FTRL.** It reaches the target with {needs['ftrl']:,} phones"
                     + (f", against DP-FedAvg's {needs['fedavg']:,}" if "fedavg" in needs else
                        ", where DP-FedAvg kept the quality at no noise level run here")
                     + ", and its guarantee holds for the participation the aggregator enforces, whereas DP-FedAvg's "
                     f"assumes every phone is sampled with the same probability every round, which a fleet with only "
                     f"{eligible:.0%} of its phones eligible at a time does not do.")
    else:
        lines.append(f"DP-FedAvg's figure is the smaller ({needs['fedavg']:,} phones"
                     + (f" against DP-FTRL's {needs['ftrl']:,}" if "ftrl" in needs else "")
                     + f"), but only under uniform sampling, which a fleet with {eligible:.0%} of its phones eligible "
                     "at a time does not do; **use DP-FTRL** with the population above"
                     + (" if it can be had" if "ftrl" in needs else ", once a run shows the noise level it keeps")
                     + ", or DP-FedAvg only with a sampler that really is uniform.")
    lines += ["", f"Caveats: each figure is one {PER_ROUND}-phone run; the DP-FTRL runs used a BLT for their own "
              f"rounds, a deployment one for {TARGET_ROUNDS}, whose noise per round differs; and more phones per round "
              "only average the same clipped updates better, as the mapping from z_sim assumes."]
    return lines


def report(args: argparse.Namespace, reference: dict, runs: dict[str, dict[float, dict]]) -> None:
    """Writes the table, the recommendation and the plot for the runs made so far."""
    lines = [
        f"# Differential privacy: quality against noise, {args.rounds} rounds of {PER_ROUND} phones",
        "",
        f"Made by `benchmarks/privacy.py --rounds {args.rounds} --min-separation {args.min_separation}`. Without "
        f"differential privacy: top-1 {reference['top1']:.2%}, top-3 {reference['top3']:.2%}. Clip norm 1.0, noise "
        f"added once per round to the sum, divided by the goal of {PER_ROUND}. DP-FedAvg's epsilon assumes each phone "
        f"is sampled with probability {PER_ROUND}/{args.phones}; DP-FTRL's (B = {args.min_separation}, BLT for "
        f"{args.rounds} rounds) assumes nothing: a phone may take part once every B rounds, the aggregator enforces "
        f"it. DP-FTRL was run at z_sim in {FTRL_NOISE}, the levels where DP-FedAvg goes from learning to not "
        "learning and beyond; rows not yet run are missing.",
        "",
        "| z here (z_sim) | mechanism | noise on the mean | top-1 | top-3 | top-1 loss | epsilon on this fleet "
        f"(delta 1/{args.phones}) | rho-zCDP | rounds closed (failed) | phones that reported | most rounds per phone | "
        + " | ".join(f"phones per round at z = {z}" for z in DEPLOYMENT_Z) + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
        + " | ".join("---" for _ in DEPLOYMENT_Z) + " |",
    ]
    for z in sorted({z for by_z in runs.values() for z in by_z}):
        needed = " | ".join(f"{PER_ROUND * deploy / z:,.0f}" for deploy in DEPLOYMENT_Z)
        for mechanism, by_z in runs.items():
            if z in by_z:
                run = by_z[z]
                lines.append(
                    f"| {z} | {MECHANISMS[mechanism]} | {z / PER_ROUND:.4f} | {run['top1']:.2%} | {run['top3']:.2%} | "
                    f"{top1_loss(run, reference)} | {shown(run['epsilon'])} | {shown(run['rho'])} | {run['closed']} "
                    f"({run['failed']}) | {run['phones']} | {run['max_per_phone']} | {needed} |")
    lines += ["", "A DP-FedAvg deployment that samples each phone with probability "
              f"{DEPLOYMENT_SAMPLING:.0%} per round needs {1 / DEPLOYMENT_SAMPLING:.0f} times the phones per round in "
              f"all, and after {args.rounds} rounds spends, at delta 1e-6:", ""]
    for deploy in DEPLOYMENT_Z:
        spent = epsilon([PrivacyEvent(DEPLOYMENT_SAMPLING, deploy)] * args.rounds, 1e-6)
        lines.append(f"- z = {deploy}: epsilon {spent:.3g} (at delta 1e-6)")
    lines += ["", *recommendation(reference, runs, args.min_separation)]
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "privacy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    draw(reference, runs, args.docs / "recall_vs_epsilon.png", args.phones)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--min-separation", type=int, default=10, help="DP-FTRL's B (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--docs", type=Path, default=Path("docs/privacy"))
    parser.add_argument("--phones", type=int, default=FLEET, help="the fleet (default: %(default)s)")
    parser.add_argument("--noise", type=float, nargs="+", default=RUN_ORDER, metavar="Z",
                        help="run only these noise multipliers, in this order (default: all)")
    parser.add_argument("--mechanisms", nargs="+", choices=sorted(MECHANISMS), default=sorted(MECHANISMS))
    args, extra = parser.parse_known_args()  # the rest goes to `fedkb simulate` (the smoke test's tiny model)
    # The search for the largest sampling rate within budget probes rates at which the accountant cannot evaluate
    # some RDP orders; it leaves those out (a larger, still valid epsilon) and warns for each, thousands of times.
    logging.getLogger("absl").setLevel(logging.ERROR)

    reference = train(args.out / "none", args.rounds, None, phones=args.phones, extra=extra)
    print(f"no differential privacy: top-1 {reference['top1']:.2%}, top-3 {reference['top3']:.2%}", flush=True)
    runs: dict[str, dict[float, dict]] = {"fedavg": {}, "ftrl": {}}
    folders = {"fedavg": lambda z: f"z{z}", "ftrl": lambda z: f"ftrl-b{args.min_separation}-z{z}"}
    for z in args.noise:
        for mechanism, levels in (("ftrl", FTRL_NOISE), ("fedavg", NOISE)):
            if z not in levels or mechanism not in args.mechanisms:
                continue
            run = train(args.out / folders[mechanism](z), args.rounds, z, mechanism, args.min_separation,
                        args.phones, extra)
            runs[mechanism][z] = run
            print(f"{MECHANISMS[mechanism]} z_sim {z}: top-1 {run['top1']:.2%} "
                  f"({top1_loss(run, reference)} below the reference), epsilon {shown(run['epsilon'])} "
                  f"on this fleet", flush=True)
            report(args, reference, runs)


def draw(reference: dict, runs: dict[str, dict[float, dict]], path: Path, phones: int) -> None:
    import matplotlib  # only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_noise, by_epsilon) = plt.subplots(1, 2, figsize=(11, 4))
    for mechanism, by_z in runs.items():
        noise = sorted(by_z)
        if not noise:
            continue
        top1 = [by_z[z]["top1"] for z in noise]
        by_noise.semilogx([z / PER_ROUND for z in noise], top1, "o-", label=MECHANISMS[mechanism])
        released = [z for z in noise if by_z[z]["epsilon"] is not None]  # a run none of whose rounds closed has none
        eps, top1 = [by_z[z]["epsilon"] for z in released], [by_z[z]["top1"] for z in released]
        by_epsilon.semilogx(eps, top1, "o-", label=MECHANISMS[mechanism])
        for z, e, top in zip(released, eps, top1):
            by_epsilon.annotate(f"z={z}", (e, top), fontsize=8)
    for axes in (by_noise, by_epsilon):
        axes.axhline(reference["top1"], color="grey", linestyle="--", label="no DP")
        axes.set_ylabel("top-1 recall")
        axes.grid(alpha=0.3)
        axes.legend()
    by_noise.set_xlabel("noise std on the mean update (z * clip / phones per round)")
    by_epsilon.set_xlabel(f"epsilon on this fleet ({PER_ROUND} of {phones} phones per round, delta 1/{phones}; "
                          "DP-FedAvg assumes sampling)", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
