"""Suggestions written as a keyboard shows them.

The tokenizer lower-cases everything, which is right for the model and wrong for the person: the strip shows
"I" and "I'm" capitalised always, the first word of a sentence capitalised, and a completion in the case of what
has been typed of the word ("Mor" gives "Morrow", "MOR" gives "MORROW").
"""

from __future__ import annotations

import re

# The word being typed: the tokenizer's word pattern (keyboard_model/tokenizer.py), with the curly apostrophe it
# normalises to a straight one.
PARTIAL_WORD = re.compile(r"\w+(?:['\u2019]\w+)*\Z")
# A sentence starts at the start of the text, on a new line, or after ., ! or ? and a space.
SENTENCE_START = re.compile(r"(?:\A|[.!?]\s|\n)\s*\Z")


def capitalised(word: str) -> str:
    return word[:1].upper() + word[1:]


def is_first_person(word: str) -> bool:
    """"i" and its contractions ("i'm", "i'll", "i'd", "i've"), which English always capitalises."""
    return word == "i" or word.startswith("i'")


def in_typed_case(word: str, typed: str) -> str:
    cased = [c for c in typed if c.lower() != c.upper()]
    # One capital is the start of a word ("I", "Th"); two or more and no small letter is caps lock.
    if len(cased) >= 2 and all(c.isupper() for c in cased):
        return word.upper()
    return capitalised(word) if typed[:1].isupper() else word


def shown_words(text: str, words: list[str]) -> list[str]:
    """`words`, the suggester's lower-case suggestions for the text up to the caret, as the strip shows them:
    a completion follows the case of the part of the word typed, a next word is capitalised at the start of a
    sentence, and "i" and its contractions are always capitalised."""
    partial = PARTIAL_WORD.search(text)
    if partial:
        shown = [in_typed_case(word, partial.group()) for word in words]
    elif SENTENCE_START.search(text):
        shown = [capitalised(word) for word in words]
    else:
        shown = words
    return [capitalised(word) if is_first_person(word) else word for word in shown]
