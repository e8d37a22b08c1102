"""One phone's local training: a few epochs of plain SGD over its own messages.

`train_centrally` reuses it for the server-side baselines that pool messages in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from keyboard_model.model import CIFGLSTM
from keyboard_model.tokenizer import PAD_ID


@dataclass(frozen=True)
class LocalTrainConfig:
    """Client-side optimisation, as in the TFF/FedJAX Stack Overflow baseline (SGD, batch 16)."""

    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1.0
    sequence_length: int = 20
    # Clipping each step keeps one unlucky batch of a random-init model from blowing up.
    max_grad_norm: float = 5.0
    # Newest messages a phone trains on in one round; older ones wait for later rounds.
    max_messages: int = 400

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.sequence_length < 1 or self.max_messages < 1:
            raise ValueError(f"epochs, batch_size, sequence_length and max_messages must be positive: {self}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive: {self}")


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    num_examples: int  # messages trained on


def pack_sequences(messages: Sequence[Sequence[int]], sequence_length: int) -> torch.Tensor:
    """Concatenate encoded messages and cut the stream into rows of `sequence_length + 1` tokens.

    Rows overlap by one token so every token but the first is a target exactly once.
    The last row is padded with PAD, which the loss ignores.
    """
    stream = [token for message in messages for token in message]
    if len(stream) < 2:
        return torch.empty(0, sequence_length + 1, dtype=torch.long)
    rows = []
    for start in range(0, len(stream) - 1, sequence_length):
        row = stream[start : start + sequence_length + 1]
        rows.append(row + [PAD_ID] * (sequence_length + 1 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def language_model_loss(model: CIFGLSTM, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding targets of `rows`."""
    return model.loss(rows[:, :-1], rows[:, 1:], ignore_index=PAD_ID)


def train_local(
    model: CIFGLSTM, messages: Sequence[Sequence[int]], config: LocalTrainConfig, seed: int = 0
) -> TrainResult:
    """Train `model` in place on encoded messages; returns the mean loss over all steps."""
    messages = messages[-config.max_messages :]
    rows = pack_sequences(messages, config.sequence_length)
    if not (rows[:, 1:] != PAD_ID).any():
        return TrainResult(float("nan"), 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total_loss, steps = 0.0, 0
    for _ in range(config.epochs):
        for batch in torch.randperm(len(rows), generator=generator).split(config.batch_size):
            loss = language_model_loss(model, rows[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            total_loss += loss.item()
            steps += 1
    return TrainResult(total_loss / steps, len(messages))


def train_centrally(
    model: CIFGLSTM,
    messages: Sequence[Sequence[int]],
    config: LocalTrainConfig,
    epochs: int,
    after_epoch: Callable[[int, TrainResult], None] = lambda epoch, result: None,
) -> None:
    """Train on pooled messages for `epochs` passes, the learning rate decayed on a cosine per epoch.

    The decay is what lets a central baseline converge instead of hovering at SGD's noise
    floor, so it is a fair upper bound for federated training (phones use a constant rate).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    for epoch in range(epochs):
        rate = config.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        epoch_config = replace(config, epochs=1, learning_rate=rate, max_messages=max(1, len(messages)))
        after_epoch(epoch, train_local(model, messages, epoch_config, seed=epoch))
