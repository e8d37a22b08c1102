"""Keystroke latency of the suggestion strip, measured in-process.

Types held-out messages of the default corpus one character at a time (each phone's
newest 20%, never trained on) and times `Suggester.suggest` for every keystroke, on
one thread as a phone's keyboard would have. Prints p50, p99 and max in milliseconds,
and the size of the model's int8 on-device artifact. `keystroke_latency` is the
measurement itself; `benchmarks/quality.py` uses it for every federated model of its table.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from device_sim.corpus import CorpusConfig, PreparedCorpus, prepare
from keyboard_model import artifact
from keyboard_model.architecture import ARCHITECTURES, DEFAULT_ARCHITECTURE, NextWordModel, architecture, build_model
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import model_from_bytes


@dataclass(frozen=True)
class KeystrokeLatency:
    """Milliseconds per keystroke through the suggester: wall time, and the thread's CPU time (what the keystroke
    costs when nothing else wants the core; on a shared machine the wall tail is mostly waiting for it)."""

    keystrokes: int
    threads: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    cpu_p50_ms: float
    cpu_p99_ms: float

    def __str__(self) -> str:
        return (f"p50 {self.p50_ms:.3f} ms  p99 {self.p99_ms:.3f} ms  max {self.max_ms:.3f} ms  "
                f"mean {self.mean_ms:.3f} ms; CPU time p50 {self.cpu_p50_ms:.3f} ms  p99 {self.cpu_p99_ms:.3f} ms")


def percentiles_ms(seconds: list[float]) -> list[float]:
    """p[k] is the k-th percentile in milliseconds, p[0] the minimum and p[100] the maximum."""
    ms = sorted(t * 1000 for t in seconds)
    return [ms[0], *statistics.quantiles(ms, n=100, method="inclusive"), ms[-1]]


def typed_messages(corpus: PreparedCorpus) -> list[str]:
    """The held-out messages the benchmark types, in its fixed shuffled order."""
    held_out = corpus.held_out_texts()
    random.Random(0).shuffle(held_out)
    return held_out


def keystroke_latency(
    model: NextWordModel, tokenizer: KeyboardTokenizer, messages: Sequence[str], keystrokes: int = 5000,
    threads: int = 1,
) -> KeystrokeLatency:
    """Type `messages` one character at a time into a fresh suggester, on `threads` torch threads, until at
    least `keystrokes` keystrokes (whole messages) have been timed. The CPU time is the calling thread's only."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        suggester = Suggester(model, tokenizer)
        wall, cpu = [], []
        for message in messages:
            for end in range(1, len(message) + 1):
                started, started_cpu = time.perf_counter(), time.thread_time()
                suggester.suggest(message[:end])
                wall.append(time.perf_counter() - started)
                cpu.append(time.thread_time() - started_cpu)
            if len(wall) >= keystrokes:
                break
    finally:
        torch.set_num_threads(threads_before)
    # Each message is a new text box; the first keystroke of each resets the state and is timed too.
    p, p_cpu = percentiles_ms(wall), percentiles_ms(cpu)
    return KeystrokeLatency(len(wall), threads, p[50], p[99], p[100], 1000 * statistics.fmean(wall),
                            p_cpu[50], p_cpu[99])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/up/model.safetensors"))
    parser.add_argument("--keystrokes", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCHITECTURE,
                        help="of the untrained model, when --model does not exist (default: %(default)s)")
    args = parser.parse_args()

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    if args.model.exists():
        model, version = model_from_bytes(args.model.read_bytes())
        source = f"{args.model} (version {version})"
    else:
        config = architecture(args.architecture).config_class(vocab_size=tokenizer.vocab_size)
        model, source = build_model(config), f"an untrained default-size {args.architecture} model"

    latency = keystroke_latency(model, tokenizer, typed_messages(corpus), args.keystrokes, args.threads)
    print(f"model: {source}; {latency.keystrokes} keystrokes on {args.threads} thread(s)")
    print(f"latency per keystroke: {latency}")
    print(f"target: p99 <= 1 ms -> {'met' if latency.p99_ms <= 1.0 else 'NOT met'}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keyboard.fkb"
        artifact.export(model, tokenizer, path, version=0)
        print(f"int8 artifact: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
