"""What federated evaluation on a share of each round's phones costs in noise, and saves in phones' time.

Each selected phone asked to (aggregator/rounds.py `_evaluators`: the first ceil(share x selected) of a round's
draws) scores the model it downloaded on up to 25 held-out messages; the round's federated top-1 is the sum of the
hits over the sum of the positions of those that report. This scores a model once on every one of `--phones`
phones provisioned as the fleet does (their own held-out messages), then draws rounds as the aggregator does:
`--per-round` x over-selection phones selected at random, the first ceil(share x selected) asked, `--per-round` of
the selected reporting (the others drop out). For each share it prints the scored predictions a round, the
standard deviation of a round's federated top-1 around the population's (and of a mean over ten rounds), and the
CPU time a phone saves: scoring's mean CPU-s against a phone's training (timed on `--train-phones` phones).

    .venv/bin/python benchmarks/eval_share.py [--model runs/up/model.safetensors] [--phones 300] [--per-round 10]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aggregator.config import AggregatorConfig
from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import provision
from device_sim.phone import EVAL_MESSAGES
from device_sim.session import RoundInput, train
from keyboard_model.architecture import DEFAULT_ARCHITECTURE, architecture, build_model
from keyboard_model.evaluate import evaluate
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import LatestModel, model_to_bytes

SHARES = (0.1, 0.2, 0.3, 0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="the model scored (default: a new one)")
    parser.add_argument("--phones", type=int, default=300, help="phones scored")
    parser.add_argument("--train-phones", type=int, default=10, help="phones whose training is timed")
    parser.add_argument("--per-round", type=int, default=10, help="phones that report a round")
    parser.add_argument("--rounds", type=int, default=5_000, help="rounds drawn for each share")
    args = parser.parse_args()

    torch.set_num_threads(1)
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    if args.model is None:
        config = architecture(DEFAULT_ARCHITECTURE).config_class(vocab_size=tokenizer.vocab_size)
        served = model_to_bytes(build_model(config).state_dict(), 0, config)
    else:
        served = args.model.read_bytes()
    latest = LatestModel()
    counts, score_s, train_s = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for seed, phone in enumerate(provision(corpus, Path(folder), args.phones, seed=0, log=lambda _: None)):
            train_texts, held_out = phone.messages()
            model, version = latest.fresh(served)
            started = time.process_time()
            scored = evaluate(model, tokenizer, tokenizer.encode_batch(held_out[:EVAL_MESSAGES]))
            score_s.append(time.process_time() - started)
            counts.append((scored.positions, scored.hits_at_1))
            if seed < args.train_phones:
                started = time.process_time()
                train(RoundInput(model, version, tokenizer, train_texts, held_out, LocalTrainConfig(), seed))
                train_s.append(time.process_time() - started)
    population = sum(h for _, h in counts) / max(1, sum(p for p, _ in counts))
    score, trained = statistics.fmean(score_s), statistics.fmean(train_s)
    print(f"{args.phones} phones scored: top-1 {population:.2%} over {sum(p for p, _ in counts)} predictions, "
          f"{statistics.fmean(p for p, _ in counts):.0f} a phone; scoring {score:.3f} CPU-s a phone, "
          f"training {trained:.3f} ({score / (score + trained):.0%} of the two)")

    selected = math.ceil(args.per_round * AggregatorConfig.over_selection)
    rng = random.Random(0)
    print(f"{args.per_round} reporting of {selected} selected a round, {args.rounds} rounds drawn:")
    for share in SHARES:
        asked = math.ceil(share * selected)
        estimates, positions = [], []
        for _ in range(args.rounds):
            drawn = rng.sample(range(len(counts)), selected)
            reporting = set(rng.sample(drawn, args.per_round))
            scoring = [counts[p] for p in drawn[:asked] if p in reporting]
            total = sum(p for p, _ in scoring)
            positions.append(total)
            if total:
                estimates.append(sum(h for _, h in scoring) / total)
        spread = math.sqrt(statistics.fmean((e - population) ** 2 for e in estimates))
        print(f"  share {share:.1f}: {asked} asked, {statistics.fmean(positions):.0f} predictions a round "
              f"({len(estimates) / args.rounds:.0%} of rounds score any); top-1 off the population's by "
              f"{spread:.2%} a round (rms), {spread / math.sqrt(10):.2%} over ten rounds; "
              f"saves {(1 - share) * score:.3f} CPU-s a phone ({(1 - share) * score / (score + trained):.1%})")


if __name__ == "__main__":
    main()
