"""The executors of this machine's CPU: the local process pool and the serial one (the seam and the registry that
names them: device_sim/executors.py).

`LocalProcessPool` runs each phone's local work in one single-threaded worker process per core
(see benchmarks/train_speed.py: two phones on one thread each train faster than one phone on
two threads); `SerialExecutor` runs it at once in this process.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

from device_sim.executors import ExecutorSettings
from device_sim.session import LocalWork
from device_sim.worker import TrainingJob, run_in_worker, run_job
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import LatestModel


class SerialExecutor:
    """Each phone's local work as it is submitted, in this process, one after the other: the local pool's results
    without its processes, for tests and for stepping through a phone in a debugger (FedJAX's debug backend)."""

    def __init__(self, tokenizer: KeyboardTokenizer) -> None:
        self.tokenizer = tokenizer
        self._models = LatestModel()

    def submit(self, job: TrainingJob) -> Future[tuple[LocalWork, float]]:
        future: Future[tuple[LocalWork, float]] = Future()
        try:
            future.set_result(run_job(job, self.tokenizer, self._models))
        except Exception as error:  # the phone's future carries it, as a worker's would
            future.set_exception(error)
        return future

    def use_tokenizer(self, tokenizer: KeyboardTokenizer) -> None:
        self.tokenizer = tokenizer

    def close(self) -> None:
        """Nothing is ever queued."""


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

    def submit(self, job: TrainingJob) -> Future[tuple[LocalWork, float]]:
        # The executor starts a worker here when it has fewer than it may. Cut short by Ctrl-C between starting
        # one and recording it, it would never stop that worker, which outlives the simulator: it holds an end of
        # the job queue itself, so it never sees the queue close.
        path = self._models.hold(job.model)
        with _ctrl_c_held():
            future = self._executor.submit(_run_from_file, self._tokenizer_json, path, job.without_model())
        future.add_done_callback(lambda _: self._models.release(path))
        return future

    def use_tokenizer(self, tokenizer: KeyboardTokenizer) -> None:
        self._tokenizer_json = tokenizer.to_json()  # each job takes the one of its submission

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
            if not self._holders[path] and (self._latest is None or path != self._latest[1]):
                del self._holders[path]
                path.unlink(missing_ok=True)  # gone already if the pool closed first

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


def local_pool(tokenizer: KeyboardTokenizer, settings: ExecutorSettings) -> LocalProcessPool:
    """`--executor local` (device_sim/executors.py)."""
    return LocalProcessPool(tokenizer, settings.workers)


def serial(tokenizer: KeyboardTokenizer, settings: ExecutorSettings) -> SerialExecutor:
    """`--executor serial` (device_sim/executors.py)."""
    return SerialExecutor(tokenizer)


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
def _model_file(path: Path) -> bytes:
    """Read once per model per worker: the same bytes object each time after, which `LatestModel` then knows."""
    return path.read_bytes()


def _run_from_file(tokenizer_json: str, model_path: Path, job: TrainingJob) -> tuple[LocalWork, float]:
    """A job in a worker: the model comes from its file, read once per model per worker."""
    return run_in_worker(tokenizer_json, replace(job, model=_model_file(model_path)))
