"""A phone's local work as a job: what the fleet hands an executor, and what runs wherever the executor puts it.

Every executor (device_sim/executor.py) takes the same `TrainingJob`; the local pool's worker processes, a Ray
node and the serial executor all run it with `run_job`, so the same seeds give the same local work on each; the
vectorised cohort trains its jobs' phones together, then runs each phone's mods around its share.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace

from aggregator.api.schemas import SecAggState
from device_sim.phone import Phone
from device_sim.secure_aggregation import SecAggPhone
from device_sim.session import Clipping, LocalWork
from keyboard_model.personal import PersonalConfig
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import LatestModel


@dataclass(frozen=True)
class TrainingJob:
    """One selected phone's round: the model it downloaded, how to train, and what the aggregator asked of it."""

    phone: Phone
    model: bytes  # the downloaded global model, as served
    config: LocalTrainConfig
    seed: int
    compression: str  # of the upload: "int8" or "none"
    now_s: float  # simulated time: the phone trains on the messages typed by then
    clipping: Clipping | None  # the clipping the aggregator asked for (differential privacy), if any
    secure: tuple[SecAggPhone, SecAggState] | None = None  # this phone's part of a secure round, and its state
    evaluate: bool = True  # score the downloaded model first (the aggregator asks a share of the phones)
    personal: PersonalConfig | None = None  # the phone keeps a personal model (refreshed when asked to score)

    def without_model(self) -> TrainingJob:
        """The job as it travels to a worker that gets the model its own way (a file it reads once, Ray's object
        store): a 5 MB model pickled with every job cost 17 ms of wall time per phone."""
        return replace(self, model=b"")


def run_job(job: TrainingJob, tokenizer: KeyboardTokenizer,
            models: LatestModel | None = None) -> tuple[LocalWork, float]:
    """The phone's local work and the wall seconds it took. What comes back is what the phone sends (its upload or
    abort, its evaluation) and how training went, not the float32 delta the upload was encoded from: 5 MB more to
    pickle back from a worker for every phone, which nothing reads. A worker that runs many phones passes its
    `models`, which decodes each downloaded model once."""
    started = time.perf_counter()
    work = job.phone.local_work(job.model, tokenizer, job.config, job.seed, job.compression, job.now_s,
                                clipping=job.clipping, secure=job.secure, evaluate=job.evaluate, models=models,
                                personal=job.personal)
    return replace(work, delta=None), time.perf_counter() - started


# What a worker process (one of the local pool's, a Ray worker on a node) keeps between jobs: the model it decoded
# last, as every phone of a round downloads the same one.
_LATEST_MODEL = LatestModel()


@functools.lru_cache(maxsize=1)
def _tokenizer(tokenizer_json: str) -> KeyboardTokenizer:
    """Parsed once per worker process: every job brings the same one."""
    return KeyboardTokenizer.from_json(tokenizer_json)


def run_in_worker(tokenizer_json: str, job: TrainingJob) -> tuple[LocalWork, float]:
    """`run_job` in a worker process, which parses the tokenizer once and decodes each downloaded model once."""
    return run_job(job, _tokenizer(tokenizer_json), _LATEST_MODEL)
