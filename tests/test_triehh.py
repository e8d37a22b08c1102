import math
import random

import pytest

from keyboard_model.triehh import (
    EMPTY_TRIE,
    END,
    TrieHHConfig,
    discover,
    discovered,
    discovery_round,
    for_privacy,
    grow,
    privacy,
    vote,
)


def fleet() -> dict[int, list[str]]:
    """100 phones: 60 type "zounds"; every phone types a word of its own ("solo<n>", sharing the prefix "solo");
    phone 99 also types "zoundsy", a word no other phone types, fifty times, so it is nearly always its vote."""
    phones = {n: [f"solo{n}"] + (["zounds"] if n < 60 else []) for n in range(100)}
    phones[99] = ["zoundsy"] * 50 + phones[99]
    return phones


# theta = 2 with gamma = 1/3 (the most the accounting allows for it): the easiest setting for a lone word to get in.
LENIENT = TrieHHConfig(theta=2, sampling_rate=1 / 3, max_word_length=10)


def test_a_word_many_phones_type_is_discovered_and_its_prefixes_are_not_words():
    for seed in range(10):
        trie = discover(fleet(), LENIENT, seed)
        assert "zounds" in discovered(trie)
        assert "zound" in trie and "zound" not in discovered(trie)  # a prefix, not a word: no end marker


def test_a_word_only_one_phone_types_is_never_discovered_however_often_it_types_it():
    for seed in range(200):
        trie = discover(fleet(), LENIENT, seed)
        # Its prefixes up to "zounds" are other phones' too; the seventh character is its alone.
        assert not {"zoundsy", "zoundsy" + END} & trie
        assert not {f"solo{n}" for n in range(100)} & discovered(trie)


def test_with_a_threshold_of_one_the_lone_word_would_be_found():
    # The control for the test above: it is the threshold that keeps the lone word out, not the fleet's make-up.
    without_threshold = TrieHHConfig(theta=1, sampling_rate=LENIENT.sampling_rate, max_word_length=10)
    assert any("zoundsy" in discovered(discover(fleet(), without_threshold, seed)) for seed in range(100))


def test_a_word_longer_than_the_longest_discoverable_is_never_discovered():
    phones = {n: ["gentlewoman"] for n in range(50)}
    assert discovered(discover(phones, TrieHHConfig(2, 1 / 3, max_word_length=11), seed=0)) == {"gentlewoman"}
    assert discovered(discover(phones, TrieHHConfig(2, 1 / 3, max_word_length=10), seed=0)) == set()


def test_each_sampled_phone_casts_at_most_one_vote_of_the_rounds_depth():
    phones = fleet()
    rng = random.Random(0)
    trie = EMPTY_TRIE
    for depth in range(1, 5):
        trie_before = trie
        trie, votes = discovery_round(trie, depth, phones, LENIENT, rng)
        assert len(votes) == 33  # floor(gamma * 100) distinct phones, one entry each
        assert set(votes) <= set(phones)
        for prefix in votes.values():
            assert prefix is None or (len(prefix) == depth and (depth == 1 or prefix[:-1] in trie_before))


def test_a_phone_votes_one_prefix_of_its_own_words_that_extends_the_trie():
    trie = frozenset({"z", "zo", "s", "si"})
    words = ["zounds", "zany", "sirrah", "thee"]
    votes = {vote(words, trie, 3, random.Random(seed)) for seed in range(50)}
    assert votes == {"zou", "sir"}  # "zany" and "thee" leave the trie before depth 3
    assert vote(["ay"], trie, 1, random.Random(0)) == "a"
    assert vote(["ay"], frozenset({"a", "ay"}), 3, random.Random(0)) == "ay" + END
    assert vote(["ay"], frozenset({"a", "ay"}), 4, random.Random(0)) is None  # "ay$" is all of it
    assert vote([], trie, 1, random.Random(0)) is None


def test_a_vote_depends_on_the_seed_not_on_the_order_of_the_history():
    words = ["zounds", "sirrah", "thee", "anon"]
    assert vote(words, EMPTY_TRIE, 1, random.Random(7)) == vote(words[::-1], EMPTY_TRIE, 1, random.Random(7))


@pytest.mark.parametrize("word", ["", "cost$", "$"])
def test_a_phone_refuses_to_vote_on_what_is_not_a_word(word):
    with pytest.raises(ValueError, match="non-empty words"):
        vote([word], EMPTY_TRIE, 1, random.Random(0))


def test_a_prefix_joins_with_theta_votes_and_not_one_fewer():
    trie = frozenset({"t"})
    assert grow(trie, {"a": "th", "b": "th", "c": None}, 2, theta=3) == trie
    assert grow(trie, {"a": "th", "b": "th", "c": "th"}, 2, theta=3) == trie | {"th"}


@pytest.mark.parametrize(("stray", "depth"), [
    ("ab", 2),  # its parent "a" never joined
    ("thex", 4),  # nor did "the"
    ("thee", 3),  # not of the round's depth
    ("thy" + END + "s", 5),  # past the end of a word
    (END, 1),  # the empty word
])
def test_votes_that_do_not_extend_the_trie_count_for_nothing(stray, depth):
    trie = frozenset({"t", "th", "thy", "thy" + END})
    assert grow(trie, dict.fromkeys(range(10), stray), depth, theta=2) == trie


def test_discovered_words_are_those_with_their_end_marker():
    assert discovered(frozenset({"t", "th", "the", "thee", "thee" + END, "thy", "thy" + END})) == {"thee", "thy"}


def test_privacy_matches_the_formula_worked_by_hand():
    # theta = 5, gamma = 0.1, words of up to 9 characters, so L = 10 rounds:
    #   epsilon = L ln(1 / (1 - theta gamma)) = 10 ln(1 / 0.5) = 10 ln 2 = 6.931...
    #   delta = (theta - 2) / ((theta - 3) theta!) = 3 / (2 * 120) = 0.0125
    spent = privacy(TrieHHConfig(theta=5, sampling_rate=0.1, max_word_length=9))
    assert spent.epsilon == pytest.approx(6.9315, abs=1e-3)
    assert spent.delta == pytest.approx(0.0125, abs=1e-9)


def test_epsilon_grows_with_sampling_theta_and_rounds_and_delta_shrinks_with_theta():
    def spent(theta, rate, length):
        return privacy(TrieHHConfig(theta, rate, length))

    rates = [0.01, 0.02, 0.05, 0.1]
    assert all(spent(8, a, 9).epsilon < spent(8, b, 9).epsilon for a, b in zip(rates, rates[1:]))
    assert all(spent(t, 0.02, 9).epsilon < spent(t + 1, 0.02, 9).epsilon for t in range(4, 20))
    assert all(spent(t, 0.02, 9).delta > spent(t + 1, 0.02, 9).delta for t in range(4, 20))
    assert spent(8, 0.02, 19).epsilon == pytest.approx(2 * spent(8, 0.02, 9).epsilon)  # linear in the rounds
    assert spent(8, 0.02, 19).delta == spent(8, 0.02, 9).delta


@pytest.mark.parametrize(("theta", "rate", "message"), [(3, 0.1, "theta >= 4"), (5, 0.2, "sampling_rate <=")])
def test_privacy_refuses_settings_outside_the_theorem(theta, rate, message):
    with pytest.raises(ValueError, match=message):
        privacy(TrieHHConfig(theta, rate, 9))


def test_for_privacy_picks_the_papers_theta_and_spends_exactly_epsilon():
    # The paper's experiments: epsilon = 4, delta = 2.3e-12, L = 10. delta(14) = 12 / (11 * 14!) = 1.25e-11 is too
    # large, delta(15) = 13 / (12 * 15!) = 8.3e-13 is not; gamma = (e^0.4 - 1) / (15 e^0.4) = 0.02198.
    config = for_privacy(epsilon=4.0, delta=2.3e-12, max_word_length=9)
    assert config.theta == 15
    assert config.sampling_rate == pytest.approx(0.02198, abs=1e-5)
    spent = privacy(config)
    assert spent.epsilon == pytest.approx(4.0, abs=1e-9)
    assert spent.delta <= 2.3e-12


def test_for_privacy_raises_theta_when_epsilon_per_round_is_large():
    # e^(eps/L) = e^3 = 20.1 per round: theta + 1 must reach it, whatever delta allows.
    config = for_privacy(epsilon=30.0, delta=0.1, max_word_length=9)
    assert config.theta == math.ceil(math.exp(3) - 1)
    assert privacy(config).epsilon == pytest.approx(30.0, abs=1e-9)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"theta": 0, "sampling_rate": 0.1, "max_word_length": 9}, "theta"),
    ({"theta": 2, "sampling_rate": 0.0, "max_word_length": 9}, "sampling_rate"),
    ({"theta": 2, "sampling_rate": 1.5, "max_word_length": 9}, "sampling_rate"),
    ({"theta": 2, "sampling_rate": 0.1, "max_word_length": 0}, "max_word_length"),
])
def test_config_refuses_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrieHHConfig(**kwargs)
