"""What the aggregator spends on one upload, against what a phone spends training it.

A plain round's upload is decoded, checked (shapes, dtypes, finite scales, no -128, the L2 bound) and added to the
round's sum in the aggregator's own process, on the path between the phones' work and the next round. This times
exactly what `RoundManager.submit` runs for one upload (`decode_flat_update`, the norm, the aggregation rule's add),
in CPU seconds, on int8 updates of the default model for the default corpus, for the plain rule (FedAvg) and the
private one (which clips), and beside it `train_local` for phones of the default corpus (their newest 400 messages,
the phones' settings), in CPU seconds on the same number of threads.

Then what the privacy switches add to a round, against the phones' training of a round of `--goal` (goal x
train_local):
- DP-FTRL: one release (the BLT noise drawn and added, the accounting, the noise state serialised to commit), for
  the default BLT (`--dp-rounds` 1000, `--min-separation` 10; optimising it, once per aggregator, is not counted);
- secure aggregation: a phone's ring encoding (rotation and stochastic rounding) of its update, on the default
  8-bit ring.

And a round's commit (`SqliteStorage.record_round`): the new model and the server momentum, the model's size each,
into a new database that keeps versions as the aggregator does by default; it sits between a round's last upload
and the next round's first phone, and is mostly writing, so it is timed in wall seconds.

    .venv/bin/python benchmarks/upload_cost.py [--uploads 40] [--phones 3] [--threads 1] [--goal 10]
        [--dp-rounds 1000] [--min-separation 10] [--commits 30]

Targets (issue 25): the aggregator's process at most 0.03 CPU-s per update; DP-FTRL's noise within 5% of a plain
round.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aggregator.adaptive_clipping import ClipNorm
from aggregator.aggregation import PrivateMean, WeightedMean
from aggregator.config import AggregatorConfig
from aggregator.privacy import PrivacyLedger
from aggregator.sqlite_storage import SqliteStorage
from device_sim.corpus import CorpusConfig, prepare
from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.secagg import RingEncoding
from keyboard_model.train import LocalTrainConfig, train_local
from keyboard_model.update_codec import decode_flat_update, encode_update
from keyboard_model.weights import parameter_shapes

TARGET_S = 0.03
FTRL_TARGET = 0.05


def upload_cost_s(shapes: dict[str, tuple[int, ...]], uploads: int, private: bool) -> float:
    """CPU seconds per upload of decoding, checking and summing `uploads` different int8 updates."""
    generator = torch.Generator().manual_seed(0)
    data = [encode_update({name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()},
                          400, "int8", generator) for _ in range(uploads)]
    if private:
        ledger = PrivacyLedger(ClipNorm(0.5, 0.1, None, 10, 20.0), 0.1, 10, lambda: 621, None, [])
        rule = PrivateMean(shapes, ledger)
    else:
        rule = WeightedMean(shapes)
    started = time.process_time()
    for upload in data:
        delta, metadata = decode_flat_update(upload, shapes)
        if not float(torch.linalg.vector_norm(delta)) <= 20.0:
            raise AssertionError("the benchmark's updates are within the bound")
        rule.add(delta, int(metadata["num_examples"]))
    return (time.process_time() - started) / uploads


def ftrl_release_s(shapes: dict[str, tuple[int, ...]], rounds: int, min_separation: int, releases: int = 5) -> float:
    """CPU seconds per DP-FTRL release and commit of its noise state, after the BLT is optimised."""
    from aggregator.ftrl import FtrlLedger, optimised_blt  # JAX only here

    optimised_blt(rounds, min_separation)
    ledger = FtrlLedger(ClipNorm(0.5, 0.1, None, 10, 20.0), 0.1, 10, min_separation, rounds, shapes, lambda: 621,
                        None, None)
    total = {name: torch.zeros(shape) for name, shape in shapes.items()}
    started = time.process_time()
    for _ in range(releases):
        _, record = ledger.release(total, 0, 10)
        ledger.pending_state()
        ledger.spent(record)
    return (time.process_time() - started) / releases


def ring_encoding_s(shapes: dict[str, tuple[int, ...]], goal: int, encodings: int = 5) -> float:
    """CPU seconds of a phone's ring encoding of its update (the default ring, a round of `goal`)."""
    length = sum(torch.Size(shape).numel() for shape in shapes.values())
    encoding = RingEncoding(bits=8, bound=20.0, max_summands=goal, length=length, rotation_seed=1)
    delta = np.random.default_rng(0).standard_normal(length).astype(np.float32) * 1e-3
    started = time.process_time()
    for seed in range(encodings):
        encoding.encode(delta, np.random.default_rng(seed))
    return (time.process_time() - started) / encodings


def round_commit_s(shapes: dict[str, tuple[int, ...]], commits: int) -> float:
    """Wall seconds of one round's commit: a new model and its server momentum (float32, the model's size each)."""
    blob = bytes(4 * sum(torch.Size(shape).numel() for shape in shapes.values()))
    with tempfile.TemporaryDirectory() as folder:
        storage = SqliteStorage(Path(folder) / "aggregator.sqlite", AggregatorConfig.keep_models,
                                AggregatorConfig.keep_every)
        storage.save_initial_model(blob)
        started = time.perf_counter()
        for number in range(1, commits + 1):
            row = {"round": number, "status": "closed", "started_at": 0.0, "closed_at": 1.0, "goal": 10,
                   "selected": 13, "reported": 10, "examples": 1000, "base_version": number - 1,
                   "new_version": number, "update_norm": 1.0}
            storage.record_round(row, blob, blob)
        spent = time.perf_counter() - started
        storage.close()
    return spent / commits


def train_cost_s(phones: int) -> tuple[float, dict[str, tuple[int, ...]]]:
    """CPU seconds of `train_local` per phone (the phones with the most messages), and the model's shapes."""
    corpus = prepare(CorpusConfig(), log=lambda _: None)
    tokenizer = corpus.tokenizer()
    users = sorted(corpus.users().values(), key=len, reverse=True)[:phones]
    config = LocalTrainConfig()
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size)
    spent = 0.0
    for user in users:
        model = build_model(model_config)
        messages = tokenizer.encode_batch([message.text for message in user])
        started = time.process_time()
        train_local(model, messages, config)
        spent += time.process_time() - started
    return spent / len(users), parameter_shapes(build_model(model_config).state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=40)
    parser.add_argument("--phones", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the pool's workers use 1)")
    parser.add_argument("--goal", type=int, default=10, help="phones a round")
    parser.add_argument("--dp-rounds", type=int, default=1000)
    parser.add_argument("--min-separation", type=int, default=10)
    parser.add_argument("--commits", type=int, default=30, help="round commits to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_s, shapes = train_cost_s(args.phones)
    print(f"model: {sum(torch.Size(s).numel() for s in shapes.values()):,} parameters in {len(shapes)} tensors; "
          f"{args.threads} thread(s)")
    print(f"train_local: {train_s:.3f} CPU-s per phone (mean of {args.phones})")
    for name, private in (("plain", False), ("private (clipped)", True)):
        cost = upload_cost_s(shapes, args.uploads, private)
        print(f"upload, {name}: {cost * 1e3:.2f} CPU-ms per upload (decode + check + add), "
              f"{cost / train_s:.2%} of train_local; target <= {TARGET_S * 1e3:.0f} ms: "
              f"{'met' if cost <= TARGET_S else 'NOT met'}")
    ftrl = ftrl_release_s(shapes, args.dp_rounds, args.min_separation)
    round_s = args.goal * train_s
    print(f"DP-FTRL release: {ftrl:.3f} CPU-s per round, {ftrl / round_s:.2%} of a round's training "
          f"({args.goal} x train_local); target <= {FTRL_TARGET:.0%}: "
          f"{'met' if ftrl <= FTRL_TARGET * round_s else 'NOT met'}")
    encode = ring_encoding_s(shapes, args.goal)
    print(f"secure aggregation, a phone's ring encoding: {encode:.3f} CPU-s, {encode / train_s:.2%} of its train_local")
    print(f"a round's commit (model and server momentum): {round_commit_s(shapes, args.commits) * 1e3:.1f} ms wall")


if __name__ == "__main__":
    main()
