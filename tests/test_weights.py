import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.weights import (
    WeightsError,
    model_from_bytes,
    model_to_bytes,
    parameter_shapes,
    read_metadata,
    read_tensors,
    write_tensors,
)

SHAPES = {"a": (2, 3), "b": (4,)}


def tensors(**changes):
    values = {"a": torch.ones(2, 3), "b": torch.arange(4, dtype=torch.float32)}
    values.update(changes)
    return values


def test_round_trip_keeps_tensors_and_metadata():
    data = write_tensors(tensors(), {"num_examples": "12"})
    read, metadata = read_tensors(data, SHAPES)
    assert torch.equal(read["b"], torch.arange(4, dtype=torch.float32))
    assert metadata == {"num_examples": "12"}


@pytest.mark.parametrize(
    "bad, message",
    [
        (tensors(a=torch.ones(3, 2)), "shape"),
        (tensors(b=torch.arange(4)), "dtype"),
        (tensors(b=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "NaN"),
        (tensors(b=torch.tensor([0.0, float("inf"), 0.0, 0.0])), "infinite"),
        ({"a": torch.ones(2, 3)}, "missing"),
        (tensors(c=torch.ones(1)), "unexpected"),
    ],
)
def test_bad_tensors_are_refused_with_the_reason(bad, message):
    with pytest.raises(WeightsError, match=message):
        read_tensors(write_tensors(bad), SHAPES)


def test_pickles_and_garbage_are_refused_not_executed():
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    for data in (pickle.dumps(Boom()), b"", b"\x00" * 3, (10**9).to_bytes(8, "little") + b"{}"):
        with pytest.raises(WeightsError):
            read_tensors(data, SHAPES)


def test_bad_metadata_header_is_refused():
    header = json.dumps({"__metadata__": {"n": 3}}).encode()
    with pytest.raises(WeightsError):
        read_tensors(len(header).to_bytes(8, "little") + header, SHAPES)


def test_model_bytes_rebuild_the_same_model():
    config = ModelConfig(vocab_size=30, embedding_dim=4, hidden_dim=5, projection_dim=4)
    model = build_model(config, seed=5)
    rebuilt, version = model_from_bytes(model_to_bytes(model.state_dict(), 7, config))
    assert version == 7 and rebuilt.config == config
    assert parameter_shapes(rebuilt.state_dict()) == parameter_shapes(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor)


def int8_model_bytes(config: ModelConfig, **changes) -> bytes:
    """An int8 model download, with some stored tensors replaced (to play a tampered or broken one)."""
    data = model_to_bytes(build_model(config, seed=5).state_dict(), 3, config, "int8")
    stored, metadata = load_safetensors(data), read_metadata(data)
    return write_tensors({**stored, **changes}, metadata)


def test_an_int8_download_is_under_30_percent_of_float32_and_within_half_a_step_of_each_weight():
    # Rows of 64 or more, as in real models (the default's are 96 and 670): each row's scale costs 4 bytes.
    config = ModelConfig(vocab_size=200, embedding_dim=64, hidden_dim=64, projection_dim=64)
    state = build_model(config, seed=5).state_dict()
    float32, quantised = model_to_bytes(state, 3, config), model_to_bytes(state, 3, config, "int8")
    assert len(quantised) <= 0.30 * len(float32)
    rebuilt, version = model_from_bytes(quantised)
    assert version == 3 and rebuilt.config == config
    for name, tensor in state.items():
        restored = rebuilt.state_dict()[name]
        if tensor.dim() != 2:  # biases travel as float32
            assert torch.equal(restored, tensor)
            continue
        half_step = tensor.abs().amax(dim=1, keepdim=True) / 127 / 2
        assert ((restored - tensor).abs() <= half_step * 1.001).all(), name
        assert not torch.equal(restored, tensor)


@pytest.mark.parametrize("change, message", [
    ({"embedding.weight": torch.full((200, 16), -128, dtype=torch.int8)}, "outside"),
    ({"embedding.weight.scale": torch.full((200,), -1.0)}, "negative"),
    ({"embedding.weight.scale": torch.full((200,), 3e38)}, "infinite"),
    ({"embedding.weight": torch.zeros(200, 16)}, "dtype"),
])
def test_a_tampered_int8_download_is_refused_like_an_upload(change, message):
    config = ModelConfig(vocab_size=200, embedding_dim=16, hidden_dim=32, projection_dim=16)
    assert "embedding.weight" in build_model(config).state_dict()
    with pytest.raises(WeightsError, match=message):
        model_from_bytes(int8_model_bytes(config, **change))


def test_an_unknown_model_encoding_is_refused():
    config = ModelConfig(vocab_size=30, embedding_dim=4, hidden_dim=5, projection_dim=4)
    state = build_model(config).state_dict()
    with pytest.raises(ValueError, match="unknown model encoding"):
        model_to_bytes(state, 0, config, "int4")
    with pytest.raises(WeightsError, match="unknown model encoding"):
        model_from_bytes(write_tensors(state, {**read_metadata(model_to_bytes(state, 0, config)), "encoding": "int4"}))


def test_identical_models_are_identical_files_whatever_order_their_metadata_was_built_in(tmp_path):
    config = ModelConfig(vocab_size=30, embedding_dim=4, hidden_dim=5, projection_dim=4)
    state = build_model(config, seed=5).state_dict()
    metadata = {"version": "7", "architecture": "cifg", "model_config": '{"a": 1}', "encoding": "int8", "n": "3"}
    built = [metadata, dict(reversed(metadata.items())), dict(sorted(metadata.items()))]
    # safetensors' own writer put these keys in a different order from call to call (its Rust hash map's), so
    # fifteen writes of one model gave several different files.
    files = {write_tensors(dict(reversed(state.items())) if i % 2 else state, built[i % 3]) for i in range(15)}
    assert len(files) == 1
    data = files.pop()
    read, header = read_tensors(data, parameter_shapes(state))
    assert header == metadata and all(torch.equal(read[name], t) for name, t in state.items())
    # A valid safetensors file as the library itself reads it.
    (tmp_path / "model.safetensors").write_bytes(data)
    with safe_open(tmp_path / "model.safetensors", "pt") as opened:
        assert opened.metadata() == metadata
    assert len(data[8 : 8 + int.from_bytes(data[:8], "little")]) % 8 == 0  # the tensors stay 8-byte aligned
