from dataclasses import replace

import pytest
import torch

from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import PAD_ID
from keyboard_model.train import (
    LocalTrainConfig,
    batch_order,
    clip_gradients,
    language_model_loss,
    pack_sequences,
    train_local,
    training_rows,
)


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


def two_step_phone(small_tokenizer, small_model_config):
    """A model and messages that make exactly two SGD steps of one row each."""
    messages = small_tokenizer.encode_batch(["to be or not to be that is the question", "the winter of our discontent"])
    config = LocalTrainConfig(batch_size=1, sequence_length=10, learning_rate=1.0)
    _, rows = training_rows(messages, config)
    assert len(rows) == 2
    return build_model(small_model_config, seed=3), messages, config, rows


def test_without_a_proximal_term_a_phone_takes_plain_clipped_sgd_steps(small_tokenizer, small_model_config):
    model, messages, config, rows = two_step_phone(small_tokenizer, small_model_config)
    by_hand = build_model(small_model_config)
    by_hand.load_state_dict(model.state_dict())
    train_local(model, messages, replace(config, proximal_mu=0.0), seed=5)
    for batch in batch_order(len(rows), config, seed=5):
        by_hand.zero_grad()
        language_model_loss(by_hand, rows[batch]).backward()
        torch.nn.utils.clip_grad_norm_(by_hand.parameters(), config.max_grad_norm)
        with torch.no_grad():
            for p in by_hand.parameters():
                p -= config.learning_rate * p.grad
    for (name, trained), expected in zip(model.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_the_proximal_term_pulls_each_step_towards_the_downloaded_model(small_tokenizer, small_model_config):
    model, messages, config, rows = two_step_phone(small_tokenizer, small_model_config)
    mu = 0.5
    start = {name: t.clone() for name, t in model.state_dict().items()}
    plain, proximal = build_model(small_model_config), build_model(small_model_config)
    plain.load_state_dict(start)
    proximal.load_state_dict(start)
    train_local(plain, messages, config, seed=5)
    train_local(proximal, messages, replace(config, proximal_mu=mu), seed=5)

    # The first step starts at the downloaded model, where the proximal term has no gradient: it is the plain step.
    first = build_model(small_model_config)
    first.load_state_dict(start)
    language_model_loss(first, rows[batch_order(len(rows), config, seed=5)[0]]).backward()
    torch.nn.utils.clip_grad_norm_(first.parameters(), config.max_grad_norm)
    after_first = {name: p.detach() - config.learning_rate * p.grad for name, p in first.named_parameters()}
    # The second starts there, so it is the plain second step minus lr * mu * (w - w_global).
    for name, p in proximal.named_parameters():
        moved = after_first[name] - start[name]
        expected = plain.state_dict()[name] - config.learning_rate * mu * moved
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    pull = sum(float((after_first[n] - start[n]).norm()) for n in start)
    assert pull > 0.01  # the first step moved the model, so the term above is not zero


def test_a_negative_proximal_mu_is_refused():
    with pytest.raises(ValueError, match="proximal_mu"):
        LocalTrainConfig(proximal_mu=-0.1)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # the gradients clipped, and left as they are
def test_clipping_gives_clip_grad_norm_s_gradients_and_norm(small_model_config, max_norm):
    models = [build_model(small_model_config, seed=2) for _ in range(2)]
    for model in models:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    norm = clip_gradients(list(models[0].parameters()), max_norm)
    assert norm == torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm).item()
    for ours, torchs in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(ours.grad, torchs.grad)
