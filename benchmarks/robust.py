"""How far one poisoning phone moves a round's result under each aggregation rule (aggregator/rules/).

Runs rounds of the real round manager, in process, on a tiny model: `--phones` phones report a round, honest ones an
update of norm 0.01 in a shared direction with their own noise a tenth of its size, and `--poisoning` of them
(0, then 1 by default) their own update scaled `--scale` times instead (1000: norm 10, within the aggregator's norm
bound of 20, so it is accepted). For FedAvg's example-weighted mean, the coordinate-wise median and the trimmed mean
(Yin et al. 2018) it prints the distance of the round's result (the step of a FedAvg server optimiser at rate 1) from
the mean of the honest updates, as a share of that mean's norm.

    .venv/bin/python benchmarks/robust.py [--phones 10] [--poisoning 0 1] [--scale 1000] [--trim-fraction 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundManager
from aggregator.rules import RULES
from aggregator.storage import open_storage
from keyboard_model.model import ModelConfig
from keyboard_model.update_codec import encode_update
from keyboard_model.weights import Tensors

HONEST_NORM = 0.01
EXAMPLES = 40  # every phone claims the same count: the weighted mean is the plain mean


def norm(tensors: Tensors) -> float:
    return float(sum((t.double() ** 2).sum() for t in tensors.values())) ** 0.5


def honest_updates(shapes: dict[str, tuple[int, ...]], phones: int, seed: int) -> list[Tensors]:
    generator = torch.Generator().manual_seed(seed)
    direction = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    scale = HONEST_NORM / norm(direction)
    return [{name: scale * t * (1 + 0.1 * torch.randn(t.shape, generator=generator)) for name, t in direction.items()}
            for _ in range(phones)]


def round_result(folder: Path, rule: str, args: argparse.Namespace, poisoning: int) -> float:
    """One round under `rule` with `poisoning` of the phones scaling their update: the distance of the model's step
    from the honest mean, over the honest mean's norm."""
    config = AggregatorConfig(
        db_path=folder / f"{rule}-{poisoning}.sqlite", tokenizer_path=folder / "unused.json",
        model=ModelConfig(vocab_size=200, embedding_dim=8, hidden_dim=16, projection_dim=8),
        clients_per_round=args.phones, over_selection=1.0, selection_window_s=0.0, server_optimizer="fedavg",
        serving_average=0.0, aggregation_rule=rule, trim_fraction=args.trim_fraction, seed=args.seed)
    rounds = RoundManager(config, open_storage(config.db_path))
    updates = honest_updates(rounds.model.shapes, args.phones, args.seed)
    honest = updates[poisoning:]
    honest_mean = {name: sum(u[name] for u in honest) / len(honest) for name in rounds.model.shapes}
    sent = [{name: args.scale * t for name, t in u.items()} for u in updates[:poisoning]] + honest
    before = {name: t.clone() for name, t in rounds.model.state.items()}
    for update in sent:
        decision = rounds.checkin(rounds.authenticate(rounds.enrol()[1]))
        rounds.submit(decision.round, decision.upload_token, encode_update(update, EXAMPLES, "none"))
    step = {name: rounds.model.state[name] - before[name] for name in before}
    rounds.storage.close()
    return norm({name: step[name] - honest_mean[name] for name in step}) / norm(honest_mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=10, help="phones reporting each round")
    parser.add_argument("--poisoning", type=int, nargs="+", default=[0, 1], help="poisoning phones among them")
    parser.add_argument("--scale", type=float, default=1000.0,
                        help="how many times a poisoning phone scales its update")
    parser.add_argument("--trim-fraction", type=float, default=0.1, help="trimmed_mean's share dropped from each end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    print(f"{args.phones} phones a round, honest updates of norm {HONEST_NORM}; a poisoning phone sends its own "
          f"update x{args.scale:g}; trimmed_mean drops {args.trim_fraction:g} of each end")
    print("distance of the round's result from the honest mean, as a share of its norm:")
    print("| rule | " + " | ".join(f"{p} poisoning" for p in args.poisoning) + " |")
    print("|---|" + "---:|" * len(args.poisoning))
    with tempfile.TemporaryDirectory() as folder:
        for rule in sorted(RULES):
            distances = [round_result(Path(folder), rule, args, p) for p in args.poisoning]
            print(f"| {rule} | " + " | ".join(f"{d:.4f}" for d in distances) + " |")


if __name__ == "__main__":
    main()
