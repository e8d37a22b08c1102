"""The model seam and its second architecture, the causal Transformer."""

import argparse
import json

import pytest
import torch

from keyboard_model import artifact, int8
from keyboard_model.architecture import build_model
from keyboard_model.cli_options import add_model_arguments, model_config_from_args
from keyboard_model.model import CIFGLSTM, ModelConfig
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import BOS_ID, PAD_ID
from keyboard_model.train import LocalTrainConfig, language_model_loss, pack_sequences, train_local
from keyboard_model.transformer import CausalTransformer, TransformerConfig
from keyboard_model.weights import WeightsError, model_from_bytes, model_to_bytes, write_tensors
from tests.conftest import SMALL_TEXT
from tests.helpers import typed_with_deletions

# A window of 6 tokens, so that short test texts already slide it.
CONTEXT = 6


@pytest.fixture
def config(small_tokenizer):
    return TransformerConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=16, layers=2, heads=2,
                             context=CONTEXT)


def strong(model):
    """A model with strong opinions, so that rankings are not ties and differences are not lost in noise."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8)
    return model.eval()


def test_the_default_sizes_match_the_cifg_parameter_count():
    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    cifg, transformer = build_model(ModelConfig(vocab_size=9_093)), build_model(TransformerConfig(vocab_size=9_093))
    assert abs(count(transformer) - count(cifg)) < 0.01 * count(cifg)


def test_the_same_seed_gives_the_same_weights(config):
    a, b, c = build_model(config, seed=3), build_model(config, seed=3), build_model(config, seed=4)
    assert all(torch.equal(a.state_dict()[n], t) for n, t in b.state_dict().items())
    assert not torch.equal(a.embedding.weight, c.embedding.weight)


@pytest.mark.parametrize("length", [CONTEXT - 1, 3 * CONTEXT])
def test_a_later_token_never_changes_earlier_outputs(config, length):
    model = strong(build_model(config, seed=1))
    tokens = torch.randint(4, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :-1], after[:, :-1])
    assert not torch.allclose(before[:, -1], after[:, -1])


def test_stepping_through_the_cache_equals_the_full_pass_past_the_window(config):
    model = strong(build_model(config, seed=2))
    tokens = torch.randint(4, config.vocab_size, (3, 3 * CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.features(tokens)
        state = model.initial_state(3)
        for t in range(tokens.shape[1]):
            output, state = model.step(tokens[:, t], state)
            torch.testing.assert_close(output, full[:, t], atol=1e-4, rtol=1e-4)
    window, caches = state
    assert window.shape[1] == CONTEXT and all(k.shape[2] == CONTEXT for k, _ in caches)


def test_the_suggester_walks_the_cache_and_matches_a_full_pass(small_tokenizer, config):
    model = strong(build_model(config, seed=2))
    s = Suggester(model, small_tokenizer)
    longest = 0
    for text in typed_with_deletions(" ".join(SMALL_TEXT), keystrokes=300):
        pieces, _ = s.split_context(text)
        incremental = s.next_word_scores(pieces)
        ids = [BOS_ID, *small_tokenizer.ids_of(pieces)]
        longest = max(longest, len(ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids]))
        torch.testing.assert_close(incremental, torch.log_softmax(logits[0, -1], dim=-1), atol=1e-4, rtol=1e-4)
    assert longest > 2 * CONTEXT  # the walk went well past a full cache


def test_saved_bytes_rebuild_the_architecture_they_record(config):
    model = build_model(config, seed=5)
    loaded, version = model_from_bytes(model_to_bytes(model.state_dict(), 7, config))
    assert isinstance(loaded, CausalTransformer) and loaded.config == config and version == 7
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in model.state_dict().items())


def test_a_file_without_an_architecture_loads_as_a_cifg(small_model_config):
    model = build_model(small_model_config, seed=1)
    # The format before the seam: no "architecture" in the metadata.
    old = write_tensors(model.state_dict(), {"version": "3", "model_config": json.dumps(small_model_config.to_dict())})
    loaded, version = model_from_bytes(old)
    assert isinstance(loaded, CIFGLSTM) and loaded.config == small_model_config and version == 3


def test_an_unknown_architecture_or_mismatched_sizes_are_refused(config, small_model_config):
    cifg = build_model(small_model_config).state_dict()
    with pytest.raises(WeightsError, match="unknown model architecture"):
        model_from_bytes(write_tensors(cifg, {"version": "0", "architecture": "mamba",
                                              "model_config": json.dumps(small_model_config.to_dict())}))
    with pytest.raises(WeightsError):  # CIFG tensors under a Transformer's header
        model_from_bytes(model_to_bytes(cifg, 0, config))


def test_local_sgd_lowers_the_loss_on_a_tiny_corpus(small_tokenizer, config):
    model = build_model(config, seed=0)
    messages = small_tokenizer.encode_batch(SMALL_TEXT)
    rows = pack_sequences(messages, 20)
    with torch.no_grad():
        before = language_model_loss(model, rows).item()
    result = train_local(model, messages, LocalTrainConfig(epochs=30, batch_size=4, learning_rate=0.5), seed=0)
    with torch.no_grad():
        after = language_model_loss(model, rows).item()
    assert result.divergence is None and result.num_examples == len(SMALL_TEXT)
    assert after < 0.7 * before, (before, after)


def test_the_int8_artifact_round_trips(tmp_path, small_tokenizer, config):
    model = strong(build_model(config, seed=6))
    manifest = artifact.export(model, small_tokenizer, tmp_path / "k.fkb", version=4)
    loaded = artifact.load(tmp_path / "k.fkb")
    assert manifest["architecture"] == loaded.manifest["architecture"] == "transformer"
    assert isinstance(loaded.model, CausalTransformer) and loaded.model.config == config
    assert "blocks.0.attention.qkv.weight" in manifest["int8_tensors"]
    stored = int8.quantize_state(model.state_dict())
    for name, original in model.state_dict().items():  # each weight within half an int8 step of its own
        step = stored[name + ".scale"][:, None] if name in manifest["int8_tensors"] else 0
        assert torch.all((loaded.model.state_dict()[name] - original).abs() <= step / 2 + 1e-6), name
    assert Suggester(loaded.model, loaded.tokenizer).suggest("to be ")


def test_the_architecture_option_reaches_the_built_model():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    built = build_model(model_config_from_args(parser.parse_args(["--architecture", "transformer"]), 123))
    assert isinstance(built, CausalTransformer) and built.config.vocab_size == 123
    assert isinstance(build_model(model_config_from_args(parser.parse_args([]), 123)), CIFGLSTM)
    with pytest.raises(SystemExit):
        parser.parse_args(["--architecture", "rnn"])


def test_padding_after_a_message_does_not_change_its_loss(config):
    model = strong(build_model(config, seed=7))
    rows = torch.randint(4, config.vocab_size, (1, 2 * CONTEXT + 1), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([rows, torch.full((1, 3), PAD_ID)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(language_model_loss(model, padded), language_model_loss(model, rows))
