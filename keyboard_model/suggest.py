"""The keyboard's suggestion strip: three words for the text typed so far.

After a space (or at the start) it predicts the next word; inside a word it ranks the
vocabulary words that begin with what has been typed of it. Only real words are
offered: never <unk>, sentence markers or lone punctuation.
"""

from __future__ import annotations

import bisect

import torch

from keyboard_model.evaluate import suggestion_mask
from keyboard_model.model import CIFGLSTM
from keyboard_model.tokenizer import BOS_ID, KeyboardTokenizer

SUGGESTIONS = 3


class Suggester:
    def __init__(self, model: CIFGLSTM, tokenizer: KeyboardTokenizer, max_context: int = 64) -> None:
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"model has {model.config.vocab_size} words, tokenizer {tokenizer.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = max_context
        self._can_suggest = suggestion_mask(tokenizer)
        # Suggestible words sorted alphabetically, so a prefix is a contiguous range.
        self._sorted_words = sorted((tokenizer.id_to_token[i], i) for i in tokenizer.word_ids)
        self._sorted_keys = [word for word, _ in self._sorted_words]

    def split_context(self, text: str) -> tuple[list[str], str]:
        """(complete pieces before the cursor, the partly typed word, or '' after a boundary)."""
        pieces = self.tokenizer.split(text)
        if pieces and text and not text[-1].isspace() and pieces[-1][-1].isalnum():
            return pieces[:-1], pieces[-1]
        return pieces, ""

    @torch.no_grad()
    def next_word_scores(self, pieces: list[str]) -> torch.Tensor:
        """Log-probabilities of the next token after `pieces`, from the start of the message."""
        context = [BOS_ID, *self.tokenizer.ids_of(pieces)][-self.max_context :]
        logits, _ = self.model(torch.tensor([context]))
        return torch.log_softmax(logits[0, -1], dim=-1)

    def suggest(self, text: str) -> list[str]:
        pieces, prefix = self.split_context(text)
        scores = self.next_word_scores(pieces) + self._can_suggest
        if prefix:
            candidates = self._words_with_prefix(prefix.lower())
            if not candidates:
                return []
            ranked = sorted(candidates, key=lambda token_id: -float(scores[token_id]))[:SUGGESTIONS]
        else:
            best = scores.topk(min(SUGGESTIONS, len(scores)))
            # -inf marks non-words; a tiny vocabulary may not have three real words.
            ranked = best.indices[best.values > float("-inf")].tolist()
        return [self.tokenizer.id_to_token[i] for i in ranked]

    def _words_with_prefix(self, prefix: str) -> list[int]:
        start = bisect.bisect_left(self._sorted_keys, prefix)
        end = bisect.bisect_left(self._sorted_keys, prefix + "\U0010ffff")
        return [token_id for _, token_id in self._sorted_words[start:end]]
