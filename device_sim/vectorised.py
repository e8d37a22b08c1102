"""The vectorised cohort executor: many phones' local SGD in batched passes, on the CPU or a GPU.

`train_cohort` trains P phones from the same downloaded model at once. Their weights are
stacked (P copies), and each SGD step is one batched pass: the network's features for each
phone's own batch through its own weights (`torch.func.vmap` over the phones), the tied
output layer and loss for all phones in one fused function (`CohortOutputLoss`), one
backward pass (phones share no weights, so each gets only its own gradient), then per phone
the gradient norm, clipping at `max_grad_norm` and the SGD update (with FedProx's proximal
term when `proximal_mu` > 0, as `train_local` adds it). A phone's batches are
exactly those `train_local` draws for its seed (`keyboard_model.train.batch_order`), and
its divergence is judged by the same rule (`step_divergence`, `final_divergence`), so each
phone ends where its own training ends, within float tolerance (tests/test_vectorised.py).

Phones have different numbers of batches (ragged histories). They are sorted by step
count, so at step s the phones with a batch left are a prefix of the stack, and only that
prefix is computed: a phone whose batches are used up takes no further step and its
weights are not touched; it is never given extra steps. A phone whose step had a loss or
gradient norm that is not finite is masked from then on (its update is zero), as
`train_local` stops there. Within a step, a phone's short batch (the last of an epoch) is
filled with rows of PAD, which the loss ignores, so they add nothing to its gradient.

`VectorisedCohort` puts this behind the executor seam (device_sim/executor.py). Its futures
are lazy: `submit` only queues a phone, and the first `result()` asked for trains every
phone queued by then in batched passes; then each phone's mods (evaluation, guard,
clipping, encoding or masking: device_sim/session.py) run one phone at a time, as on a
phone. The network's features come from its architecture's record (`batched_features`,
keyboard_model/architecture.py): the CIFG brings its recurrence in plain operations,
which vmap can batch; the Transformer runs its own `features`.

On the CPU the local process pool stays the default (device_sim/executor.py says why, from
benchmarks/scale.py); this executor is for GPUs, and runs and is tested on the CPU as well.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch.func import vmap

from device_sim.executors import ExecutorSettings
from device_sim.phone import EVAL_MESSAGES
from device_sim.session import LocalWork, RoundInput, local_work, phone_mods
from device_sim.worker import TrainingJob
from keyboard_model.architecture import BatchedFeatures, NextWordModel, architecture
from keyboard_model.errors import UserFacingError
from keyboard_model.tokenizer import PAD_ID, KeyboardTokenizer
from keyboard_model.train import (
    LocalTrainConfig,
    TrainResult,
    batch_order,
    final_divergence,
    step_divergence,
    training_rows,
)
from keyboard_model.weights import Tensors, model_from_bytes

DEVICES = ("cpu", "cuda")
# Phones trained together in one pass when not told otherwise. A pass holds, per phone, a copy of the weights and
# one of their gradients (5.3 MB each for the default model) and the output layer's scores for every position of its
# batch (16 x 20 x vocabulary floats, 11.6 MB at the default vocabulary): about 0.7 GB for 32 phones, 12 GB for 512.
DEFAULT_PHONES_PER_PASS = {"cpu": 32, "cuda": 512}

class PhoneTrained(NamedTuple):
    """One phone's training in a cohort: what `train_local` would have returned, the delta, and its SGD steps."""

    result: TrainResult
    delta: Tensors
    steps: int


def check_device(device: str) -> None:
    """Raise a UserFacingError if the vectorised executor cannot train on `device` here."""
    if device not in DEVICES:
        raise UserFacingError(f"unknown device {device!r} for the vectorised executor; known: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("this torch sees no CUDA device (is it the CPU build?); train on the CPU, --device cpu")


def train_cohort(model: NextWordModel, phones: Sequence[tuple[Sequence[Sequence[int]], int]],
                 config: LocalTrainConfig, device: str = "cpu",
                 phones_per_pass: int | None = None) -> list[PhoneTrained]:
    """Train each phone, given as (its encoded messages, its seed), from `model` as `train_local` would, in batched
    passes of at most `phones_per_pass` phones on `device`. `model` itself is not changed; deltas are on the CPU."""
    check_device(device)
    features = _features_function(model)
    per_pass = phones_per_pass or DEFAULT_PHONES_PER_PASS[device]
    if per_pass < 1:
        raise ValueError(f"phones_per_pass must be at least 1, got {per_pass}")
    start = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    plans = []
    for index, (messages, seed) in enumerate(phones):
        messages, rows = training_rows(messages, config)
        plans.append(_Plan(index, len(messages), rows, [] if rows is None else batch_order(len(rows), config, seed)))
    done: dict[int, PhoneTrained] = {}
    for plan in plans:
        if plan.rows is None:  # nothing to train on: train_local returns at once and the model does not move
            done[plan.index] = PhoneTrained(TrainResult(float("nan"), 0), _zeros(start), 0)
    # Longest first, so that at every step the phones with a batch left are a prefix of the stack.
    trainable = sorted((plan for plan in plans if plan.rows is not None), key=lambda plan: -len(plan.batches))
    for first in range(0, len(trainable), per_pass):
        cohort = trainable[first : first + per_pass]
        for plan, trained in zip(cohort, _train_pass(model, features, start, cohort, config, torch.device(device))):
            done[plan.index] = trained
    return [done[index] for index in range(len(plans))]


@dataclass(frozen=True)
class _Plan:
    index: int  # the phone's place in train_cohort's arguments
    examples: int  # messages trained on
    rows: torch.Tensor | None
    batches: list[torch.Tensor]  # row indices of each step, as train_local takes them


def _already_trained(phone: PhoneTrained) -> Callable[[RoundInput], LocalWork]:
    """The training step of a phone the batched pass has trained: its result, for the phone's mods to finish."""
    return lambda _: LocalWork(phone.result, phone.delta)


def _train_pass(model: NextWordModel, features: BatchedFeatures, start: Tensors, plans: list[_Plan],
                config: LocalTrainConfig, device: torch.device) -> list[PhoneTrained]:
    """One batched pass over `plans`, sorted by step count, longest first."""
    phones, most_steps = len(plans), len(plans[0].batches)
    steps = [len(plan.batches) for plan in plans]
    # Every phone's batches in one tensor, (phone, step, row, token): rows of PAD fill short batches and the steps
    # after a phone's last, which are never computed.
    batches = torch.full((phones, most_steps, config.batch_size, config.sequence_length + 1), PAD_ID, dtype=torch.long)
    for p, plan in enumerate(plans):
        assert plan.rows is not None  # train_cohort answers a phone with nothing to train on before any pass
        for s, batch in enumerate(plan.batches):
            batches[p, s, : len(batch)] = plan.rows[batch]
    batches = batches.to(device)
    start = {name: t.to(device) for name, t in start.items()}
    weights = {name: t.expand(phones, *t.shape).clone() for name, t in start.items()}
    losses = torch.full((phones, most_steps), float("nan"), device=device)
    norms = torch.full_like(losses, float("nan"))
    moving = torch.ones(phones, dtype=torch.bool, device=device)
    with _quiet_batching_fallbacks():
        for s in range(most_steps):
            k = sum(n > s for n in steps)  # the prefix with a batch left, known without a host-device sync
            # Leaves that share the prefix's storage: the step's backward fills their .grad, phone by phone.
            leaves = {name: w[:k].detach().requires_grad_() for name, w in weights.items()}
            step_losses = cohort_loss(model, features, leaves, batches[:k, s])
            step_losses.sum().backward()  # phones share no weights, so each gets only its own loss's gradient
            grads = {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                     for name, leaf in leaves.items()}
            with torch.no_grad():
                losses[:k, s] = step_losses
                # As clip_grad_norm_: the norm of the per-tensor norms, and its clipping coefficient.
                norms[:k, s] = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
                coefficient = (config.max_grad_norm / (norms[:k, s] + 1e-6)).clamp(max=1.0)
                # train_local stops a phone at a step whose loss or gradient norm is not finite, before it moves.
                moving[:k] &= losses[:k, s].isfinite() & norms[:k, s].isfinite()
                for name, w in weights.items():
                    shape = (k,) + (1,) * (w.dim() - 1)
                    step = grads[name] * coefficient.view(shape)
                    if config.proximal_mu > 0:  # FedProx's pull towards the downloaded model, unclipped as there
                        step += config.proximal_mu * (w[:k] - start[name])
                    update = torch.where(moving[:k].view(shape), step, 0.0)
                    w[:k].sub_(update, alpha=config.learning_rate)
        with torch.no_grad():  # the trained model's loss on its first batch, for the final divergence check
            after = cohort_loss(model, features, weights, batches[:, 0]).tolist()
    loss_values, norm_values = losses.tolist(), norms.tolist()
    trained = []
    for p, plan in enumerate(plans):
        # The steps the phone took: all of its batches, or up to the one that stopped it, whose loss counts in the
        # mean as in train_local.
        why = None
        for s in range(steps[p]):
            why = step_divergence(s + 1, loss_values[p][s], norm_values[p][s])
            if why is not None:
                break
        taken = loss_values[p][: s + 1]
        if why is None:
            why = final_divergence(taken[0], after[p], model.config.vocab_size)
        result = TrainResult(sum(taken) / len(taken), plan.examples, why)
        delta = {name: (weights[name][p] - start[name]).cpu() for name in start}
        trained.append(PhoneTrained(result, delta, len(taken)))
    return trained


def cohort_loss(model: NextWordModel, features: BatchedFeatures, weights: Tensors, rows: torch.Tensor) -> torch.Tensor:
    """Each phone's mean next-token cross-entropy, (phones,), over the non-PAD targets of its `rows` (phones, batch,
    tokens), with its own `weights` (each stacked over phones): `language_model_loss` for every phone at once."""
    outputs = vmap(partial(features, model))(weights, rows[:, :, :-1])
    return CohortOutputLoss.apply(outputs.flatten(1, 2), weights["embedding.weight"], weights["output_bias"],
                                  rows[:, :, 1:].flatten(1))


class CohortOutputLoss(torch.autograd.Function):
    """Each phone's mean cross-entropy of the tied output layer, for features (phones, positions, width) and
    targets (phones, positions), PAD targets skipped: the models' `TiedOutputCrossEntropy` with a phone dimension.

    The scores over the vocabulary are the largest tensors of a step; as there, they are made once and turned into
    their own gradient in place. Through vmap the same loss took three times as long (measured on the CPU).
    """

    @staticmethod
    def forward(ctx, features, embedding, bias, targets):
        keep = targets != PAD_ID
        counts = keep.sum(1)
        log_probs = torch.baddbmm(bias[:, None], features, embedding.transpose(1, 2))
        torch.log_softmax(log_probs, dim=2, out=log_probs)
        picked = log_probs.gather(2, targets[..., None])[..., 0]
        ctx.save_for_backward(features, embedding, log_probs, targets, keep, counts)
        return -torch.where(keep, picked, 0.0).sum(1) / counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss):
        features, embedding, log_probs, targets, keep, counts = ctx.saved_tensors
        d_scores = log_probs.exp_()
        d_scores.scatter_add_(2, targets[..., None], torch.full_like(d_scores[..., :1], -1.0))
        d_scores.mul_((keep * (d_loss / counts)[:, None])[..., None])
        return (torch.bmm(d_scores, embedding), torch.bmm(d_scores.transpose(1, 2), features), d_scores.sum(1),
                None)


def _features_function(model: NextWordModel) -> BatchedFeatures:
    state = model.state_dict()
    if set(state) != {name for name, _ in model.named_parameters()}:
        raise UserFacingError("the vectorised executor trains models whose state is all parameters (no buffers)")
    if not {"embedding.weight", "output_bias"} <= set(state):
        raise UserFacingError(f"the vectorised executor needs a tied output layer (embedding.weight, output_bias); "
                              f"the {model.config.architecture} model has none: use --executor local")
    return architecture(model.config.architecture).batched_features


@contextmanager
def _quiet_batching_fallbacks() -> Iterator[None]:
    """vmap has no batching rule for the CPU's fused attention kernel and loops over phones there, with a warning
    per call; the result is the same, and benchmarks/scale.py measures what it costs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        yield


def _zeros(tensors: Tensors) -> Tensors:
    return {name: torch.zeros_like(t) for name, t in tensors.items()}


class _Queued(Future):
    """A phone's future that, asked for its result, first trains every phone queued with its executor."""

    def __init__(self, cohort: VectorisedCohort) -> None:
        super().__init__()
        self._cohort = cohort

    def result(self, timeout: float | None = None) -> tuple[LocalWork, float]:
        if not self.done():
            self._cohort.run_queued()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._cohort.run_queued()
        return super().exception(timeout)


def cohort(tokenizer: KeyboardTokenizer, settings: ExecutorSettings) -> VectorisedCohort:
    """`--executor vectorised` (device_sim/executors.py)."""
    return VectorisedCohort(tokenizer, settings.device, settings.phones_per_pass)


class VectorisedCohort:
    """A `TrainingExecutor` that trains the phones queued by the time a result is asked for in batched passes, in
    this process, on `device` ("cpu" or "cuda")."""

    def __init__(self, tokenizer: KeyboardTokenizer, device: str = "cpu", phones_per_pass: int | None = None,
                 eval_messages: int = EVAL_MESSAGES) -> None:
        check_device(device)
        # By vocabulary size: a job queued before the vocabulary grew trains its model with the tokenizer made for it.
        self._tokenizers = {tokenizer.vocab_size: tokenizer}
        self.device = device
        self.phones_per_pass = phones_per_pass
        self.eval_messages = eval_messages
        self._queue: list[tuple[TrainingJob, _Queued]] = []

    def submit(self, job: TrainingJob) -> Future[tuple[LocalWork, float]]:
        """A lazy future of (the phone's LocalWork, wall seconds spent on it: its share of the batched pass, by SGD
        steps, and its own mods)."""
        future = _Queued(self)
        self._queue.append((job, future))
        return future

    def use_tokenizer(self, tokenizer: KeyboardTokenizer) -> None:
        self._tokenizers[tokenizer.vocab_size] = tokenizer

    def run_queued(self) -> None:
        """Train every queued phone: those that downloaded the same model with the same settings together."""
        queued, self._queue = [(job, future) for job, future in self._queue if not future.cancelled()], []
        groups: dict[tuple[bytes, LocalTrainConfig], list[tuple[TrainingJob, _Queued]]] = {}
        for job, future in queued:
            groups.setdefault((job.model, job.config), []).append((job, future))
        for (model_bytes, config), group in groups.items():
            try:
                self._run_group(model_bytes, config, group)
            except Exception as error:  # each phone's future carries it to whoever asks
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)

    def _run_group(self, model_bytes: bytes, config: LocalTrainConfig,
                   group: list[tuple[TrainingJob, _Queued]]) -> None:
        # One downloaded model serves every phone of the group: training works on stacked copies, and the mods
        # only score it, so none of them changes it.
        model, version = model_from_bytes(model_bytes)
        tokenizer = self._tokenizers[model.config.vocab_size]
        inputs: list[tuple[TrainingJob, _Queued, RoundInput]] = []
        for job, future in group:
            try:
                train_texts, held_out = job.phone.messages(job.now_s)
            except Exception as error:  # a damaged phone fails alone, as in the process pool
                future.set_exception(error)
                continue
            inputs.append((job, future,
                           RoundInput(model, version, tokenizer, train_texts, held_out, config, job.seed)))
        started = time.perf_counter()
        trained = train_cohort(model, [(tokenizer.encode_batch(given.train_texts), job.seed)
                                       for job, _, given in inputs], config, self.device, self.phones_per_pass)
        pass_s = time.perf_counter() - started
        all_steps = sum(t.steps for t in trained) or 1
        for (job, future, given), phone in zip(inputs, trained):
            started = time.perf_counter()
            try:
                mods = phone_mods(job.compression, self.eval_messages if job.evaluate else 0, job.clipping, job.secure,
                                  job.phone.personalisation(job.personal))
                work = local_work(given, mods, train_step=_already_trained(phone))
            except Exception as error:  # one phone's failure is that phone's
                future.set_exception(error)
                continue
            future.set_result((work, pass_s * phone.steps / all_steps + time.perf_counter() - started))

    def close(self) -> None:
        """Drop the phones still queued: their futures are cancelled."""
        for _, future in self._queue:
            future.cancel()
        self._queue = []
