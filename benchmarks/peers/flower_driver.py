"""Flower's side of benchmarks/vs_peers.py: a ClientApp and a ServerApp (FedAvg) on Flower's Ray simulation.

Each virtual SuperNode runs the ClientApp as Flower's PyTorch template does (a new model from the arrays it was sent,
trained, its arrays sent back with `num-examples`), with the phone's whole local work inside (common.phone_work):
the same phones each round as this project's fleet trained, named in the message's config, so the work is the same
whichever node gets it. The ServerApp is Flower's FedAvg with its sampling replaced by that schedule; its
aggregation is Flower's own. One Ray worker per core, one CPU per ClientApp, and Ray on 127.0.0.1 only.

Run with the Flower environment's python (`bash dev.sh peers`); job as the first argument (common.Job),
one JSON line out.
"""

from __future__ import annotations

import os

# Before Ray is imported (Flower imports it): a Ray started here takes 127.0.0.1 and listens there only, rather than
# on the machine's network address (see device_sim/ray_executor.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import sys
import traceback
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

# Ray's workers import the ClientApp by its module's name: it and `common` are found through PYTHONPATH.
PEERS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PEERS, os.environ.get("PYTHONPATH")]))

from common import Job, Round, Stopwatch, report
from flower_client import client_app
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from keyboard_model.architecture import build_model


class ScheduledFedAvg(FedAvg):
    """FedAvg training the scheduled phones each round, one node each; the measurement starts after round 1."""

    def __init__(self, job: Job, watch: Stopwatch) -> None:
        super().__init__(fraction_evaluate=0.0)
        self.job, self.watch = job, watch
        self.updates = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        if server_round == 2:
            self.watch.start()
        planned: Round = ([self.job.warm_up] + self.job.rounds)[server_round - 1]
        nodes = sorted(grid.get_node_ids())[:len(planned.phone_ids)]
        messages = []
        for seed, (node, phone) in enumerate(zip(nodes, planned.phone_ids)):
            phone_config = ConfigRecord({"server-round": server_round, "phone": phone, "now-s": planned.now_s,
                                         "seed": seed, "evaluate": phone in planned.scoring,
                                         "phones-dir": str(self.job.phones_dir),
                                         "tokenizer": str(self.job.tokenizer_path)})
            messages.append(Message(RecordDict({"arrays": arrays, "config": phone_config}), message_type="train",
                                    dst_node_id=node))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if server_round > 1:
            self.updates += sum(not reply.has_error() for reply in replies)
        return super().aggregate_train(server_round, replies)


def main() -> None:
    job = Job.read()
    watch = Stopwatch()
    strategy = ScheduledFedAvg(job, watch)
    server_app = ServerApp()

    @server_app.main()
    def serve(grid: Grid, context: Context) -> None:
        model = build_model(job.model_config())
        strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=1 + len(job.rounds))
        watch.stop()

    nodes = max(len(r.phone_ids) for r in [job.warm_up, *job.rounds])
    run_simulation(server_app, client_app, num_supernodes=nodes, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        # address "local": a Ray of its own, even where another Ray already runs on this machine.
        "init_args": {"address": "local", "num_cpus": job.workers, "num_gpus": 0, "_node_ip_address": "127.0.0.1",
                      "include_dashboard": False}})
    planned = sum(len(r.phone_ids) for r in job.rounds)
    if strategy.updates != planned:
        sys.exit(f"Flower: {strategy.updates} of the {planned} phones' updates came back (see the log above)")
    report("Flower", version("flwr"), strategy.updates, watch, workers=job.workers)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # Flower's threads outlive a crashed simulation, and would hold the process open
        traceback.print_exc()
        os._exit(1)
