"""Local-training speed of the CIFG-LSTM against what the machine's matrix multiply can do.

Trains the default-size model with the phones' settings (SGD, batch 16, rows of 20
tokens) on real phone messages of the default corpus, and prints tokens per second
and the share of the machine's measured fp32 matrix-multiply FLOP/s (all cores, one
1024 x 1024 product) that training reaches. A training token costs three forward
passes' worth of matrix FLOPs (forward, and backward through inputs and weights),
counted from the model's sizes.

Two layouts are measured:
- one phone on all cores: how fast a single phone's round finishes;
- one phone per core, each on one thread, all at once: the machine's training
  throughput, which is what a fleet simulation uses. A phone's per-step products
  (16 rows by 96) are too small to keep two cores busy, so phones side by side beat
  one phone split across cores. The target (40% of the matmul peak) is for this one.

    .venv/bin/python benchmarks/train_speed.py [--seconds 20] [--workers N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import torch

from device_sim.corpus import CorpusConfig, prepare
from keyboard_model.model import ModelConfig, build_model
from keyboard_model.train import LocalTrainConfig, language_model_loss, pack_sequences

TARGET_SHARE = 0.40


def matmul_flops_per_second(size: int = 1024, seconds: float = 3.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started)


def training_flops_per_token(config: ModelConfig) -> int:
    e, h, p, v = config.embedding_dim, config.hidden_dim, config.projection_dim, config.vocab_size
    forward = 2 * (e * 3 * h + p * 3 * h + h * p + p * v)
    return 3 * forward


def training_rows(worker: int, workers: int) -> tuple[torch.Tensor, ModelConfig]:
    """Packed rows of real phone messages (each worker its own phones), and the default model's config."""
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    users = list(corpus.users().values())[worker * 50 : (worker + 1) * 50]
    rows = pack_sequences(tokenizer.encode_batch([m.text for user in users for m in user]), LocalTrainConfig.sequence_length)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(worker))]
    return rows, ModelConfig(vocab_size=tokenizer.vocab_size)


def tokens_per_second(rows: torch.Tensor, model_config: ModelConfig, seconds: float, start_together=None) -> float:
    """Train for `seconds` after a short warm-up (and after every worker is ready, when given a barrier)."""
    config = LocalTrainConfig()
    model = build_model(model_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    batches = rows.split(config.batch_size)
    tokens, step, started = 0, 0, None
    while started is None or time.perf_counter() - started < seconds:
        if step == 5:  # warm-up done
            if start_together is not None:
                start_together.wait()
            tokens, started = 0, time.perf_counter()
        batch = batches[step % len(batches)]
        loss = language_model_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        tokens += int((batch[:, 1:] != 0).sum())
        step += 1
    return tokens / (time.perf_counter() - started)


def _one_thread_worker(worker: int, workers: int, seconds: float, barrier, results) -> None:
    torch.set_num_threads(1)
    rows, model_config = training_rows(worker, workers)
    results.put(tokens_per_second(rows, model_config, seconds, barrier))


def phones_side_by_side(workers: int, seconds: float) -> list[float]:
    """Tokens per second of each of `workers` processes training at the same time, one thread each."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(workers), spawn.Queue()
    processes = [
        spawn.Process(target=_one_thread_worker, args=(w, workers, seconds, barrier, results)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    speeds = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="phones training side by side")
    args = parser.parse_args()

    rows, model_config = training_rows(0, 1)
    per_token = training_flops_per_token(model_config)
    peak = matmul_flops_per_second()
    print(f"machine: {torch.get_num_threads()} threads, fp32 matmul {peak / 1e9:.1f} GFLOP/s (1024x1024)")
    print(f"model: {model_config}; {per_token / 1e6:.2f} MFLOP per training token")

    def report(label: str, speed: float) -> float:
        share = speed * per_token / peak
        print(f"{label}: {speed:,.0f} tokens/s = {speed * per_token / 1e9:.1f} GFLOP/s = {share:.0%} of matmul peak")
        return share

    report(f"one phone on {torch.get_num_threads()} threads", tokens_per_second(rows, model_config, args.seconds))
    speeds = phones_side_by_side(args.workers, args.seconds)
    each = ", ".join(f"{s:,.0f}" for s in speeds)
    share = report(f"{args.workers} phones side by side, one thread each ({each})", sum(speeds))
    print(f"target: >= {TARGET_SHARE:.0%} -> {'met' if share >= TARGET_SHARE else 'NOT met'}")


if __name__ == "__main__":
    main()
