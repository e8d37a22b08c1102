"""Growing the vocabulary with new words: a new tokenizer, new weights and new optimiser state, each made from
the old one, which stays as it was.

New words take the ids after every existing token, so every old id keeps its meaning: old texts encode to the same
ids, and the old rows of the weights stay where they are. Only the parameters with one row per token grow, the
embedding and the output bias (`VOCABULARY_PARAMETERS`); both architectures tie their output layer to the
embedding, so its rows are the output rows too, and the recurrent, projection and attention weights do not depend
on the vocabulary at all.

A new word starts unlikely, so that growing the vocabulary does not change what the keyboard suggests until
training has seen the word (`grow_weights` says how unlikely).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence

import torch

from keyboard_model.architecture import ArchitectureConfig, config_from_dict
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import Tensors

# The parameters with one row per token, by the names every architecture gives them (architecture.NextWordModel).
VOCABULARY_PARAMETERS = ("embedding.weight", "output_bias")
_STARTS_AS_WORD = re.compile(r"\w")


def is_new_word(word: str, tokenizer: KeyboardTokenizer) -> bool:
    """Whether the vocabulary can take `word`: letters only, one word as the tokenizer splits text (so lower case), and
    not a token yet. Phones vote only on such words (device_sim/word_votes.py); the aggregator adds only such words,
    whatever a discovery's trie spells."""
    return word.isalpha() and tokenizer.split(word) == [word] and word not in tokenizer.token_to_id


def grow_tokenizer(tokenizer: KeyboardTokenizer, words: Sequence[str]) -> KeyboardTokenizer:
    """`tokenizer` with `words` added as whole tokens, the first at id `tokenizer.vocab_size`, in their order.

    Each must be one new word as the tokenizer splits text (lower case, no spaces or punctuation around it),
    or no text would ever encode to it.
    """
    if not words:
        raise ValueError("no words to add")
    for word in words:
        if tokenizer.split(word) != [word] or not _STARTS_AS_WORD.match(word):
            raise ValueError(f"{word!r} is not one word as the tokenizer splits text: {tokenizer.split(word)}")
        if word in tokenizer.token_to_id:
            raise ValueError(f"{word!r} is already token {tokenizer.token_to_id[word]}")
    if len(set(words)) != len(words):
        raise ValueError(f"words to add must be distinct: {sorted(w for w in set(words) if words.count(w) > 1)}")
    # The tokenizer's own serialisation, with the vocabulary extended: its normaliser and splitting stay the same.
    spec = json.loads(tokenizer.to_json())
    spec["model"]["vocab"].update({word: tokenizer.vocab_size + i for i, word in enumerate(words)})
    return KeyboardTokenizer.from_json(json.dumps(spec))


def grow_config(config: ArchitectureConfig, added: int) -> ArchitectureConfig:
    """`config` with room for `added` more tokens."""
    return config_from_dict(config.architecture, {**config.to_dict(), "vocab_size": config.vocab_size + added})


def grow_weights(state: Tensors, added: int) -> Tensors:
    """A model's weights with rows for `added` new tokens appended (a copy: `state` is left as it was).

    A new word's embedding row is the mean of the existing rows, and its output bias the smallest existing bias.
    Its score after any context is then the mean of the old words' scores, less how far the mean bias is above the
    smallest: it ranks below every old word scoring above the average, so it enters no top three while three old
    words score above average (in a trained model, every context), and the old words keep their order.
    """
    if added < 1:
        raise ValueError(f"added must be at least 1 token, got {added}")
    embedding, bias = state["embedding.weight"], state["output_bias"]
    if embedding.shape[0] != bias.shape[0]:
        raise ValueError(f"embedding has {embedding.shape[0]} rows but output_bias {bias.shape[0]}")
    new_rows = {
        "embedding.weight": embedding.mean(dim=0, keepdim=True).expand(added, -1),
        "output_bias": bias.min().expand(added),
    }
    return {
        name: torch.cat([tensor, new_rows[name]]) if name in new_rows else tensor.clone()
        for name, tensor in state.items()
    }


def grow_optimizer_state(state: Tensors, grown_weights: Tensors, weight_copies: Collection[str] = ()) -> Tensors:
    """A server optimiser's `state` with rows for the new tokens of `grown_weights` (from `grow_weights`) appended
    to every tensor of a vocabulary parameter, named "<prefix><parameter>" as "velocity/embedding.weight" is.

    The new rows are zeros, where every optimiser's state starts, except under the prefixes in `weight_copies`,
    whose tensors are copies of the weights (the served average's "average/"): those take the new rows of the
    weights themselves, so that the served model starts the new words as unlikely as the global one; zeros there
    would give them a zero bias, above most old words'. Tensors of other parameters are copied unchanged.
    """
    grown = {}
    for key, tensor in state.items():
        parameter = key.rpartition("/")[2]
        if parameter not in VOCABULARY_PARAMETERS:
            grown[key] = tensor.clone()
            continue
        weights = grown_weights[parameter]
        added = weights.shape[0] - tensor.shape[0]
        if added < 1 or weights.shape[1:] != tensor.shape[1:]:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, not that of {parameter} "
                             f"{tuple(weights.shape)} less some new rows")
        copies_weights = key[: -len(parameter)] in weight_copies
        new_rows = weights[-added:] if copies_weights else tensor.new_zeros(added, *tensor.shape[1:])
        grown[key] = torch.cat([tensor, new_rows])
    return grown
