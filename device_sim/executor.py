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
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
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
    """Phones' local work in worker processes, one thread each, side by side.

    The workers take every core, so this process's own tensor work (an in-process aggregator decoding and summing
    uploads) runs on one thread until `close`: a second thread only waits for a core a worker holds. At 10 phones a
    round that took the simulator from 0.064 to 0.024 CPU-seconds per update (benchmarks/vs_peers.py)."""

    def __init__(self, tokenizer: KeyboardTokenizer, workers: int | None) -> None:
        self.workers = workers or os.cpu_count() or 1
        # The tokenizer goes with each job rather than to each worker as it starts: start arguments larger than a
        # pipe's buffer held submit for the seconds the new worker spent importing torch, deaf to Ctrl-C.
        self._tokenizer_json = tokenizer.to_json()
        self._executor = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=_start_worker)
        self._models = _ModelFiles()
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(1)

    def submit(self, phone: Phone, model: bytes, config: LocalTrainConfig, seed: int, compression: str, now_s: float,
               clipping: Clipping | None, secure: tuple[SecAggPhone, SecAggState] | None = None,
               evaluate: bool = True) -> Future:
        """A future of (LocalWork, wall seconds the phone spent on it)."""
        # The executor starts a worker here when it has fewer than it may. Cut short by Ctrl-C between starting
        # one and recording it, it would never stop that worker, which outlives the simulator: it holds an end of
        # the job queue itself, so it never sees the queue close.
        path = self._models.hold(model)
        with _ctrl_c_held():
            future = self._executor.submit(_train_from_file, self._tokenizer_json, phone.phone_id,
                                           phone.history_path.parent, path, config, seed, compression, now_s,
                                           clipping, secure, evaluate)
        future.add_done_callback(lambda _: self._models.release(path))
        return future

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
        self._models.close()
        torch.set_num_threads(self._threads_before)


class _ModelFiles:
    """The models the pool's jobs start from, each distinct one written once to a file of its own that the workers
    read once each, rather than pickled through a pipe with every job: a 5 MB model cost 17 ms of wall time and 8 ms
    of this process's CPU per phone that way. A file goes once no job still to finish names it and a newer model
    has come. Thread-safe: jobs release their file from the pool's own thread as they finish."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="fedkb-models-"))
        self._lock = threading.Lock()
        self._latest: tuple[bytes, Path] | None = None
        self._holders: Counter[Path] = Counter()
        self._written = 0

    def hold(self, model: bytes) -> Path:
        """The file holding `model`, written now unless it is the latest; held until `release`."""
        with self._lock:
            if self._latest is None or (model is not self._latest[0] and model != self._latest[0]):
                # A new name for every model: a worker keeps the last file it read by name.
                path = self._folder / f"model-{self._written}.safetensors"
                path.write_bytes(model)
                self._written += 1
                if self._latest is not None and not self._holders[self._latest[1]]:
                    del self._holders[self._latest[1]]
                    self._latest[1].unlink()
                self._latest = (model, path)
            self._holders[self._latest[1]] += 1
            return self._latest[1]

    def release(self, path: Path) -> None:
        with self._lock:
            self._holders[path] -= 1
            if not self._holders[path] and path != self._latest[1]:
                del self._holders[path]
                path.unlink(missing_ok=True)  # gone already if the pool closed first

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


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


@functools.lru_cache(maxsize=1)
def _model_file(path: Path) -> bytes:
    """Read once per model per worker: the same bytes object each time after, which `LatestModel` then knows."""
    return path.read_bytes()


def _train_from_file(tokenizer_json: str, phone_id: str, folder: Path, model_path: Path,
                     *job: object) -> tuple[LocalWork, float]:
    return _train(tokenizer_json, phone_id, folder, _model_file(model_path), *job)


def _train(tokenizer_json: str, phone_id: str, folder: Path, model: bytes, config: LocalTrainConfig, seed: int,
           compression: str, now_s: float, clipping: Clipping | None,
           secure: tuple[SecAggPhone, SecAggState] | None, evaluate: bool = True) -> tuple[LocalWork, float]:
    """A phone's local work in a worker; what comes back is what the phone sends (its upload or abort, its
    evaluation) and how training went, not the float32 delta the upload was encoded from: 5 MB more to pickle
    through the pipe for every phone, which nothing here reads."""
    started = time.perf_counter()
    work = Phone(phone_id, folder).local_work(model, _tokenizer(tokenizer_json), config, seed, compression, now_s,
                                              clipping=clipping, secure=secure, evaluate=evaluate,
                                              models=_LATEST_MODEL)
    return replace(work, delta=None), time.perf_counter() - started
