"""Personal models measured phone by phone: the per-phone distribution of Wang et al. 2019 ("Federated evaluation of
on-device personalization").

For each phone of a finished run (or a sample of them, --phones), the run's model is fine-tuned on the phone's own
training messages with each setting (keyboard_model/personal.py), and the personal and the run's model are both scored
on that phone's held-out messages: each personal model reads only its own phone's messages, as on a phone. Per
setting it prints the share of phones whose top-1 recall the personal model helped, hurt or left unchanged, the median
and mean per-phone gain in top-1 points, top-1 over all the phones' held-out positions pooled (the run's model, then
the personal ones), and the seconds of fine-tuning per phone on one thread. Phones with no held-out word to predict
are left out. A setting is PARAMETERS:LEARNING_RATE:EPOCHS, PARAMETERS "all" or "bias" (the output bias alone).

    .venv/bin/python -m fedkb simulate --in-process --no-progress --rounds 100 --out RUN   # first: a finished run
    .venv/bin/python benchmarks/personal.py RUN [--phones 100] [--settings all:0.1:1 bias:1:1] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch

from device_sim.fleet import provisioned_phones
from keyboard_model.evaluate import EvalCounts
from keyboard_model.personal import PersonalConfig, PhoneScore, score_personalised
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import model_from_bytes

MAKE_A_RUN = ".venv/bin/python -m fedkb simulate --in-process --no-progress --rounds 100 --out RUN"
DEFAULT_SETTINGS = ["all:0.1:1", "all:0.3:1", "all:1:1", "all:0.3:3", "bias:10:1"]


def setting(spec: str) -> PersonalConfig:
    """A PersonalConfig from PARAMETERS:LEARNING_RATE:EPOCHS, e.g. all:0.1:1."""
    try:
        parameters, learning_rate, epochs = spec.split(":")
        return PersonalConfig(epochs=int(epochs), learning_rate=float(learning_rate), parameters=parameters)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{spec!r} is not PARAMETERS:LEARNING_RATE:EPOCHS ({error})") from None


def label(config: PersonalConfig) -> str:
    return f"{config.parameters}:{config.learning_rate:g}:{config.epochs}"


def table(rows: dict[str, list[PhoneScore]]) -> str:
    lines = ["| setting | helped | hurt | unchanged | median gain | mean gain | pooled top-1, run's model → personal "
             "| fine-tuning per phone |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, scores in rows.items():
        # Hits on the same positions are whole numbers: "unchanged" means exactly as many right as before.
        helped = sum(s.personal.hits_at_1 > s.shared.hits_at_1 for s in scores)
        hurt = sum(s.personal.hits_at_1 < s.shared.hits_at_1 for s in scores)
        shares = " | ".join(f"{count / len(scores):.0%}" for count in (helped, hurt, len(scores) - helped - hurt))
        gains = [s.gain_points for s in scores]
        shared = sum((s.shared for s in scores), EvalCounts())
        personal = sum((s.personal for s in scores), EvalCounts())
        lines.append(f"| {name} | {shares} | {statistics.median(gains):+.2f} pts | {statistics.mean(gains):+.2f} pts "
                     f"| {100 * shared.recall_at_1:.2f}% → {100 * personal.recall_at_1:.2f}% "
                     f"| {statistics.mean(s.seconds for s in scores):.2f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help=f"a finished run folder (make one with: {MAKE_A_RUN})")
    parser.add_argument("--phones", type=int, default=None, help="a random sample of this many phones (default: all)")
    parser.add_argument("--settings", type=setting, nargs="+", default=[setting(s) for s in DEFAULT_SETTINGS],
                        help=f"PARAMETERS:LEARNING_RATE:EPOCHS each (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--seed", type=int, default=0, help="draws the sample and each phone's batch order")
    args = parser.parse_args()
    if args.run is None or not (args.run / "model.safetensors").is_file():
        raise SystemExit(f"no finished run {'given' if args.run is None else f'in {args.run}'}: make one first with\n"
                         f"    {MAKE_A_RUN}\nthen: .venv/bin/python benchmarks/personal.py RUN")

    # A phone fine-tunes on one core, beside whatever else it runs.
    torch.set_num_threads(1)
    model, version = model_from_bytes((args.run / "model.safetensors").read_bytes())
    tokenizer = KeyboardTokenizer.from_file(args.run / "tokenizer.json")
    phones = provisioned_phones(args.run / "phones")
    if args.phones is not None and args.phones < len(phones):
        phones = random.Random(args.seed).sample(phones, args.phones)

    rows: dict[str, list[PhoneScore]] = {label(config): [] for config in args.settings}
    for index, phone in enumerate(phones):
        held_out = phone.held_out(tokenizer)
        if not held_out:
            continue
        training = tokenizer.encode_batch(phone.messages()[0])
        for config in args.settings:
            score = score_personalised(model, tokenizer, training, held_out, config, seed=args.seed + index)
            if score.shared.positions:
                rows[label(config)].append(score)

    scored = next(iter(rows.values()))
    if not scored:
        raise SystemExit(f"none of the {len(phones)} phones has a held-out word to predict")
    positions = sum(s.shared.positions for s in scored)
    print(f"\n{args.run}: model version {version}, personalised on each phone's own training messages and scored on "
          f"its held-out ones; {len(scored)} of {len(phones)} phones ({len(phones) - len(scored)} with no held-out "
          f"word left out), {positions:,} held-out positions\n")
    print(table(rows))


if __name__ == "__main__":
    main()
