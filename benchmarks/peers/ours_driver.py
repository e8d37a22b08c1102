"""This project's side of benchmarks/vs_peers.py: the simulated fleet with its in-process aggregator, as
`fedkb simulate --in-process` runs it, on the local process pool (one single-threaded worker per core). The server
step is plain FedAvg (server learning rate 1), as the peers' is, rather than this project's default server momentum.

The fleet picks its own phones (check-ins, selection, over-selection, phones that vanish or come late); the phones
whose updates each round counted are printed with the figures, and the peers' drivers then train exactly those,
scoring the model on the phones that scored it here (the aggregator asks a share of each round's phones to).

Job: a JSON file named by the first argument, {"phones_dir", "tokenizer_path", "per_round", "rounds", "workers",
"seed", "workdir"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import Stopwatch, report

from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from device_sim.fleet import Fleet, FleetConfig, RoundReport, provisioned_phones
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    tokenizer_path, phones_dir = Path(job["tokenizer_path"]), Path(job["phones_dir"])
    vocab_size = KeyboardTokenizer.from_json(tokenizer_path.read_text(encoding="utf-8")).vocab_size
    config = local_aggregator_config(Path(job["workdir"]), tokenizer_path, model=ModelConfig(vocab_size=vocab_size),
                                     clients_per_round=job["per_round"], round_deadline_s=3600.0,
                                     simulated_clock=True, server_optimizer="fedavg", server_learning_rate=1.0,
                                     serving_average=0.0)
    fleet = Fleet(provisioned_phones(phones_dir), FleetConfig(phones_dir=phones_dir, workers=job["workers"],
                                                              seed=job["seed"]), InProcessClient(config))
    watch = Stopwatch()
    try:
        # Unmeasured, as the peers' start is: every phone enrols with this new aggregator (once in a run, at its
        # first check-in otherwise: a few rounds measured after the start would count the enrolments of hundreds of
        # phones), and a warm-up round starts the workers and loads the C++ kernel.
        for phone in fleet.phones:
            phone.enrol(fleet.client)
        rounds = [scheduled(fleet)]
        watch.start()
        rounds += [scheduled(fleet) for _ in range(job["rounds"])]
        watch.stop()
    finally:
        fleet.close()
    # Phones whose local work was computed in the measured rounds, counted or not (late, refused, diverged); a phone
    # that vanished or aborted is only timed.
    trained = sum(p.result is not None for _, done in rounds[1:] for p in done.participations)
    report("fedkeyboard", "this tree", sum(len(r["phone_ids"]) for r, _ in rounds[1:]), watch,
           workers=fleet.executor.workers, trained=trained, schedule=[r for r, _ in rounds])


def scheduled(fleet: Fleet) -> tuple[dict, RoundReport]:
    """One round, and the phones whose updates it counted, those of them that scored the model, and the simulated
    time they trained at."""
    now_s = fleet.now_s
    done = fleet.run_round()
    return {"phone_ids": [p.phone_id for p in done.participants],
            "scoring": [p.phone_id for p in done.participants if p.scored], "now_s": now_s}, done


if __name__ == "__main__":
    main()
