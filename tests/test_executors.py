"""An executor is one class and one record in EXECUTORS: a toy one, registered here, runs the fleet's rounds, and the
records are what `--executor`'s defaults and checks come from."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from device_sim.executor import SerialExecutor
from device_sim.executors import EXECUTORS, Executor, ExecutorSettings, chosen_executor, make_executor
from device_sim.session import LocalWork
from device_sim.worker import TrainingJob, run_job
from keyboard_model.errors import UserFacingError
from keyboard_model.tokenizer import KeyboardTokenizer
from tests.helpers import close, outcome, run_fleet


class Threads:
    """Phones' local work on threads of this process."""

    def __init__(self, tokenizer: KeyboardTokenizer, workers: int | None) -> None:
        self.tokenizer = tokenizer
        self.jobs: list[TrainingJob] = []
        self._threads = ThreadPoolExecutor(workers or 2)

    def submit(self, job: TrainingJob) -> Future[tuple[LocalWork, float]]:
        self.jobs.append(job)
        return self._threads.submit(run_job, job, self.tokenizer)

    def close(self) -> None:
        self._threads.shutdown(cancel_futures=True)


def threads(tokenizer, settings: ExecutorSettings) -> Threads:
    return Threads(tokenizer, settings.workers)


def test_a_registered_executor_runs_the_fleets_rounds(monkeypatch, tmp_path, small_tokenizer_path, small_tokenizer,
                                                      small_model_config):
    monkeypatch.setitem(EXECUTORS, "threads", Executor("threads", ("cpu",), ("workers",), f"{__name__}:threads",
                                                       "a thread per phone"))
    threads = make_executor("threads", small_tokenizer, ExecutorSettings(workers=3))
    assert isinstance(threads, Threads) and threads._threads._max_workers == 3
    on_threads, reports = run_fleet(tmp_path / "threads", small_tokenizer_path, small_model_config, threads, rounds=2)
    serial, expected = run_fleet(tmp_path / "serial", small_tokenizer_path, small_model_config,
                                 SerialExecutor(small_tokenizer), rounds=2)
    assert len(threads.jobs) >= 6 and [len(report.participants) for report in reports] == [3, 3]
    for report, same in zip(reports, expected):
        assert [outcome(p) for p in report.participations] == [outcome(p) for p in same.participations]
    for name, tensor in serial.state_dict().items():  # the same seeds, the same training, wherever it runs
        assert close(on_threads.state_dict()[name], tensor), name


def test_the_records_give_each_devices_default_and_refuse_what_does_not_go_together():
    assert chosen_executor(None, ExecutorSettings("cpu")).name == "local"
    assert chosen_executor(None, ExecutorSettings("cuda")).name == "vectorised"
    with pytest.raises(UserFacingError, match="--device cuda needs --executor vectorised: the serial executor"):
        chosen_executor("serial", ExecutorSettings("cuda"))
    with pytest.raises(UserFacingError, match="--phones-per-pass goes with --executor vectorised"):
        chosen_executor("local", ExecutorSettings(phones_per_pass=4))
    with pytest.raises(UserFacingError, match="unknown --executor 'gpu-farm'; known: local, vectorised, ray, serial"):
        chosen_executor("gpu-farm", ExecutorSettings())


def test_the_command_line_offers_a_registered_executor_with_no_other_change(monkeypatch):
    from fedkb.cli import COMMANDS
    from keyboard_model.commands import command_parser, parse

    monkeypatch.setitem(EXECUTORS, "threads", Executor("threads", ("cpu",), ("workers",), f"{__name__}:threads",
                                                       "a thread per phone"))
    parser = command_parser("fedkb", "", COMMANDS)
    assert parse(parser, ["simulate", "--executor", "threads", "--workers", "3"]).executor == "threads"
    simulate = next(action for action in parser._actions if action.dest == "command").choices["simulate"]
    assert "threads, a thread per phone" in " ".join(simulate.format_help().split())
