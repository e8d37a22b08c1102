"""Federated evaluation against the researcher's central score, over a finished run.

Each round's line in `metrics.jsonl` holds two scores of two models:
- `fed_recall_at_1` (and at 3): the aggregator's, summed from the counts the round's
  phones sent about the model the round started from (`fed_eval_model_version`);
- `recall_at_1` (and at 3): the simulator's central score of the model the round
  produced (`model_version`), on the held-out messages of a fixed sample of phones.
So the federated score of version v is compared with the central score of the same v
from an earlier line. They use different phones; agreement says the federated figures
on `/status` track quality without the server ever holding text.

    .venv/bin/python benchmarks/federated_eval.py --run runs/up [--plot docs/fleet/federated_eval.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def paired_scores(metrics_path: Path, k: int) -> list[tuple[int, float, float]]:
    """(model version, central recall@k, federated recall@k) for every version both scored."""
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    central = {line["model_version"]: line[f"recall_at_{k}"] for line in lines if line[f"recall_at_{k}"] is not None}
    return [
        (line["fed_eval_model_version"], central[line["fed_eval_model_version"]], line[f"fed_recall_at_{k}"])
        for line in lines
        if line.get(f"fed_recall_at_{k}") is not None and line["fed_eval_model_version"] in central
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run folder with metrics.jsonl")
    parser.add_argument("--plot", type=Path, default=None, help="also draw both scores per model version (PNG)")
    args = parser.parse_args()

    for k in (1, 3):
        pairs = paired_scores(args.run / "metrics.jsonl", k)
        if len(pairs) < 2:
            raise SystemExit(f"{args.run} has fewer than two rounds with federated evaluation")
        differences = [federated - central for _, central, federated in pairs]
        correlation = statistics.correlation([c for _, c, _ in pairs], [f for _, _, f in pairs])
        last_tenth = pairs[-max(1, len(pairs) // 10):]
        print(f"recall@{k}: {len(pairs)} model versions; federated minus central: "
              f"mean {statistics.mean(differences):+.4f}, "
              f"mean absolute {statistics.mean(map(abs, differences)):.4f}; correlation {correlation:.3f}; "
              f"last tenth: central {statistics.mean(c for _, c, _ in last_tenth):.4f}, "
              f"federated {statistics.mean(f for _, _, f in last_tenth):.4f}")
        if args.plot is not None and k == 1:
            draw(pairs, args.plot)


def draw(pairs: list[tuple[int, float, float]], path: Path) -> None:
    import matplotlib  # only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [v for v, _, _ in pairs]
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.plot(versions, [c for _, c, _ in pairs], label="central (simulator reads 32 phones' held-out text)")
    axes.plot(versions, [f for _, _, f in pairs], label="federated (counts from the round's phones)", alpha=0.8)
    axes.set_xlabel("global model version")
    axes.set_ylabel("top-1 recall")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
