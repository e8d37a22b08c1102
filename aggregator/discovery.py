"""Word discovery: rounds in which phones vote on words the model does not know, and the vocabulary grows by the
words that many of them type (TrieHH, keyboard_model/triehh.py).

Every `discover_every` training rounds the aggregator runs a discovery: up to `max_word_length + 1` discovery
rounds, one per character of a word and one for its end. In the round at depth d it selects ⌊γ·n⌋ of the n phones
(no over-selection: more would spend more privacy than the accounting says), sends each the trie's prefixes of
d − 1 characters, and each answers with one vote: the first d characters of one of its own words that the model
does not know, extending one of those prefixes, or no vote. A prefix with at least θ votes joins the trie; the
votes themselves are held in memory only until the round closes, and never stored. The discovery ends when a round
adds no prefix or the last depth is reached: its complete words join the vocabulary (`GlobalModel.grow_vocabulary`)
and training goes on with the grown model and tokenizer.

What survives a restart is each round's record: the trie so far (public: it is the output the accounting covers),
the depth of the next round, and how many training rounds have passed since the last discovery. A discovery round
open at a crash is run again, as any round is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.triehh import EMPTY_TRIE, END, Privacy, Trie, TrieHHConfig, discovered, grow, privacy
from keyboard_model.vocabulary_growth import is_new_word


class BadVoteError(ValueError):
    """A vote no honest phone could cast in this round."""


@dataclass(frozen=True)
class DiscoveryTask:
    """What a phone selected for a discovery round is asked: vote at `depth`, extending one of `frontier`."""

    depth: int
    frontier: tuple[str, ...]  # sorted
    max_word_length: int  # a longer word cannot be finished within the discovery's rounds


@dataclass
class DiscoveryRound:
    """An open discovery round: its task, and the votes of its phones (device id -> prefix, or None: no vote)."""

    task: DiscoveryTask
    trie: Trie
    votes: dict[str, str | None]

    def vote(self, device_id: str, prefix: str | None) -> None:
        """Record a selected phone's one vote, refusing one that does not extend the frontier by one character."""
        if prefix is not None:
            depth = self.task.depth
            letters = prefix.removesuffix(END)
            if len(prefix) != depth or not letters.isalpha() or letters != letters.lower():
                raise BadVoteError(f"a vote in this round is {depth} characters, lower-case letters of which the last "
                                   f"may be {END!r}: got {len(prefix)}")
            if depth > 1 and prefix[:-1] not in self.trie:
                raise BadVoteError("the vote does not extend a prefix this round asked about")
        self.votes[device_id] = prefix


@dataclass(frozen=True)
class DiscoveryState:
    """Where discovery stands, as every round's record carries it (`record`) so that a restart picks it up."""

    training_rounds: int = 0  # since the last discovery ended
    discoveries: int = 0  # started so far
    words_added: int = 0
    campaign: tuple[Trie, int] | None = None  # the trie of the discovery under way, and its next round's depth
    # What the discoveries started so far spent, each's own (ε, δ) added as it started; None once one ran outside the
    # paper's accounting (a θ and γ it does not cover).
    epsilon: float | None = 0.0
    delta: float | None = 0.0

    @classmethod
    def restored(cls, record: dict | None) -> DiscoveryState:
        """From the newest round record that holds discovery's fields (None: discovery never ran)."""
        if record is None:
            return cls()
        trie = record["discovery_trie"]
        # A discovery under way when the service stopped goes on at its next depth.
        campaign = (frozenset(json.loads(trie)), int(record["discovery_next_depth"])) if trie is not None else None
        return cls(int(record["discovery_training_rounds"]), int(record["discoveries"]),
                   int(record["words_discovered_total"]), campaign, record["discovery_epsilon"],
                   record["discovery_delta"])

    def record(self) -> dict:
        trie = None if self.campaign is None else json.dumps(sorted(self.campaign[0]))
        return {"discovery_training_rounds": self.training_rounds, "discoveries": self.discoveries,
                "words_discovered_total": self.words_added, "discovery_trie": trie,
                "discovery_next_depth": None if self.campaign is None else self.campaign[1],
                "discovery_epsilon": self.epsilon, "discovery_delta": self.delta}


class WordDiscovery:
    """When discovery rounds run, and how each grows the trie. The manager assigns `state` what `opened`, `closed`
    and `trained` return: when it opens a discovery round (a restart runs that round again from the last record),
    and once a closed round's record is stored."""

    def __init__(self, config: TrieHHConfig, every: int, last_record: dict | None) -> None:
        """`last_record`: the newest round record with discovery's fields, or None."""
        self.config = config
        self.every = every
        self.state = DiscoveryState.restored(last_record)
        # The (ε, δ) of one discovery; None when θ and γ are outside the paper's accounting.
        try:
            self.privacy: Privacy | None = privacy(config)
        except ValueError:
            self.privacy = None

    @property
    def due(self) -> bool:
        """Whether the next round is a discovery round."""
        return self.state.campaign is not None or self.state.training_rounds >= self.every

    def opened(self) -> tuple[DiscoveryRound, DiscoveryState]:
        """The next discovery round (call only when `due`), and the state with it open: a discovery that starts
        here adds its (ε, δ) to what was spent."""
        state = self.state
        if state.campaign is None:
            spent = self.privacy
            state = replace(state, discoveries=state.discoveries + 1, campaign=(EMPTY_TRIE, 1),
                            epsilon=None if spent is None or state.epsilon is None else state.epsilon + spent.epsilon,
                            delta=None if spent is None or state.delta is None else state.delta + spent.delta)
        assert state.campaign is not None
        trie, depth = state.campaign
        frontier = tuple(sorted(prefix for prefix in trie if len(prefix) == depth - 1 and not prefix.endswith(END)))
        return DiscoveryRound(DiscoveryTask(depth, frontier, self.config.max_word_length), trie, {}), state

    def sample_size(self, population: int) -> int:
        """⌊γ·n⌋ phones a round, as the accounting samples them (at least one, so a round can close)."""
        return max(1, int(self.config.sampling_rate * population))

    def closed(self, open_round: DiscoveryRound, tokenizer: KeyboardTokenizer) -> tuple[dict, list[str],
                                                                                       DiscoveryState]:
        """Grow the trie with the round's votes: the round's record, the words to add to the vocabulary when this
        round ends the discovery (none otherwise), and the state after it.

        The record holds only what the trie itself says (the prefixes it gained, the words): not how many voted,
        a count below the threshold that the accounting does not cover."""
        depth = open_round.task.depth
        grown = grow(open_round.trie, open_round.votes, depth, self.config.theta)
        ended = grown == open_round.trie or depth >= self.config.rounds
        words = sorted(word for word in discovered(grown) if is_new_word(word, tokenizer)) if ended else []
        state = (replace(self.state, training_rounds=0, words_added=self.state.words_added + len(words),
                         campaign=None) if ended else replace(self.state, campaign=(grown, depth + 1)))
        record = {"round_kind": "discovery", "discovery_depth": depth,
                  "discovery_prefixes_added": len(grown - open_round.trie), "words_discovered": len(words),
                  **state.record()}
        return record, words, state

    def trained(self) -> tuple[dict, DiscoveryState]:
        """A training round closed (whether or not it made a model): its record's fields, and the state after."""
        state = replace(self.state, training_rounds=self.state.training_rounds + 1)
        return {"round_kind": "training", **state.record()}, state
