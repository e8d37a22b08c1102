import copy

import torch

from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import BOS_ID, SPECIAL_TOKENS, KeyboardTokenizer
from tests.conftest import SMALL_TEXT
from tests.helpers import typed_with_deletions


def suggester(tokenizer: KeyboardTokenizer, seed: int = 0) -> Suggester:
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=8, hidden_dim=16, projection_dim=8)
    model = build_model(config, seed=seed)
    with torch.no_grad():  # a model with strong opinions, so that rankings are not ties
        for parameter in model.parameters():
            parameter.mul_(8)
    return Suggester(model, tokenizer)


def test_next_word_suggestions_are_three_distinct_real_words(small_tokenizer):
    s = suggester(small_tokenizer)
    for text in ["", "to be ", "All the world's a stage, ", "zzzz qqq "]:
        words = s.suggest(text)
        assert len(words) == len(set(words)) == 3
        assert not set(words) & set(SPECIAL_TOKENS)
        assert all(any(ch.isalnum() for ch in w) for w in words)


def test_completions_respect_the_typed_prefix(small_tokenizer):
    s = suggester(small_tokenizer)
    words = s.suggest("to be or not to be, that is the qu")
    assert sorted(words) == ["quality", "question"]
    words = s.suggest("to be or not to be, that is the QUES")
    assert words == ["question"]
    assert all(w.startswith("th") for w in s.suggest("Now is Th"))
    assert sorted(s.suggest("Now is th")) == ["that", "the"]
    assert s.suggest("xyzzy") == []


def test_completions_rank_by_the_model(small_tokenizer):
    s = suggester(small_tokenizer)
    scores = s.next_word_scores(s.split_context("all the ")[0])
    ranked = sorted((w for w in small_tokenizer.word_ids if small_tokenizer.id_to_token[w].startswith("w")),
                    key=lambda i: -float(scores[i]))
    assert s.suggest("all the w") == [small_tokenizer.id_to_token[i] for i in ranked[:3]]


def test_a_tiny_vocabulary_never_pads_with_special_tokens():
    tokenizer = KeyboardTokenizer.train(["a b"], vocab_size=10)
    assert sorted(suggester(tokenizer).suggest("")) == ["a", "b"]


def test_next_words_are_the_models_top_words_after_the_whole_message(small_tokenizer):
    s = suggester(small_tokenizer, seed=1)
    words = torch.tensor(small_tokenizer.word_ids)
    seen = set()
    for text in SMALL_TEXT:
        ids = [BOS_ID, *small_tokenizer.encode(text)]
        logits, _ = s.model(torch.tensor([ids]))
        best = words[logits[0, -1, words].topk(3).indices]
        expected = [small_tokenizer.id_to_token[i] for i in best]
        assert s.suggest(text + " ") == expected
        seen.add(tuple(expected))
    assert len(seen) > 1  # the context, not just word frequency, decides


def test_incremental_state_matches_a_full_pass_while_typing_and_deleting(small_tokenizer, small_model_config):
    model = build_model(small_model_config, seed=2)
    s = Suggester(copy.deepcopy(model), small_tokenizer)
    steps = []
    step = s.model.step

    def counting_step(tokens, state):
        steps.append(len(tokens))
        return step(tokens, state)

    s.model.step = counting_step
    fed = 0
    for text in typed_with_deletions(" ".join(SMALL_TEXT), keystrokes=400):
        steps.clear()
        pieces, _ = s.split_context(text)
        incremental = s.next_word_scores(pieces)
        with torch.no_grad():  # one pass over the whole message, as if nothing had been typed before
            logits, _ = model(torch.tensor([[BOS_ID, *small_tokenizer.ids_of(pieces)]]))
        torch.testing.assert_close(incremental, torch.log_softmax(logits[0, -1], dim=-1), atol=1e-5, rtol=1e-5)
        # A keystroke feeds at most the word it finished (plus a punctuation mark typed with it).
        assert sum(steps) <= 2, (text, steps)
        fed += sum(steps)
    assert fed > 50  # the count above saw real model steps


def test_the_command_line_shows_suggestions_as_the_keyboard_does(tmp_path, small_tokenizer, capsys):
    """`python -m keyboard_model suggest` writes "I" and a sentence's first word capitalised, as the strip does."""
    from keyboard_model.casing import shown_words
    from keyboard_model.cli import main
    from keyboard_model.weights import model_to_bytes

    s = suggester(small_tokenizer)
    (tmp_path / "model.safetensors").write_bytes(model_to_bytes(s.model.state_dict(), 4, s.model.config))
    small_tokenizer.save(tmp_path / "tokenizer.json")
    texts = ["I think ", "Good night. ", "to be or "]
    assert main(["suggest", "--model", str(tmp_path / "model.safetensors"), *texts]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{text!r} -> {' | '.join(shown_words(text, s.suggest(text)))}  (model v4)" for text in texts]
    assert all(word[0].isupper() for word in printed[1].split(" -> ")[1].split("  (")[0].split(" | "))
