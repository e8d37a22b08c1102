"""Int8 against float32 model downloads: top-1 of the same federated runs, paired by seed.

A lean FedAvg loop over the default corpus's phones (every user a phone, its oldest four fifths
its training messages), with the project's own parts and nothing else: each round the server's
model is served in the download encoding (`weights.model_to_bytes`) and read back by the phone
(`model_from_bytes`), trained (`device_sim.session.train`, which computes the delta against what
the phone downloaded), uploaded as int8 with stochastic rounding (`int8.quantize`, as `update_codec` encodes it),
averaged by examples and stepped by the default server optimiser (`aggregator.strategies`). Both arms of a seed
draw the same phones in the same order,
with the same training seeds, from the same initial model; only the download differs. No clock,
no pace steering, no dropouts: the pairing is exact, so a difference is the encoding's.

The final server model (float32) is scored on the held-out messages; printed per seed: top-1 of
each arm and the difference, then the mean, standard deviation and a 95% paired t interval of the
difference, in points and relative to float32.

    .venv/bin/python benchmarks/int8_downloads.py [--seeds 0 1 2 3 4 5 6 7] [--rounds 60] [--per-round 10]
        [--held-out 4000] [--tiny]

`--tiny` is the smoke test's size: a small model and vocabulary-sized corpus, 2 rounds of 2 phones.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from aggregator.config import AggregatorConfig
from aggregator.strategies import make_strategy
from device_sim.corpus import CorpusConfig, prepare
from device_sim.history import split_held_out
from device_sim.session import RoundInput, train
from keyboard_model import int8
from keyboard_model.architecture import build_model
from keyboard_model.evaluate import evaluate
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import MODEL_ENCODINGS, Tensors, model_from_bytes, model_to_bytes

# t quantiles (two-sided 95%) for the paired interval, by degrees of freedom; beyond 30 the normal one.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class Fleet:
    tokenizer: KeyboardTokenizer
    phones: list[list[str]]  # each phone's training messages, oldest first
    held_out: list[list[int]]  # encoded held-out messages the final models are scored on


def load_fleet(held_out: int) -> Fleet:
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    phones, scored = [], []
    for messages in corpus.users().values():
        training, held = split_held_out([m.text for m in messages])
        phones.append(training)
        scored.extend(held)
    # A fixed sample of the held-out messages (the same for every run) keeps scoring cheap.
    sample = scored if held_out <= 0 or held_out >= len(scored) else random.Random(0).sample(scored, held_out)
    return Fleet(tokenizer, phones, tokenizer.encode_batch(sample))


def run(fleet: Fleet, model_config: ModelConfig, encoding: str, seed: int, rounds: int, per_round: int,
        optimizer: str, upload_salt: int = 0) -> Tensors:
    """The server's float32 model after `rounds` rounds with downloads in `encoding`. Another `upload_salt` rounds
    the uploads with other random draws and changes nothing else: the control."""
    strategy = make_strategy(optimizer)
    state = build_model(model_config, seed=seed).state_dict()
    optimizer_state = strategy.init(state)
    draw = random.Random(seed)
    train_config = LocalTrainConfig()
    for round_number in range(rounds):
        download = model_to_bytes(state, round_number, model_config, encoding)
        total: Tensors = {name: torch.zeros_like(w) for name, w in state.items()}
        weight = 0
        for phone in draw.sample(range(len(fleet.phones)), per_round):
            model, version = model_from_bytes(download)
            phone_seed = seed * 1_000_003 + round_number * 1_009 + phone
            work = train(RoundInput(model, version, fleet.tokenizer, fleet.phones[phone][-train_config.max_messages:],
                                    [], train_config, phone_seed))
            if work.result.divergence is not None or work.result.num_examples == 0:
                continue
            examples = min(work.result.num_examples, AggregatorConfig.max_examples_per_update)
            generator = torch.Generator().manual_seed(phone_seed + upload_salt)
            for name, tensor in work.delta.items():
                total[name] += examples * int8.dequantize(*int8.quantize(tensor, generator, stochastic=True))
            weight += examples
        if weight:
            mean = {name: summed / weight for name, summed in total.items()}
            state, optimizer_state = strategy.apply(state, optimizer_state, mean)
    return state


def top1(fleet: Fleet, model_config: ModelConfig, state: Tensors, encoding: str = "float32") -> float:
    """Top-1 (%) of `state` as it is in `encoding` (int8: as phones download it, and as the on-device artifact)."""
    model, _ = model_from_bytes(model_to_bytes(state, 0, model_config, encoding))
    return 100 * evaluate(model, fleet.tokenizer, fleet.held_out).recall_at_1


def paired_summary(differences: list[float]) -> str:
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return f"mean {mean:+.3f}"
    spread = statistics.stdev(differences)
    freedom = len(differences) - 1
    t = T_975.get(freedom) or T_975[max(k for k in T_975 if k <= freedom)]
    half = t * spread / len(differences) ** 0.5
    return f"mean {mean:+.3f}, std {spread:.3f}, 95% paired t interval [{mean - half:+.3f}, {mean + half:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--held-out", type=int, default=4000, help="held-out messages scored (0: all)")
    parser.add_argument("--optimizer", default=AggregatorConfig.server_optimizer)
    parser.add_argument("--control", action="store_true",
                        help="also float32 with the uploads rounded by other random draws: how far two runs that "
                             "differ by a harmless perturbation end apart")
    parser.add_argument("--tiny", action="store_true", help="a small model (the smoke test's size)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    fleet = load_fleet(args.held_out)
    sizes = dict(embedding_dim=8, hidden_dim=16, projection_dim=8) if args.tiny else {}
    model_config = ModelConfig(vocab_size=fleet.tokenizer.vocab_size, **sizes)
    print(f"{len(fleet.phones)} phones, {args.per_round} a round, {args.rounds} rounds, {args.optimizer}; "
          f"top-1 (%) of the final server model on {len(fleet.held_out)} held-out messages")
    control = " | control - float32 (points)" if args.control else ""
    print(f"| seed | float32 | int8 | int8 - float32 (points) | relative | the two served as int8{control} |")
    print("| --- " * (7 if args.control else 6) + "|")
    baselines, differences, relative, controls = [], [], [], []
    started = time.process_time()
    for seed in args.seeds:
        final = {encoding: run(fleet, model_config, encoding, seed, args.rounds, args.per_round, args.optimizer)
                 for encoding in MODEL_ENCODINGS}
        scores = {encoding: top1(fleet, model_config, state) for encoding, state in final.items()}
        served = {encoding: top1(fleet, model_config, state, "int8") for encoding, state in final.items()}
        baselines.append(scores["float32"])
        differences.append(scores["int8"] - scores["float32"])
        relative.append(100 * differences[-1] / scores["float32"] if scores["float32"] else 0.0)
        row = (f"| {seed} | {scores['float32']:.2f} | {scores['int8']:.2f} | {differences[-1]:+.2f} | "
               f"{relative[-1]:+.1f}% | {served['float32']:.2f} / {served['int8']:.2f} |")
        if args.control:
            other = run(fleet, model_config, "float32", seed, args.rounds, args.per_round, args.optimizer, 1)
            controls.append(top1(fleet, model_config, other) - scores["float32"])
            row += f" {controls[-1]:+.2f} |"
        print(row, flush=True)
    # Two unrelated runs differ by about sqrt(2) times this: the yardstick for the paired differences' spread.
    spread = f", std {statistics.stdev(baselines):.3f}" if len(baselines) > 1 else ""
    print(f"float32 across seeds: mean {statistics.fmean(baselines):.3f}{spread}")
    print(f"int8 - float32, points: {paired_summary(differences)}")
    print(f"int8 - float32, relative (%): {paired_summary(relative)}")
    if args.control:
        print(f"control - float32, points: {paired_summary(controls)}")
    cpu = time.process_time() - started + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    print(f"CPU seconds: {cpu:.0f}")


if __name__ == "__main__":
    main()
