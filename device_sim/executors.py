"""The executor seam, and the registry `--executor` reads: where phones' local work runs.

The fleet hands each selected phone's local work (a `TrainingJob`, device_sim/worker.py) to a
`TrainingExecutor` and collects the result when the phone's simulated training time is up.
The executors are the local process pool and the serial one (device_sim/executor.py), the
vectorised cohort (device_sim/vectorised.py) and a Ray cluster (device_sim/ray_executor.py).

Adding an executor is one module with a class that has `submit(job)` and `close()`, and one
`Executor` record in `EXECUTORS`: its name, the devices it trains on, the options it reads,
and its factory, named by where it lives ("module:function"), as aggregator.rules and
aggregator.mechanisms name theirs. `--executor`'s choices and help, each device's default
and the checks of which options go together all come from the records; naming the factory
rather than importing it keeps `--help` free of torch (tests/test_cli_startup.py) and an
optional executor's library (Ray) unimported until it is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from device_sim.session import LocalWork
    from device_sim.worker import TrainingJob
    from keyboard_model.tokenizer import KeyboardTokenizer


class TrainingExecutor(Protocol):
    def submit(self, job: TrainingJob) -> Future[tuple[LocalWork, float]]:
        """A future of (the phone's LocalWork, wall seconds it spent on it)."""

    def use_tokenizer(self, tokenizer: KeyboardTokenizer) -> None:
        """Jobs submitted from now on train with this tokenizer: the vocabulary grew (aggregator/discovery.py). Jobs
        submitted before keep the one their model was made for."""

    def close(self) -> None:
        """Stop now: work still queued or running is dropped."""


@dataclass(frozen=True)
class ExecutorSettings:
    """What the command line says of executors; each reads only the options its record names."""

    device: str = "cpu"  # where phones train
    workers: int | None = None  # processes side by side (None: one per core)
    phones_per_pass: int | None = None  # most phones in one batched pass (None: the device's default)
    ray_address: str | None = None  # the Ray cluster's head (None: the Ray on this machine, else one started)


@dataclass(frozen=True)
class Executor:
    """An executor as `--executor` knows it."""

    name: str
    devices: tuple[str, ...]  # the --device values it trains on
    options: tuple[str, ...]  # the ExecutorSettings fields it reads besides the device: the others are refused
    factory: str  # "module:function", called with (tokenizer, settings)
    summary: str  # what --help says of it
    default_on: tuple[str, ...] = ()  # the devices where it is the one used when --executor is not given
    extra: str | None = None  # the project's optional extra that installs what it needs, if any

    def make(self, tokenizer: KeyboardTokenizer, settings: ExecutorSettings) -> TrainingExecutor:
        module, function = self.factory.split(":")
        try:
            loaded = importlib.import_module(module)
        except ImportError as error:
            if self.extra is None:
                raise
            raise UserFacingError(f"--executor {self.name} needs {error.name or self.extra} ({error}): "
                                  f"pip install -e '.[{self.extra}]'") from None
        return getattr(loaded, function)(tokenizer, settings)


# The defaults: on the CPU the local pool: on 2 cores it outran the vectorised cohort at 10 and 100 phones a round
# (benchmarks/scale.py, on a machine busy with other jobs: 2.3 phone-updates/s against 1.9 with the cohort on one
# thread, 0.6 on two), because each of its workers trains a phone with the C++ CIFG walk and the fused output loss on
# one thread, while batching phones adds no arithmetic intensity on a CPU (a phone's largest products, 320 x 96 by
# 96 x vocabulary, are already big) and one process on two threads loses most when other processes want the cores.
# On CUDA the vectorised cohort: the pool has no GPU path. Ray only when asked for: it spreads phones over a
# cluster's CPUs.
EXECUTORS: dict[str, Executor] = {executor.name: executor for executor in [
    Executor("local", ("cpu",), ("workers",), "device_sim.executor:local_pool",
             "one process per core, each phone on its own", default_on=("cpu",)),
    Executor("vectorised", ("cpu", "cuda"), ("phones_per_pass",), "device_sim.vectorised:cohort",
             "the phones selected by then in batched passes in this process", default_on=("cuda",)),
    Executor("ray", ("cpu",), ("ray_address",), "device_sim.ray_executor:on_ray",
             "each phone on a node of a Ray cluster that holds its history", extra="ray"),
    Executor("serial", ("cpu",), (), "device_sim.executor:serial",
             "each phone as it is selected, in this process, for debugging"),
]}
ExecutorFactory = Callable[["KeyboardTokenizer"], TrainingExecutor]


def default_executor(device: str) -> str:
    return next(executor.name for executor in EXECUTORS.values() if device in executor.default_on)


def chosen_executor(name: str | None, settings: ExecutorSettings) -> Executor:
    """The executor `--executor NAME` asks for (None: the device's default); refuses a device it does not train on
    and options it does not read."""
    name = name or default_executor(settings.device)
    if name not in EXECUTORS:
        raise UserFacingError(f"unknown --executor {name!r}; known: {', '.join(EXECUTORS)}")
    executor = EXECUTORS[name]
    if settings.device not in executor.devices:
        trains_there = [other for other in EXECUTORS.values() if settings.device in other.devices]
        raise UserFacingError(f"--device {settings.device} needs --executor "
                              f"{' or '.join(other.name for other in trains_there)}: the {name} executor trains on "
                              f"{' or '.join(executor.devices)}")
    for option in (field.name for field in fields(settings)):
        if option != "device" and getattr(settings, option) is not None and option not in executor.options:
            readers = [other.name for other in EXECUTORS.values() if option in other.options]
            raise UserFacingError(f"--{option.replace('_', '-')} goes with --executor {' or '.join(readers)}")
    return executor


def make_executor(name: str | None, tokenizer: KeyboardTokenizer,
                  settings: ExecutorSettings = ExecutorSettings()) -> TrainingExecutor:
    """The executor `--executor NAME` asks for (None: the device's default), made with `settings`."""
    return chosen_executor(name, settings).make(tokenizer, settings)
