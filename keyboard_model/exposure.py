"""How much a model has memorised a planted secret: its exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a fixed prefix and a secret of `length` words, each drawn from an alphabet of
words ("my secret number is" and five of "one" ... "ten": 10^5 possible secrets). A model
ranks every possible secret by the log-perplexity it gives the secret's words after the
prefix; the planted secret's exposure is

    log2(number of possible secrets) - log2(its rank),

so a secret the model finds likelier than every other has the greatest exposure, log2 of the
space, and one it has not learnt about 1 bit, on average. Gboard measured memorisation this
way (Ramaswamy et al. 2020). With a space small enough every candidate is scored and the rank
is exact; otherwise it is estimated, as Carlini et al. do, by fitting a skew-normal
distribution to the log-perplexities of sampled candidates and reading the secret's place in
it (`estimated_exposure`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from keyboard_model.architecture import NextWordModel
from keyboard_model.tokenizer import BOS_ID, SPECIAL_TOKENS, KeyboardTokenizer

# Candidates scored in one forward pass.
BATCH = 4096
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

Secret = tuple[str, ...]


@dataclass(frozen=True)
class CanaryFormat:
    """The shape every canary of a run shares: a prefix, then `length` words of `alphabet`."""

    prefix: str = "my secret number is"
    alphabet: tuple[str, ...] = NUMBER_WORDS
    length: int = 5

    def __post_init__(self) -> None:
        if self.length < 1 or len(set(self.alphabet)) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"a canary needs a length of at least 1 and two or more distinct words: {self}")

    @property
    def space(self) -> int:
        """How many secrets there are."""
        return len(self.alphabet) ** self.length

    def phrase(self, secret: Secret) -> str:
        return " ".join((self.prefix, *secret))

    def random_secret(self, rng: random.Random) -> Secret:
        return tuple(rng.choice(self.alphabet) for _ in range(self.length))

    def secret(self, index: int) -> Secret:
        """The `index`-th secret of the space, in a fixed order: every secret is one index below `space`."""
        words = []
        for _ in range(self.length):
            index, digit = divmod(index, len(self.alphabet))
            words.append(self.alphabet[digit])
        return tuple(reversed(words))


def alphabet_ids(tokenizer: KeyboardTokenizer, canary: CanaryFormat) -> dict[str, int]:
    """The token id of each word of the canary's alphabet. Each must be one word of the vocabulary: a secret of words
    the tokenizer splits or does not know could be neither scored nor suggested."""
    ids = {word: tokenizer.encode(word) for word in canary.alphabet}
    unknown = [word for word, encoded in ids.items() if len(encoded) != 1 or encoded[0] < len(SPECIAL_TOKENS)]
    if unknown:
        raise ValueError(f"every word of a canary's alphabet must be one word of the vocabulary; not: {unknown}")
    return {word: encoded[0] for word, encoded in ids.items()}


def log_perplexities(model: NextWordModel, tokenizer: KeyboardTokenizer, canary: CanaryFormat,
                     secrets: list[Secret]) -> np.ndarray:
    """Each secret's log-perplexity after the prefix: minus the sum of the log2-probabilities of its words.

    Only the secret's words are scored: the prefix is the same for every candidate, so it moves every score alike."""
    prefix = [BOS_ID, *tokenizer.encode(canary.prefix)]
    ids = alphabet_ids(tokenizer, canary)
    model.eval()  # as evaluate() scores a model
    scores = []
    with torch.no_grad():
        for start in range(0, len(secrets), BATCH):
            rows = torch.tensor([prefix + [ids[word] for word in secret] for secret in secrets[start:start + BATCH]])
            # The prediction of position i+1 is made at position i: the secret's words are predicted from the
            # positions before each.
            features = model.features(rows[:, :-1])[:, len(prefix) - 1:]
            log_probabilities = torch.log_softmax(model.output_logits(features).float(), dim=-1)
            taken = log_probabilities.gather(-1, rows[:, len(prefix):, None])[..., 0]
            scores.append(-taken.sum(dim=1) / math.log(2))
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def exposures(model: NextWordModel, tokenizer: KeyboardTokenizer, canary: CanaryFormat,
              secrets: list[Secret]) -> list[float]:
    """Each secret's exposure, its rank counted among every secret of the space (exact: the space is scored whole,
    once for all the secrets)."""
    scores = np.sort(log_perplexities(model, tokenizer, canary,
                                      [canary.secret(index) for index in range(canary.space)]))
    ranks = 1 + np.searchsorted(scores, log_perplexities(model, tokenizer, canary, secrets), side="left")
    return [math.log2(canary.space) - math.log2(int(rank)) for rank in ranks]


def estimated_exposures(model: NextWordModel, tokenizer: KeyboardTokenizer, canary: CanaryFormat,
                        secrets: list[Secret], samples: int = 4096, seed: int = 0) -> list[float]:
    """Each secret's exposure for a space too large to score whole (Carlini et al. 2019, section 4.3): the share of
    the space that the model finds likelier than the secret, read from a skew-normal fitted (once for all the
    secrets) to the log-perplexities of `samples` random secrets, as -log2 of that share."""
    rng = random.Random(seed)
    sampled = log_perplexities(model, tokenizer, canary, [canary.random_secret(rng) for _ in range(samples)])
    shape, location, scale = stats.skewnorm.fit(sampled)
    likelier = stats.skewnorm.cdf(log_perplexities(model, tokenizer, canary, secrets), shape, location, scale)
    # No share of the space is below one secret in it.
    return [-math.log2(max(float(share), 1 / canary.space)) for share in likelier]
