"""A phone's vote in a discovery round (aggregator/discovery.py): one prefix of one of its own unknown words.

The phone looks only at its training messages (the held-out ones stay for evaluation), splits them as the model's
tokenizer does, and keeps the words the tokenizer does not know: those are the words the keyboard can never suggest.
TrieHH's `vote` picks one at random, a word typed often more likely than one typed once, and the phone sends the
first `depth` characters of it, or no vote. That one prefix is all that leaves the phone in a discovery round.
"""

from __future__ import annotations

import random

from aggregator.api.schemas import DiscoveryQuestion, Vote
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.triehh import vote
from keyboard_model.vocabulary_growth import is_new_word


def unknown_words(texts: list[str], tokenizer: KeyboardTokenizer, max_length: int) -> list[str]:
    """The words of `texts` that `tokenizer` does not know, once per time typed, up to `max_length` characters.
    Punctuation and numbers are left out: a vocabulary grows by words."""
    return [word for text in texts for word in tokenizer.split(text)
            if len(word) <= max_length and is_new_word(word, tokenizer)]


def cast_vote(texts: list[str], tokenizer: KeyboardTokenizer, question: DiscoveryQuestion, seed: int) -> Vote:
    """The phone's answer to a discovery round's question, from its training messages."""
    words = unknown_words(texts, tokenizer, question.max_word_length)
    return Vote(prefix=vote(words, frozenset(question.frontier), question.depth, random.Random(seed)))
