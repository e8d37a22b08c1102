"""An interpolated Kneser-Ney trigram model: the n-gram baseline a neural keyboard must beat.

Chen & Goodman (1999) interpolated Kneser-Ney, one discount per order:

    P3(w | u v) = max(c(u v w) - D3, 0) / c(u v .)  +  D3 * N1+(u v .) / c(u v .) * P2(w | v)
    P2(w | v)   = max(N1+(. v w) - D2, 0) / N1+(. v .)  +  D2 * N1+(v .) / N1+(. v .) * P1(w)
    P1(w)       = max(N1+(. w) - D1, 0) / N1+(. .)  +  D1 * N1+(seen words) / N1+(. .) / V

c counts trigrams; the lower orders count *continuations* (how many distinct words
precede), which is what makes Kneser-Ney predict "Francisco" less often after an unseen
context than its raw frequency would. A context never seen falls through to the next
order. Each discount is D = n1 / (n1 + 2 n2) from that order's counts of counts.

Messages are padded with two <s>, so the first word has a trigram context too. No
library fits here: scoring needs the whole next-word distribution at every position
(for top-3 recall), which this builds as one dense vector per position.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch

from keyboard_model.evaluate import MAX_SCORED_TOKENS, EvalCounts, recall_positions, score_predictions, suggestion_mask
from keyboard_model.tokenizer import BOS_ID, KeyboardTokenizer

Sparse = tuple[torch.Tensor, torch.Tensor]  # (word ids, discounted probability mass)
# Messages scored together: at most 64 x 63 positions of the vocabulary's float64 probabilities (about 290 MB at
# 9,093 words); fewer calls, not a larger matrix, is what the batching is for.
MESSAGES_PER_BATCH = 64


def _discount(counts: Iterable[int]) -> float:
    histogram = Counter(counts)
    n1, n2 = histogram[1], histogram[2]
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5


def _interpolated(counts: dict[tuple, Counter], discount: float) -> dict[tuple, tuple[Sparse, float]]:
    """For each context: its discounted sparse part, and the weight left for the lower order."""
    table = {}
    for context, following in counts.items():
        total = sum(following.values())
        words = torch.tensor(list(following.keys()), dtype=torch.long)
        kept = (torch.tensor(list(following.values()), dtype=torch.float64) - discount).clamp_min(0) / total
        table[context] = ((words, kept), discount * len(following) / total)
    return table


class KneserNeyTrigram:
    def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int) -> None:
        """Count trigrams in encoded messages (each `<s> ... </s>`)."""
        self.vocab_size = vocab_size
        trigrams: dict[tuple, Counter] = defaultdict(Counter)
        for sequence in sequences:
            padded = [BOS_ID, *sequence]
            for u, v, w in zip(padded, padded[1:], padded[2:], strict=False):
                trigrams[(u, v)][w] += 1
        # Continuation counts for the lower orders: distinct left neighbours, not occurrences.
        bigrams: dict[tuple, Counter] = defaultdict(Counter)
        for (_, v), following in trigrams.items():
            for w in following:
                bigrams[(v,)][w] += 1
        unigrams: Counter = Counter(w for following in bigrams.values() for w in following)

        d3 = _discount(c for following in trigrams.values() for c in following.values())
        d2 = _discount(c for following in bigrams.values() for c in following.values())
        d1 = _discount(unigrams.values())
        self.discounts = (d1, d2, d3)
        self.trigram = _interpolated(trigrams, d3)
        self.bigram = _interpolated(bigrams, d2)
        total = sum(unigrams.values())
        words = torch.tensor(list(unigrams.keys()), dtype=torch.long)
        kept = (torch.tensor(list(unigrams.values()), dtype=torch.float64) - d1).clamp_min(0) / total
        self.unigram = torch.full((vocab_size,), d1 * len(unigrams) / total / vocab_size, dtype=torch.float64)
        self.unigram.index_add_(0, words, kept)

    def distribution(self, u: int, v: int) -> torch.Tensor:
        """P(. | u v) over the whole vocabulary (float64, sums to 1)."""
        return self.distributions([(u, v)])[0]

    def distributions(self, contexts: Sequence[tuple[int, int]]) -> torch.Tensor:
        """P(. | u v) for each context (u, v), one row each: each order scales the rows of the contexts it has seen
        and adds its discounted counts, for all rows at once (one row at a time took minutes on a corpus)."""
        probabilities = self.unigram.repeat(len(contexts), 1)
        for table, keys in ((self.bigram, [(v,) for _, v in contexts]), (self.trigram, contexts)):
            lower_weights, rows, words, kept = [1.0] * len(contexts), [], [], []
            for row, key in enumerate(keys):
                if key in table:
                    (row_words, row_kept), lower_weights[row] = table[key]
                    rows.append(torch.full_like(row_words, row))
                    words.append(row_words)
                    kept.append(row_kept)
            probabilities.mul_(torch.tensor(lower_weights, dtype=torch.float64)[:, None])
            if rows:  # a context's words are distinct: each entry gets one addition, as in a loop over rows
                probabilities.index_put_((torch.cat(rows), torch.cat(words)), torch.cat(kept), accumulate=True)
        return probabilities

    def evaluate(
        self, tokenizer: KeyboardTokenizer, messages: Sequence[Sequence[int]],
        progress: Callable[[int, int], object] | None = None,
    ) -> EvalCounts:
        """Counts as for the neural models (see keyboard_model.evaluate), from each message's start; `progress(done,
        total)` hears how many of the messages are scored, after each batch of them."""
        is_recall_target, can_suggest = recall_positions(tokenizer), suggestion_mask(tokenizer)
        scored = [message[:MAX_SCORED_TOKENS] for message in messages if len(message) >= 2]
        total = EvalCounts()
        for start in range(0, len(scored), MESSAGES_PER_BATCH):
            batch = scored[start:start + MESSAGES_PER_BATCH]
            contexts: list[tuple[int, int]] = []
            targets: list[int] = []
            for message in batch:
                padded = [BOS_ID, *message]
                contexts += zip(padded, padded[1:-1], strict=False)
                targets += message[1:]
            log_probabilities = self.distributions(contexts).log().float()
            total += score_predictions(log_probabilities, torch.tensor(targets), is_recall_target, can_suggest)
            if progress is not None:
                progress(start + len(batch), len(scored))
        return total
