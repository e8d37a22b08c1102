"""TrieHH: discovering the words many phones type, with differential privacy and without noise.

Zhu, Kairouz, McMahan, Sun and Li 2020, "Federated Heavy Hitters Discovery with Differential Privacy" (AISTATS;
arXiv:1902.08534), Algorithm 1. The server grows a trie of prefixes one character per round. In round `depth`
it samples a share γ (`sampling_rate`) of the phones, and each sampled phone casts at most one vote: the first
`depth` characters of one of its own words whose first `depth - 1` characters are already in the trie, drawn at
random. A prefix with at least θ (`theta`) votes in that round joins the trie. Words are spelt with an end marker,
so "zounds$" in the trie says that many phones type "zounds" itself, not only longer words that start with it.

The privacy comes from the sampling and the threshold alone: a phone votes once a round at most (`grow` takes
the votes keyed by phone, so a second vote has nowhere to go), and a string that only one phone holds can never
gather θ ≥ 2 votes; `privacy` gives the (ε, δ) of the paper's accounting.

Every function is pure: a trie (a frozenset of prefixes) in, a new trie out. The random draws come from the
`random.Random` the caller passes, so a seed replays a whole discovery.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

Trie = frozenset[str]
EMPTY_TRIE: Trie = frozenset()
# Never part of a word: the tokenizer splits "$" off as punctuation, and phones vote only on words.
END = "$"

Phone = TypeVar("Phone", bound=Hashable)


@dataclass(frozen=True)
class TrieHHConfig:
    """A discovery's threshold, sampling and longest word. `for_privacy` picks θ and γ for a target (ε, δ)."""

    theta: int  # votes a prefix needs in one round to join the trie
    sampling_rate: float  # γ: the share of the phones asked to vote in each round
    max_word_length: int  # characters of the longest word that can be discovered

    def __post_init__(self) -> None:
        if self.theta < 1:
            raise ValueError(f"theta must be at least 1 vote, got {self.theta}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.max_word_length < 1:
            raise ValueError(f"max_word_length must be at least 1 character, got {self.max_word_length}")

    @property
    def rounds(self) -> int:
        """L of the paper: one round per character, and one more for the end marker."""
        return self.max_word_length + 1


def vote(words: Sequence[str], trie: Trie, depth: int, rng: random.Random) -> str | None:
    """One phone's vote in round `depth`: the first `depth` characters of one of its `words` (ended by END) whose
    first `depth - 1` are in `trie`, drawn at random; None when no word qualifies.

    `words` holds a word once per time the phone typed it, so a word it types often is more likely its vote; it
    still casts one vote however often it typed any of them.
    """
    if depth < 1:
        raise ValueError(f"rounds count from depth 1, got {depth}")
    candidates = []
    for word in words:
        if not word or END in word:
            raise ValueError(f"a phone votes only on non-empty words without {END!r}, got {word!r}")
        spelt = word + END
        if len(spelt) >= depth and (depth == 1 or spelt[: depth - 1] in trie):
            candidates.append(spelt[:depth])
    # Sorted so that a seed gives the same vote whatever order the phone's history came in.
    return rng.choice(sorted(candidates)) if candidates else None


def grow(trie: Trie, votes: Mapping[Phone, str | None], depth: int, theta: int) -> Trie:
    """`trie` with every prefix that at least `theta` phones voted for in round `depth`.

    Votes are keyed by phone, one each, so no phone counts twice. A vote that does not extend the trie by one
    character at this depth (a stale or hostile phone's) counts as no vote: it could otherwise plant a prefix
    whose own prefixes were never voted for.
    """
    if theta < 1:
        raise ValueError(f"theta must be at least 1 vote, got {theta}")
    counts = Counter(prefix for prefix in votes.values() if prefix is not None and _extends(trie, prefix, depth))
    return trie | {prefix for prefix, count in counts.items() if count >= theta}


def _extends(trie: Trie, prefix: str, depth: int) -> bool:
    parent = prefix[:-1]
    if depth == 1:
        return len(prefix) == 1 and prefix != END  # a lone end marker would be the empty word
    return len(prefix) == depth and END not in parent and parent in trie


def discovered(trie: Trie) -> set[str]:
    """The complete words in `trie`: those whose end marker joined it."""
    return {prefix[: -len(END)] for prefix in trie if prefix.endswith(END)}


def discovery_round(
    trie: Trie, depth: int, phones: Mapping[Phone, Sequence[str]], config: TrieHHConfig, rng: random.Random
) -> tuple[Trie, dict[Phone, str | None]]:
    """One round: sample ⌊γ·n⌋ of the n `phones` (each a history of words), collect their votes, grow the trie.
    Returns the new trie and the votes, keyed by the sampled phones."""
    # A fixed-size sample, as the paper's m = γn, rather than each phone flipping its own coin.
    sampled = rng.sample(list(phones), int(config.sampling_rate * len(phones)))
    # A word too long to finish within the rounds would only take votes from the phone's words that can.
    votes = {
        phone: vote([word for word in phones[phone] if len(word) <= config.max_word_length], trie, depth, rng)
        for phone in sampled
    }
    return grow(trie, votes, depth, config.theta), votes


def discover(phones: Mapping[Phone, Sequence[str]], config: TrieHHConfig, seed: int) -> Trie:
    """A whole discovery over `phones`, round after round, from an empty trie."""
    rng = random.Random(seed)
    trie = EMPTY_TRIE
    for depth in range(1, config.rounds + 1):
        grown, _ = discovery_round(trie, depth, phones, config, rng)
        # No prefix of this depth joined, so no vote of the next depth could extend the trie: it is final.
        if grown == trie:
            break
        trie = grown
    return trie


@dataclass(frozen=True)
class Privacy:
    epsilon: float
    delta: float


def privacy(config: TrieHHConfig) -> Privacy:
    """The (ε, δ) of a whole discovery (all `config.rounds` rounds), by the paper's Theorem 1 (Section 4):

        ε = L · ln(1 / (1 − θγ))   (ln(1 / (1 − θγ)) per round, over L rounds)
        δ = (θ − 2) / ((θ − 3) · θ!)

    for θ ≥ 4 (δ divides by θ − 3) and γ ≤ 1 / (θ + 1). This is the form that the paper's Corollary 1 inverts
    (`for_privacy`), as the authors' released simulation code (github.com/triehh/triehh) computes it; that code
    takes δ for the whole discovery, with no factor L.

    It assumes each phone is one person, votes at most once a round, and is sampled uniformly at random,
    independently of its words: the simulator's sample is, a real fleet's eligibility-driven one only roughly.
    """
    theta, rate = config.theta, config.sampling_rate
    if theta < 4:
        raise ValueError(f"the accounting needs theta >= 4 (its delta divides by theta - 3), got {theta}")
    if rate > 1 / (theta + 1):
        raise ValueError(
            f"the accounting holds for sampling_rate <= 1 / (theta + 1) = {1 / (theta + 1):.4g}, got {rate}"
        )
    return Privacy(epsilon=config.rounds * -math.log1p(-theta * rate), delta=_delta(theta))


def _delta(theta: int) -> float:
    return (theta - 2) / ((theta - 3) * math.factorial(theta))


def for_privacy(epsilon: float, delta: float, max_word_length: int) -> TrieHHConfig:
    """The paper's Corollary 1: the smallest θ whose δ is at most `delta` (and with θ + 1 ≥ e^(ε/L), the range of
    Theorem 1), and the sampling rate γ = (e^(ε/L) − 1) / (θ · e^(ε/L)) that spends exactly `epsilon`.

    The smallest θ, because a larger one needs more phones to find a word: a word that a share f of the n phones
    types gets about γ·n·f votes a round, and γ shrinks as 1/θ while the votes needed grow as θ, so finding it
    takes f·n ≳ θ² / (1 − e^(−ε/L)) phones.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    per_round = math.exp(epsilon / (max_word_length + 1))
    theta = 4
    while _delta(theta) > delta or theta + 1 < per_round:
        theta += 1
    return TrieHHConfig(theta, (per_round - 1) / (theta * per_round), max_word_length)
