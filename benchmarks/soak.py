"""A soak, as production systems test: the main job's fleet with every private switch on, for a long time, while its
aggregator is killed and restarted, phones vanish, and a few phones lie.

Runs the main job's fleet (the default corpus's 621 phones, 10 a round, the aggregator a service on loopback on the
simulator's clock) with secure aggregation, DP-FTRL and adaptive clipping (`--secure-aggregation --noise-multiplier
0.1 --dp-mechanism ftrl --clip-quantile 0.5`) for `--minutes` of wall time, while:
- every `--kill-every` minutes of service it SIGKILLs the aggregator, wherever its round is, and starts it again on
  the same database and port (the fleet then starts its simulated day again, as the new aggregator's clock does);
- 30% of the selected phones vanish (`--vanish-probability`), at any step of a secure round;
- four phones lie, one of each kind: one masks impossible counts ([10, 1, 2, 1000]: a clipping "bit" of 1000) in
  its masked vector; one reveals each share at its right point with a wrong value; one posts 64 random bytes as its
  survivor-set signature before its real one; one advertises an all-zero (small-order) X25519 key.
Then it prints rounds closed and failed (each failure with its cause, and the phones that survived it against those
it needed, as benchmarks/secure_run.py counts them), the largest released update norm against the bound, the clip
norm's range, the aggregator's memory (RSS) before each kill and how long each start took, what became of each lying
phone's rounds, and whether the database is whole: rounds numbered 1, 2, ... without a gap, each closed round making
the next model version from the one before, each model version from one closed round, every round the fleet saw end
recorded as it saw it, and each round's counts matching its phones' recorded statuses.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--kill-every 3] [--out runs/soak] [FEDKB SIMULATE OPTIONS ...]

Other options go to the fleet and aggregator as `fedkb simulate` takes them (they win over the switches above); the
smoke test runs `--minutes 0.5 --kill-every 0.2` on a small fleet and model. --out is started afresh (its phones are
kept). A DP-FTRL aggregator optimises its noise at every start (aggregator/ftrl.py): tens of seconds of CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import replace
from pathlib import Path

import numpy as np
from fleet import memory_mb  # benchmarks/fleet.py, beside this file
from secure_run import FailedRound, verdict

from aggregator import cli as aggregator_cli
from aggregator.api.client import AggregatorClient, AggregatorRefusedError, AggregatorUnavailableError
from aggregator.api.protocol import Aggregator
from aggregator.api.schemas import CheckinResponse, SecAggConfirm, SecAggKeys
from aggregator.process import LocalAggregator, local_aggregator_config
from device_sim import cli as device_cli
from device_sim.corpus import prepare
from device_sim.fleet import DROPPED_OUT, Fleet, RoundReport, provision
from device_sim.participation import Participant
from device_sim.phone import Phone
from device_sim.secure_aggregation import SecAggPhone
from fedkb import composition
from keyboard_model.cli_options import model_config_from_args
from keyboard_model.secagg import Layout, Masked, Share

SWITCHES = ["--out", "runs/soak", "--secure-aggregation", "--noise-multiplier", "0.1", "--dp-mechanism", "ftrl",
            "--clip-quantile", "0.5", "--vanish-probability", "0.3", "--clients-per-round", "10"]
# What a lying phone masks instead of its three evaluation counts and its clipping bit.
LYING_COUNTS = [10, 1, 2, 1000]


# --- the lying phones: an honest phone's part, with one step changed ---

class LyingCounts(SecAggPhone):
    def mask(self, inputs: Masked, shared: list[int], layout: Layout) -> Masked:
        counts = np.array(LYING_COUNTS, dtype=inputs["counts"].dtype)
        return super().mask({**inputs, "counts": counts}, shared, layout)


class WrongShare(SecAggPhone):
    def reveal(self, *args, **kwargs) -> dict[int, Share]:
        return {owner: Share(share.x, bytes([share.value[0] ^ 1]) + share.value[1:])
                for owner, share in super().reveal(*args, **kwargs).items()}


class ZeroKey(SecAggPhone):
    def keys_message(self) -> SecAggKeys:
        return super().keys_message().model_copy(update={"cipher": bytes(32)})


class GarbageConfirmation(Participant):
    def take(self, step: str) -> None:
        if step == "confirm":
            try:
                self.client.secagg_confirm(self.round, self.decision.upload_token,
                                           SecAggConfirm(signature=os.urandom(64)))
            except AggregatorRefusedError:
                pass  # refused: it goes on to its real signature all the same
        super().take(step)


def lying(kind: type[SecAggPhone]) -> Callable[[Phone, Aggregator, CheckinResponse], Participant]:
    """A phone whose part in secure rounds is `kind` instead of the honest SecAggPhone."""

    def participant(phone: Phone, client: Aggregator, decision: CheckinResponse) -> Participant:
        part = Participant(phone, client, decision)
        if part.secagg is not None:
            part.secagg = kind(part.round, phone.device_id(), phone.identity(), phone.identity_directory())
        return part

    return participant


LIARS = {"impossible counts": lying(LyingCounts), "a wrong share": lying(WrongShare),
         "a garbage confirmation first": GarbageConfirmation, "an all-zero key": lying(ZeroKey)}


class Planted:
    """Makes the fleet's selected phones' parts: `liars` (phone id -> kind) lie, every other phone is honest. Keeps
    the rounds each liar was selected for."""

    def __init__(self, liars: dict[str, str]) -> None:
        self.liars = liars
        self.rounds: dict[int, set[str]] = defaultdict(set)  # round -> the liars selected for it

    def __call__(self, phone: Phone, client: Aggregator, decision: CheckinResponse) -> Participant:
        kind = self.liars.get(phone.phone_id)
        if kind is None:
            return Participant(phone, client, decision)
        self.rounds[decision.round].add(phone.phone_id)
        return LIARS[kind](phone, client, decision)

    def honest_survivors(self, report: RoundReport) -> int:
        """The round's phones still in it when it ended, less the liars among them."""
        liars = self.rounds[report.round]
        gone = {p.phone_id for p in report.participations if p.round == report.round and p.outcome in DROPPED_OUT}
        return report.survived - len(liars - gone)


# --- the aggregator, killed every so often ---

class Killer(threading.Thread):
    """SIGKILLs the aggregator `every_s` seconds after each start (`started`), noting its RSS first."""

    def __init__(self, every_s: float) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.aggregator: LocalAggregator | None = None
        self.started, self.done = threading.Event(), threading.Event()
        self.rss_at_kill: list[float] = []

    def run(self) -> None:
        while self.started.wait() and not self.done.is_set():
            self.started.clear()
            if self.done.wait(self.every_s):
                return
            process = self.aggregator.process
            self.rss_at_kill.append(memory_mb(process.pid, "VmRSS"))
            process.kill()
            process.wait()


# --- the run ---

def run(args: argparse.Namespace, minutes: float, kill_every_min: float) -> dict:
    """The soak: returns what the summary needs."""
    for leftover in ("aggregator.sqlite", "aggregator.sqlite-wal", "aggregator.sqlite-shm"):
        (args.out / leftover).unlink(missing_ok=True)  # a fresh database; the phones enrol in it again
    corpus = prepare(device_cli.corpus_config_from_args(args), log=lambda _: None)
    fleet_config = device_cli.simulation_config_from_args(args).fleet_config()
    phones = provision(corpus, fleet_config.phones_dir, fleet_config.num_phones, fleet_config.seed,
                       fleet_config.typing_days)
    # The simulator drives the aggregator's clock and knows the population, as `fedkb simulate` does.
    config = local_aggregator_config(
        args.out, corpus.tokenizer_path, model=model_config_from_args(args, corpus.manifest["vocab_size"]),
        **aggregator_cli.round_settings(args) | {"simulated_clock": True, "population": len(phones)})
    planted = Planted(dict(zip(random.Random(args.seed).sample([p.phone_id for p in phones], len(LIARS)), LIARS)))
    killer = Killer(kill_every_min * 60.0)
    reports: dict[int, RoundReport] = {}
    seen: dict[int, str] = {}  # round -> status, as the fleet saw each round end
    starts_s: list[float] = []
    with ExitStack() as stack:
        executor = None
        killer.start()
        stack.callback(killer.done.set)
        stack.callback(killer.started.set)  # wakes the killer, which then sees it is done
        ends = time.monotonic() + minutes * 60.0
        while time.monotonic() < ends:
            started = time.monotonic()
            aggregator = LocalAggregator(config).__enter__()
            stack.callback(aggregator.__exit__, None, None, None)
            starts_s.append(time.monotonic() - started)
            # The same port at every start: the phones keep the aggregator's address.
            config = replace(config, port=aggregator.port)
            client = stack.enter_context(closing(AggregatorClient(aggregator.url,
                                                                  operator_token=config.operator_token)))
            fleet = Fleet(phones, fleet_config, client, executor, planted)
            executor = executor or stack.enter_context(closing(fleet.executor))
            killer.aggregator = aggregator
            killer.started.set()
            try:
                while time.monotonic() < ends:
                    report = fleet.run_round()
                    reports[report.round] = report
                    seen |= {r.round: r.status for r in client.status(recent=5).recent_rounds}
            except AggregatorUnavailableError:
                if aggregator.process.wait(timeout=60) != -signal.SIGKILL:
                    raise RuntimeError(f"the aggregator stopped by itself:\n{aggregator.output()}") from None
        killer.done.set()
    return {"config": config, "reports": reports, "seen": seen, "planted": planted, "starts_s": starts_s,
            "rss_at_kill": killer.rss_at_kill}


# --- what the database says ---

def rounds_of(db_path: Path) -> list[dict]:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM rounds ORDER BY round")]


def integrity(db_path: Path, seen: dict[int, str]) -> list[str]:
    """What is not whole in the database: [] if nothing."""
    problems = []
    rounds = rounds_of(db_path)
    numbers = [r["round"] for r in rounds]
    if numbers != list(range(1, len(rounds) + 1)):
        problems.append(f"round numbers are not 1..{len(rounds)} without a gap: {numbers}")
    version = 0
    for r in rounds:
        made = r["new_version"]
        if r["base_version"] != version or (made != version + 1 if r["status"] == "closed" else made is not None):
            problems.append(f"round {r['round']} ({r['status']}) goes from version {r['base_version']} to {made}; "
                            f"the model was at version {version}")
        version = made if r["status"] == "closed" and made is not None else version
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        newest = db.execute("SELECT version, round FROM models ORDER BY version DESC LIMIT 1").fetchone()
        closed = [r["round"] for r in rounds if r["status"] == "closed"]
        if newest != (version, closed[-1] if closed else 0):
            problems.append(f"the newest model is {newest} (version, round), not version {version} of round "
                            f"{closed[-1] if closed else 0}")
        statuses = defaultdict(lambda: defaultdict(int))
        for number, status, count in db.execute("SELECT round, status, count(*) FROM selections GROUP BY round, "
                                                "status"):
            statuses[number][status] = count
    for r in rounds:
        counted = statuses[r["round"]]
        recorded = {"reported": r["reported"], "aborted": r["aborted"], "late": r["late"], "selected": r["dropped"]}
        if sum(counted.values()) != r["selected"] or any(counted[s] != n for s, n in recorded.items()):
            problems.append(f"round {r['round']}: recorded {r['selected']} selected ({recorded}), its selections "
                            f"say {dict(counted)}")
    by_number = {r["round"]: r["status"] for r in rounds}
    for number, status in sorted(seen.items()):
        if by_number.get(number) != status:
            problems.append(f"the fleet saw round {number} end {status}; the database holds {by_number.get(number)}")
    return problems


def summary(result: dict, db_path: Path, minutes: float) -> None:
    config, reports, planted = result["config"], result["reports"], result["planted"]
    rounds = rounds_of(db_path)
    closed = [r for r in rounds if r["status"] == "closed"]
    failed = [r for r in rounds if r["status"] == "failed"]
    print(f"\n{minutes:g} minutes: {len(rounds)} rounds, {len(closed)} closed, {len(failed)} failed; the aggregator "
          f"was killed {len(result['rss_at_kill'])} times")
    seen_failing = []
    for r in failed:
        report = reports.get(r["round"])
        if report is None:
            print(f"- round {r['round']}: {r['failure']} (the fleet did not see it end)")
            continue
        liars = ", ".join(planted.liars[phone_id] for phone_id in sorted(planted.rounds[r["round"]]))
        seen_failing.append(FailedRound.of(r, planted.honest_survivors(report), config.min_report_fraction))
        print(f"{seen_failing[-1]}" + (f"\n  lying phones in it (not counted as survivors): {liars}" if liars else ""))
    print(verdict(seen_failing) + " (honest phones counted)")
    norms = [r["update_norm"] for r in closed if r["update_norm"] is not None]
    print(f"largest released update norm: {f'{max(norms):.4g}' if norms else 'none (no round closed)'} (bound: "
          f"--max-update-norm {config.max_update_norm:g})")
    clip = [r["dp_clip_norm"] for r in closed if r["dp_clip_norm"] is not None]
    print(f"clip norm: {f'{min(clip):.4g} to {max(clip):.4g}' if clip else 'none'} over the closed rounds (next: "
          f"{closed[-1]['dp_next_clip_norm'] if closed else None})")
    print("aggregator RSS before each kill (MB): " + ", ".join(f"{m:.0f}" for m in result["rss_at_kill"]))
    print("seconds to start the aggregator each time: " + ", ".join(f"{s:.1f}" for s in result["starts_s"]))
    outcomes = {r["round"]: r["status"] for r in rounds}
    for phone_id, kind in planted.liars.items():
        taken = sorted(n for n, liars in planted.rounds.items() if phone_id in liars)
        print(f"lying phone {phone_id} ({kind}): selected in rounds "
              + (", ".join(f"{n} ({outcomes.get(n, 'not recorded')})" for n in taken) or "none"))
    problems = integrity(db_path, result["seen"])
    print("database whole: rounds 1.." + str(len(rounds)) + " without a gap, model versions matching closed rounds, "
          "counts matching selections" if not problems else "database NOT whole:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall minutes of rounds (default: %(default)s)")
    parser.add_argument("--kill-every", type=float, default=3.0,
                        help="minutes of service between SIGKILLs of the aggregator (default: %(default)s)")
    own, extra = parser.parse_known_args(argv)
    simulate = argparse.ArgumentParser()
    composition.add_simulate_arguments(simulate)
    args = simulate.parse_args([*SWITCHES, *extra])
    result = run(args, own.minutes, own.kill_every)
    summary(result, args.out / "aggregator.sqlite", own.minutes)


if __name__ == "__main__":
    main()
