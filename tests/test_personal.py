"""A phone's personal model (keyboard_model/personal.py): it learns the phone's own style, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from keyboard_model.architecture import NextWordModel, build_model
from keyboard_model.evaluate import evaluate
from keyboard_model.model import ModelConfig
from keyboard_model.personal import PersonalConfig, personalise
from keyboard_model.tokenizer import KeyboardTokenizer

# What this person keeps typing, and types again after the training messages end.
OWN_PHRASES = ["now is the winter of our discontent", "the quality of mercy is not strain'd"]
# Enough steps to learn two phrases; at a rate where the learnt recall (0.79 from 0.07) stayed the same with the
# starting weights perturbed by 1e-3 and 2e-3 (measured), so the margins below hold on any CPU.
LEARNS = PersonalConfig(epochs=10, learning_rate=1.0, batch_size=4)


@pytest.fixture
def global_model(small_tokenizer: KeyboardTokenizer) -> NextWordModel:
    # Wider than the shared small model: 8 embedding dimensions learn the two phrases too slowly to measure.
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=16, hidden_dim=32, projection_dim=16)
    return build_model(config, seed=0)


@pytest.fixture
def own_messages(small_tokenizer: KeyboardTokenizer) -> list[list[int]]:
    return small_tokenizer.encode_batch(OWN_PHRASES * 20)


def weights(model: NextWordModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_personalising_on_own_phrases_raises_recall_on_the_phones_held_out_messages(
    small_tokenizer, global_model, own_messages
):
    held_out = small_tokenizer.encode_batch(OWN_PHRASES)
    before = evaluate(global_model, small_tokenizer, held_out).recall_at_1
    personal = personalise(global_model, own_messages, LEARNS, seed=0)
    after = evaluate(personal, small_tokenizer, held_out).recall_at_1
    assert before < 0.25 and after > before + 0.4


def test_the_global_model_is_left_unchanged(global_model, own_messages):
    before = weights(global_model)
    personalise(global_model, own_messages, LEARNS, seed=0)
    assert all(torch.equal(before[name], tensor) for name, tensor in global_model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in global_model.parameters())


def test_bias_only_changes_only_the_output_bias(global_model, own_messages):
    personal = personalise(global_model, own_messages, PersonalConfig(parameters="bias", learning_rate=1.0), seed=0)
    before, after = weights(global_model), weights(personal)
    assert not torch.equal(before["output_bias"], after["output_bias"])
    assert all(torch.equal(before[name], after[name]) for name in before if name != "output_bias")
    # An ordinary model again: the next round's training may move every weight.
    assert all(p.requires_grad and p.grad is None for p in personal.parameters())


def test_the_seed_alone_decides_the_personal_model(global_model, own_messages):
    first, again, other = (weights(personalise(global_model, own_messages, LEARNS, seed))
                           for seed in (3, 3, 4))
    assert all(torch.equal(first[name], again[name]) for name in first)
    # 40 messages make more rows than a batch, so another seed orders the steps differently.
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_training_that_diverges_gives_the_global_weights_back(global_model, own_messages):
    blown_up = PersonalConfig(epochs=3, learning_rate=1e6, batch_size=4)
    personal = personalise(global_model, own_messages, blown_up, seed=0)
    assert all(torch.equal(tensor, personal.state_dict()[name]) for name, tensor in weights(global_model).items())


def test_a_config_names_parameters_a_phone_can_tune():
    with pytest.raises(ValueError, match="parameters"):
        PersonalConfig(parameters="embedding")
    with pytest.raises(ValueError, match="learning_rate"):
        PersonalConfig(learning_rate=0.0)
