"""Local-training speed of the CIFG-LSTM against what the machine's matrix multiply can do.

Trains the default-size model with the phones' settings (SGD, batch 16, rows of 20
tokens) on real phone messages of the default corpus, and prints tokens per second
and the share of the machine's measured fp32 matrix-multiply FLOP/s that training
reaches. A training token costs three forward passes' worth of matrix FLOPs (forward,
and backward through inputs and weights), counted from the model's sizes.

    .venv/bin/python benchmarks/train_speed.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from device_sim.corpus import CorpusConfig, prepare
from keyboard_model.model import CIFGLSTM, ModelConfig, build_model
from keyboard_model.train import LocalTrainConfig, language_model_loss, pack_sequences


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


def tokens_per_second(model: CIFGLSTM, rows: torch.Tensor, config: LocalTrainConfig, seconds: float) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    batches = rows.split(config.batch_size)
    tokens, step, started = 0, 0, None
    while started is None or time.perf_counter() - started < seconds:
        if step == 5:  # warm-up done
            tokens, started = 0, time.perf_counter()
        batch = batches[step % len(batches)]
        loss = language_model_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        tokens += batch[:, 1:].numel()
        step += 1
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    config = LocalTrainConfig()
    messages = [m.text for user in list(corpus.users().values())[:50] for m in user]
    rows = pack_sequences(tokenizer.encode_batch(messages), config.sequence_length)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size)

    peak = matmul_flops_per_second()
    speed = tokens_per_second(build_model(model_config), rows, config, args.seconds)
    per_token = training_flops_per_token(model_config)
    achieved = speed * per_token
    print(f"machine: {torch.get_num_threads()} threads, fp32 matmul {peak / 1e9:.1f} GFLOP/s (1024x1024)")
    print(f"model: {model_config}; {per_token / 1e6:.2f} MFLOP per training token")
    print(f"local training: {speed:,.0f} tokens/s = {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of matmul peak")
    print(f"target: >= 40% -> {'met' if achieved / peak >= 0.40 else 'NOT met'}")


if __name__ == "__main__":
    main()
