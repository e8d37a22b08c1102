import pytest
import torch

from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import UNK_ID, KeyboardTokenizer
from keyboard_model.transformer import TransformerConfig
from keyboard_model.vocabulary_growth import grow_config, grow_optimizer_state, grow_tokenizer, grow_weights
from keyboard_model.weights import model_from_bytes, model_to_bytes

TEXTS = [
    "To be, or not to be: that is the question.",
    "O Romeo, Romeo! wherefore art thou Romeo?",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
]
NEW_WORDS = ["zounds", "forsooth", "o'er"]


@pytest.fixture(scope="module")
def tokenizer() -> KeyboardTokenizer:
    return KeyboardTokenizer.train(TEXTS, vocab_size=200)


def trained_looking_state(vocab_size: int) -> dict[str, torch.Tensor]:
    """A small CIFG's weights with word-frequency-like output biases, as training leaves them (a fresh model's are
    all zero, which would make the smallest bias no smaller than the rest)."""
    state = build_model(ModelConfig(vocab_size=vocab_size, embedding_dim=8, hidden_dim=12), seed=1).state_dict()
    biases = torch.randn(vocab_size, generator=torch.Generator().manual_seed(2))
    return {**state, "output_bias": biases}


def test_new_words_take_the_ids_after_every_old_token_and_old_texts_encode_as_before(tokenizer):
    grown = grow_tokenizer(tokenizer, NEW_WORDS)
    first = tokenizer.vocab_size
    assert grown.vocab_size == first + len(NEW_WORDS)
    assert [grown.encode(word) for word in NEW_WORDS] == [[first], [first + 1], [first + 2]]
    exclamation, *the_sea = tokenizer.encode("! the sea")
    assert grown.encode("Zounds! O\u2019er the sea") == [first, exclamation, first + 2, *the_sea]
    for text in TEXTS:
        assert grown.encode_message(text) == tokenizer.encode_message(text)
    assert grown.encode("gadzooks") == [UNK_ID]
    assert set(range(first, first + len(NEW_WORDS))) <= set(grown.word_ids)  # the keyboard may suggest them
    assert tokenizer.vocab_size == first and tokenizer.encode("zounds") == [UNK_ID]  # the old one is unchanged


@pytest.mark.parametrize(("words", "message"), [
    (["Zounds"], "not one word"),  # the tokenizer lower-cases text, so no text encodes to it
    (["two words"], "not one word"),
    (["!"], "not one word"),
    (["romeo"], "already token"),
    (["zounds", "zounds"], "distinct"),
    ([], "no words"),
])
def test_refuses_words_no_text_could_encode_to_or_that_it_has(tokenizer, words, message):
    with pytest.raises(ValueError, match=message):
        grow_tokenizer(tokenizer, words)


def test_growing_keeps_the_old_words_ranking_and_new_words_out_of_the_top_three(tokenizer):
    old_size, added = tokenizer.vocab_size, len(NEW_WORDS)
    state = trained_looking_state(old_size)
    grown_state = grow_weights(state, added)
    old_model = build_model(ModelConfig(vocab_size=old_size, embedding_dim=8, hidden_dim=12))
    old_model.load_state_dict(state)
    grown_model = build_model(grow_config(old_model.config, added))
    grown_model.load_state_dict(grown_state)
    tokens = torch.tensor([tokenizer.encode_message(text)[:12] for text in TEXTS])
    with torch.no_grad():
        old_logits = old_model.output_logits(old_model.features(tokens))
        grown_logits = grown_model.output_logits(grown_model.features(tokens))
    # Every context of every text: the same top three, all old words.
    assert torch.equal(old_logits.topk(3).indices, grown_logits.topk(3).indices)
    torch.testing.assert_close(grown_logits[..., :old_size], old_logits, atol=1e-5, rtol=0)
    # By construction a new word scores at most the mean of the old words' scores, after any context.
    assert (grown_logits[..., old_size:] <= old_logits.mean(dim=-1, keepdim=True) + 1e-5).all()


def test_grown_weights_are_a_new_state_and_the_old_one_is_untouched():
    state = trained_looking_state(30)
    before = {name: tensor.clone() for name, tensor in state.items()}
    grown = grow_weights(state, 2)
    assert all(torch.equal(state[name], before[name]) for name in state)
    assert grown["embedding.weight"].shape == (32, 8) and grown["output_bias"].shape == (32,)
    assert torch.equal(grown["embedding.weight"][:30], state["embedding.weight"])
    assert torch.equal(grown["output_bias"][30:], state["output_bias"].min().repeat(2))
    for name in state.keys() - {"embedding.weight", "output_bias"}:
        assert torch.equal(grown[name], state[name]) and grown[name].data_ptr() != state[name].data_ptr()
    with pytest.raises(ValueError, match="at least 1"):
        grow_weights(state, 0)


@pytest.mark.parametrize("config", [
    ModelConfig(vocab_size=30, embedding_dim=8, hidden_dim=12),
    TransformerConfig(vocab_size=30, embedding_dim=8, layers=1, heads=2, context=6),
], ids=["cifg", "transformer"])
@pytest.mark.parametrize("encoding", ["float32", "int8"])
def test_grown_weights_load_with_the_larger_vocabulary(config, encoding):
    grown_config = grow_config(config, 4)
    assert grown_config.vocab_size == 34 and type(grown_config) is type(config)
    grown = grow_weights(build_model(config, seed=3).state_dict(), 4)
    model, version = model_from_bytes(model_to_bytes(grown, 7, grown_config, encoding))
    assert version == 7 and model.config == grown_config
    assert model.output_logits(model.features(torch.tensor([[1, 33, 2]]))).shape == (1, 3, 34)


def test_optimizer_state_grows_zero_rows_and_the_served_average_takes_the_new_weights():
    weights = trained_looking_state(30)
    grown_weights = grow_weights(weights, 2)
    generator = torch.Generator().manual_seed(4)
    state = {
        **{f"velocity/{name}": torch.randn(tensor.shape, generator=generator) for name, tensor in weights.items()},
        **{f"average/{name}": tensor.clone() for name, tensor in weights.items()},
        "average_steps": torch.tensor(3.0),
    }
    grown = grow_optimizer_state(state, grown_weights, weight_copies=("average/",))
    assert grown.keys() == state.keys()
    for name in ("embedding.weight", "output_bias"):
        assert torch.equal(grown[f"velocity/{name}"][:30], state[f"velocity/{name}"])
        assert not grown[f"velocity/{name}"][30:].any()
        assert torch.equal(grown[f"average/{name}"], grown_weights[name])
    for key in state.keys() - {f"{prefix}/{name}" for prefix in ("velocity", "average")
                               for name in ("embedding.weight", "output_bias")}:
        assert torch.equal(grown[key], state[key])
    assert state["velocity/output_bias"].shape == (30,)  # the old state is untouched


def test_optimizer_state_of_another_vocabulary_is_refused():
    grown_weights = grow_weights(trained_looking_state(30), 2)
    with pytest.raises(ValueError, match="m/output_bias has shape"):
        grow_optimizer_state({"m/output_bias": torch.zeros(32)}, grown_weights)
