import json
import pickle

import pytest
import torch

from keyboard_model.model import ModelConfig, build_model
from keyboard_model.weights import (
    WeightsError,
    model_from_bytes,
    model_to_bytes,
    parameter_shapes,
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
