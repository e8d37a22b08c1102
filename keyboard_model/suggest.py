"""The keyboard's suggestion strip: three words for the text typed so far.

After a space (or at the start) it predicts the next word; inside a word it ranks the
vocabulary words that begin with what has been typed of it. Only real words are
offered: never <unk>, sentence markers or lone punctuation.

A `Suggester` follows one text box. It keeps the model's incremental state (the CIFG's
recurrent state, the Transformer's key/value cache) after every token of the text typed so far, so a keystroke costs
at most one model step: typing inside a
word reuses the scores it already has, finishing a word feeds that one word, and
deleting goes back to a state it kept.
"""

from __future__ import annotations

import bisect
import threading

import torch

from keyboard_model.architecture import ModelState, NextWordModel
from keyboard_model.evaluate import suggestion_mask
from keyboard_model.tokenizer import BOS_ID, KeyboardTokenizer

SUGGESTIONS = 3


class Suggester:
    def __init__(self, model: NextWordModel, tokenizer: KeyboardTokenizer) -> None:
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"model has {model.config.vocab_size} words, tokenizer {tokenizer.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._can_suggest = suggestion_mask(tokenizer)
        # Suggestible words sorted alphabetically, so the words with a prefix are one slice.
        ordered = sorted((tokenizer.id_to_token[i], i) for i in tokenizer.word_ids)
        self._sorted_words = [word for word, _ in ordered]
        self._sorted_ids = torch.tensor([token_id for _, token_id in ordered], dtype=torch.long)
        # One text box at a time: requests from several threads take turns.
        self._lock = threading.Lock()
        self._context: list[int] = []
        # _steps[i] is the model's (output, state) after <s> + _context[:i]. Scores (the costly output
        # layer) are computed only for the end of the text, and kept while the context stays the same.
        self._steps: list[tuple[torch.Tensor, ModelState]] = []
        self._scores: torch.Tensor | None = None
        self._feed_from(self.model.initial_state(1), [BOS_ID])

    def split_context(self, text: str) -> tuple[list[str], str]:
        """(complete pieces before the cursor, the partly typed word, or '' after a boundary)."""
        pieces = self.tokenizer.split(text)
        if pieces and text and not text[-1].isspace() and pieces[-1][-1].isalnum():
            return pieces[:-1], pieces[-1]
        return pieces, ""

    def next_word_scores(self, pieces: list[str]) -> torch.Tensor:
        """Log-probabilities of the next token after `pieces`, from the start of the message."""
        with self._lock:
            return self._scores_after(self.tokenizer.ids_of(pieces))

    def suggest(self, text: str) -> list[str]:
        pieces, prefix = self.split_context(text)
        with self._lock:
            scores = self._scores_after(self.tokenizer.ids_of(pieces))
        if prefix:
            start = bisect.bisect_left(self._sorted_words, prefix)
            end = bisect.bisect_left(self._sorted_words, prefix + "\U0010ffff")
            candidates = self._sorted_ids[start:end]
            best = scores[candidates].topk(min(SUGGESTIONS, len(candidates)))
            ranked = candidates[best.indices].tolist()
        else:
            best = (scores + self._can_suggest).topk(min(SUGGESTIONS, len(scores)))
            # -inf marks non-words; a tiny vocabulary may not have three real words.
            ranked = best.indices[best.values > float("-inf")].tolist()
        return [self.tokenizer.id_to_token[i] for i in ranked]

    def _scores_after(self, ids: list[int]) -> torch.Tensor:
        """Scores after <s> + ids, stepping the model only past the part not already seen."""
        common = 0
        for seen, new in zip(self._context, ids):
            if seen != new:
                break
            common += 1
        if common < len(self._context) or common < len(ids):
            del self._context[common:], self._steps[common + 1 :]
            self._feed_from(self._steps[-1][1], ids[common:])
            self._context.extend(ids[common:])
            self._scores = None
        if self._scores is None:
            self._scores = self._log_probabilities(self._steps[-1][0])
        return self._scores

    @torch.inference_mode()
    def _feed_from(self, state: ModelState, ids: list[int]) -> None:
        for token in ids:
            output, state = self.model.step(torch.tensor([token]), state)
            self._steps.append((output, state))

    @torch.inference_mode()
    def _log_probabilities(self, output: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model.output_logits(output)[0], dim=-1)
