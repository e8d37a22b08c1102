"""What every driver of benchmarks/vs_peers.py shares: its job, the phone's work, the CPU it measures, its report.

A driver runs in its framework's own environment (`bash dev.sh peers`), reads its job from the JSON file named by its
first argument and prints one JSON line on stdout (its last line; frameworks log to stderr). The job is the same for
every framework: the rounds
to run, each the phones that train in it and the simulated time they train at, after one unmeasured warm-up round.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from device_sim.phone import EVAL_MESSAGES, Phone
from device_sim.session import LocalWork, RoundInput, local_work, phone_mods
from keyboard_model.architecture import NextWordModel
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.train import LocalTrainConfig

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Round:
    phone_ids: list[str]
    scoring: frozenset[str]  # the phones that score the model (the aggregator asked them to), as in the fleet
    now_s: float


@dataclass(frozen=True)
class Job:
    phones_dir: Path
    tokenizer_path: Path
    workers: int
    warm_up: Round
    rounds: list[Round]

    @classmethod
    def read(cls) -> Job:
        raw = json.loads(Path(sys.argv[1]).read_text())
        rounds = [Round(r["phone_ids"], frozenset(r["scoring"]), r["now_s"]) for r in raw["rounds"]]
        return cls(Path(raw["phones_dir"]), Path(raw["tokenizer_path"]), raw["workers"], rounds[0], rounds[1:])

    def tokenizer(self) -> KeyboardTokenizer:
        return KeyboardTokenizer.from_json(self.tokenizer_path.read_text(encoding="utf-8"))

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.tokenizer().vocab_size)


def phone_work(model: NextWordModel, tokenizer: KeyboardTokenizer, phones_dir: Path, phone_id: str, now_s: float,
               seed: int, evaluate: bool) -> LocalWork:
    """A phone's whole local work as the fleet's phones do it (`Phone.local_work`), on a model the framework has
    already made from what it downloaded: score it on held-out messages if `evaluate`, train it in place, guard and
    encode the int8 upload. The framework then sends the trained model its own way."""
    train_texts, held_out = Phone(phone_id, phones_dir / phone_id).messages(now_s)
    return local_work(RoundInput(model, 0, tokenizer, train_texts, held_out, LocalTrainConfig(), seed),
                      phone_mods("int8", EVAL_MESSAGES if evaluate else 0, None, None))


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds (user and system) of process `root` (default: this one) and every live process below it, each
    with the children it has waited for (getrusage's RUSAGE_CHILDREN, which alone misses the workers that are still
    running: a pool's, Ray's). Linux's /proc."""
    root = os.getpid() if root is None else root
    parents, ticks = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    total = 0
    for pid, tick_count in ticks.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == root:
            total += tick_count
    return total / CLOCK_TICKS


class Stopwatch:
    """Wall and process-tree CPU seconds between `start` and `stop`, of the tree under process `root` (default: this
    process)."""

    def __init__(self, root: int | None = None) -> None:
        self.root = root
        self.wall_s = self.cpu_s = 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), tree_cpu_s(self.root)

    def stop(self) -> None:
        self.wall_s, self.cpu_s = time.perf_counter() - self._wall, tree_cpu_s(self.root) - self._cpu


def report(framework: str, version: str, updates: int, watch: Stopwatch, **extra: object) -> None:
    """The driver's one line of JSON on stdout."""
    print(json.dumps({"framework": framework, "version": version, "updates": updates, "wall_s": watch.wall_s,
                      "cpu_s": watch.cpu_s, "torch_threads": torch.get_num_threads(), **extra}), flush=True)
