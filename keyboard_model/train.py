"""One phone's local training: a few epochs of plain SGD over its own messages.

With `proximal_mu` > 0 it is FedProx's local step (Li et al. 2020): the phone minimises its loss plus
mu/2 * ||w - w_global||^2, which keeps a phone with unusual data or many steps from drifting far from
the model it downloaded. `train_centrally` reuses it for the server-side baselines that pool messages
in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from keyboard_model.architecture import NextWordModel
from keyboard_model.errors import UserFacingError
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
    # FedProx's mu: the weight of the proximal term mu/2 * ||w - w_global||^2. 0 is plain SGD (FedAvg's).
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.sequence_length < 1 or self.max_messages < 1:
            raise ValueError(f"epochs, batch_size, sequence_length and max_messages must be positive: {self}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive: {self}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be 0 or more: {self}")


# How far a phone's loss on its first batch may rise over its training, in multiples of ln(vocabulary size), before
# the training counts as diverged (see train_local).
DIVERGED_LOSS_RISE = 2.0


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    num_examples: int  # messages trained on
    # Why training diverged (see `train_local`), or None. A phone never uploads a diverged model's delta.
    divergence: str | None = None


class TrainingDivergedError(UserFacingError):
    """Central training diverged; the message says how."""


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


def language_model_loss(model: NextWordModel, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding targets of `rows`."""
    return model.loss(rows[:, :-1], rows[:, 1:], ignore_index=PAD_ID)


def train_local(
    model: NextWordModel, messages: Sequence[Sequence[int]], config: LocalTrainConfig, seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train `model` in place on encoded messages; returns the mean loss over all steps. `optimizer` steps the
    model if given (central training passes one whose rate a schedule sets), else SGD at the config's rate.

    Each step clips the loss's gradient to `max_grad_norm`, then adds FedProx's proximal gradient
    mu * (w - w_global), w_global being the model as it was given: only the loss's own gradient is clipped,
    so the pull back towards the global model is never scaled down with it. The losses reported and
    judged below are the language model's alone, without the proximal term.

    Training has diverged, and the result's `divergence` says how, when
    - a step's loss or gradient norm is not finite: training stops there, before that step moves the model; or
    - after the last step, the model's loss on the first step's batch is not finite, or is more than
      DIVERGED_LOSS_RISE x ln(vocabulary size) nats above the loss the starting model had on it (the first
      step's loss): the words the phone trained on became more than V^2 times less likely, where ln(V) is all a
      uniform guess loses against certainty.
    Healthy training stays far from that: over 600 phone-rounds of the Shakespeare fleet at learning rate 1.0
    (300 phones, from the initial and from a trained model) the largest rise was 5.1 nats, against
    2 ln(10,000) = 18.4; at learning rate 10 most phones rose by hundreds of nats. The recheck is one forward
    pass over one batch, about 1% of a phone's training time (measured over 40 phones).
    """
    messages, rows = training_rows(messages, config)
    if rows is None:
        return TrainResult(float("nan"), 0)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    parameters = list(model.parameters())
    anchor = [p.detach().clone() for p in parameters] if config.proximal_mu > 0 else None
    model.train()
    losses: list[float] = []
    batches = batch_order(len(rows), config, seed)
    for batch in batches:
        loss = language_model_loss(model, rows[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient_norm = clip_gradients(parameters, config.max_grad_norm)
        losses.append(loss.item())
        why = step_divergence(len(losses), losses[-1], gradient_norm)
        if why is not None:
            return TrainResult(_mean(losses), len(messages), why)
        if anchor is not None:
            with torch.no_grad():
                for p, start in zip(parameters, anchor):
                    if p.grad is not None:
                        p.grad.add_(p - start, alpha=config.proximal_mu)
        optimizer.step()
    with torch.no_grad():
        after = language_model_loss(model, rows[batches[0]]).item()
    return TrainResult(_mean(losses), len(messages), final_divergence(losses[0], after, model.config.vocab_size))


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_`, the same gradients to the bit, returning the norm before clipping; but the gradients are
    scaled only when their norm is above `max_norm`: `clip_grad_norm_` multiplies every one of them by 1.0
    otherwise, a pass over all 1.4M of them on nearly every step (0.4 ms of a 50 ms step, measured)."""
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    norm = total.item()
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return norm


def training_rows(
    messages: Sequence[Sequence[int]], config: LocalTrainConfig
) -> tuple[Sequence[Sequence[int]], torch.Tensor | None]:
    """(the messages a phone trains on this round, their packed rows), or None for rows if no row has a target."""
    messages = messages[-config.max_messages :]
    rows = pack_sequences(messages, config.sequence_length)
    return messages, (rows if (rows[:, 1:] != PAD_ID).any() else None)


def batch_order(num_rows: int, config: LocalTrainConfig, seed: int) -> list[torch.Tensor]:
    """The row indices of every SGD step, in order: a fresh permutation per epoch from a generator seeded with
    `seed`, cut into batches (the last of each epoch may be smaller)."""
    generator = torch.Generator().manual_seed(seed)
    return [batch for _ in range(config.epochs)
            for batch in torch.randperm(num_rows, generator=generator).split(config.batch_size)]


def step_divergence(step: int, loss: float, gradient_norm: float) -> str | None:
    """Why training must stop before step `step` (counted from 1) moves the model, or None if it may go on."""
    if math.isfinite(loss) and math.isfinite(gradient_norm):
        return None
    return f"step {step} had loss {loss:.4g} and gradient norm {gradient_norm:.4g}"


def final_divergence(first_loss: float, after: float, vocab_size: int) -> str | None:
    """Why the trained model counts as diverged, given the first step's loss and the trained model's loss on that
    step's batch (`after`), or None."""
    # Written so that NaN fails it too.
    if after <= first_loss + DIVERGED_LOSS_RISE * math.log(vocab_size):
        return None
    return f"the loss on its first batch went from {first_loss:.4g} to {after:.4g}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def train_centrally(
    model: NextWordModel,
    messages: Sequence[Sequence[int]],
    config: LocalTrainConfig,
    epochs: int,
    after_epoch: Callable[[int, TrainResult], None] = lambda epoch, result: None,
) -> None:
    """Train on pooled messages for `epochs` passes, the learning rate decayed on a cosine per epoch (from the
    config's rate in the first to near 0 in the last, `CosineAnnealingLR`).

    The decay is what lets a central baseline converge instead of hovering at SGD's noise
    floor, so it is a fair upper bound for federated training (phones use a constant rate).
    Raises TrainingDivergedError if an epoch diverges (as `train_local` judges it), rather than
    let a blown-up model stand as a baseline.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    # No FedProx term: pooled training has no global model to stay near.
    epoch_config = replace(config, epochs=1, max_messages=max(1, len(messages)), proximal_mu=0.0)
    for epoch in range(epochs):
        result = train_local(model, messages, epoch_config, seed=epoch, optimizer=optimizer)
        schedule.step()
        after_epoch(epoch, result)
        if result.divergence is not None:
            raise TrainingDivergedError(
                f"central training diverged in epoch {epoch + 1} ({result.divergence}); try a smaller learning rate"
            )
