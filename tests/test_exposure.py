"""Exposure (Carlini et al. 2019): a secret a model was trained on many times ranks first among all secrets of its
space, secrets it never saw rank anywhere, and the estimate from sampled candidates agrees with the exact rank."""

from __future__ import annotations

import random

import pytest

from keyboard_model.architecture import build_model
from keyboard_model.exposure import CanaryFormat, estimated_exposures, exposures
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig, train_centrally
from tests.conftest import SMALL_TEXT

CANARY = CanaryFormat(length=3)  # 1,000 secrets: every one can be scored


@pytest.fixture(scope="module")
def memorised():
    """A small model trained on everyday lines and on one secret typed 40 times; and 8 secrets it never saw."""
    rng = random.Random(4)
    planted = CANARY.random_secret(rng)
    held_out = [secret for secret in (CANARY.random_secret(rng) for _ in range(20)) if secret != planted][:8]
    # The alphabet's words appear in ordinary text too, so the model knows them as words, not only as the secret.
    everyday = [*SMALL_TEXT, *(f"{a} and {b} make a pair" for a in CANARY.alphabet for b in CANARY.alphabet[:3])]
    tokenizer = KeyboardTokenizer.train([*everyday, CANARY.phrase(planted)], vocab_size=400)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=16, hidden_dim=32), seed=1)
    messages = tokenizer.encode_batch([*everyday, *[CANARY.phrase(planted)] * 40])
    train_centrally(model, messages, LocalTrainConfig(batch_size=8, learning_rate=0.5), epochs=30)
    return model, tokenizer, planted, held_out


def test_a_secret_typed_many_times_is_exposed_and_unseen_ones_are_not(memorised):
    model, tokenizer, planted, held_out = memorised
    most = CANARY.space.bit_length() - 1  # log2(1000) is 9.97; the planted secret ranks first or near it
    assert exposures(model, tokenizer, CANARY, [planted])[0] >= most - 1
    unseen = exposures(model, tokenizer, CANARY, held_out)
    # A secret never typed ranks like any: its exposure averages about 1 bit (log2 e), far below the planted one's.
    assert sum(unseen) / len(unseen) < 4


def test_the_estimate_from_sampled_secrets_follows_the_exact_rank(memorised):
    model, tokenizer, planted, held_out = memorised
    exact = exposures(model, tokenizer, CANARY, held_out)
    *estimated, of_planted = estimated_exposures(model, tokenizer, CANARY, [*held_out, planted], samples=2000)
    assert estimated == pytest.approx(exact, abs=1.5)
    assert of_planted > 6


def test_every_secret_of_the_space_has_its_own_index_and_the_alphabet_must_be_words_of_the_vocabulary():
    canary = CanaryFormat(alphabet=("one", "two", "three"), length=2)
    assert {canary.secret(index) for index in range(canary.space)} == {
        (a, b) for a in canary.alphabet for b in canary.alphabet}
    tokenizer = KeyboardTokenizer.train(["one two"], vocab_size=20)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=8, hidden_dim=8))
    with pytest.raises(ValueError, match="not: \\['three'\\]"):
        exposures(model, tokenizer, canary, [("one", "two")])
    with pytest.raises(ValueError, match="two or more distinct words"):
        CanaryFormat(alphabet=("one", "one"))
