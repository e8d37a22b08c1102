import pytest
import torch

from keyboard_model import int8
from keyboard_model.int8 import quantize_state as quantize
from keyboard_model.model import CIFGLSTM, ModelConfig
from keyboard_model.update_codec import decode_update, encode_update, max_encoded_bytes
from keyboard_model.weights import WeightsError, parameter_shapes, read_tensors, write_tensors

SHAPES = {"w": (4, 5), "b": (3,)}
INT8_SHAPES = {"w": (4, 5), "w.scale": (4,), "b": (3,), "b.scale": (1,)}
INT8_DTYPES = {"w": torch.int8, "b": torch.int8}
METADATA = {"num_examples": "7", "compression": "int8"}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_delta() -> dict[str, torch.Tensor]:
    generator = seeded(1)
    return {"w": torch.randn(4, 5, generator=generator), "b": torch.randn(3, generator=generator)}


def stored_int8(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The raw tensors of a valid int8 upload of `small_delta`, with some replaced."""
    stored, _ = read_tensors(encode_update(small_delta(), 7, generator=seeded()), INT8_SHAPES, INT8_DTYPES)
    stored.update(changes)
    return stored


def test_int8_round_trip_is_within_one_step_per_element():
    delta = small_delta()
    decoded, metadata = decode_update(encode_update(delta, 7, generator=seeded()), SHAPES)
    assert metadata == METADATA
    assert all(t.dtype == torch.float32 for t in decoded.values())
    w_step = delta["w"].abs().amax(dim=1, keepdim=True) / 127
    b_step = delta["b"].abs().max() / 127
    assert ((decoded["w"] - delta["w"]).abs() <= w_step * 1.0001).all()
    assert ((decoded["b"] - delta["b"]).abs() <= b_step * 1.0001).all()
    # The largest value of each row is exactly representable.
    row_max = delta["w"].abs().argmax(dim=1)
    assert torch.allclose(decoded["w"].gather(1, row_max[:, None]), delta["w"].gather(1, row_max[:, None]))


def test_none_round_trip_is_exact():
    delta = small_delta()
    decoded, metadata = decode_update(encode_update(delta, 3, compression="none"), SHAPES)
    assert metadata == {"num_examples": "3", "compression": "none"}
    assert all(torch.equal(decoded[name], delta[name]) for name in delta)


def test_stochastic_rounding_is_unbiased():
    # Values that sit between quantisation levels, where rounding to nearest would be biased.
    delta = {"w": torch.tensor([[1.0, 0.3, -0.55, 0.004, -0.996]]), "b": torch.tensor([0.5, 0.25, 0.126])}
    shapes = {"w": (1, 5), "b": (3,)}
    generator = seeded()
    encodings = 2000
    total = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in delta.items()}
    for _ in range(encodings):
        decoded, _ = decode_update(encode_update(delta, 1, generator=generator), shapes)
        for name in total:
            total[name] += decoded[name].double()
    for name, tensor in delta.items():
        step = float(tensor.abs().max()) / 127
        error = (total[name] / encodings - tensor.double()).abs().max().item()
        # One rounding has standard deviation <= step / 2, so the mean's is <= step / 2 / sqrt(2000) ~ 0.011 step.
        assert error < 0.05 * step, f"{name}: mean is off by {error / step:.3f} steps"


def test_int8_is_under_30_percent_of_float32_for_the_default_model():
    shapes = parameter_shapes(CIFGLSTM(ModelConfig(vocab_size=9093)).state_dict())
    assert shapes == {
        "embedding.weight": (9093, 96),
        "input_weights.weight": (2010, 96),
        "input_weights.bias": (2010,),
        "recurrent_weights.weight": (2010, 96),
        "projection.weight": (96, 670),
        "output_bias": (9093,),
    }
    generator = seeded()
    delta = {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in shapes.items()}
    int8_bytes = len(encode_update(delta, 100, generator=generator))
    float32_bytes = len(encode_update(delta, 100, compression="none"))
    ratio = int8_bytes / float32_bytes
    print(f"int8 {int8_bytes} bytes / float32 {float32_bytes} bytes = {ratio:.4f}")
    assert ratio <= 0.30
    assert int8_bytes <= max_encoded_bytes(shapes, "int8") < float32_bytes
    assert float32_bytes <= max_encoded_bytes(shapes, "none")


def test_zero_rows_decode_to_zero_without_nan():
    delta = {"w": torch.zeros(4, 5), "b": torch.zeros(3)}
    delta["w"][2] = torch.tensor([0.5, -1.0, 0.0, 0.25, 1.0])
    decoded, _ = decode_update(encode_update(delta, 1, generator=seeded()), SHAPES)
    assert torch.isfinite(decoded["w"]).all() and torch.isfinite(decoded["b"]).all()
    assert torch.equal(decoded["b"], torch.zeros(3))
    assert torch.equal(decoded["w"][[0, 1, 3]], torch.zeros(3, 5))
    assert ((decoded["w"][2] - delta["w"][2]).abs() <= 1.0001 / 127).all()


def test_same_seed_gives_the_same_update():
    delta = small_delta()
    first = read_tensors(encode_update(delta, 7, generator=seeded(5)), INT8_SHAPES, INT8_DTYPES)[0]
    again = read_tensors(encode_update(delta, 7, generator=seeded(5)), INT8_SHAPES, INT8_DTYPES)[0]
    other = read_tensors(encode_update(delta, 7, generator=seeded(6)), INT8_SHAPES, INT8_DTYPES)[0]
    assert all(torch.equal(first[name], again[name]) for name in INT8_SHAPES)
    assert not all(torch.equal(first[name], other[name]) for name in INT8_SHAPES)


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        (stored_int8(w=torch.zeros(4, 5)), METADATA, "w has dtype torch.float32, expected torch.int8"),
        (stored_int8(**{"w.scale": torch.ones(4, dtype=torch.float64)}), METADATA, "w.scale has dtype"),
        ({k: v for k, v in stored_int8().items() if k != "b.scale"}, METADATA, r"missing \['b.scale'\]"),
        (stored_int8(**{"w.scale": torch.tensor([1.0, float("nan"), 1.0, 1.0])}), METADATA, "w.scale holds NaN"),
        (stored_int8(**{"w.scale": torch.tensor([1.0, -1.0, 1.0, 1.0])}), METADATA, "w.scale holds negative"),
        (stored_int8(**{"w.scale": torch.full((4,), 3e38)}), METADATA, "w decodes to infinite"),
        (stored_int8(**{"w.scale": torch.ones(5)}), METADATA, r"w.scale has shape \(5,\), expected \(4,\)"),
        (stored_int8(w=torch.zeros(5, 4, dtype=torch.int8)), METADATA, r"w has shape \(5, 4\)"),
        (stored_int8(b=torch.tensor([0, -128, 0], dtype=torch.int8)), METADATA, r"b holds values outside"),
        (stored_int8(extra=torch.zeros(1)), METADATA, r"unexpected \['extra'\]"),
        (stored_int8(), {**METADATA, "words": "hello"}, "exactly"),
        (stored_int8(), {"num_examples": "7"}, "exactly"),
        (stored_int8(), {**METADATA, "compression": "int4"}, "unknown compression 'int4'"),
        (small_delta(), {"num_examples": "7", "compression": "none", "loss": "0.1"}, "exactly"),
        (stored_int8(), {**METADATA, "compression": "none"}, r"unexpected \['b.scale', 'w.scale'\]"),
    ],
)
def test_bad_updates_are_refused_with_the_reason(tensors, metadata, message):
    with pytest.raises(WeightsError, match=message):
        decode_update(write_tensors(tensors, metadata), SHAPES)


def test_garbage_is_refused():
    for data in (b"", b"\x00" * 3, (10**9).to_bytes(8, "little") + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"):
        with pytest.raises(WeightsError):
            decode_update(data, SHAPES)


def test_unknown_scheme_is_refused_when_encoding():
    with pytest.raises(ValueError, match="unknown compression"):
        encode_update(small_delta(), 1, compression="int4")


def test_the_artifact_and_the_update_codec_quantise_alike():
    # One quantiser: the artifact's nearest rounding and an update's stochastic rounding land on adjacent steps of
    # the same per-row grid.
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(5, 7, generator=generator)
    nearest = quantize({"w": matrix})
    stochastic, scale = int8.quantize(matrix, torch.Generator().manual_seed(4), stochastic=True)
    torch.testing.assert_close(nearest["w.scale"], scale)
    assert (stochastic.int() - nearest["w"].int()).abs().max() <= 1
    assert (int8.dequantize(nearest["w"], scale) - matrix).abs().max() <= scale.max() / 2 + 1e-6
