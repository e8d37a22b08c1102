"""Eligible phones per tick over simulated days: the diurnal wave the fleet trains on.

Provisions nothing: eligibility depends only on phone ids (phone-00000, ... as the
fleet names them), the seed and `EligibilityConfig`. Counts the eligible phones at
every tick, plots them against the UTC hour, and prints the peak, the trough and the
time `SimulatedClock.eligible` takes per tick for the whole fleet.

    .venv/bin/python benchmarks/diurnal.py [--phones 10000] [--days 1] [--out docs/fleet/eligible_per_hour.png]

With `--run DIR` (a `fedkb simulate --out DIR` run), the fleet is that run's phones and
the plot adds the updates counted per simulated hour, from its metrics.jsonl.

`eligible_per_tick` and `plot_eligible` are meant for reuse: a fleet benchmark can
pass its participants per round as an extra series to draw on the same axes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_sim.eligibility import MINUTES_PER_DAY, EligibilityConfig, SimulatedClock
from device_sim.fleet import provisioned_phones


@dataclass(frozen=True)
class EligibleCounts:
    """Eligible phones at ticks 0, 1, ... and the wall time each tick took to compute."""

    counts: np.ndarray
    seconds_per_tick: np.ndarray
    tick_minutes: float

    @property
    def hours(self) -> np.ndarray:
        """Hours since 00:00 UTC of day 0 at each tick: the x axis."""
        return np.arange(len(self.counts)) * self.tick_minutes / 60.0


def eligible_per_tick(config: EligibilityConfig, phones: int, days: float) -> EligibleCounts:
    """Count the eligible phones among `phones` fleet-named ids at every tick of `days` simulated days."""
    clock = SimulatedClock(config)
    phone_ids = [f"phone-{index:05d}" for index in range(phones)]
    for phone_id in phone_ids:  # profiles are drawn once per phone: keep that out of the per-tick times
        clock.profile(phone_id)
    ticks = round(days * MINUTES_PER_DAY / config.tick_minutes)
    counts, seconds = np.empty(ticks, dtype=np.int64), np.empty(ticks)
    for tick in range(ticks):
        start = time.perf_counter()
        counts[tick] = clock.eligible(phone_ids, tick).sum()
        seconds[tick] = time.perf_counter() - start
    return EligibleCounts(counts, seconds, config.tick_minutes)


def plot_eligible(eligible: EligibleCounts, png: Path, extra: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  title: str = "Eligible phones per tick") -> None:
    """Draw eligible phones against UTC hour; `extra` adds labelled (hours since day 0, values) series."""
    import matplotlib  # only the benchmark draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    axis.plot(eligible.hours, eligible.counts, label="eligible phones (idle, charging, unmetered)")
    for label, (hours, values) in (extra or {}).items():
        axis.plot(hours, values, marker=".", linestyle="", label=label)
    last_hour = max(eligible.hours[-1], 24.0)
    ticks = np.arange(0.0, last_hour + 1e-9, 3.0 * np.ceil(last_hour / 24.0))  # about eight labels a day
    axis.set_xticks(ticks, [f"{int(hour) % 24:02d}:00" for hour in ticks])
    axis.set_xlim(0.0, last_hour)
    axis.set_ylim(0, None)
    axis.set_xlabel("UTC hour (tick 0 = 00:00 UTC, day 0)")
    axis.set_ylabel("phones")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)


def updates_per_hour(metrics: Path, days: float) -> tuple[np.ndarray, np.ndarray]:
    """(mid-hour, updates counted in rounds that opened in that simulated hour) over the first `days`."""
    totals = np.zeros(int(np.ceil(days * 24)))
    for line in metrics.read_text().splitlines():
        round_ = json.loads(line)
        hour = int(round_["sim_day"] * 24 + round_["sim_hour_utc"])
        if round_["round"] > 0 and hour < len(totals):
            totals[hour] += round_["participants"]
    return np.arange(len(totals)) + 0.5, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/fleet/eligible_per_hour.png"))
    parser.add_argument("--run", type=Path, default=None, help="a simulation's --out folder: plot its updates too")
    args = parser.parse_args()
    if args.phones < 1 or args.days <= 0:
        parser.error("--phones must be at least 1 and --days positive")

    extra, title = None, f"Eligible phones per tick, {args.phones:,} phones (default time-zone mix)"
    if args.run is not None:
        args.phones = len(provisioned_phones(args.run / "phones"))
        extra = {"updates counted per simulated hour": updates_per_hour(args.run / "metrics.jsonl", args.days)}
        title = f"Eligible phones and counted updates, {args.phones:,} phones ({args.run.name})"
    eligible = eligible_per_tick(EligibilityConfig(seed=args.seed), args.phones, args.days)
    peak, trough = int(np.argmax(eligible.counts)), int(np.argmin(eligible.counts))
    plot_eligible(eligible, args.out, extra, title=title)

    def at(tick: int) -> str:
        minutes = round(eligible.hours[tick] * 60)
        day, hour, minute = minutes // MINUTES_PER_DAY, minutes % MINUTES_PER_DAY // 60, minutes % 60
        return (f"{eligible.counts[tick]:,} ({eligible.counts[tick] / args.phones:.1%}) "
                f"at {hour:02d}:{minute:02d} UTC, day {day}")

    milliseconds = 1e3 * eligible.seconds_per_tick
    print(f"{args.phones:,} phones, {len(eligible.counts)} ticks of {eligible.tick_minutes:g} min")
    print(f"peak:   {at(peak)}")
    print(f"trough: {at(trough)}")
    print(f"peak / trough: {eligible.counts[peak] / max(1, eligible.counts[trough]):.2f}")
    print(f"time per tick for all phones: median {np.median(milliseconds):.1f} ms, max {milliseconds.max():.1f} ms")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
