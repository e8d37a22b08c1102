"""Secure aggregation's cost: per phone, on the server, in bytes, and on a whole round of 100 phones.

1. The protocol alone, for a cohort of 130 selected phones (a goal of 100 with 1.3 over-selection) and the
   default model: each phone's time to make its shares (checking its neighbours' key signatures), mask its input,
   sign the survivor set (the consistency round) and reveal its shares (checking the survivor-set signatures),
   and the server's
   time to unmask the sum when 30 phones shared but did not report (the late ones of an over-selected round).
2. Whole rounds: the fleet of `benchmarks/fleet.py` (10,000 phones, in-process, simulated clock, goal 100),
   with and without secure aggregation; rounds' wall time and bytes up per reporting phone.

    .venv/bin/python benchmarks/secagg.py [--rounds 3] [--skip-fleet] [--ring-bits 8] [--cohort 130 --goal 100]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from aggregator.secure_aggregation import SecureAggregation
from device_sim.corpus import CorpusConfig, prepare
from device_sim.fleet import Fleet, FleetConfig, provision
from device_sim.secure_aggregation import SecAggPhone
from device_sim.session import update_bytes
from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.secagg import Directory, IdentityKey, Layout, RingEncoding, masked_layout
from keyboard_model.weights import parameter_shapes

TARGETS = {"wall time": 2.0, "bytes up": 1.1}


def protocol_costs(layout: Layout, cohort: int, goal: int) -> dict[str, float]:
    """Seconds per phone for each step, the server's unmasking, and bytes each reporting phone sends, for a cohort
    of which `goal` report."""
    server = SecureAggregation(round_number=1, layout=layout, graph_seed=7)
    directory, phones = Directory(), []
    for k in range(cohort):
        identity = IdentityKey.generate()
        directory.register(f"device-{k:03d}", identity.public())
        phones.append(SecAggPhone(1, f"device-{k:03d}", identity, directory))
    for k, phone in enumerate(phones):
        server.advertise(f"device-{k:03d}", *phone.advertise())
    roster = server.close_advertising()
    timings: dict[str, list[float]] = {"share": [], "mask": [], "confirm": [], "reveal": []}
    sealed_bytes = []
    for k, phone in enumerate(phones):
        started = time.perf_counter()
        sealed = phone.share(roster)
        timings["share"].append(time.perf_counter() - started)
        sealed_bytes.append(sealed.nbytes)
        server.add_shares(k, sealed)
    shared = server.close_sharing()
    rng = np.random.default_rng(0)
    for k, phone in enumerate(phones[:goal]):
        inputs = {name: rng.integers(0, np.iinfo(dtype).max, size, dtype, endpoint=True)
                  for name, dtype, size in layout.arrays}
        started = time.perf_counter()
        masked = phone.mask(inputs, shared, layout)
        timings["mask"].append(time.perf_counter() - started)
        server.add_masked_input(k, masked)
    reported = server.close_collection()
    for k, phone in enumerate(phones[:goal]):
        started = time.perf_counter()
        signature = phone.confirm(reported)
        timings["confirm"].append(time.perf_counter() - started)
        server.add_confirmation(k, signature)
    server.close_confirming()
    reveal_bytes = []
    for k, phone in enumerate(phones[:goal]):
        started = time.perf_counter()
        shares = phone.reveal(server.incoming(k), shared, reported, server.confirmations_for(k))
        timings["reveal"].append(time.perf_counter() - started)
        reveal_bytes.append(sum(len(s.value) + 2 for s in shares.values()))
        server.add_reveals(k, shares)
    started = time.perf_counter()
    server.unmasked_sum()
    unmask_s = time.perf_counter() - started
    return {
        "degree": roster.parameters.degree, "threshold": roster.parameters.threshold,
        **{f"{step}_s": statistics.mean(values) for step, values in timings.items()},
        "unmask_s": unmask_s,
        # Keys (64) and their signature (64), sealed shares with their commitments, the masked input, the survivor-set
        # signature (64), shares.
        "bytes_up": 64 + 64 + statistics.mean(sealed_bytes) + layout.nbytes + 64 + statistics.mean(reveal_bytes),
    }


def fleet_rounds(secure: bool, corpus, phones, args) -> tuple[float, float]:
    """(mean wall seconds per round, bytes up per reporting phone) over `args.rounds` rounds after a warm-up."""
    workdir = args.out / ("secure" if secure else "plain")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = local_aggregator_config(
        workdir, corpus.tokenizer_path, model=ModelConfig(vocab_size=corpus.tokenizer().vocab_size),
        clients_per_round=args.goal, round_deadline_s=3600.0, simulated_clock=True, secure_aggregation=secure,
        secagg_ring_bits=args.ring_bits,
    )
    client = InProcessClient(config)
    fleet = Fleet(phones, FleetConfig(phones_dir=args.out / "phones", seed=args.seed, vanish_probability=0.0), client)
    try:
        fleet.run_round()  # warm-up: workers start, phones enrol
        started = time.perf_counter()
        reports = [fleet.run_round() for _ in range(args.rounds)]
        wall = (time.perf_counter() - started) / args.rounds
    finally:
        fleet.close()
    measured = {report.round for report in reports}
    summaries = [s for s in client.status().recent_rounds if s.round in measured]
    failed = [s.round for s in summaries if s.status != "closed"]
    if failed:
        print(f"  rounds {failed} failed: {[s.failure for s in summaries if s.status != 'closed']}")
    return wall, sum(s.bytes_up for s in summaries) / sum(s.reported for s in summaries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per mode, after one warm-up")
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("runs/fleet-benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fleet", action="store_true", help="only the protocol's own costs")
    parser.add_argument("--ring-bits", type=int, choices=(8, 16, 32), default=8, help="the masked update's ring")
    parser.add_argument("--cohort", type=int, default=130, help="the protocol's cohort (default: %(default)s)")
    parser.add_argument("--goal", type=int, default=100,
                        help="of them, phones that report; also the fleet rounds' goal (default: %(default)s)")
    args = parser.parse_args()

    corpus = prepare(CorpusConfig())
    shapes = parameter_shapes(build_model(ModelConfig(vocab_size=corpus.tokenizer().vocab_size)).state_dict())
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    layout = masked_layout(RingEncoding(args.ring_bits, 1.0, args.cohort, parameters, rotation_seed=0))
    costs = protocol_costs(layout, args.cohort, args.goal)
    zeros = {name: torch.zeros(shape) for name, shape in shapes.items()}
    int8, float32 = len(update_bytes(zeros, 1, "int8")), len(update_bytes(zeros, 1, "none"))
    print(f"protocol, cohort {args.cohort} (graph degree {costs['degree']}, threshold {costs['threshold']}), goal "
          f"{args.goal}, ring 2^{args.ring_bits}, {layout.nbytes:,} bytes masked per phone:")
    print(f"  per phone: shares {1000 * costs['share_s']:.0f} ms, masking {1000 * costs['mask_s']:.0f} ms, "
          f"signing the survivors {1000 * costs['confirm_s']:.1f} ms, revealing {1000 * costs['reveal_s']:.0f} ms")
    print(f"  server: unmasking the sum with {args.cohort - args.goal} phones dropped after sharing: "
          f"{costs['unmask_s']:.2f} s")
    print(f"  bytes up per reporting phone: {costs['bytes_up'] / 1e6:.2f} MB = {costs['bytes_up'] / float32:.2f}x the "
          f"float32 update ({float32 / 1e6:.2f} MB), {costs['bytes_up'] / int8:.2f}x the int8 one "
          f"({int8 / 1e6:.2f} MB), which plain rounds send (target <= {TARGETS['bytes up']}x: "
          f"{'met' if costs['bytes_up'] / int8 <= TARGETS['bytes up'] else 'NOT met'})")
    if args.skip_fleet:
        return
    phones = provision(corpus, args.out / "phones", args.phones, args.seed)
    plain_wall, plain_bytes = fleet_rounds(False, corpus, phones, args)
    secure_wall, secure_bytes = fleet_rounds(True, corpus, phones, args)
    ratio = secure_wall / plain_wall
    print(f"rounds of {args.goal} phones from {len(phones):,} (in-process, {args.rounds} measured rounds each):")
    print(f"  plain (int8 updates): {plain_wall:.1f} s per round, {plain_bytes / 1e6:.2f} MB up per reporting phone")
    print(f"  secure aggregation:   {secure_wall:.1f} s per round, {secure_bytes / 1e6:.2f} MB up per reporting phone")
    print(f"  wall time {ratio:.2f}x (target <= {TARGETS['wall time']}x: "
          f"{'met' if ratio <= TARGETS['wall time'] else 'NOT met'})")


if __name__ == "__main__":
    main()
