"""A federated training run: provision the fleet, run rounds, log metrics, save the model.

Writes into the output folder:
- `metrics.jsonl` and `tensorboard/`: one record per round (round 0 is the initial model),
  see `device_sim/run_log.py`. Running again into the same folder resumes: the
  aggregator's database keeps its model and round numbers, and the new rounds are appended,
  after a line for each round the aggregator finished after the last line (the run was
  stopped between a round's commit and its line), from the aggregator's record of it;
- `model.safetensors` and `tokenizer.json`: the latest served model (the average of the recent global models,
  `GET /model/served`), replaced atomically;
- `summary.json`, when the run ends: the final model against a keyboard that always
  offers the three most frequent words, on every phone's held-out messages, beside round
  0's score of the initial model on the eval sample. It is removed when a run starts, so
  its presence says the run in the folder has ended. With canary phrases (`canaries`), it also holds how much the
  final model memorised them (`device_sim/canaries.py`);
- `canaries.json`, with canary phrases: the planted and held-out secrets, the researcher's record of them.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from aggregator.api.client import AggregatorRefusedError
from aggregator.api.protocol import Aggregator
from aggregator.api.schemas import RoundSummary
from device_sim.canaries import CanaryConfig, audit_delta, canary_report, plant_canaries
from device_sim.corpus import PreparedCorpus
from device_sim.executors import ExecutorFactory
from device_sim.fleet import Fleet, FleetConfig, RoundReport, provision
from device_sim.run_log import METRICS_FILE, RunLog, json_safe, read_lines
from keyboard_model.architecture import NextWordModel
from keyboard_model.evaluate import EvalCounts, evaluate, evaluate_fixed_suggestions, most_frequent_words
from keyboard_model.files import write_atomically
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import model_from_bytes


@dataclass(frozen=True)
class SimulationConfig:
    out_dir: Path
    rounds: int = 10  # training rounds: a word discovery's rounds come on top
    fleet: FleetConfig | None = None
    # Stop after this many seconds even if rounds remain (None: run all rounds).
    time_budget_s: float | None = None
    # Score the model centrally on the eval sample after every this many rounds (the phones' own, federated score
    # comes every round); scoring holds up the next round, so long runs may want it less often.
    eval_every: int = 1
    # (fraction of the run, local learning rate): from that fraction of the time budget, or of the rounds when
    # there is no budget, on, phones train at that rate. Empty: the fleet's rate throughout.
    lr_steps: tuple[tuple[float, float], ...] = ()
    # Canary phrases to plant in phones' histories before the first round, and score the final model on.
    canaries: CanaryConfig | None = None

    def __post_init__(self) -> None:
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")
        if any(not 0.0 <= at < 1.0 or not lr > 0 for at, lr in self.lr_steps):
            raise ValueError(f"each learning-rate step needs a fraction in [0, 1) and a positive rate: {self.lr_steps}")

    def learning_rate(self, fraction_done: float) -> float | None:
        """The local learning rate a run this far along trains at, or None for the fleet's own."""
        reached = [lr for at, lr in sorted(self.lr_steps) if at <= fraction_done]
        return reached[-1] if reached else None

    def fleet_config(self) -> FleetConfig:
        return self.fleet or FleetConfig(phones_dir=self.out_dir / "phones")


SUMMARY_FILE = "summary.json"


@dataclass
class SimulationSummary:
    rounds_completed: int
    # Of those, rounds the aggregator recorded as failed (the model did not change).
    rounds_failed: int
    model_version: int
    # Round 0's central score of the initial model, on the `initial_sample_phones` of the eval sample: scoring it on
    # every phone would be a second pass as long as the final one, for a row that only shows training did something.
    initial: dict[str, float | None]
    initial_sample_phones: int
    final: dict[str, float]
    most_frequent_baseline: dict[str, float]
    most_frequent_words: list[str]
    eval_positions: int
    wall_time_s: float
    # What the run's releases spent, as the aggregator accounts it (epsilon at dp_delta; rho-zCDP under DP-FTRL);
    # None without differential privacy.
    privacy_spent: dict[str, float | None] | None = None
    # The aggregator's last audit with canary clients (its round and the `audit_*` figures); None without them.
    privacy_audit: dict | None = None
    # The last screen's reference rows (the n-gram, the most frequent words) on the same positions as `final`,
    # added once they are scored (device_sim.cli.finish); the dashboard draws them.
    baselines: list[dict] = field(default_factory=list)
    # With canary phrases: how much the final model memorised them (device_sim.canaries.canary_report).
    canaries: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_simulation(
    corpus: PreparedCorpus, config: SimulationConfig, client: Aggregator, show_progress: bool = True,
    executor: ExecutorFactory | None = None,
) -> SimulationSummary:
    """`executor` makes the phones' training executor from the run's tokenizer (default: the fleet's process pool)."""
    started = time.monotonic()
    fleet_config = config.fleet_config()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    # Its presence says a run in this folder has ended; this one has not.
    (config.out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    phones = provision(corpus, fleet_config.phones_dir, fleet_config.num_phones, fleet_config.seed,
                       fleet_config.typing_days)
    tokenizer = KeyboardTokenizer.from_json(client.tokenizer_json())
    # Before the fleet starts its workers, which a refusal would leave behind.
    canaries = plant_canaries(config.out_dir, phones, config.canaries, tokenizer, fleet_config.train.max_messages)
    fleet = Fleet(phones, fleet_config, client, None if executor is None else executor(tokenizer))
    write_atomically(config.out_dir / "tokenizer.json", tokenizer.to_json().encode("utf-8"))

    eval_sample = random.Random(fleet_config.seed).sample(phones, min(fleet_config.eval_phones, len(phones)))
    eval_messages = [m for phone in eval_sample for m in phone.held_out(tokenizer)]

    def save_current_model(score: bool) -> tuple[int, EvalCounts | None]:
        nonlocal tokenizer, eval_messages
        data = client.served_model()
        model, version = model_from_bytes(data)
        if model.config.vocab_size != tokenizer.vocab_size:  # a discovery grew the vocabulary
            tokenizer = KeyboardTokenizer.from_json(client.tokenizer_json())
            if tokenizer.vocab_size != model.config.vocab_size:  # it grew again in between: take its newer model
                data = client.served_model()
                model, version = model_from_bytes(data)
            eval_messages = [m for phone in eval_sample for m in phone.held_out(tokenizer)]
            write_atomically(config.out_dir / "tokenizer.json", tokenizer.to_json().encode("utf-8"))
        write_atomically(config.out_dir / "model.safetensors", data)
        return version, evaluate(model, tokenizer, eval_messages) if score else None

    rounds_completed = rounds_failed = 0
    # Ctrl-C ends the loop by propagating: every finished round is already on disk.
    with closing(fleet), RunLog(config.out_dir) as log:
        version, initial_sample = save_current_model(score=not log.resuming)
        if log.resuming:
            print(f"resuming the run in {config.out_dir} at model version {version}", flush=True)
            _recover_rounds(log, client)
        else:
            # The first round this run can see: the aggregator may have finished rounds before it (--aggregator URL).
            log.append({**_round_line(0, version, None, None, initial_sample, 0.0, None),
                        "first_round": client.status().round})
        # The budget is the rounds': provisioning and scoring round 0 come before it.
        budget_started = time.monotonic()
        final_audit = None
        # `rounds` counts training rounds: a word discovery's rounds (aggregator/discovery.py) come on top.
        trained = 0
        with _progress_bar(config, show_progress) as progress:
            while trained < config.rounds:
                elapsed = time.monotonic() - budget_started
                round_started = time.monotonic()
                fraction_done = elapsed / config.time_budget_s if config.time_budget_s else trained / config.rounds
                learning_rate = config.learning_rate(fraction_done) or fleet.config.train.learning_rate
                report = fleet.run_round(learning_rate)
                if report.count("diverged"):
                    progress.write(f"round {report.round}: local training diverged on {report.count('diverged')} "
                                   "phone(s), which aborted instead of uploading; a smaller --lr may help")
                if report.count("refused"):
                    progress.write(f"round {report.round}: the aggregator refused {report.count('refused')} "
                                   "update(s) (over --max-update-norm, or malformed); the phones' part in the round "
                                   "ended there")
                rounds_completed += 1
                kind = next((r.round_kind for r in client.status(recent=5).recent_rounds if r.round == report.round),
                            None)
                trained += kind != "discovery"
                # Decided once, here: the last round's model is audited before its line is written.
                over_budget = (config.time_budget_s is not None
                               and time.monotonic() - budget_started > config.time_budget_s)
                last = trained == config.rounds or over_budget
                version, counts = save_current_model(score=rounds_completed % config.eval_every == 0 or last)
                if last:
                    final_audit = _audit_last_model(client, progress)
                server_view = next(r for r in client.status().recent_rounds if r.round == report.round)
                line = _round_line(
                    report.round, version, report, server_view, counts, time.monotonic() - round_started,
                    learning_rate,
                )
                log.append(line)
                if line["failed"]:
                    rounds_failed += 1
                    progress.write(f"round {report.round} failed: {server_view.failure or 'no reason recorded'}")
                # Between central scores, the bar shows the phones' own score of the model the round started from.
                top1 = line["recall_at_1"] if counts is not None else line["fed_recall_at_1"]
                progress.set_postfix(
                    round=report.round, participants=len(report.participants), loss=_shown(line["train_loss"]),
                    top1=_shown(top1),
                )
                done = trained if config.time_budget_s is None else min(time.monotonic() - budget_started,
                                                                           config.time_budget_s)
                progress.update(done - progress.n)
                if over_budget:
                    progress.write(f"time budget of {config.time_budget_s:.0f} s reached; stopping")
                    break
        initial = _round_zero(log.path)

    final_model, version = model_from_bytes((config.out_dir / "model.safetensors").read_bytes())
    all_messages = [m for phone in phones for m in phone.held_out(tokenizer)]
    final = _score_with_progress(final_model, tokenizer, all_messages, show_progress)
    frequent = most_frequent_words(tokenizer, tokenizer.encode_batch(corpus.proxy_lines()))
    summary = SimulationSummary(
        rounds_completed=rounds_completed,
        rounds_failed=rounds_failed,
        model_version=version,
        initial=initial,
        initial_sample_phones=len(eval_sample),
        final=final.metrics(),
        most_frequent_baseline=evaluate_fixed_suggestions(tokenizer, all_messages, frequent).metrics(),
        most_frequent_words=[tokenizer.id_to_token[i] for i in frequent],
        eval_positions=final.positions,
        wall_time_s=time.monotonic() - started,
        privacy_spent=_privacy_spent(client),
        privacy_audit=_privacy_audit(config.out_dir, final_audit),
        canaries=None if canaries is None else canary_report(final_model, tokenizer, canaries,
                                                             audit_delta(config.out_dir)),
    )
    write_summary(config.out_dir, summary)
    return summary


def write_summary(out_dir: Path, summary: SimulationSummary) -> None:
    """summary.json, whole or absent: its presence says the run has ended."""
    summary_json = json.dumps(json_safe(summary.to_dict()), indent=2, allow_nan=False) + "\n"
    write_atomically(out_dir / SUMMARY_FILE, summary_json.encode())


def _audit_last_model(client: Aggregator, progress: tqdm) -> RoundSummary | None:
    """Have the aggregator audit the run's last model with its canary clients, whatever its --audit-every; the record
    of the round that made it. An aggregator this run did not start takes no such order from it (the operator's
    token is not the run's): its own last audit stands."""
    if not client.status(recent=0).canary_clients:
        return None
    try:
        return client.audit()
    except AggregatorRefusedError as error:
        progress.write(f"the aggregator did not audit the last model ({error}); its last audit stands")
        return None


def _privacy_audit(out_dir: Path, final_audit: RoundSummary | None) -> dict | None:
    """The figures of the audit of the run's last model, else of the last audited round in metrics.jsonl. The last
    model's audit may sit on an earlier round than the last line's, when the last rounds failed."""
    keys = ("round", *AUDIT, *PRIVACY_SPENT)
    if final_audit is not None and final_audit.audit_epsilon is not None:
        return {key: getattr(final_audit, key) for key in keys}
    audited = [line for line in read_lines(out_dir / METRICS_FILE) if line.get("audit_epsilon") is not None]
    return {key: audited[-1][key] for key in keys} if audited else None


def _privacy_spent(client: Aggregator) -> dict[str, float | None] | None:
    status = client.status(recent=10)
    if not status.differential_privacy:
        return None
    # The delta epsilon is at: the last release's (a failed round released nothing and records none).
    delta = next((line.dp_delta for line in status.recent_rounds if line.dp_delta is not None), None)
    return {"epsilon": status.epsilon, "dp_delta": delta, "rho": status.rho}


def _recover_rounds(log: RunLog, client: Aggregator) -> None:
    """Append a line for each round the aggregator finished after the run's last line: a run stopped (Ctrl-C, a
    crash) after the aggregator committed a round and before its line was written would otherwise have no line for
    it. The aggregator's record of the round is whole; the fleet's own view of it is gone (null)."""
    lines = read_lines(log.path)
    first = next((line.get("first_round", 1) for line in lines if line["round"] == 0), 1)
    last = max(line["round"] for line in lines)
    missing = [view for view in client.status(recent=RECOVERABLE_ROUNDS).recent_rounds
               if view.round > last and view.round >= first]
    for view in missing:
        log.append(_recovered_line(view))
    if missing:
        print(f"recovered the line of round(s) {', '.join(str(view.round) for view in missing)} from the "
              "aggregator's record: the run had stopped after the aggregator finished them", flush=True)


def _round_zero(metrics_path: Path) -> dict[str, float | None]:
    """Round 0's central score of the initial model on the eval sample, as the run's first line recorded it."""
    first = next((line for line in read_lines(metrics_path) if line["round"] == 0), {})
    return {key: first.get(key) for key in EvalCounts().metrics()}


def _score_with_progress(
    model: NextWordModel, tokenizer: KeyboardTokenizer, messages: list[list[int]], show: bool,
) -> EvalCounts:
    """The final score, on every phone: minutes on a large fleet, so it has a progress bar of its own."""
    with tqdm(desc="scoring the final model on every phone's held-out messages", unit="message", disable=not show,
              dynamic_ncols=True) as progress:

        def advance(done: int, total: int) -> None:
            progress.total = total
            progress.update(done - progress.n)

        return evaluate(model, tokenizer, messages, progress=advance)


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _progress_bar(config: SimulationConfig, show: bool) -> tqdm:
    """Counts rounds, or seconds of the time budget when there is one (the rounds then show in the postfix)."""
    if config.time_budget_s is None:
        return tqdm(total=config.rounds, desc="federated rounds", unit="round", disable=not show, dynamic_ncols=True)
    return tqdm(
        total=config.time_budget_s, desc="federated training", disable=not show, dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
    )


# What the aggregator recorded of a round, copied into metrics.jsonl beside the fleet's own view.
SERVER_COUNTS = ("selected", "reported", "aborted", "dropped", "late", "bytes_up", "bytes_down")
# Privacy spent by every round up to this one: null, never 0, where nothing was measured (no differential privacy,
# or round 0): a 0 read as perfect privacy in metrics.jsonl and TensorBoard.
PRIVACY_SPENT = ("epsilon", "dp_delta", "rho")
# The aggregator's empirical privacy audit (canary clients), on the rounds it audited: null on the others.
AUDIT = ("audit_canaries_taking_part", "audit_canaries", "audit_epsilon", "audit_epsilon_low", "audit_epsilon_high",
         "audit_epsilon_lower_bound", "audit_delta", "audit_score_in", "audit_score_out")
# Word discovery (aggregator/discovery.py): the round's kind and, in a discovery round, how many voted and what it
# added (counts, never words); null without discovery.
DISCOVERY = ("round_kind", "discovery_depth", "discovery_prefixes_added", "words_discovered",
             "words_discovered_total", "discovery_epsilon", "discovery_delta")
# Federated evaluation of personal models (--personal), from the phones that scored theirs beside the global model in
# a plain round: null where none did.
PERSONAL = ("personal_helped", "personal_hurt", "personal_median_gain", "personal_recall_at_1",
            "personal_recall_at_3")
# The fleet's own view of a round, unknown for a round recovered from the aggregator's record.
FLEET_VIEW = ("participants", "eligible", "checkins", "vanished", "diverged", "refused", "survived", "sim_day",
              "sim_hour_utc", "train_loss", "local_learning_rate", "sim_ticks", "training_s", "wall_s_by_activity",
              "duration_s")
# The most finished rounds a resumed run asks the aggregator for (its /status gives at most 1,000).
RECOVERABLE_ROUNDS = 1000


def _recovered_line(server_view: RoundSummary) -> dict:
    """A round's line from the aggregator's record alone, marked `recovered`."""
    version = server_view.base_version if server_view.new_version is None else server_view.new_version
    line = _round_line(server_view.round, version, None, server_view, None, 0.0, None)
    return {**line, **dict.fromkeys(FLEET_VIEW), "examples": server_view.examples, "recovered": True}


def _round_line(
    round_number: int, version: int, report: RoundReport | None, server_view: RoundSummary | None,
    counts: EvalCounts | None, duration_s: float, learning_rate: float | None,
) -> dict:
    line = {
        "round": round_number,
        "model_version": version,
        "status": server_view.status if server_view else None,
        "failed": server_view.status == "failed" if server_view else False,
        "participants": len(report.participants) if report else 0,
        # The fleet's own view: phones eligible when the round began, and selected phones that vanished.
        "eligible": report.eligible_at_start if report else 0,
        # Check-ins the fleet made while the round was open (pace steering spreads them out).
        "checkins": report.checkins if report else 0,
        "vanished": report.count("vanished") if report else 0,
        # Selected phones whose local training diverged: they aborted instead of uploading.
        "diverged": report.count("diverged") if report else 0,
        # Selected phones whose update the aggregator refused (e.g. over its norm bound).
        "refused": report.count("refused") if report else 0,
        # The round's phones still in it when it ended (a secure round needs its threshold of them).
        "survived": report.survived if report else 0,
        "sim_day": report.day if report else 0,
        "sim_hour_utc": round(report.hour_utc, 2) if report else 0,
        **{name: getattr(server_view, name) if server_view else 0 for name in SERVER_COUNTS},
        # Differential privacy: the norm the round clipped to and, adapting it, the noisy fraction within it; and
        # the canary clients' audit of the round's model.
        **{name: getattr(server_view, name) if server_view else None
           for name in (*PRIVACY_SPENT, "dp_clip_norm", "dp_fraction_within", *AUDIT, *DISCOVERY)},
        "examples": sum(p.result.num_examples for p in report.participants if p.result) if report else 0,
        "train_loss": report.train_loss if report else None,
        "local_learning_rate": learning_rate,
        # The researcher's central score of the model this round produced (model_version), when scored...
        **(counts.metrics() if counts is not None else dict.fromkeys(EvalCounts().metrics())),
        "eval_positions": counts.positions if counts is not None else 0,
        # ...and the aggregator's federated one of the model the round started from: the phones' own counts.
        "fed_eval_model_version": server_view.base_version if server_view else None,
        "fed_eval_devices": server_view.eval_devices if server_view else 0,
        "fed_eval_positions": server_view.eval_positions if server_view else 0,
        "fed_recall_at_1": server_view.recall_at_1 if server_view else None,
        "fed_recall_at_3": server_view.recall_at_3 if server_view else None,
        "fed_personal_devices": (server_view.personal_devices or 0) if server_view else 0,
        **{f"fed_{name}": getattr(server_view, name) if server_view else None for name in PERSONAL},
        "sim_ticks": report.ticks if report else 0,
        "training_s": round(report.training_s, 3) if report else 0.0,
        # This process's wall time in the round by activity (device_sim/fleet.py's ACTIVITIES).
        "wall_s_by_activity": {k: round(v, 3) for k, v in report.wall_s.items()} if report else {},
        # The round as the aggregator timed it, and the whole iteration including scoring the model.
        "round_duration_s": round(server_view.duration_s, 3) if server_view and server_view.duration_s else None,
        "duration_s": round(duration_s, 3),
    }
    return line
