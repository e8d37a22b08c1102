"""Local-training speed of a phone's model against what the machine's matrix multiply can do.

Trains the default-size model of each `--architecture` (the CIFG-LSTM by default; repeat
the option to measure several) with the phones' settings (SGD, batch 16, rows of 20
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

Then one training step's CPU time by part (`--step-split`, the CIFG only): the embedding with the input gates'
product, the recurrence (the C++ walk), the tied output layer over the whole vocabulary with the loss, clipping
and the optimiser step; each part's forward and backward, run as the step runs them.

Then the cost of one phone-update: a selected phone's whole local work (`Phone.local_work`:
load the downloaded model, score it on up to 25 held-out messages, one epoch of SGD over
its newest 400 training messages, encode the int8 update) from the initial model, on one
thread, for `--phone-updates` phones provisioned as the fleet does, and its CPU time by part: the
model loaded from the downloaded bytes (or reset from the copy a worker keeps, `LatestModel`), scored, trained
and encoded. With several
architectures each phone runs them in turn, one after the other, so load from anything
else on the machine falls on all of them alike.

    .venv/bin/python benchmarks/train_speed.py [--seconds 20] [--workers N] [--phone-updates 40]
        [--step-split 200] [--architecture cifg --architecture transformer]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aggregator.config import AggregatorConfig
from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import provision
from device_sim.phone import EVAL_MESSAGES
from device_sim.session import RoundInput, train, update_bytes
from keyboard_model.architecture import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    ArchitectureConfig,
    architecture,
    build_model,
)
from keyboard_model.evaluate import evaluate
from keyboard_model.model import CIFGLSTM, CompiledCIFGRecurrence, TiedOutputCrossEntropy
from keyboard_model.native import cifg_kernel
from keyboard_model.tokenizer import PAD_ID
from keyboard_model.train import LocalTrainConfig, clip_gradients, language_model_loss, pack_sequences
from keyboard_model.weights import LatestModel, model_from_bytes, model_to_bytes

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


def default_config(name: str, vocab_size: int) -> ArchitectureConfig:
    return architecture(name).config_class(vocab_size=vocab_size)


def training_rows(worker: int, name: str) -> tuple[torch.Tensor, ArchitectureConfig]:
    """Packed rows of real phone messages (each worker its own phones), and the default `name` model's config."""
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    users = list(corpus.users().values())[worker * 50 : (worker + 1) * 50]
    rows = pack_sequences(tokenizer.encode_batch([m.text for user in users for m in user]),
                          LocalTrainConfig.sequence_length)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(worker))]
    return rows, default_config(name, tokenizer.vocab_size)


def tokens_per_second(rows: torch.Tensor, model_config: ArchitectureConfig, seconds: float,
                      start_together=None) -> float:
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
        clip_gradients(list(model.parameters()), config.max_grad_norm)
        optimizer.step()
        tokens += int((batch[:, 1:] != 0).sum())
        step += 1
    return tokens / (time.perf_counter() - started)


def _one_thread_worker(worker: int, name: str, seconds: float, barrier, results) -> None:
    torch.set_num_threads(1)
    rows, model_config = training_rows(worker, name)
    results.put(tokens_per_second(rows, model_config, seconds, barrier))


def phones_side_by_side(name: str, workers: int, seconds: float) -> list[float]:
    """Tokens per second of each of `workers` processes training at the same time, one thread each."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(workers), spawn.Queue()
    processes = [
        spawn.Process(target=_one_thread_worker, args=(w, name, seconds, barrier, results)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    speeds = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return speeds


def seconds_per_phone_update(names: list[str], phones: int) -> dict[str, list[float]]:
    """Wall seconds of each of `phones` phones' local work for one round (`Phone.local_work`: load the model, score
    it on held-out messages, train, encode the int8 update), one thread, from each architecture's initial model.
    The phones are provisioned as the fleet does (seed 0) and hold their whole history."""
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    initial = {}
    for name in names:
        config = default_config(name, tokenizer.vocab_size)
        initial[name] = model_to_bytes(build_model(config).state_dict(), 0, config)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for seed, phone in enumerate(provision(corpus, Path(folder), phones, seed=0, log=lambda _: None)):
                for name in names:
                    started = time.perf_counter()
                    phone.local_work(initial[name], tokenizer, LocalTrainConfig(), seed)
                    seconds[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads_before)
    return seconds


STEP_PARTS = ("embedding + input gates", "recurrence", "output layer + loss", "clip + optimiser step")


def step_split(rows: torch.Tensor, model_config: ArchitectureConfig, steps: int) -> dict[str, float]:
    """CPU seconds per training step of each part in STEP_PARTS, forward and backward together, one thread.

    The step is cut where the model's own functions meet (CIFGLSTM.hidden_states, TiedOutputCrossEntropy): each
    part's output is detached before the next reads it, and its backward runs on the gradient the next one gave
    back, so the same operations run as in `train_local`'s step, only timed apart."""
    config = LocalTrainConfig()
    model = build_model(model_config)
    if not isinstance(model, CIFGLSTM) or cifg_kernel() is None:
        raise SystemExit("--step-split measures the CIFG trained with its C++ kernel")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    batches = rows.split(config.batch_size)
    spent = dict.fromkeys(STEP_PARTS, 0.0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps + 5):  # the first five warm up
            batch = batches[step % len(batches)]
            tokens, targets = batch[:, :-1], batch[:, 1:]
            keep = targets != PAD_ID
            clock = [time.process_time()]
            optimizer.zero_grad(set_to_none=True)
            gate_inputs = model.input_weights(model.embedding(tokens))
            clock.append(time.process_time())
            walk_in = gate_inputs.detach().requires_grad_()
            state = model.initial_state(len(tokens))
            outputs, _, _ = CompiledCIFGRecurrence.apply(walk_in, *state, model.recurrent_weights.weight,
                                                        model.projection.weight)
            clock.append(time.process_time())
            projected = outputs.detach().requires_grad_()
            loss = TiedOutputCrossEntropy.apply(projected[keep], model.embedding.weight, model.output_bias,
                                                targets[keep])
            loss.backward()
            clock.append(time.process_time())
            outputs.backward(projected.grad)
            clock.append(time.process_time())
            gate_inputs.backward(walk_in.grad)
            clock.append(time.process_time())
            clip_gradients(list(model.parameters()), config.max_grad_norm)
            optimizer.step()
            clock.append(time.process_time())
            if step >= 5:
                lap = [b - a for a, b in zip(clock, clock[1:])]
                for part, seconds in zip(STEP_PARTS, (lap[0] + lap[4], lap[1] + lap[3], lap[2], lap[5])):
                    spent[part] += seconds / steps
    finally:
        torch.set_num_threads(threads_before)
    return spent


PHONE_PARTS = ("load from bytes", "reset from the worker's copy", "score", "train", "encode")


def phone_work_split(name: str, phones: int) -> dict[str, float]:
    """Mean CPU seconds per phone of each part of a phone's local work (PHONE_PARTS), one thread, from the default
    `name` model as the aggregator serves it by default: the parts `Phone.local_work` runs, timed one by one.
    "load from bytes" is what a phone that decodes its download pays; "reset from the worker's copy" what it pays
    when its worker keeps the decoded model (`LatestModel`); a phone pays one of the two."""
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    model_config = default_config(name, tokenizer.vocab_size)
    served = model_to_bytes(build_model(model_config).state_dict(), 0, model_config,
                            AggregatorConfig.download_encoding)
    latest = LatestModel()
    latest.fresh(served)
    spent = dict.fromkeys(PHONE_PARTS, 0.0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            for seed, phone in enumerate(provision(corpus, Path(folder), phones, seed=0, log=lambda _: None)):
                train_texts, held_out = phone.messages()
                clock = [time.process_time()]
                model_from_bytes(served)
                clock.append(time.process_time())
                model, version = latest.fresh(served)
                clock.append(time.process_time())
                evaluate(model, tokenizer, tokenizer.encode_batch(held_out[:EVAL_MESSAGES]))
                clock.append(time.process_time())
                work = train(RoundInput(model, version, tokenizer, train_texts, held_out, LocalTrainConfig(), seed))
                clock.append(time.process_time())
                update_bytes(work.delta, work.result.num_examples, "int8", seed)
                clock.append(time.process_time())
                for part, a, b in zip(PHONE_PARTS, clock, clock[1:]):
                    spent[part] += (b - a) / phones
    finally:
        torch.set_num_threads(threads_before)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="phones training side by side")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), action="append",
                        help=f"the model to train; repeat for several (default: {DEFAULT_ARCHITECTURE})")
    parser.add_argument("--phone-updates", type=int, default=40, help="phones whose one update is timed")
    parser.add_argument("--step-split", type=int, default=200,
                        help="training steps timed by part, CIFG only (0: skip)")
    args = parser.parse_args()
    names = args.architecture or [DEFAULT_ARCHITECTURE]

    peak = matmul_flops_per_second(seconds=min(3.0, args.seconds))
    print(f"machine: {torch.get_num_threads()} threads, fp32 matmul {peak / 1e9:.1f} GFLOP/s (1024x1024)")
    for name in names:
        rows, model_config = training_rows(0, name)
        per_token = architecture(name).training_flops_per_token(model_config)
        print(f"\nmodel: {model_config}; {per_token / 1e6:.2f} MFLOP per training token")

        def report(label: str, speed: float) -> float:
            share = speed * per_token / peak  # noqa: B023 (called in this iteration only)
            gigaflops = speed * per_token / 1e9  # noqa: B023 (called in this iteration only)
            print(f"{label}: {speed:,.0f} tokens/s = {gigaflops:.1f} GFLOP/s = {share:.0%} of matmul peak")
            return share

        if args.step_split > 0 and name == "cifg":
            split = step_split(rows, model_config, args.step_split)
            total = sum(split.values())
            print(f"one training step (batch {LocalTrainConfig.batch_size}, one thread, mean of {args.step_split}): "
                  f"{total * 1e3:.1f} ms CPU = " + ", ".join(f"{part} {seconds * 1e3:.1f} ms ({seconds / total:.0%})"
                                                          for part, seconds in split.items()))
        report(f"one phone on {torch.get_num_threads()} threads", tokens_per_second(rows, model_config, args.seconds))
        speeds = phones_side_by_side(name, args.workers, args.seconds)
        each = ", ".join(f"{s:,.0f}" for s in speeds)
        share = report(f"{args.workers} phones side by side, one thread each ({each})", sum(speeds))
        print(f"target: >= {TARGET_SHARE:.0%} -> {'met' if share >= TARGET_SHARE else 'NOT met'}")

    if args.phone_updates > 0:
        print(f"\none phone-update (Phone.local_work, one thread), {args.phone_updates} phones, in turn:")
        for name, seconds in seconds_per_phone_update(names, args.phone_updates).items():
            print(f"  {architecture(name).label}: mean {statistics.fmean(seconds):.3f} s, "
                  f"median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s per phone-update")
        for name in names:
            split = phone_work_split(name, args.phone_updates)
            print(f"  {architecture(name).label}, CPU-s per phone by part: "
                  + ", ".join(f"{part} {seconds:.3f}" for part, seconds in split.items()))


if __name__ == "__main__":
    main()
