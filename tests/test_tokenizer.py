from keyboard_model.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID, KeyboardTokenizer


def test_lowercases_and_splits_punctuation_keeping_inner_apostrophes():
    tokenizer = KeyboardTokenizer.train(["x"], vocab_size=10)
    assert (tokenizer.split("'Tis now, RELIEV'D Francisco's!")
            == ["'", "tis", "now", ",", "reliev'd", "francisco's", "!"])


def test_special_tokens_have_fixed_ids_and_messages_are_framed():
    tokenizer = KeyboardTokenizer.train(["the cat sat", "the dog sat"], vocab_size=50)
    assert tokenizer.id_to_token[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    ids = tokenizer.encode_message("The cat flew")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert [tokenizer.id_to_token[i] for i in ids[1:3]] == ["the", "cat"]
    assert ids[3] == UNK_ID  # "flew" was never seen


def test_vocabulary_keeps_the_most_frequent_words_up_to_its_size():
    tokenizer = KeyboardTokenizer.train(["a a a b b c", "a b"], vocab_size=len(SPECIAL_TOKENS) + 2)
    assert set(tokenizer.id_to_token[len(SPECIAL_TOKENS):]) == {"a", "b"}
    assert tokenizer.encode("c") == [UNK_ID]


def test_word_ids_exclude_punctuation_and_specials():
    tokenizer = KeyboardTokenizer.train(["hello , world ."], vocab_size=20)
    assert sorted(tokenizer.id_to_token[i] for i in tokenizer.word_ids) == ["hello", "world"]


def test_json_round_trip():
    tokenizer = KeyboardTokenizer.train(["one two three"], vocab_size=20)
    again = KeyboardTokenizer.from_json(tokenizer.to_json())
    assert again.encode("three two one") == tokenizer.encode("three two one")


def test_curly_apostrophe_is_an_apostrophe():
    tokenizer = KeyboardTokenizer.train(["x"], vocab_size=10)
    assert tokenizer.split("Don\u2019t \u2019tis") == tokenizer.split("don't 'tis") == ["don't", "'", "tis"]
