"""pfl-research's side of benchmarks/vs_peers.py: FedAvg on pfl's SimulatedBackend with its PyTorch model.

The phone's whole local work (common.phone_work) is pfl's `train_one_user`, on pfl's model in place, the update being
pfl's own model difference, averaged and applied by pfl. Each round's users are the phones this project's fleet
trained in that round (a user sampler that walks the schedule; the cohort size follows it). pfl's own evaluation is
off: the phone's scoring is inside its local work, as in the other frameworks.

With more than one worker, vs_peers.py starts this under torchrun (`--standalone`, so on 127.0.0.1), as pfl runs a
simulation over several processes: each process trains its share of a cohort and pfl sums them with
torch.distributed. Rank 0 reports, measuring the CPU of the whole torchrun tree.

Run with the pfl environment's python (`bash dev.sh peers`); job as the first argument (common.Job), one JSON line out.
"""

from __future__ import annotations

import os
from dataclasses import replace
from importlib.metadata import version

import numpy as np
import torch
from common import Job, Round, Stopwatch, phone_work, report
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import HyperParam, NNTrainHyperParams
from pfl.metrics import Metrics
from pfl.model.pytorch import PyTorchModel

from keyboard_model.architecture import build_model


class Schedule(HyperParam, TrainingProcessCallback):
    """The rounds to run: the cohort size of the open round, and its users in order. pfl gives a process of a
    distributed simulation the cohort's users i with i % world_size == rank, drawing world_size users for each, so the
    draws restart at each round rather than running on across rounds."""

    def __init__(self, rounds: list[Round], watch: Stopwatch) -> None:
        self.rounds, self.watch = rounds, watch
        self.round = self.drawn = 0

    def value(self) -> int:
        return len(self.rounds[self.round].phone_ids)

    def next_user(self) -> str:
        phones = self.rounds[self.round].phone_ids
        self.drawn += 1
        return phones[(self.drawn - 1) % len(phones)]

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration: int):
        self.round, self.drawn = central_iteration + 1, 0
        if central_iteration == 0:  # the warm-up round is done
            self.watch.start()
        return False, Metrics()

    def on_train_end(self, *, model) -> None:
        self.watch.stop()


class PhoneFedAvg(FederatedAveraging):
    """pfl's FedAvg with the phone's own local work as a user's training, and pfl's evaluation off."""

    def __init__(self, job: Job, schedule: Schedule) -> None:
        super().__init__()
        self.job, self.schedule, self.tokenizer = job, schedule, job.tokenizer()

    def get_next_central_contexts(self, *args, **kwargs):
        contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
        if contexts is not None:
            contexts = tuple(replace(context, do_evaluation=False) for context in contexts)
        return contexts, model, metrics

    def train_one_user(self, initial_model_state, model, user_dataset, central_context):
        planned = self.schedule.rounds[self.schedule.round]
        phone_work(model.pytorch_model, self.tokenizer, self.job.phones_dir, user_dataset.user_id, planned.now_s,
                   seed=self.schedule.drawn, evaluate=user_dataset.user_id in planned.scoring)
        return model.get_model_difference(initial_model_state), Metrics()


def main() -> None:
    job = Job.read()
    # Under torchrun the measured tree is torchrun's: its agent and every rank.
    watch = Stopwatch(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None)
    schedule = Schedule([job.warm_up, *job.rounds], watch)
    model = build_model(job.model_config())
    # pfl's PyTorchModel asks for `loss` (the model has it) and `metrics`, which only pfl's own evaluation, off here,
    # would call.
    model.metrics = None
    pfl_model = PyTorchModel(model, local_optimizer_create=torch.optim.SGD,
                             central_optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    # A user's data is its phone's history, which the phone's work reads itself; pfl only counts the rows it is given.
    users = FederatedDataset(lambda phone_id: Dataset(raw_data=[np.array([phone_id])], user_id=phone_id),
                             schedule.next_user)
    algorithm = PhoneFedAvg(job, schedule)
    algorithm.run(NNAlgorithmParams(central_num_iterations=len(schedule.rounds), evaluation_frequency=1,
                                    train_cohort_size=schedule, val_cohort_size=None),
                  SimulatedBackend(training_data=users, val_data=None), pfl_model,
                  NNTrainHyperParams(local_num_epochs=1, local_learning_rate=0.0, local_batch_size=None),
                  callbacks=[schedule], send_metrics_to_platform=False)
    if int(os.environ.get("RANK", "0")) == 0:
        report("pfl-research", version("pfl"), sum(len(r.phone_ids) for r in job.rounds), watch,
               workers=int(os.environ.get("WORLD_SIZE", "1")))


if __name__ == "__main__":
    main()
