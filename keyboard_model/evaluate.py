"""Keyboard metrics: top-1 and top-3 recall of the next word, and perplexity.

How positions are counted (the same for every model scored here):
- Each held-out message is scored on its own, from <s>, as a keyboard sees it, up to
  its first MAX_SCORED_TOKENS tokens (Shakespeare's longest line has 30).
- Recall counts every position whose target is a word, including out-of-vocabulary
  words (<unk>). Suggestions are drawn only from vocabulary words, so an <unk>
  target is always a miss. Punctuation and </s> targets are not recall positions:
  a keyboard does not suggest them.
- Perplexity is over every target token, punctuation, </s> and <unk> included.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keyboard_model.architecture import NextWordModel
from keyboard_model.tokenizer import PAD_ID, UNK_ID, KeyboardTokenizer

# Tokens of a message that are scored; longer messages are cut here, for every keyboard alike.
MAX_SCORED_TOKENS = 64


@dataclass(frozen=True)
class EvalCounts:
    """Sums that add up across phones; the metrics are ratios of them."""

    hits_at_1: int = 0
    hits_at_3: int = 0
    positions: int = 0  # recall positions (word targets)
    nll_sum: float = 0.0
    tokens: int = 0  # perplexity positions (all targets)

    def __add__(self, other: EvalCounts) -> EvalCounts:
        return EvalCounts(
            self.hits_at_1 + other.hits_at_1,
            self.hits_at_3 + other.hits_at_3,
            self.positions + other.positions,
            self.nll_sum + other.nll_sum,
            self.tokens + other.tokens,
        )

    @property
    def recall_at_1(self) -> float:
        return self.hits_at_1 / self.positions if self.positions else float("nan")

    @property
    def recall_at_3(self) -> float:
        return self.hits_at_3 / self.positions if self.positions else float("nan")

    @property
    def perplexity(self) -> float:
        if not self.tokens:
            return float("nan")
        # A model wrecked by noise can have a mean loss past what exp() can hold.
        mean = self.nll_sum / self.tokens
        return math.exp(mean) if mean < 700 else math.inf

    def metrics(self) -> dict[str, float]:
        return {"recall_at_1": self.recall_at_1, "recall_at_3": self.recall_at_3, "perplexity": self.perplexity}


def recall_positions(tokenizer: KeyboardTokenizer) -> torch.Tensor:
    """Boolean mask over the vocabulary: targets that count for recall."""
    mask = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    mask[tokenizer.word_ids] = True
    mask[UNK_ID] = True
    return mask


def suggestion_mask(tokenizer: KeyboardTokenizer) -> torch.Tensor:
    """Additive mask over the vocabulary: 0 for suggestible words, -inf for everything else."""
    mask = torch.full((tokenizer.vocab_size,), float("-inf"))
    mask[tokenizer.word_ids] = 0.0
    return mask


def score_predictions(
    logits: torch.Tensor, targets: torch.Tensor, is_recall_target: torch.Tensor, can_suggest: torch.Tensor
) -> EvalCounts:
    """Counts for one batch: logits (N, V), targets (N,) with PAD where there is nothing to score."""
    scored = targets != PAD_ID
    logits, targets = logits[scored], targets[scored]
    nll = F.cross_entropy(logits, targets, reduction="sum").item()
    # In place: the logits are (positions x vocabulary), the largest tensor of an evaluation.
    top3 = logits.add_(can_suggest).topk(3, dim=-1).indices
    counted = is_recall_target[targets]
    hits = top3[counted] == targets[counted, None]
    return EvalCounts(
        hits_at_1=int(hits[:, 0].sum()),
        hits_at_3=int(hits.any(dim=-1).sum()),
        positions=int(counted.sum()),
        nll_sum=nll,
        tokens=int(targets.numel()),
    )


@torch.no_grad()
def evaluate(
    model: NextWordModel,
    tokenizer: KeyboardTokenizer,
    messages: Sequence[Sequence[int]],
    batch_size: int = 128,
    progress: Callable[[int, int], object] | None = None,
) -> EvalCounts:
    """Score encoded messages (each <s> ... </s>), each from a fresh state; `progress(done, total)` hears how many of
    the messages that have a word to predict are scored, after each batch (for a progress bar)."""
    model.eval()
    is_recall_target, can_suggest = recall_positions(tokenizer), suggestion_mask(tokenizer)
    # Similar lengths together waste less padding.
    ordered = sorted((list(m[:MAX_SCORED_TOKENS]) for m in messages if len(m) >= 2), key=len)
    total = EvalCounts()
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[-1])
        rows = torch.tensor([m + [PAD_ID] * (width - len(m)) for m in chunk], dtype=torch.long)
        features = model.features(rows[:, :-1])
        targets = rows[:, 1:]
        # Scores over the vocabulary are the costliest part; none are made for padding.
        scored = targets != PAD_ID
        total += score_predictions(model.output_logits(features[scored]), targets[scored], is_recall_target,
                                   can_suggest)
        if progress is not None:
            progress(start + len(chunk), len(ordered))
    return total


def most_frequent_words(tokenizer: KeyboardTokenizer, encoded: Iterable[Sequence[int]], k: int = 3) -> list[int]:
    """The k most frequent suggestible words in some (server-side) text: the simplest keyboard."""
    suggestible = set(tokenizer.word_ids)
    counts = Counter(token for message in encoded for token in message if token in suggestible)
    return [token for token, _ in counts.most_common(k)]


def evaluate_fixed_suggestions(
    tokenizer: KeyboardTokenizer, messages: Sequence[Sequence[int]], suggestions: Sequence[int]
) -> EvalCounts:
    """Recall of a keyboard that always offers the same words, best first."""
    is_recall_target = recall_positions(tokenizer)
    hits_at_1 = hits_at_3 = positions = 0
    for message in messages:
        for target in message[1:MAX_SCORED_TOKENS]:
            if is_recall_target[target]:
                positions += 1
                hits_at_1 += target == suggestions[0]
                hits_at_3 += target in suggestions[:3]
    return EvalCounts(hits_at_1, hits_at_3, positions)
