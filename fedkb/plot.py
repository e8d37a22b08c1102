"""`fedkb plot RUN... --out FILE.png`: recall and training loss per round of one or more runs, in one PNG.

Each run's `metrics.jsonl` gives its central top-1 recall (the eval sample, on the rounds
it was scored), the phones' own federated top-1, and the training loss. A run that has a
comparison table (`fedkb eval RUN --table` writes `table.json`) adds the n-gram's and
the oracle's top-1 as horizontal lines.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from keyboard_model.arguments import new_file
from keyboard_model.errors import UserFacingError

# The table's rows drawn as reference lines, by the start of their name.
REFERENCE_ROWS = ("n-gram", "centralised oracle")


def references(run: Path) -> list[tuple[str, float]]:
    """The n-gram's and the oracle's top-1 recall from the run's comparison table, if it has one."""
    from device_sim.comparison import TABLE_FILE

    try:
        rows = json.loads((run / TABLE_FILE).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [(row["model"], row["recall_at_1"]) for row in rows
            if row["model"].startswith(REFERENCE_ROWS) and row["recall_at_1"] is not None]


def plot_runs(runs: Sequence[Path], png: Path, lines: Sequence[tuple[str, float]] | None = None) -> None:
    """Draw `runs` into `png`; `lines` (name, top-1) default to the reference rows of the runs' tables."""
    import matplotlib  # a second or so to import; only this command draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from device_sim.run_log import METRICS_FILE, read_lines

    figure, (recall, loss) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True)
    for run in runs:
        metrics = read_lines(run / METRICS_FILE)
        scored = [m for m in metrics if m.get("recall_at_1") is not None]
        federated = [m for m in metrics if m.get("fed_recall_at_1") is not None]
        trained = [m for m in metrics if m.get("train_loss") is not None]
        drawn = recall.plot([m["round"] for m in scored], [100 * m["recall_at_1"] for m in scored],
                            label=f"{run.name}: central (eval sample)")
        colour = drawn[0].get_color()
        recall.plot([m["round"] for m in federated], [100 * m["fed_recall_at_1"] for m in federated], ":",
                    color=colour, label=f"{run.name}: federated (the phones' own)")
        loss.plot([m["round"] for m in trained], [m["train_loss"] for m in trained], color=colour, label=run.name)
    drawn_lines = list(lines) if lines is not None else list(dict.fromkeys(r for run in runs for r in references(run)))
    for (name, top1), style in zip(drawn_lines, (":", "-.", "--", (0, (1, 4)))):
        recall.axhline(100 * top1, linestyle=style, color="grey", label=name)
    recall.set_ylabel("top-1 recall (%)")
    recall.set_ylim(bottom=0)
    recall.set_title("Held-out top-1 recall and training loss per round")
    recall.legend(loc="lower right", fontsize="small")
    loss.set_ylabel("training loss (phones' mean)")
    loss.set_xlabel("round")
    loss.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders (fedkb simulate --out)")
    parser.add_argument("--out", type=new_file, required=True, metavar="FILE.png", help="the PNG to write")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: device_sim's modules import torch, which `fedkb --help` does without.
    from device_sim.run_log import METRICS_FILE

    for folder in args.runs:
        if not (folder / METRICS_FILE).is_file():
            raise UserFacingError(f"{folder} is not a run folder: it has no {METRICS_FILE}")
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out}")
    return 0
