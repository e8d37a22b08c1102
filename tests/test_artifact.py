import json
import zipfile

import pytest
import torch

from keyboard_model import artifact, int8
from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.suggest import Suggester
from keyboard_model.weights import WeightsError
from tests.conftest import SMALL_TEXT


def test_quantisation_is_per_row_int8_within_half_a_step():
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.001, 0.002, -0.003]])
    stored = int8.quantize_state({"w": weight, "b": torch.tensor([0.1, 0.2])})
    assert stored["w"].dtype == torch.int8 and stored["b"].dtype == torch.float32
    assert stored["w"].abs().amax(dim=1).tolist() == [127, 127]  # each row uses its own full range
    restored = int8.dequantize_state(stored)
    assert torch.all((restored["w"] - weight).abs() <= stored["w.scale"][:, None] / 2 + 1e-9)
    assert torch.equal(restored["b"], torch.tensor([0.1, 0.2]))


def test_artifact_round_trip_suggests_like_the_float_model(tmp_path, small_tokenizer):
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=16, hidden_dim=32, projection_dim=16)
    model = build_model(config, seed=1)
    path = tmp_path / "keyboard.fkb"
    manifest = artifact.export(model, small_tokenizer, path, version=12)
    loaded = artifact.load(path)
    assert loaded.manifest == manifest and manifest["model_version"] == 12
    assert loaded.tokenizer.to_json() == small_tokenizer.to_json()
    tokens = torch.tensor([small_tokenizer.encode_message(" ".join(SMALL_TEXT))])
    float_logits, _ = model(tokens)
    int8_logits, _ = loaded.model(tokens)
    assert (int8_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()
    float_suggester, int8_suggester = Suggester(model, small_tokenizer), Suggester(loaded.model, loaded.tokenizer)
    agree = sum(float_suggester.suggest(t + " ")[0] == int8_suggester.suggest(t + " ")[0] for t in SMALL_TEXT)
    assert agree >= len(SMALL_TEXT) - 1


def test_default_model_artifact_fits_in_1_6_megabytes(tmp_path, shakespeare):
    tokenizer = shakespeare.tokenizer()
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size))
    path = tmp_path / "keyboard.fkb"
    artifact.export(model, tokenizer, path, version=0)
    assert path.stat().st_size <= 1_600_000
    with zipfile.ZipFile(path) as archive:
        weights = archive.read("weights.safetensors")
        assert sorted(archive.namelist()) == ["manifest.json", "tokenizer.json", "weights.safetensors"]
    header = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])
    matrices = ["embedding.weight", "input_weights.weight", "recurrent_weights.weight", "projection.weight"]
    assert all(header[name]["dtype"] == "I8" for name in matrices)


def test_a_damaged_artifact_is_refused(tmp_path, small_tokenizer, small_model_config):
    path = tmp_path / "keyboard.fkb"
    artifact.export(build_model(small_model_config), small_tokenizer, path, version=0)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["manifest.json"])
    manifest["model_config"]["hidden_dim"] += 1
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, json.dumps(manifest) if name == "manifest.json" else data)
    with pytest.raises(WeightsError, match="shape"):
        artifact.load(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a fedkeyboard artifact"):
        artifact.load(path)


def test_export_command_writes_a_loadable_artifact(tmp_path, small_tokenizer, small_tokenizer_path, small_model_config):
    import subprocess
    import sys

    from keyboard_model.weights import model_to_bytes

    model = build_model(small_model_config, seed=4)
    (tmp_path / "model.safetensors").write_bytes(model_to_bytes(model.state_dict(), 9, small_model_config))
    result = subprocess.run(
        [sys.executable, "-m", "keyboard_model", "export", "--model", str(tmp_path / "model.safetensors"),
         "--tokenizer", str(small_tokenizer_path), "--out", str(tmp_path / "k.fkb")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    loaded = artifact.load(tmp_path / "k.fkb")
    assert loaded.manifest["model_version"] == 9
    assert (Suggester(loaded.model, loaded.tokenizer).suggest("to be ")
            == Suggester(model, small_tokenizer).suggest("to be "))
