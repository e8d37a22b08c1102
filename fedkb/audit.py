"""`fedkb audit RUN [--out FILE.png]`: what a run's model is measured to leak, beside what its accountant proves.

Two measurements, each where the run made it:
- canary phrases (`fedkb simulate --canaries N`, device_sim/canaries.py): the exposure of each planted secret in the
  run's latest model (`model.safetensors`), by how many times it was typed, against secrets never typed, and whether
  the keyboard would suggest it. They are scored afresh from the run folder (`canaries.json`, `tokenizer.json`, the
  model), so a run that was stopped, or resumed and still going, is audited as it is now;
- canary clients (`--canary-clients K`, the aggregator's one-shot audit of Andrew et al. 2024): the empirical epsilon
  of the last audited round of `metrics.jsonl`, with its interval and the one-run lower bound, beside the epsilon the
  accountant reported for that round.

An empirical epsilon is what one attack achieved on these canaries: a lower bound on what the model leaks, never a
guarantee; only the accountant's epsilon is one. The PNG (default RUN/audit.png) draws the exposures by repetitions
with the held-out band, and the empirical epsilon against the accountant's over the rounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from keyboard_model.arguments import new_file
from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from device_sim.canaries import Canaries

AUDIT_PNG = "audit.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder (fedkb simulate --out)")
    parser.add_argument("--out", type=new_file, default=None, metavar="FILE.png",
                        help=f"the PNG to write (default: RUN/{AUDIT_PNG})")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: device_sim's modules import torch, which `fedkb --help` does without.
    from device_sim.canaries import Canaries, canary_client_lines, report_lines
    from device_sim.run_log import METRICS_FILE, read_lines

    folder: Path = args.run_dir
    if not (folder / METRICS_FILE).is_file():
        raise UserFacingError(f"{folder} is not a run folder: it has no {METRICS_FILE}")
    lines = _with_final_audit(read_lines(folder / METRICS_FILE), folder)
    canaries = Canaries.read(folder)
    audited = [line for line in lines if line.get("audit_epsilon") is not None]
    if canaries is None and not audited:
        raise UserFacingError(f"nothing to audit in {folder}: run with --canaries N or --canary-clients K")
    report = None
    if canaries is not None:
        report = _canary_report(folder, canaries)
        print("\n".join(report_lines(report)))
    if audited:
        print("\n".join(canary_client_lines(audited[-1])))
    png = args.out or folder / AUDIT_PNG
    draw(report, lines, png)
    print(f"wrote {png}")
    return 0


def _with_final_audit(lines: list[dict], folder: Path) -> list[dict]:
    """The run's lines, with the audit of its last model (summary.json's `privacy_audit`, once the run has ended) on
    the line of the round that made that model: the aggregator adds it to that round's record after the line was
    written, and when the run's last rounds failed, that round is an earlier one."""
    from device_sim.simulation import SUMMARY_FILE

    try:
        final = json.loads((folder / SUMMARY_FILE).read_text()).get("privacy_audit")
    except (OSError, ValueError):
        return lines  # a run still going (or stopped) has no summary: its lines are all there is
    if not final:
        return lines
    return [{**line, **final} if line["round"] == final["round"] else line for line in lines]


def _canary_report(folder: Path, canaries: Canaries) -> dict:
    """The canary phrases' report on the run's latest model."""
    from device_sim.canaries import CANARIES_FILE, audit_delta, canary_report
    from keyboard_model.tokenizer import KeyboardTokenizer
    from keyboard_model.weights import model_from_bytes

    if not canaries.complete:
        raise UserFacingError(f"planting the canaries of {folder / CANARIES_FILE} was interrupted: resume the run "
                              "(the same --out and options) to finish it")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise UserFacingError(f"{folder} has no {name} yet: the run stopped before its first model was saved")
    model, version = model_from_bytes((folder / "model.safetensors").read_bytes())
    tokenizer = KeyboardTokenizer.from_file(folder / "tokenizer.json")
    print(f"{folder}: model version {version}; {len(canaries.planted)} canary phrases planted, "
          f"{len(canaries.held_out)} held out")
    return canary_report(model, tokenizer, canaries, audit_delta(folder))


def draw(report: dict | None, lines: list[dict], png: Path) -> None:
    """Exposure by repetitions (left) and empirical against proven epsilon over the rounds (right)."""
    import matplotlib  # a second or so to import; only this command draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (exposure, epsilon) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    if report is None:
        _nothing(exposure, "no canary phrases\n(fedkb simulate --canaries N)")
    else:
        _draw_exposures(exposure, report)
    _draw_epsilons(epsilon, lines)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)


def _draw_exposures(axes: Axes, report: dict) -> None:
    held_out = [row["exposure"] for row in report["held_out"]]
    axes.axhspan(min(held_out), max(held_out), color="grey", alpha=0.25, label="held out (never typed): range")
    axes.axhline(sum(held_out) / len(held_out), color="grey", linestyle="--", label="held out: mean")
    axes.axhline(report["most_exposure"], color="black", linestyle=":", label="most exposure (ranked first)")
    levels = sorted({row["repetitions"] for row in report["planted"]})
    for position, level in enumerate(levels):
        scores = [row["exposure"] for row in report["planted"] if row["repetitions"] == level]
        # A level's points spread a little sideways, so that equal exposures stay visible.
        spread = [position + 0.3 * (k + 0.5) / len(scores) - 0.15 for k in range(len(scores))]
        axes.scatter(spread, scores, color="tab:red",
                     label="planted" if position == 0 else None, zorder=3)
    axes.set_xticks(range(len(levels)), [f"{level}x" for level in levels])
    axes.set_xlim(-0.5, len(levels) - 0.5)
    axes.set_xlabel(f"times typed, by each of {report['phones_per_canary']} phone(s)")
    axes.set_ylabel("exposure (bits)")
    axes.set_ylim(bottom=0, top=report["most_exposure"] + 1)
    axes.set_title("Canary phrases: exposure in the model")
    axes.legend(loc="best", fontsize="small")


def _draw_epsilons(axes: Axes, lines: list[dict]) -> None:
    audited = [line for line in lines if line.get("audit_epsilon") is not None]
    proven = [line for line in lines if line.get("epsilon") is not None]
    if not audited and not proven:
        _nothing(axes, "no canary clients (--canary-clients K)\nand no DP (--noise-multiplier)")
        return
    if audited:
        rounds = [line["round"] for line in audited]
        axes.plot(rounds, [line["audit_epsilon"] for line in audited], "o-", color="tab:red",
                  label="empirical (canary clients)")
        bounded = [line for line in audited if line.get("audit_epsilon_low") is not None]
        axes.fill_between([line["round"] for line in bounded], [line["audit_epsilon_low"] for line in bounded],
                          [line["audit_epsilon_high"] for line in bounded], color="tab:red", alpha=0.2,
                          label="its 95% interval")
        lower = [line for line in audited if line.get("audit_epsilon_lower_bound") is not None]
        axes.plot([line["round"] for line in lower], [line["audit_epsilon_lower_bound"] for line in lower], "v",
                  color="tab:purple", label="one-run 95% lower bound")
    if proven:
        axes.plot([line["round"] for line in proven], [line["epsilon"] for line in proven], color="tab:blue",
                  label="accountant (proven)")
    else:
        axes.text(0.5, 0.9, "no DP: no proven bound", transform=axes.transAxes, ha="center")
    # Proven epsilons run to thousands where empirical ones are a few: linear near 0, logarithmic beyond.
    axes.set_yscale("symlog", linthresh=1.0)
    axes.set_xlabel("round")
    axes.set_ylabel("epsilon")
    axes.set_title("Empirical against proven epsilon")
    axes.legend(loc="upper left", fontsize="small")


def _nothing(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center")
    axes.set_axis_off()
