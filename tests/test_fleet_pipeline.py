"""The pipelined fleet: the same model as a fleet that trains each phone the moment it is drawn, and no training
computed for a phone whose round closed before its turn."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

import device_sim.fleet
from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from device_sim.eligibility import EligibilityConfig
from device_sim.fleet import Fleet
from device_sim.worker import TrainingJob, run_job
from keyboard_model.tokenizer import KeyboardTokenizer
from tests.helpers import fleet_config, make_phones


class Inline:
    """Each phone's local work computed as it is handed over, in this process: nothing overlaps, nothing waits."""

    workers = 1

    def __init__(self, tokenizer: KeyboardTokenizer) -> None:
        self.tokenizer = tokenizer
        self.runs = 0

    def submit(self, job: TrainingJob) -> Future:
        self.runs += 1
        future = Future()
        future.set_result(run_job(job, self.tokenizer))
        return future

    def close(self) -> None:
        pass


class Stepping(Inline):
    """Holds the phones handed over and computes them, newest first, each time the fleet waits for a result: so
    phones finish in another order than their simulated training does, and what the fleet hands over when is seen
    deterministically, unlike with a pool whose workers run on their own."""

    def __init__(self, tokenizer: KeyboardTokenizer) -> None:
        super().__init__(tokenizer)
        self.held: list[tuple[TrainingJob, Future]] = []
        self.handed_over: list[Future] = []
        self.finished: list[Future] = []
        self.computed: list[TrainingJob] = []  # the jobs computed, as handed over

    def submit(self, job: TrainingJob) -> Future:
        future = _Held(self)
        self.held.append((job, future))
        self.handed_over.append(future)
        return future

    def step(self) -> None:
        while self.held:
            job, future = self.held.pop()
            self.computed.append(job)
            future.set_result(super().submit(job).result())
            self.finished.append(future)


class _Held(Future):
    """A held phone's future: asked for its result, its executor computes what it holds (as a pool's worker would)."""

    def __init__(self, executor: Stepping) -> None:
        super().__init__()
        self._executor = executor

    def result(self, timeout: float | None = None):
        if not self.done():
            self._executor.step()
        return super().result(timeout)


def run(folder: Path, tokenizer_path: Path, model_config, executor_kind, rounds: int = 3, **aggregator):
    """(final model bytes, every participation as (phone, round, outcome, ticks), the executor, the aggregator's
    round summaries)."""
    settings = dict(model=model_config, clients_per_round=3, simulated_clock=True, round_deadline_s=3600.0) | aggregator
    client = InProcessClient(local_aggregator_config(folder, tokenizer_path, **settings))
    executor = executor_kind(KeyboardTokenizer.from_json(client.tokenizer_json()))
    fleet = Fleet(make_phones(folder / "phones", 16), fleet_config(folder / "phones", vanish_probability=0.1),
                  client, executor)
    try:
        reports = [fleet.run_round() for _ in range(rounds)]
    finally:
        fleet.close()
    participations = [p for report in reports for p in report.participations]
    return client.model(), participations, executor, client.status().recent_rounds


def outcomes(participations) -> list[tuple]:
    """What became of each selected phone, and when (a late phone's training result differs: it may be computed
    or not)."""
    return [(p.phone_id, p.round, p.outcome, p.selected_tick, p.done_tick) for p in participations]


@pytest.fixture
def stepping_wait(monkeypatch):
    """The fleet's waits for results, each first letting a Stepping executor compute one held phone."""
    executors: list[Stepping] = []
    real_wait = device_sim.fleet.wait

    def wait(futures, **kwargs):
        executors[-1].step()
        return real_wait(futures, **kwargs)

    monkeypatch.setattr(device_sim.fleet, "wait", wait)

    def make(tokenizer: KeyboardTokenizer) -> Stepping:
        executors.append(Stepping(tokenizer))
        return executors[-1]

    return make


@pytest.fixture
def one_thread():
    """This process trains with one thread, as the pool's workers do, so that every executor does the same
    arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_a_pipelined_run_reaches_the_same_model_as_one_that_trains_each_phone_as_it_is_drawn(
    tmp_path, small_tokenizer_path, small_model_config, stepping_wait, one_thread, secure
):
    inline = run(tmp_path / "inline", small_tokenizer_path, small_model_config, Inline, secure_aggregation=secure)
    pipelined = run(tmp_path / "pipelined", small_tokenizer_path, small_model_config, stepping_wait,
                    secure_aggregation=secure)
    executor = pipelined[2]
    # The phones finished out of the order they were handed over in, and so out of their simulated order.
    assert executor.finished != executor.handed_over[:len(executor.finished)]
    assert outcomes(pipelined[1]) == outcomes(inline[1]) and [p.outcome for p in inline[1]].count("reported") >= 6
    assert pipelined[0] == inline[0]


def test_a_phone_whose_round_closed_before_its_turn_is_told_it_is_late_without_training(
    tmp_path, small_tokenizer_path, small_model_config, stepping_wait
):
    # Three times the goal of two selected, all finishing at the same tick; the executor holds at most two phones
    # (one worker, one queued), so the last ones drawn are still queued when the goal is reached.
    model, participations, executor, summaries = run(tmp_path, small_tokenizer_path, small_model_config,
                                                     stepping_wait, rounds=4, clients_per_round=2, over_selection=3.0)
    late = [p for p in participations if p.outcome == "late"]
    untrained = [p for p in late if p.result is None]
    assert untrained, "over-selected phones still queued when their round closed"
    assert all(p.result is not None for p in participations if p.outcome == "reported")
    # None of them was computed: a plain round's phone starts training at the tick it is drawn.
    tick_s = EligibilityConfig().tick_minutes * 60.0
    computed = {(job.phone.phone_id, job.now_s) for job in executor.computed}
    assert len(computed) == executor.runs
    assert not computed & {(p.phone_id, p.selected_tick * tick_s) for p in untrained}
    # The aggregator heard from each of them as from a late phone that trained: counted late, not dropped.
    assert sum(s.late for s in summaries) == len(late)



def test_no_phone_trains_once_its_round_has_the_updates_it_needs(
    tmp_path, small_tokenizer_path, small_model_config, stepping_wait, monkeypatch
):
    # Three workers and one queued could take four of the six phones drawn for a goal of two; the two beyond the
    # goal would finish after the round closed, their training thrown away.
    monkeypatch.setattr(Stepping, "workers", 3)
    _, participations, executor, _ = run(tmp_path, small_tokenizer_path, small_model_config, stepping_wait,
                                         rounds=4, clients_per_round=2, over_selection=3.0)
    reported = [p for p in participations if p.outcome == "reported"]
    assert len(reported) == 8 and any(p.outcome == "late" for p in participations)
    assert all(p.result is None for p in participations if p.outcome == "late")
    assert executor.runs == len(reported)
