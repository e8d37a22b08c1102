import math

import pytest
import torch

from keyboard_model.evaluate import (
    EvalCounts,
    evaluate_fixed_suggestions,
    most_frequent_words,
    recall_positions,
    score_predictions,
    suggestion_mask,
)
from keyboard_model.tokenizer import EOS_ID, PAD_ID, UNK_ID, KeyboardTokenizer


def test_recall_on_a_hand_made_example():
    tokenizer = KeyboardTokenizer.train(["a b c d e , ."], vocab_size=20)
    a, b, c, d, e, comma = (tokenizer.token_to_id[t] for t in ["a", "b", "c", "d", "e", ","])
    v = tokenizer.vocab_size

    def ranking(*best_first):
        logits = torch.zeros(v)
        for rank, token in enumerate(best_first):
            logits[token] = 10.0 - rank
        return logits

    logits = torch.stack([
        ranking(a, b, c),          # target a: top-1 hit
        ranking(b, a, c),          # target a: top-3 hit only
        ranking(b, c, d, a),       # target a: miss (4th)
        ranking(comma, d, e, a),   # target a: punctuation is never suggested, so a is 3rd: top-3 hit
        ranking(a, b, c),          # target <unk>: always a miss, but counted
        ranking(a, b, c),          # target ",": not a recall position
        ranking(a, b, c),          # target </s>: not a recall position
        ranking(a, b, c),          # padding: not scored at all
    ])
    targets = torch.tensor([a, a, a, a, UNK_ID, comma, EOS_ID, PAD_ID])
    counts = score_predictions(logits, targets, recall_positions(tokenizer), suggestion_mask(tokenizer))
    assert (counts.hits_at_1, counts.hits_at_3, counts.positions) == (1, 3, 5)
    assert counts.tokens == 7
    assert math.isclose(counts.recall_at_1, 1 / 5) and math.isclose(counts.recall_at_3, 3 / 5)
    expected_nll = torch.nn.functional.cross_entropy(logits[:7], targets[:7], reduction="sum").item()
    assert math.isclose(counts.perplexity, math.exp(expected_nll / 7), rel_tol=1e-6)


def test_most_frequent_words_keyboard():
    tokenizer = KeyboardTokenizer.train(["the the the cat cat sat , , , , , ."], vocab_size=20)
    encoded = [tokenizer.encode_message("the the the cat cat sat , , , , ,")]
    top = most_frequent_words(tokenizer, encoded)
    assert [tokenizer.id_to_token[i] for i in top] == ["the", "cat", "sat"]  # punctuation is not a word
    counts = evaluate_fixed_suggestions(tokenizer, [tokenizer.encode_message("the cat dog .")], top)
    # positions: the, cat, dog(<unk>); "." and </s> are not counted
    assert (counts.hits_at_1, counts.hits_at_3, counts.positions) == (1, 2, 3)


def test_evaluate_batches_and_pads_without_changing_the_counts(small_tokenizer, small_model_config):
    from keyboard_model.architecture import build_model
    from keyboard_model.evaluate import EvalCounts, evaluate
    from tests.conftest import SMALL_TEXT

    model = build_model(small_model_config, seed=3)
    messages = small_tokenizer.encode_batch(SMALL_TEXT)  # different lengths: batches need padding
    batched = evaluate(model, small_tokenizer, messages, batch_size=4)
    one_by_one = sum((evaluate(model, small_tokenizer, [m], batch_size=1) for m in messages), EvalCounts())
    assert (batched.hits_at_1, batched.hits_at_3, batched.positions, batched.tokens) == (
        one_by_one.hits_at_1, one_by_one.hits_at_3, one_by_one.positions, one_by_one.tokens)
    assert batched.tokens == sum(len(m) - 1 for m in messages)
    assert math.isclose(batched.nll_sum, one_by_one.nll_sum, rel_tol=1e-5)


def test_perplexity_of_a_wrecked_model_is_infinite_not_an_error():
    # A model that noise has wrecked can average a loss past what exp() holds; the run must go on.
    assert EvalCounts(nll_sum=5_000.0, tokens=2).perplexity == float("inf")
    assert EvalCounts(nll_sum=2.0, tokens=2).perplexity == pytest.approx(math.e)
