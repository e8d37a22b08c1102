"""Keystroke latency of the suggestion strip, measured in-process.

Types held-out messages of the default corpus one character at a time (each phone's
newest 20%, never trained on) and times `Suggester.suggest` for every keystroke, on
one thread as a phone's keyboard would have. Prints p50, p99 and max in milliseconds,
and the size of the model's int8 on-device artifact.

    .venv/bin/python benchmarks/latency.py [--model runs/up/model.safetensors] [--keystrokes 5000]

Without a saved model it uses a freshly initialised one of the default sizes of
`--architecture`: the cost of a step does not depend on the weights.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from device_sim.corpus import CorpusConfig, prepare
from keyboard_model import artifact
from keyboard_model.architecture import ARCHITECTURES, DEFAULT_ARCHITECTURE, architecture
from keyboard_model.model import build_model
from keyboard_model.suggest import Suggester
from keyboard_model.weights import model_from_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/up/model.safetensors"))
    parser.add_argument("--keystrokes", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                        help="of the untrained model, when --model does not exist (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    if args.model.exists():
        model, version = model_from_bytes(args.model.read_bytes())
        source = f"{args.model} (version {version})"
    else:
        config = architecture(args.architecture).config_class(vocab_size=tokenizer.vocab_size)
        model, source = build_model(config), f"an untrained default-size {args.architecture} model"
    held_out = corpus.held_out_texts()
    random.Random(0).shuffle(held_out)

    suggester = Suggester(model, tokenizer)
    timings = []
    for message in held_out:
        for end in range(1, len(message) + 1):
            started = time.perf_counter()
            suggester.suggest(message[:end])
            timings.append(time.perf_counter() - started)
        if len(timings) >= args.keystrokes:
            break
    # Each message is a new text box; the first keystroke of each resets the state and is timed too.
    timings_ms = sorted(t * 1000 for t in timings)
    # p[k] is the k-th percentile (p[0] pads the list so the index reads as the percentile).
    p = [timings_ms[0], *statistics.quantiles(timings_ms, n=100, method="inclusive")]
    print(f"model: {source}; {len(timings_ms)} keystrokes on {args.threads} thread(s)")
    print(f"latency per keystroke: p50 {p[50]:.3f} ms  p99 {p[99]:.3f} ms  max {timings_ms[-1]:.3f} ms  "
          f"mean {statistics.fmean(timings_ms):.3f} ms")
    print(f"target: p99 <= 1 ms -> {'met' if p[99] <= 1.0 else 'NOT met'}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keyboard.fkb"
        artifact.export(model, tokenizer, path, version=0)
        print(f"int8 artifact: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
