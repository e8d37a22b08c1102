"""The local process pool's own costs: the model its phones start from goes through a file, once per model, and the
simulator's own tensor work stays on one thread while the workers hold the cores."""

from __future__ import annotations

import torch

from device_sim.executor import LocalProcessPool, _ModelFiles


def test_each_model_is_written_once_and_removed_when_no_job_needs_it():
    files = _ModelFiles()
    first = files.hold(b"version 1")
    assert files.hold(bytes(b"version 1")) == first  # equal bytes, even another object: the same file
    assert first.read_bytes() == b"version 1"
    second = files.hold(b"version 2")
    assert second != first and second.read_bytes() == b"version 2"
    files.release(first)
    assert first.exists()  # one job still reads it
    files.release(first)
    assert not first.exists()
    files.release(second)
    assert second.exists()  # the latest stays for the next job
    third = files.hold(b"version 3")
    assert not second.exists() and third.exists()
    files.close()
    assert not third.parent.exists()


def test_the_pool_keeps_the_simulator_on_one_thread_until_it_closes(small_tokenizer):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = LocalProcessPool(small_tokenizer, workers=1)
        assert torch.get_num_threads() == 1
        pool.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
