"""A phone's personal model: the global model fine-tuned on the phone's own messages, for its own suggestions.

Wang et al. 2019 ("Federated evaluation of on-device personalization") personalise this way: a few local steps of
plain SGD from the downloaded global model on the phone's own history. The personal copy is never an update: nothing
of it leaves the phone. What is tuned, and how hard, is chosen by measurement (benchmarks/personal.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from keyboard_model.architecture import NextWordModel, build_model
from keyboard_model.evaluate import EvalCounts, evaluate
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, train_local

# "all": every weight. "bias": the output layer's bias alone, the model's prior score of each word, so the personal
# copy leans towards the words this person types; its gradient needs no pass back through the network, and the
# personal copy differs from the global one in a single vector.
TUNED_PARAMETERS = ("all", "bias")


@dataclass(frozen=True)
class PersonalConfig:
    """How a phone fine-tunes its personal copy: `epochs` passes of SGD over its own training messages."""

    # The best of benchmarks/personal.py's settings on 200 phones of a 100-round run: 3 passes at 0.3 raised the pooled
    # top-1 most and helped about twice as many phones as they hurt; a round's rate (1.0) hurt nearly as many as it
    # helped, and the bias alone moved the pooled top-1 by under 0.05 points.
    epochs: int = 3
    learning_rate: float = 0.3
    batch_size: int = 16
    parameters: str = "all"  # one of TUNED_PARAMETERS

    def __post_init__(self) -> None:
        if self.parameters not in TUNED_PARAMETERS:
            raise ValueError(f"parameters must be one of {TUNED_PARAMETERS}, got {self.parameters!r}")
        self.local_config()  # the same checks as a round's local training

    def local_config(self) -> LocalTrainConfig:
        """The local training this is: a round's, with this config's passes, rate and batch size."""
        return LocalTrainConfig(epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate)


def personalise(
    global_model: NextWordModel, training_messages: Sequence[Sequence[int]], config: PersonalConfig, seed: int = 0
) -> NextWordModel:
    """A personal copy of `global_model` fine-tuned on a phone's encoded training messages; `global_model` is left
    unchanged, and the same seed gives the same copy.

    Training that diverges (as `train_local` judges it) gives the global model's weights back: the phone then suggests
    as everyone does rather than from a blown-up copy.
    """
    personal = build_model(global_model.config)
    personal.load_state_dict(global_model.state_dict())
    # Frozen weights get no gradient, so SGD and clipping pass them over and autograd skips what only they need.
    for name, parameter in personal.named_parameters():
        parameter.requires_grad_(config.parameters == "all" or name == "output_bias")
    result = train_local(personal, training_messages, config.local_config(), seed)
    for parameter in personal.parameters():
        parameter.grad = None
        parameter.requires_grad_(True)  # an ordinary model again, as `build_model` gives
    if result.divergence is not None:
        personal.load_state_dict(global_model.state_dict())
    return personal


@dataclass(frozen=True)
class PhoneScore:
    """One phone's held-out counts with the global model and with its personal model, and the fine-tuning's seconds."""

    shared: EvalCounts
    personal: EvalCounts
    seconds: float

    @property
    def gain_points(self) -> float:
        return 100 * (self.personal.recall_at_1 - self.shared.recall_at_1)


def score_personalised(
    global_model: NextWordModel,
    tokenizer: KeyboardTokenizer,
    training_messages: Sequence[Sequence[int]],
    held_out: Sequence[Sequence[int]],
    config: PersonalConfig,
    seed: int = 0,
) -> PhoneScore:
    """One phone as Wang et al. score it: `global_model` and its personal copy (`personalise` on the phone's encoded
    `training_messages`) both scored on the phone's own encoded `held_out` messages only, as on the phone."""
    start = time.perf_counter()
    personal = personalise(global_model, training_messages, config, seed)
    seconds = time.perf_counter() - start
    return PhoneScore(evaluate(global_model, tokenizer, held_out), evaluate(personal, tokenizer, held_out), seconds)


@dataclass(frozen=True)
class PersonalGains:
    """Wang et al.'s per-phone view of personalisation, over phones that scored the global and their personal model on
    the same held-out positions: a pooled recall alone would hide that a personal model helps some phones and hurts
    others."""

    phones: int
    helped: float  # the share of the phones whose personal model got more top-1 hits than the global one
    hurt: float  # the share whose personal model got fewer
    median_gain_points: float  # the median over phones of personal minus global top-1 recall, in percentage points
    personal: EvalCounts  # the personal models' counts, pooled over the phones


def personal_gains(scores: Sequence[tuple[EvalCounts, EvalCounts]]) -> PersonalGains | None:
    """The distribution of (global, personal) counts, one pair per phone; None for no phones. Hits on the same
    positions are whole numbers: a phone is helped or hurt only by a whole hit more or less."""
    if not scores:
        return None
    if any(shared.positions != personal.positions or not shared.positions for shared, personal in scores):
        raise ValueError("each phone's two counts must score the same positions, at least one")
    helped = sum(personal.hits_at_1 > shared.hits_at_1 for shared, personal in scores)
    hurt = sum(personal.hits_at_1 < shared.hits_at_1 for shared, personal in scores)
    gains = [100 * (personal.recall_at_1 - shared.recall_at_1) for shared, personal in scores]
    return PersonalGains(len(scores), helped / len(scores), hurt / len(scores), statistics.median(gains),
                         sum((personal for _, personal in scores), EvalCounts()))
