"""Where phones' local work runs: the executor seam, and the local process pool behind it.

The fleet hands each selected phone's local work (score the downloaded model, train,
clip, encode; `Phone.local_work`) to a `TrainingExecutor` and collects the result when
the phone's simulated training time is up. `LocalProcessPool` runs it in one
single-threaded worker process per core (see benchmarks/train_speed.py: two phones on
one thread each train faster than one phone on two threads). Another executor (a Ray
cluster, a vectorised cohort: device_sim/vectorised.py) implements `submit` and `close` and
is passed to the fleet; nothing else changes. `make_executor` builds one by the name
`--executor` gives.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

import torch

from aggregator.api.schemas import SecAggState
from device_sim.phone import Phone
from device_sim.session import Clipping, LocalWork
from device_sim.secure_aggregation import SecAggPhone
from device_sim.vectorised import VectorisedCohort
from keyboard_model.errors import UserFacingError
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import LatestModel


class TrainingExecutor(Protocol):
    def submit(self, phone: Phone, model: bytes, config: LocalTrainConfig, seed: int, compression: str,
               now_s: float, clipping: Clipping | None,
               secure: tuple[SecAggPhone, SecAggState] | None = None,
               evaluate: bool = True) -> Future[tuple[LocalWork, float]]:
        """A future of (the phone's LocalWork, wall seconds it spent on it); the phone scores the model it downloaded
        only when `evaluate` (the aggregator asked it to)."""

    def close(self) -> None:
        """Stop now: work still queued or running is dropped."""


class LocalProcessPool:
    """Phones' local work in worker processes, one thread each, side by side."""

    def __init__(self, tokenizer: KeyboardTokenizer, workers: int | None) -> None:
        self.workers = workers or os.cpu_count() or 1
        # The tokenizer goes with each job rather than to each worker as it starts: start arguments larger than a
        # pipe's buffer held submit for the seconds the new worker spent importing torch, deaf to Ctrl-C.
        self._tokenizer_json = tokenizer.to_json()
        self._executor = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=_start_worker)

    def submit(self, phone: Phone, model: bytes, config: LocalTrainConfig, seed: int, compression: str, now_s: float,
               clipping: Clipping | None, secure: tuple[SecAggPhone, SecAggState] | None = None,
               evaluate: bool = True) -> Future:
        """A future of (LocalWork, wall seconds the phone spent on it)."""
        # The executor starts a worker here when it has fewer than it may. Cut short by Ctrl-C between starting
        # one and recording it, it would never stop that worker, which outlives the simulator: it holds an end of
        # the job queue itself, so it never sees the queue close.
        with _ctrl_c_held():
            return self._executor.submit(_train, self._tokenizer_json, phone.phone_id, phone.history_path.parent,
                                         model, config, seed, compression, now_s, clipping, secure, evaluate)

    def close(self) -> None:
        """Stop now: drop the phones still queued and end the ones training, whose work nobody will read.

        `shutdown(cancel_futures=True)` alone cancels only what no worker has taken yet; it still waits for the
        phones in training and for those already handed to the workers' queue, several per worker, which took
        from seconds to a minute after Ctrl-C or the last round. (Python 3.14's `kill_workers` does the same.)
        """
        # shutdown() forgets the processes, so they are taken first.
        workers = list((self._executor._processes or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        # A worker only reads its phone's history and computes: killed, it leaves nothing half-written.
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join()


# What --executor chooses from, and each device's default. On the CPU the local pool: on 2 cores it outran the
# vectorised cohort at 10 and 100 phones a round (benchmarks/scale.py, on a machine busy with other jobs: 2.3
# phone-updates/s against 1.9 with the cohort on one thread, 0.6 on two), because each of its workers trains a phone
# with the C++ CIFG walk and the fused output loss on one thread, while batching phones adds no arithmetic
# intensity on a CPU (a phone's largest products, 320 x 96 by 96 x vocabulary, are already big) and one process on
# two threads loses most when other processes want the cores. On CUDA the vectorised cohort: the pool has no GPU path.
# Ray (device_sim/ray_executor.py) only when asked for: it spreads phones over a cluster's CPUs.
EXECUTORS = ("local", "vectorised", "ray")
DEFAULT_EXECUTOR = {"cpu": "local", "cuda": "vectorised"}
ExecutorFactory = Callable[[KeyboardTokenizer], TrainingExecutor]


def executor_name(name: str | None, device: str) -> str:
    """The executor to use on `device`: `name`, or the device's default when None; refuses a pair that cannot be."""
    name = name or DEFAULT_EXECUTOR[device]
    if name not in EXECUTORS:
        raise UserFacingError(f"unknown --executor {name!r}; known: {', '.join(EXECUTORS)}")
    if name in ("local", "ray") and device != "cpu":
        raise UserFacingError(f"--device {device} needs --executor vectorised: the {name} executor trains on the CPU")
    return name


def make_executor(name: str | None, tokenizer: KeyboardTokenizer, workers: int | None = None, device: str = "cpu",
                  phones_per_pass: int | None = None, ray_address: str | None = None) -> TrainingExecutor:
    """The executor `--executor NAME` asks for (None: the device's default): the local process pool (`workers`
    processes, CPU only), the vectorised cohort on `device`, or the Ray cluster at `ray_address` (None: the one on
    this machine)."""
    name = executor_name(name, device)
    if name == "local":
        return LocalProcessPool(tokenizer, workers)
    if name == "ray":
        try:  # Ray is an optional extra: only this executor needs it
            from device_sim.ray_executor import RayExecutor
        except ImportError as error:
            raise UserFacingError(f"--executor ray needs Ray ({error}): pip install -e '.[ray]'") from None
        return RayExecutor(tokenizer, ray_address)
    return VectorisedCohort(tokenizer, device, phones_per_pass)


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, here and in the processes started inside it.

    Here, one that comes meanwhile is sent again as the block ends. A process started inside starts with SIGINT
    blocked, a mask it keeps across exec, so the seconds it spends importing torch cannot end in a traceback; it
    ignores SIGINT once started (`_start_worker`). multiprocessing starts its resource tracker the same way.
    """
    held = []
    # Python runs signal handlers, and so raises KeyboardInterrupt, in the main thread only.
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGINT, lambda *_: held.append(True)) if in_main_thread else None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if in_main_thread:
            signal.signal(signal.SIGINT, handler)
            if held:
                signal.raise_signal(signal.SIGINT)


def _start_worker() -> None:
    # Ctrl-C reaches the whole process group; the simulator stops its workers itself. The worker started with
    # SIGINT blocked (_ctrl_c_held): one that came meanwhile is dropped as the block lifts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=1)
def _tokenizer(tokenizer_json: str) -> KeyboardTokenizer:
    """Parsed once per worker (every job brings the same one)."""
    return KeyboardTokenizer.from_json(tokenizer_json)


# The model this worker decoded last: every phone of a round downloads the same one.
_LATEST_MODEL = LatestModel()


def _train(tokenizer_json: str, phone_id: str, folder: Path, model: bytes, config: LocalTrainConfig, seed: int,
           compression: str, now_s: float, clipping: Clipping | None,
           secure: tuple[SecAggPhone, SecAggState] | None, evaluate: bool = True) -> tuple[LocalWork, float]:
    started = time.perf_counter()
    work = Phone(phone_id, folder).local_work(model, _tokenizer(tokenizer_json), config, seed, compression, now_s,
                                              clipping=clipping, secure=secure, evaluate=evaluate,
                                              models=_LATEST_MODEL)
    return work, time.perf_counter() - started
