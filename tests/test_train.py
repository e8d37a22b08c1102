import torch

from keyboard_model.model import ModelConfig, build_model
from keyboard_model.tokenizer import PAD_ID
from keyboard_model.train import LocalTrainConfig, language_model_loss, pack_sequences, train_local


def test_pack_sequences_makes_every_token_but_the_first_a_target_once():
    rows = pack_sequences([[2, 10, 11, 3], [2, 12, 3]], sequence_length=3)
    assert rows.tolist() == [[2, 10, 11, 3], [3, 2, 12, 3]]
    rows = pack_sequences([[2, 10, 11, 3, 2, 12]], sequence_length=4)
    assert rows.tolist() == [[2, 10, 11, 3, 2], [2, 12, PAD_ID, PAD_ID, PAD_ID]]
    targets = rows[:, 1:][rows[:, 1:] != PAD_ID]
    assert targets.tolist() == [10, 11, 3, 2, 12]


def test_local_training_lowers_the_loss_on_the_phones_messages(small_tokenizer):
    from tests.conftest import SMALL_TEXT

    # A learning rate and length at which training is not chaotic: perturbing the starting weights by 1e-3 moves the
    # final loss (about 2.69, from 3.98) by under 1e-3 (measured), so the margin below holds on any CPU. At learning
    # rate 1.0 for 100 epochs the loss ends anywhere from 0.04 to 9.8, depending on rounding.
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=16, hidden_dim=32, projection_dim=16)
    messages = small_tokenizer.encode_batch(SMALL_TEXT)
    model = build_model(config, seed=0)
    rows = pack_sequences(messages, 20)
    before = language_model_loss(model, rows).item()
    result = train_local(model, messages, LocalTrainConfig(epochs=40, batch_size=2, learning_rate=0.5))
    after = language_model_loss(model, rows).item()
    assert after < before - 1.0
    assert result.num_examples == len(messages) and result.divergence is None


def test_training_uses_only_the_newest_messages_up_to_the_cap(small_tokenizer, small_model_config):
    messages = small_tokenizer.encode_batch(["to be or not to be"] * 10)
    result = train_local(build_model(small_model_config), messages, LocalTrainConfig(max_messages=3))
    assert result.num_examples == 3


def test_same_seed_same_result(small_tokenizer, small_model_config):
    messages = small_tokenizer.encode_batch(["to be or not to be", "the winter of our discontent"] * 4)
    a, b = build_model(small_model_config), build_model(small_model_config)
    train_local(a, messages, LocalTrainConfig(batch_size=2), seed=4)
    train_local(b, messages, LocalTrainConfig(batch_size=2), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
