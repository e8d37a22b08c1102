"""Phone-updates per second of each training executor, at 10, 100 (and 1,000) phones a round.

The workload is the same for every executor: the first N provisioned phones of the default
corpus (more phones than users replay users' histories, as benchmarks/fleet.py does), each
with its whole history typed, the default-size CIFG at its initialisation, the phones'
default training settings and int8 uploads; phone k trains with seed k. Each executor gets
the N phones through the executor seam (`submit`, then every `result()`), which is what the
fleet asks of it: the phone's whole local work (scoring the downloaded model, training,
encoding), not training alone; as the aggregator asks, only a share of the phones score the model
(`--eval-share`, the aggregator's default; 1 for every phone). Before the measured cohorts each executor does
a few phones
unmeasured (the local pool starts its workers and loads the C++ kernel in each).

Printed per executor and cohort: wall seconds, phone-updates per second, training tokens
per second (the non-PAD targets of every SGD step), that rate as a share of the machine's
measured fp32 matrix-multiply rate (benchmarks/train_speed.py counts a training token's
FLOPs), and how far the executors' per-phone mean losses are apart (the same training,
so they agree to float rounding). The cohorts run interleaved, executor after executor, so
that load from elsewhere on the machine falls on each alike.

    .venv/bin/python benchmarks/scale.py [--sizes 10 100] [--with-1000] [--repeats 2]
        [--phones-per-pass N] [--vectorised-threads 1 2] [--with-ray] [--plot FILE.png] [--out /tmp/fedkb-scale]

Runs on the CPU, and on CUDA as well when torch sees a GPU (the vectorised executor only: the
local pool trains on the CPU); it says so when there is none.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from train_speed import matmul_flops_per_second

from aggregator.config import AggregatorConfig
from device_sim.corpus import CorpusConfig, prepare
from device_sim.executors import EXECUTORS, ExecutorSettings, TrainingExecutor, make_executor
from device_sim.fleet import provision
from device_sim.phone import Phone
from device_sim.worker import TrainingJob
from keyboard_model.architecture import architecture, build_model
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import PAD_ID, KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, training_rows
from keyboard_model.weights import model_to_bytes

TYPING_DAYS = 7.0
NOW_S = TYPING_DAYS * 86_400.0  # every training message typed
WARM_UP_PHONES = 4


@dataclass(frozen=True)
class Setup:
    """An executor as measured: its name, where it trains, and the torch threads of this process while it runs
    (None: as they are; the local pool's workers use one thread each whatever this process has)."""

    executor: str
    device: str
    threads: int | None
    make: Callable[[], TrainingExecutor]

    @property
    def label(self) -> str:
        return self.device if self.threads is None else f"{self.device} x{self.threads}"


@dataclass(frozen=True)
class Measured:
    setup: Setup
    phones: int
    wall_s: float
    tokens: int
    losses: list[float]

    @property
    def updates_per_s(self) -> float:
        return self.phones / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def training_tokens(phone: Phone, tokenizer: KeyboardTokenizer, config: LocalTrainConfig) -> int:
    """The targets a phone's training steps score: every non-PAD target of its rows, once per epoch."""
    _, rows = training_rows(tokenizer.encode_batch(phone.messages(NOW_S)[0]), config)
    return 0 if rows is None else int((rows[:, 1:] != PAD_ID).sum()) * config.epochs


def run_cohort(executor: TrainingExecutor, phones: list[Phone], model: bytes, config: LocalTrainConfig,
               eval_share: float) -> tuple[float, list[float]]:
    """Wall seconds for every phone's local work through `executor`, and each phone's mean training loss. The first
    ceil(eval_share x phones) also score the model, as the aggregator asks a share of each round's phones to."""
    started = time.perf_counter()
    scoring = math.ceil(eval_share * len(phones))
    jobs = [executor.submit(TrainingJob(phone, model, config, seed, "int8", NOW_S, None, evaluate=seed < scoring))
            for seed, phone in enumerate(phones)]
    losses = [job.result()[0].result.mean_loss for job in jobs]
    return time.perf_counter() - started, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="phones a round (default: 10 100)")
    parser.add_argument("--with-1000", action="store_true", help="also 1,000 phones a round")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each cohort (default: %(default)s)")
    parser.add_argument("--phones-per-pass", type=int, default=None, help="the vectorised executor's passes")
    parser.add_argument("--vectorised-threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="torch threads of the vectorised executor on the CPU, each measured "
                             "(default: one per core)")
    parser.add_argument("--with-ray", action="store_true", help="also the Ray executor (a Ray on this machine)")
    parser.add_argument("--eval-share", type=float, default=AggregatorConfig.eval_share,
                        help="share of the phones that also score the model (default: the aggregator's, %(default)s)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="draw phone-updates/s against cohort size into this PNG")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedkb-scale"), help="where the phones are provisioned")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes + ([1000] if args.with_1000 else [])))

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    count = max(sizes) + WARM_UP_PHONES
    phones = provision(corpus, args.out / f"phones-{count}", count, seed=0, typing_days=TYPING_DAYS)
    warm_up, phones = phones[:WARM_UP_PHONES], phones[WARM_UP_PHONES:]
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size)
    model = model_to_bytes(build_model(model_config).state_dict(), 0, model_config)
    config = LocalTrainConfig()
    tokens = [training_tokens(phone, tokenizer, config) for phone in phones]

    cuda = torch.cuda.is_available()
    setups = []
    for name in ["local", "vectorised", *(["ray"] if args.with_ray else [])]:
        executor = EXECUTORS[name]
        for device in (d for d in executor.devices if d == "cpu" or cuda):
            passes = args.phones_per_pass if "phones_per_pass" in executor.options else None
            make = partial(make_executor, name, tokenizer, ExecutorSettings(device, phones_per_pass=passes))
            # This process's threads matter to an executor that trains in it, on the CPU.
            in_this_process = name == "vectorised" and device == "cpu"
            setups += [Setup(name, device, threads, make)
                       for threads in (args.vectorised_threads if in_this_process else [None])]
    peak = matmul_flops_per_second()
    per_token = architecture(model_config.architecture).training_flops_per_token(model_config)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} on {torch.get_num_threads()} threads, "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s (1024x1024), load average {os.getloadavg()[0]:.1f}; GPU: "
          f"{torch.cuda.get_device_name() if cuda else 'none (torch sees no CUDA device)'}")
    print(f"workload: {model_config}, {config}; {per_token / 1e6:.2f} MFLOP per training token; "
          f"a share of {args.eval_share:g} of the phones score the model")

    made = [(setup, setup.make()) for setup in setups]
    results: list[Measured] = []
    try:
        for setup, executor in made:
            with torch_threads(setup.threads):
                run_cohort(executor, warm_up, model, config, args.eval_share)
        for size in sizes:
            for _ in range(args.repeats):
                for setup, executor in made:
                    with torch_threads(setup.threads):
                        wall_s, losses = run_cohort(executor, phones[:size], model, config, args.eval_share)
                    results.append(Measured(setup, size, wall_s, sum(tokens[:size]), losses))
                    print(f"  {setup.executor} on {setup.label}, {size} phones: {wall_s:.1f} s", flush=True)
    finally:
        for _, executor in made:
            executor.close()

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'executor':<12}{'device':<9}{'phones':>7}{'best s':>9}{'updates/s':>11}{'tokens/s':>10}"
          f"{'matmul share':>14}")
    for setup in setups:
        for size in sizes:
            best = min((r for r in results if (r.setup, r.phones) == (setup, size)), key=lambda r: r.wall_s)
            print(f"{setup.executor:<12}{setup.label:<9}{size:>7}{best.wall_s:>9.1f}{best.updates_per_s:>11.2f}"
                  f"{best.tokens_per_s:>10,.0f}{best.tokens_per_s * per_token / peak:>14.0%}")
    for size in sizes:
        runs = [r for r in results if r.phones == size]
        gap = max((abs(a - b) for other in runs[1:] for a, b in zip(runs[0].losses, other.losses)
                   if math.isfinite(a) and math.isfinite(b)), default=0.0)
        print(f"{size} phones: the executors' per-phone mean losses differ by at most {gap:.2e}")
    if not cuda:
        print("CUDA: none here, so no GPU figures.")
    if args.plot is not None:
        plot(results, setups, sizes, args.plot)


def plot(results: list[Measured], setups: list[Setup], sizes: list[int], png: Path) -> None:
    """Best phone-updates/s of each executor against phones a round, on log-log axes."""
    import matplotlib  # only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for setup in setups:
        best = [max(r.updates_per_s for r in results if (r.setup, r.phones) == (setup, size)) for size in sizes]
        axes.plot(sizes, best, "o-", label=f"{setup.executor} on {setup.label}")
    axes.set_xscale("log")
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.minorticks_off()
    axes.set_xlabel("phones a round")
    axes.set_ylabel("phone-updates per second (best of repeats)")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    print(f"wrote {png}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
