"""A phone's local work in a round, as training wrapped by mods.

Local training (`train`) returns only a delta. Everything optional around it is a mod
that wraps the next step, as Flower's client mods wrap `call_next`, so training never
sees privacy or encoding, and each mod can be tested, added or left out on its own:
- `evaluated`: scores the downloaded model on held-out messages before training
  (federated evaluation: three counts, no words);
- `personalised`: fine-tunes a personal copy of the downloaded model on the phone's own
  messages and keeps it on the phone, never in the upload; in a plain round it adds the
  personal copy's two hit counts to the evaluation (keyboard_model/personal.py);
- `guarded`: drops a delta whose training diverged or that holds non-finite values, so
  the phone aborts instead of uploading it;
- `clipped`: clips the delta to the norm the aggregator asked for (differential privacy)
  and, with adaptive clipping, notes the one bit the phone reports: was it within;
- `encoded`: the plain upload, int8 with stochastic rounding (or float32), with the bit
  in its metadata when one is asked for;
- `masked`: a secure round's upload, the delta, the counts and the bit masked together.
`local_work` composes them, outermost first. Every phone runs this, the simulated
fleet's and "this browser is a phone" alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from aggregator.api.schemas import CheckinResponse, EvaluationReport, SecAggState
from device_sim.secure_aggregation import SecAggPhone
from keyboard_model.architecture import NextWordModel
from keyboard_model.evaluate import EvalCounts, evaluate
from keyboard_model.norms import clip_to_norm, l2_norm
from keyboard_model.personal import PersonalConfig, personalise
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, TrainResult, train_local
from keyboard_model.update_codec import encode_update
from keyboard_model.weights import Tensors


@dataclass(frozen=True)
class RoundInput:
    """What the phone has for the round: the downloaded model (trained in place), its version, and its messages."""

    model: NextWordModel
    model_version: int
    tokenizer: KeyboardTokenizer
    train_texts: list[str]
    held_out: list[str]
    config: LocalTrainConfig
    seed: int


@dataclass(frozen=True)
class LocalWork:
    """What a step gives the one around it; at the end, what the phone sends and how training went (which stays on
    the phone)."""

    result: TrainResult
    # None: dropped (training diverged: no upload either, the phone sends only an abort), or left behind once the
    # upload is encoded (an executor hands back only the upload)
    delta: Tensors | None = None
    evaluation: EvaluationReport | None = None  # None: nothing scored, or a secure round (the counts are masked)
    # Adaptive clipping: whether the delta's norm was within the clip norm (None: not asked).
    within_clip: bool | None = None
    upload: bytes | None = None


@dataclass(frozen=True)
class Clipping:
    """What the aggregator asked of a private round's update: clip it to `norm`, and, when `report_within` (adaptive
    clipping), report whether it was within that norm."""

    norm: float
    report_within: bool = False

    @classmethod
    def asked(cls, decision: CheckinResponse) -> Clipping | None:
        """The clipping a check-in's answer asks for; None when the round is not private."""
        return None if decision.clip_norm is None else cls(decision.clip_norm, decision.adaptive_clipping)


@dataclass(frozen=True)
class Personalisation:
    """A phone that keeps a personal model: how it fine-tunes the copy, and `keep(model, global_version)`, which
    stores it on the phone with the version of the global model it came from."""

    config: PersonalConfig
    keep: Callable[[NextWordModel, int], None]


Step = Callable[[RoundInput], LocalWork]
Mod = Callable[[RoundInput, Step], LocalWork]


def train(round_input: RoundInput) -> LocalWork:
    """Fine-tune the downloaded model on the phone's messages; the delta is how far it moved."""
    model = round_input.model
    start = {name: t.clone() for name, t in model.state_dict().items()}
    result = train_local(model, round_input.tokenizer.encode_batch(round_input.train_texts), round_input.config,
                         seed=round_input.seed)
    return LocalWork(result, {name: t - start[name] for name, t in model.state_dict().items()})


def evaluated(messages: int) -> Mod:
    """Score the downloaded model on up to `messages` held-out messages, before training changes it."""

    def mod(round_input: RoundInput, call_next: Step) -> LocalWork:
        report = evaluation_report(round_input.model_version, _scored(round_input.model, round_input, messages))
        return replace(call_next(round_input), evaluation=report)

    return mod


def personalised(personal: Personalisation, messages: int) -> Mod:
    """Fine-tune a personal copy of the downloaded model on the phone's own training messages and keep it; when
    `messages` is above 0, score it on the held-out messages `evaluated(messages)` scores the downloaded model on,
    and add its hits to that evaluation. It sits outside `evaluated` and training: the copy is made before training
    moves the downloaded model, and neither sees it. Nothing of the copy goes into the upload."""

    def mod(round_input: RoundInput, call_next: Step) -> LocalWork:
        training = round_input.tokenizer.encode_batch(round_input.train_texts)
        model = personalise(round_input.model, training, personal.config, round_input.seed)
        personal.keep(model, round_input.model_version)
        counts = _scored(model, round_input, messages) if messages > 0 else None
        work = call_next(round_input)
        if counts is None or work.evaluation is None:
            return work
        # Built anew rather than copied with an update, so that the report's checks run on the added counts too.
        report = EvaluationReport.model_validate(work.evaluation.model_dump() | {
            "personal_hits_at_1": counts.hits_at_1, "personal_hits_at_3": counts.hits_at_3})
        return replace(work, evaluation=report)

    return mod


def _scored(model: NextWordModel, round_input: RoundInput, messages: int) -> EvalCounts:
    """`model` scored on the phone's first `messages` held-out messages."""
    scored = round_input.tokenizer.encode_batch(round_input.held_out[:messages]) if round_input.held_out else []
    return evaluate(model, round_input.tokenizer, scored)


def guarded(round_input: RoundInput, call_next: Step) -> LocalWork:
    """No delta from training that diverged (`train_local` says when) or that holds values that are not finite:
    train_local's checks should leave none of the latter; this keeps one from ever being encoded if they miss."""
    work = call_next(round_input)
    if work.result.divergence is not None:
        return replace(work, delta=None, evaluation=None)
    if work.delta is not None and not all(torch.isfinite(t).all() for t in work.delta.values()):
        return replace(work, delta=None, evaluation=None,
                       result=replace(work.result, divergence="the update holds values that are not finite"))
    return work


def clipped(clipping: Clipping) -> Mod:
    def mod(round_input: RoundInput, call_next: Step) -> LocalWork:
        work = call_next(round_input)
        if work.delta is None:
            return work
        within = l2_norm(work.delta) <= clipping.norm if clipping.report_within else None
        return replace(work, delta=clip_to_norm(work.delta, clipping.norm), within_clip=within)

    return mod


def encoded(compression: str) -> Mod:
    def mod(round_input: RoundInput, call_next: Step) -> LocalWork:
        work = call_next(round_input)
        if work.delta is None:
            return work
        return replace(work, upload=update_bytes(work.delta, work.result.num_examples, compression, round_input.seed,
                                                 work.within_clip))

    return mod


def update_bytes(delta: Tensors, num_examples: int, compression: str = "int8", seed: int = 0,
                 within_clip: bool | None = None) -> bytes:
    """The plain upload: model delta, example count and, if asked for, the clipping bit; nothing more. `seed` drives
    int8's stochastic rounding."""
    return encode_update(delta, num_examples, compression, torch.Generator().manual_seed(seed), within_clip)


def masked(part: SecAggPhone, state: SecAggState) -> Mod:
    """A secure round's upload: the delta, the evaluation counts and the clipping bit in one masked vector; the counts
    and the bit travel only there."""

    def mod(round_input: RoundInput, call_next: Step) -> LocalWork:
        work = call_next(round_input)
        if work.delta is None:
            return work
        upload = part.masked_upload(work.delta, work.evaluation, bool(work.within_clip), state, round_input.seed)
        return replace(work, upload=upload, evaluation=None)

    return mod


def phone_mods(compression: str, eval_messages: int, clipping: Clipping | None,
               secure: tuple[SecAggPhone, SecAggState] | None,
               personal: Personalisation | None = None) -> list[Mod]:
    """A phone's mods, outermost first: the upload (masked in a secure round), the guard, the personal model (a
    phone that keeps one refreshes it in the rounds it is asked to score, a share of each round's phones, which
    bounds its extra work), federated evaluation (unless `eval_messages` is 0: the aggregator did not ask this phone
    to score the model; in a secure round it then sends zero counts in the masked sum), and clipping when the
    aggregator asked for it. In a secure round the personal model is kept but not scored: the masked vector holds
    the global model's three counts only, and a sum of personal counts could not say which phones it helped."""
    asked = eval_messages > 0
    return [masked(*secure) if secure is not None else encoded(compression), guarded,
            *([personalised(personal, 0 if secure is not None else eval_messages)]
              if personal is not None and asked else []),
            *([evaluated(eval_messages)] if asked else []),
            *([clipped(clipping)] if clipping is not None else [])]


def local_work(round_input: RoundInput, mods: Sequence[Mod], train_step: Step = train) -> LocalWork:
    """`train_step` (by default `train`) wrapped by `mods`, the first outermost. An executor that trained many phones
    at once (device_sim/vectorised.py) passes a step that returns the phone's precomputed training."""
    step: Step = train_step
    for mod in reversed(mods):
        step = _wrap(mod, step)
    return step(round_input)


def _wrap(mod: Mod, call_next: Step) -> Step:
    return lambda round_input: mod(round_input, call_next)


def evaluation_report(model_version: int, counts: EvalCounts) -> EvaluationReport | None:
    """The evaluation a phone sends: recall counts only (not the loss, which says more about the text)."""
    if counts.positions == 0:
        return None
    return EvaluationReport(
        model_version=model_version, positions=counts.positions, hits_at_1=counts.hits_at_1, hits_at_3=counts.hits_at_3
    )
