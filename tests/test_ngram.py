import math

import pytest
import torch

from keyboard_model.ngram import KneserNeyTrigram

# Ids as the tokenizer assigns them: 2 is <s>, 3 is </s>; the words a, b, c are 4, 5, 6.
BOS, EOS, A, B, C = 2, 3, 4, 5, 6
CORPUS = [[BOS, A, B, EOS], [BOS, A, C, EOS], [BOS, B, B, EOS]]  # "a b", "a c", "b b"
V = 8


@pytest.fixture(scope="module")
def model() -> KneserNeyTrigram:
    return KneserNeyTrigram(CORPUS, vocab_size=V)


def test_discounts_follow_the_counts_of_counts(model):
    # Padded with a second <s>, the corpus has trigram counts 2,1,1,1,1,1,1,1: D3 = 7 / (7 + 2*1).
    # Continuation bigrams: (<s>)->a,b; (a)->b,c; (b)->b:1, (b)-></s>:2; (c)-></s>: D2 = 6 / (6 + 2*1).
    # Continuation unigrams: a:1, b:3, c:1, </s>:2: D1 = 2 / (2 + 2*1).
    assert model.discounts == pytest.approx((2 / 4, 6 / 8, 7 / 9))


def test_probabilities_by_hand(model):
    # P1: max(N1+(. w) - 1/2, 0) / 7, plus 1/2 * 4 seen words / 7, spread over V = 8 ids.
    p1 = {A: 0.5 / 7 + 1 / 28, B: 2.5 / 7 + 1 / 28, C: 0.5 / 7 + 1 / 28, EOS: 1.5 / 7 + 1 / 28}
    assert model.distribution(7, 7)[B].item() == pytest.approx(p1[B])  # nothing seen: the unigram
    # After "a": continuations b and c, once each, total 2; the rest goes to P1 with weight 3/4 * 2/2.
    p2_b_after_a = (1 - 0.75) / 2 + 0.75 * p1[B]
    assert model.distribution(7, A)[B].item() == pytest.approx(p2_b_after_a)  # unseen trigram: falls to P2
    # After "<s> a": trigram counts b:1, c:1, total 2.
    expected = (1 - 7 / 9) / 2 + (7 / 9) * p2_b_after_a
    assert model.distribution(BOS, A)[B].item() == pytest.approx(expected)
    # </s> never followed "a": all of its mass comes from the lower orders.
    assert model.distribution(BOS, A)[EOS].item() == pytest.approx((7 / 9) * 0.75 * p1[EOS])


@pytest.mark.parametrize("context", [(BOS, BOS), (BOS, A), (A, B), (7, 7), (C, A)])
def test_every_distribution_sums_to_one(model, context):
    distribution = model.distribution(*context)
    assert distribution.sum().item() == pytest.approx(1.0)
    assert torch.all(distribution > 0)


def test_perplexity_on_its_training_text_beats_uniform(small_tokenizer):
    from tests.conftest import SMALL_TEXT

    messages = small_tokenizer.encode_batch(SMALL_TEXT)
    counts = KneserNeyTrigram(messages, small_tokenizer.vocab_size).evaluate(small_tokenizer, messages)
    assert counts.tokens == sum(len(m) - 1 for m in messages)
    assert counts.perplexity < small_tokenizer.vocab_size / 4
    assert counts.recall_at_1 > 0.5  # it has seen these very trigrams
    assert math.isfinite(counts.nll_sum)
