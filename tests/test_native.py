"""The compiled CIFG kernel: where it is cached, and that its arithmetic stays the Python walk's over long runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keyboard_model import model as model_module
from keyboard_model import native
from keyboard_model.architecture import build_model
from keyboard_model.model import CIFGRecurrence, ModelConfig
from keyboard_model.train import language_model_loss, pack_sequences
from tests.conftest import SMALL_TEXT


def test_the_kernel_cache_folder_is_named_for_everything_the_build_depends_on(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FEDKB_BUILD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    here = native.build_dir()
    assert here == native.build_dir()
    assert here.parent == tmp_path / "cache" / "fedkeyboard" / "build"

    edited = tmp_path / "edited" / "cifg_kernel.cpp"
    edited.parent.mkdir()
    edited.write_bytes(native._SOURCE.read_bytes() + b"// an edit\n")
    same_bytes_elsewhere = tmp_path / "clone" / "cifg_kernel.cpp"  # another clone: its own path in the ninja file
    same_bytes_elsewhere.parent.mkdir()
    same_bytes_elsewhere.write_bytes(native._SOURCE.read_bytes())
    elsewhere = {}
    for name, target, value in [
        ("another environment", sys, ("prefix", str(tmp_path / "other" / ".venv"))),
        ("another Python", sys, ("version", sys.version + " (another build)")),
        ("another torch install", native.torch, ("__file__", str(tmp_path / "torch" / "__init__.py"))),
        ("edited source", native, ("_SOURCE", edited)),
        ("another clone", native, ("_SOURCE", same_bytes_elsewhere)),
        ("other flags", native, ("_CFLAGS", ("-O2",))),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(target, *value)
            elsewhere[name] = native.build_dir()
            assert elsewhere[name] == native.build_dir(), name
    with monkeypatch.context() as patch:
        patch.setenv("CXX", "clang++")
        elsewhere["another compiler"] = native.build_dir()
    assert len({here, *elsewhere.values()}) == 1 + len(elsewhere), elsewhere
    assert native.build_dir() == here  # and back to the first once nothing differs

    monkeypatch.setenv("FEDKB_BUILD_DIR", str(tmp_path / "mine"))
    assert native.build_dir() == tmp_path / "mine"


def test_the_compiled_walk_keeps_to_the_python_walk_over_a_long_training_run(small_tokenizer, monkeypatch):
    """120 SGD steps side by side on two copies of a model, one trained with each walk.

    The regime is one where training is not chaotic: perturbing the starting weights by 1e-5 moves the end by
    about as much (measured), so two walks that differ only by rounding (about 1e-7) stay about that close, and a
    tolerance of 1e-4 tests the arithmetic without testing luck. At every step the compiled walk's loss and
    gradients are also checked against the Python walk's at the very same weights. (At learning rate 1.0 for 100
    epochs training turns chaotic and the two walks' trajectories part after about 40 epochs, as rounding alone
    makes any two CPUs' do.)
    """
    if native.cifg_kernel() is None:
        pytest.skip("the C++ kernel does not build here")
    # 100 cells: the kernel's vectorised loops and their remainders both run.
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, embedding_dim=16, hidden_dim=100, projection_dim=16)
    rows = pack_sequences(small_tokenizer.encode_batch(SMALL_TEXT), 20)
    compiled, python = build_model(config, seed=0), build_model(config, seed=0)
    start = [p.detach().clone() for p in python.parameters()]
    optimizers = {m: torch.optim.SGD(m.parameters(), lr=0.5) for m in (compiled, python)}

    def loss_and_gradients(model, batch, python_walk: bool) -> tuple[float, list[torch.Tensor]]:
        with monkeypatch.context() as patch:
            if python_walk:  # the model picks its walk by this name
                patch.setattr(model_module, "CompiledCIFGRecurrence", CIFGRecurrence)
            model.zero_grad(set_to_none=True)
            loss = language_model_loss(model, batch)
            loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    def step(model, gradients: list[torch.Tensor]) -> None:
        for parameter, gradient in zip(model.parameters(), gradients):
            parameter.grad = gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # as train_local does
        optimizers[model].step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a phone's setting; and the small products run faster on a busy machine
    try:
        generator = torch.Generator().manual_seed(0)
        for epoch in range(40):
            for batch in torch.randperm(len(rows), generator=generator).split(2):
                compiled_loss, compiled_gradients = loss_and_gradients(compiled, rows[batch], python_walk=False)
                same_weights_loss, same_weights_gradients = loss_and_gradients(compiled, rows[batch], python_walk=True)
                python_loss, python_gradients = loss_and_gradients(python, rows[batch], python_walk=True)
                assert compiled_loss == pytest.approx(same_weights_loss, rel=1e-5)
                for name, a, b in zip(dict(compiled.named_parameters()), compiled_gradients, same_weights_gradients):
                    assert (a - b).norm() <= 1e-5 * b.norm(), (epoch, name)
                assert compiled_loss == pytest.approx(python_loss, rel=1e-4), epoch
                step(compiled, compiled_gradients)
                step(python, python_gradients)
    finally:
        torch.set_num_threads(threads)

    def distance(a, b) -> float:
        return sum((x - y).square().sum() for x, y in zip(a, b)).sqrt().item()

    # Apart by a ten-thousandth of how far training moved the weights, after 120 steps.
    assert distance(compiled.parameters(), python.parameters()) <= 1e-4 * distance(python.parameters(), start)
    with torch.no_grad():
        final = language_model_loss(python, rows).item()
        assert language_model_loss(compiled, rows).item() == pytest.approx(final, rel=1e-4)
    assert final < language_model_loss(build_model(config, seed=0), rows).item() - 1.0  # it did train


def test_a_process_killed_while_it_held_the_kernel_folder_holds_up_no_later_one(tmp_path: Path):
    """Workers are killed whenever a run stops. One killed inside torch's build step left torch's lock file behind,
    and every later process that trained waited for it forever: here the folder holds such a file, and a holder of
    the folder's own lock that was killed; a new process still gets the kernel, without building it again."""
    if native.cifg_kernel() is None:
        pytest.skip("the C++ kernel does not build here")
    folder = tmp_path / "build"
    shutil.copytree(native.build_dir(), folder)
    (folder / "lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(folder / "build.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
    finally:
        holder.kill()
        holder.wait()
    loaded = subprocess.run([sys.executable, "-c", "from keyboard_model.native import cifg_kernel; "
                             "assert cifg_kernel() is not None"], env=os.environ | {"FEDKB_BUILD_DIR": str(folder)},
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert "building" not in loaded.stderr


def test_a_library_cut_short_is_built_again_past_a_stale_torch_lock(tmp_path: Path, monkeypatch):
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "fedkeyboard_cifg.so").write_bytes(b"\x7fELF")  # a link killed after four bytes
    (folder / "lock").touch()
    monkeypatch.setenv("FEDKB_BUILD_DIR", str(folder))
    built = []

    def load(**options):
        # torch would wait for its lock file forever, and build only where no library is.
        built.append(((folder / "lock").exists(), (folder / "fedkeyboard_cifg.so").exists(), options))
        return "the built module"

    monkeypatch.setattr(native.cpp_extension, "load", load)
    assert native.cifg_kernel.__wrapped__() == "the built module"
    assert [(lock, library, options["build_directory"]) for lock, library, options in built] == [
        (False, False, str(folder))]
