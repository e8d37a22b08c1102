"""The simulator's own costs: the local pool's model goes to its workers through a file, once per model; the
simulator's own tensor work stays on one thread while the workers hold the cores; a phone enrolled ahead of its
first check-in (as vs_peers enrols every phone before measuring) checks in without enrolling again."""

from __future__ import annotations

import torch

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.schemas import CheckinResponse, EnrolmentResponse
from device_sim.executor import LocalProcessPool, _ModelFiles
from device_sim.phone import Phone


def test_each_model_is_written_once_and_removed_when_no_job_needs_it():
    files = _ModelFiles()
    first = files.hold(b"version 1")
    assert files.hold(b"version 1") == first  # equal bytes, even another object: the same file
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


def test_a_phone_enrolled_ahead_checks_in_with_those_credentials(tmp_path):
    class Aggregator:
        def __init__(self) -> None:
            self.enrolled: dict[str, str] = {}  # token -> device id
            self.refused = 0

        def enrol(self) -> EnrolmentResponse:
            device_id = f"device-{len(self.enrolled)}"
            self.enrolled[f"token-{device_id}"] = device_id
            return EnrolmentResponse(device_id=device_id, device_token=f"token-{device_id}")

        def checkin(self, device_token: str) -> CheckinResponse:
            if device_token not in self.enrolled:
                self.refused += 1
                raise AggregatorRefusedError(401, "unknown device")
            return CheckinResponse(action="retry", round=1, model_version=0, retry_after_s=60.0)

    old = Aggregator()
    phone = Phone.create("phone-0", tmp_path / "phone-0", [(0.0, "to be or not to be")])
    phone.check_in(old)  # enrols at its first check-in
    new = Aggregator()  # a new database: the phone's credentials mean nothing to it
    phone = Phone("phone-0", tmp_path / "phone-0")  # after a restart, with the old credentials on file
    phone.enrol(new)
    phone.check_in(new)
    assert new.refused == 0 and list(new.enrolled.values()) == ["device-0"] and phone.device_id() == "device-0"
