"""`fedkb data`, `fedkb eval` and the phones' side of `fedkb simulate` (also `python -m device_sim ...`).

On its own, `python -m device_sim simulate` drives a fleet against a running aggregator
(`--aggregator URL`); `fedkb simulate` (fedkb/composition.py) can also start one, or run
the aggregator in process."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from device_sim.corpus import CorpusConfig, default_data_dir, prepare
from device_sim.executors import EXECUTORS, default_executor
from device_sim.run_record import RUN_RECORD, RunRecord, corpus_checksum, start_record
from keyboard_model.arguments import (
    at_least,
    existing_file,
    folder,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
)
from keyboard_model.commands import main_for
from keyboard_model.config_file import as_arguments
from keyboard_model.errors import UserFacingError
from keyboard_model.tokenizer import SPECIAL_TOKENS

# The phones' modules import torch, which takes seconds: each command imports them when it runs, so that `--help`
# and a refused option answer at once.
if TYPE_CHECKING:
    from aggregator.api.client import AggregatorClient
    from aggregator.api.protocol import Aggregator
    from device_sim.canaries import CanaryConfig
    from device_sim.comparison import TableRow
    from device_sim.corpus import PreparedCorpus
    from device_sim.executors import ExecutorFactory
    from device_sim.simulation import SimulationConfig, SimulationSummary

# The options' choices and defaults, written out for the same reason: the modules that define them (the
# LocalTrainConfig, FleetConfig, SimulationConfig and ComparisonConfig dataclasses, device_sim.vectorised,
# keyboard_model.update_codec) import torch. tests/test_cli.py checks that they make those defaults.
DEFAULT_PHONES_PER_PASS = {"cpu": 32, "cuda": 512}
UPDATE_COMPRESSIONS = ("int8", "none")
SERVER_EPOCHS = ORACLE_EPOCHS = 20
# device_sim.canaries.CanaryConfig's and keyboard_model.exposure.CanaryFormat's (tests/test_canary_phrases.py).
CANARY_REPEATS = (1, 4, 16)
CANARY_LENGTH = 5


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("corpus")
    group.add_argument("--data-dir", type=folder, default=None,
                       help="cache for downloads and prepared corpora "
                            "(default: $FEDKB_DATA_DIR or ~/.cache/fedkeyboard)")
    group.add_argument("--corpus", type=existing_file, default=None,
                       help='your own corpus: JSONL lines {"user": ..., "text": ..., "ts": ...} '
                            '(default: Shakespeare by role)')
    group.add_argument("--proxy-text", type=existing_file, default=None,
                       help="public text (one line each) to build the tokenizer from, with --corpus "
                            "(default: Shakespeare's proxy split)")
    group.add_argument("--min-messages", type=positive_int, default=20,
                       help="fewest messages that make a user a phone (default: %(default)s)")
    group.add_argument("--vocab-size", type=at_least(len(SPECIAL_TOKENS) + 1), default=10_000,
                       help="tokenizer vocabulary, special tokens included (default: %(default)s)")


def corpus_config_from_args(args: argparse.Namespace) -> CorpusConfig:
    return CorpusConfig(
        data_dir=args.data_dir or default_data_dir(), user_corpus=args.corpus, proxy_text=args.proxy_text,
        min_messages=args.min_messages, vocab_size=args.vocab_size,
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    add_corpus_arguments(parser)
    parser.add_argument("--force", action="store_true", help="prepare again even if a cached copy is valid")


def run_data(args: argparse.Namespace) -> int:
    corpus = prepare(corpus_config_from_args(args), force=args.force)
    built = corpus.manifest["vocab_size"]
    if built < args.vocab_size:
        print(f"note: the public proxy lines hold only {built:,} distinct words (special tokens included), so the "
              f"vocabulary has {built:,} of the --vocab-size {args.vocab_size:,} asked for", file=sys.stderr)
    print(json.dumps({"path": str(corpus.path), **{k: v for k, v in corpus.manifest.items() if k != "sha256"}},
                     indent=2))
    return 0


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("on-device training")
    group.add_argument("--epochs", type=positive_int, default=1, help="local epochs per round (default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=16, help="local batch size (default: %(default)s)")
    group.add_argument("--lr", type=positive_float, default=1.0, help="local SGD learning rate (default: %(default)s)")
    group.add_argument("--seq-len", type=at_least(2), default=20, help="tokens per training row (default: %(default)s)")
    group.add_argument("--max-messages", type=positive_int, default=400,
                       help="newest training messages a phone uses per round (default: %(default)s)")
    group.add_argument("--prox-mu", type=non_negative_float, default=0.0, metavar="MU",
                       help="FedProx: phones add MU/2 * ||w - w_global||^2 to their loss, pulling their training "
                            "towards the model they downloaded (default: %(default)s, plain SGD)")
    group.add_argument("--update-compression", choices=UPDATE_COMPRESSIONS, default="int8",
                       help="how phones encode their updates (default: %(default)s)")


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """What a simulation run needs besides its aggregator: the fleet, its training and its corpus."""
    parser.add_argument("--out", type=folder, default=Path("runs/simulate"),
                        help="folder for phones, metrics.jsonl and the final model (default: %(default)s)")
    parser.add_argument("--phones", type=positive_int, default=None,
                        help="phones to provision (default: one per corpus user)")
    parser.add_argument("--rounds", type=positive_int, default=10,
                        help="federated training rounds to run; --discover-words's rounds come on top (default: "
                             "%(default)s)")
    parser.add_argument("--time-budget", type=positive_float, default=None,
                        help="seconds of rounds, counted from the first round (after provisioning): no round starts "
                             "after them, and the final scoring follows")
    parser.add_argument("--eval-phones", type=positive_int, default=32,
                        help="phones whose held-out messages score the model centrally (default: %(default)s)")
    parser.add_argument("--eval-every", type=positive_int, default=1, metavar="N",
                        help="score the model on the --eval-phones sample after every N rounds; the phones' own "
                             "(federated) score comes every round (default: %(default)s)")
    parser.add_argument("--lr-steps", type=lr_step, nargs="+", default=[], metavar="FRACTION:LR",
                        help="from this fraction of the run (of --time-budget if given, else of --rounds) on, phones "
                             "train at this local learning rate, e.g. --lr-steps 0.7:0.3 0.85:0.1 (default: --lr "
                             "throughout)")
    group = parser.add_argument_group("the simulated fleet")
    group.add_argument("--minutes-per-message", type=positive_float, default=0.05,
                       help="simulated training time per message of a phone of average speed (default: %(default)s)")
    group.add_argument("--vanish-probability", type=probability, default=0.03,
                       help="chance that a selected phone loses its network for the round (default: %(default)s)")
    group.add_argument("--typing-days", type=non_negative_float, default=7.0,
                       help="simulated days over which the second half of each history is typed (default: %(default)s)")
    group.add_argument("--workers", type=positive_int, default=None,
                       help="processes training phones side by side, one thread each (default: one per core)")
    defaults = "; ".join(f"{default_executor(device)} on {device}" for device in ("cpu", "cuda"))
    group.add_argument("--executor", choices=list(EXECUTORS), default=None,
                       help="where phones train: "
                            + "; ".join(f"{name}, {executor.summary}" for name, executor in EXECUTORS.items())
                            + f" (default: {defaults}; device_sim/executors.py says why)")
    group.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                       help="with --executor ray: the cluster's head, as `ray start --head` prints it "
                            "(default: the Ray that `ray start` runs on this machine, else one started for the run)")
    group.add_argument("--device", type=vectorised_device, default="cpu", metavar="{cpu,cuda}",
                       help="cpu or cuda: where phones train "
                            "(cuda: with the vectorised executor; default: %(default)s)")
    group.add_argument("--phones-per-pass", type=positive_int, default=None,
                       help="most phones --executor vectorised trains in one batched pass "
                            f"(default: {DEFAULT_PHONES_PER_PASS['cpu']} on cpu, "
                            f"{DEFAULT_PHONES_PER_PASS['cuda']} on cuda)")
    group.add_argument("--personal", action="store_true",
                       help="phones keep a personal model: the global model fine-tuned on their own history "
                            "(keyboard_model/personal.py), refreshed in the rounds they are asked to score, kept in "
                            "their folder and never uploaded; in plain rounds they report its recall beside the "
                            "global model's, and each round records the share of phones it helped and hurt and the "
                            "median gain (default: off)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    canaries = parser.add_argument_group(
        "privacy audit: canary phrases",
        "Canary phrases, the Secret Sharer way (Carlini et al. 2019): random secrets (\"my secret number is\" and "
        "number words) typed into chosen phones' histories before the first round, as many held out and never typed; "
        "at the end, how much the model memorised each (its exposure) and whether the keyboard would suggest it. "
        "canaries.json in --out records them; `fedkb audit RUN` reports on them.")
    canaries.add_argument("--canaries", type=positive_int, default=None, metavar="N",
                          help="canary phrases to plant (default: none)")
    canaries.add_argument("--canary-repeats", type=positive_int, nargs="+", default=list(CANARY_REPEATS),
                          metavar="R", help="times a canary is typed by each of its phones; the canaries cycle "
                                            "through these levels (default: %(default)s)")
    canaries.add_argument("--canary-phones", type=positive_int, default=1, metavar="P",
                          help="phones that type each canary, each phone typing one canary at most "
                               "(default: %(default)s)")
    canaries.add_argument("--canary-length", type=positive_int, default=CANARY_LENGTH, metavar="L",
                          help="number words (one to ten) in a secret: 10^L possible secrets, scored whole up to "
                               "10^4 and estimated from a sample beyond (default: %(default)s)")
    add_corpus_arguments(parser)
    add_training_arguments(parser)


def simulation_config_from_args(args: argparse.Namespace) -> SimulationConfig:
    from device_sim.eligibility import EligibilityConfig
    from device_sim.fleet import FleetConfig
    from device_sim.simulation import SimulationConfig
    from keyboard_model.personal import PersonalConfig
    from keyboard_model.train import LocalTrainConfig

    train = LocalTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        sequence_length=args.seq_len, max_messages=args.max_messages, proximal_mu=args.prox_mu,
    )
    fleet = FleetConfig(
        phones_dir=args.out / "phones", num_phones=args.phones, train=train,
        eligibility=EligibilityConfig(seed=args.seed), eval_phones=args.eval_phones, seed=args.seed,
        update_compression=args.update_compression, minutes_per_message=args.minutes_per_message,
        vanish_probability=args.vanish_probability, typing_days=args.typing_days, workers=args.workers,
        personal=PersonalConfig() if args.personal else None,
    )
    return SimulationConfig(out_dir=args.out, rounds=args.rounds, fleet=fleet, time_budget_s=args.time_budget,
                            eval_every=args.eval_every, lr_steps=tuple(map(_lr_step_values, args.lr_steps)),
                            canaries=canary_config_from_args(args))


def canary_config_from_args(args: argparse.Namespace) -> CanaryConfig | None:
    from device_sim.canaries import CanaryConfig
    from keyboard_model.exposure import CanaryFormat

    if args.canaries is None:
        if (tuple(args.canary_repeats), args.canary_phones, args.canary_length) != (CANARY_REPEATS, 1, CANARY_LENGTH):
            raise UserFacingError("--canary-repeats, --canary-phones and --canary-length go with --canaries N")
        return None
    try:
        return CanaryConfig(count=args.canaries, repetitions=tuple(args.canary_repeats),
                            phones_per_canary=args.canary_phones, seed=args.seed,
                            format=CanaryFormat(length=args.canary_length))
    except ValueError as error:
        raise UserFacingError(f"--canaries {args.canaries} with --canary-length {args.canary_length}: "
                              f"{error}") from None


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", required=True, help="URL of a running aggregator")
    add_fleet_arguments(parser)


def simulate_with(args: argparse.Namespace, corpus: PreparedCorpus, client: Aggregator) -> SimulationSummary:
    from device_sim.simulation import run_simulation

    return run_simulation(corpus, simulation_config_from_args(args), client, show_progress=not args.no_progress,
                          executor=executor_from_args(args))


def lr_step(text: str) -> str:
    """`--lr-steps`' FRACTION:LR, checked where it is parsed and kept as text, as a run record writes it back."""
    try:
        fraction, rate = _lr_step_values(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FRACTION:LR such as 0.7:0.3, got {text!r}") from None
    if not 0.0 <= fraction < 1.0 or not rate > 0:
        raise argparse.ArgumentTypeError(f"the fraction must be in [0, 1) and the rate positive, got {text!r}")
    return text


def _lr_step_values(text: str) -> tuple[float, float]:
    fraction, rate = (float(part) for part in text.split(":"))
    return fraction, rate


def vectorised_device(name: str) -> str:
    """`--device`'s value, refused where it is parsed if this machine cannot train there."""
    from device_sim.vectorised import check_device

    try:
        check_device(name)
    except UserFacingError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def executor_from_args(args: argparse.Namespace) -> ExecutorFactory:
    """What builds the training executor that `--executor`, `--device`, `--workers`, `--phones-per-pass` and
    `--ray-address` ask for; options that do not go together are refused here, before any phone is provisioned."""
    from device_sim.executors import ExecutorSettings, chosen_executor, make_executor

    settings = ExecutorSettings(args.device, args.workers, args.phones_per_pass, args.ray_address)
    return partial(make_executor, chosen_executor(args.executor, settings).name, settings=settings)


def remote_client(url: str) -> AggregatorClient:
    """A client of another's aggregator: its clock is ours to set only if its operator gave us the token."""
    from aggregator.api.client import AggregatorClient
    from aggregator.api.protocol import OPERATOR_TOKEN_ENV

    return AggregatorClient(url, operator_token=os.environ.get(OPERATOR_TOKEN_ENV) or None)


def run_simulate(args: argparse.Namespace) -> int:
    corpus = prepare(corpus_config_from_args(args))
    start_record(args.out, "python -m device_sim simulate",
                 {k: v for k, v in vars(args).items() if k not in ("run", "command")},
                 corpus)
    with closing(remote_client(args.aggregator)) as client:
        summary = simulate_with(args, corpus, client)
    finish(summary, corpus, args)
    return 0


def finish(summary: SimulationSummary, corpus: PreparedCorpus, args: argparse.Namespace,
           reference_rounds: int | None = None) -> None:
    """A run's end: the reference rows scored (`summary_baselines`) and kept in summary.json beside the model's
    score, for the dashboard, then the last screen (`print_summary`)."""
    from device_sim.simulation import write_summary

    baselines = summary_baselines(corpus, args.out, not args.no_progress)
    summary = replace(summary, baselines=[row.to_dict() for row in baselines])
    write_summary(args.out, summary)
    print_summary(summary, args.out, baselines, args.time_budget, reference_rounds)


def summary_baselines(corpus: PreparedCorpus, out_dir: Path, show_progress: bool) -> list[TableRow]:
    """The n-gram's and the most frequent words' rows on the held-out messages of the run's phones (those the
    summary scores the federated model on), computed once per corpus and cached in its folder."""
    from device_sim.comparison import cheap_rows
    from device_sim.fleet import provisioned_phones
    from keyboard_model.tokenizer import KeyboardTokenizer

    tokenizer = KeyboardTokenizer.from_file(out_dir / "tokenizer.json")
    held_out = [message for phone in provisioned_phones(out_dir / "phones") for message in phone.held_out(tokenizer)]
    return cheap_rows(tokenizer, tokenizer.encode_batch(corpus.proxy_lines()), held_out, corpus.path,
                      show_progress=show_progress)


def print_summary(
    summary: SimulationSummary, out_dir: Path, baselines: Sequence[TableRow], time_budget_s: float | None = None,
    reference_rounds: int | None = None,
) -> None:
    """The run's last screen: the federated model beside the n-gram and the most frequent words (`baselines`,
    `summary_baselines`), its ratio to the n-gram against the target, Gboard's figures for scale, and how many
    rounds the run had (against `reference_rounds`, the README's run of the same command, if given)."""
    from device_sim.comparison import GBOARD_FEDERATED, GBOARD_NGRAM, NGRAM_ROW, TARGET_RATIO

    def row(name: str, top1: float | None, top3: float | None, note: str = "") -> str:
        return f"  {name:<44} {_percent(top1)}  {_percent(top3)}{note}"

    failed = f" ({summary.rounds_failed} failed)" if summary.rounds_failed else ""
    budget = "" if time_budget_s is None else f" in the {time_budget_s:.0f} s budget"
    reference = ("" if reference_rounds is None
                 else f" ({reference_rounds} in the README's run on a quiet 2-core machine)")
    rounds = "1 round" if summary.rounds_completed == 1 else f"{summary.rounds_completed} rounds"
    print(f"\n{rounds}{failed}{budget}{reference}, model version {summary.model_version}, "
          f"{summary.wall_time_s:.0f} s")
    spent = summary.privacy_spent
    if spent is not None and spent["epsilon"] is not None:
        rho = "" if spent["rho"] is None else f" (rho-zCDP {spent['rho']:.4g})"
        delta = "" if spent["dp_delta"] is None else f" at delta {spent['dp_delta']:.1e}"
        print(f"differential privacy spent: epsilon {spent['epsilon']:,.4g}{delta}{rho}")
    if summary.privacy_audit is not None:
        from device_sim.canaries import canary_client_lines

        print("\n".join(canary_client_lines(summary.privacy_audit)))
    if summary.rounds_completed and summary.rounds_failed == summary.rounds_completed:
        print("  no round of this run closed: the model is the one it started from (see metrics.jsonl's failures)")
    print(f"held-out recall over {summary.eval_positions:,} next-word positions of every phone:")
    print(f"  {'keyboard':<44} {'top-1':>7}  {'top-3':>7}")
    for baseline in baselines:
        print(row(baseline.model, baseline.counts.recall_at_1, baseline.counts.recall_at_3))
    ngram = next(b.counts.recall_at_1 for b in baselines if b.model == NGRAM_ROW)
    federated = summary.final["recall_at_1"]
    ratio = "" if federated is None or not ngram else f"   {federated / ngram:.2f}x the n-gram's top-1"
    print(row("federated model", federated, summary.final["recall_at_3"], ratio))
    print(row(f"target: {TARGET_RATIO}x the n-gram's top-1, as Gboard's", TARGET_RATIO * ngram, None))
    print(row("Gboard's federated CIFG (Hard et al. 2018)", *GBOARD_FEDERATED,
              f"   {GBOARD_FEDERATED[0] / GBOARD_NGRAM[0]:.2f}x its n-gram's {100 * GBOARD_NGRAM[0]:.1f}%; "
              "for scale: real traffic, ~3,000 rounds"))
    if summary.canaries is not None:
        from device_sim.canaries import report_lines

        print("\n".join(report_lines(summary.canaries)))
    print(f"metrics: {out_dir / 'metrics.jsonl'} (TensorBoard: {out_dir / 'tensorboard'}); "
          f"model: {out_dir / 'model.safetensors'}\n"
          "the table with the server-trained and oracle models (tens of minutes the first time): "
          f"fedkb eval {out_dir} --table")


def _percent(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{100 * value:6.2f}%"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=folder, nargs="?", default=None, metavar="RUN",
                        help="a run's folder (fedkb simulate --out): its model, tokenizer, phones and corpus "
                             "(default: the folder of --model)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a saved model.safetensors (default: RUN/model.safetensors, else "
                             "runs/simulate/model.safetensors)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="its tokenizer.json (default: beside the model)")
    parser.add_argument("--phones-dir", type=Path, default=None,
                        help="phones whose held-out messages to score (default: the phones folder beside the model)")
    table = parser.add_argument_group("the comparison table (--table)")
    table.add_argument("--table", action="store_true",
                       help="compare with an n-gram, a server-trained and a centrally trained (oracle) model; "
                            "written to table.json beside the model too (the dashboard shows it)")
    table.add_argument("--beside", type=existing_file, action="append", default=[], metavar="MODEL",
                       help="another federated run's model.safetensors (e.g. the other --architecture, run on the same "
                            "phones), shown with its own server and oracle rows; may be repeated")
    table.add_argument("--baselines-dir", type=folder, default=None,
                       help="cache of the trained baselines (default: a baselines folder beside the model)")
    table.add_argument("--server-epochs", type=positive_int, default=SERVER_EPOCHS,
                       help="passes over the proxy split for the server model (default: %(default)s)")
    table.add_argument("--oracle-epochs", type=positive_int, default=ORACLE_EPOCHS,
                       help="passes over the pooled phone messages for the oracle (default: %(default)s)")
    add_corpus_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from device_sim.comparison import TABLE_FILE, ComparisonConfig, comparison_table, markdown_table
    from device_sim.fleet import evaluate_phones, provisioned_phones
    from device_sim.run_log import json_safe
    from keyboard_model.files import write_atomically
    from keyboard_model.tokenizer import KeyboardTokenizer
    from keyboard_model.weights import model_from_bytes

    model_path = args.model or (args.run_dir or Path("runs/simulate")) / "model.safetensors"
    run_dir = model_path.parent
    tokenizer_path = args.tokenizer or run_dir / "tokenizer.json"
    phones_dir = args.phones_dir or run_dir / "phones"
    for path in (model_path, tokenizer_path, phones_dir / "fleet.json", *args.beside):
        if not path.exists():
            raise UserFacingError(f"{path} does not exist (run `fedkb simulate` first, or pass its path)")
    model, version = model_from_bytes(model_path.read_bytes())
    tokenizer = KeyboardTokenizer.from_file(tokenizer_path)
    phones = provisioned_phones(phones_dir)
    if args.table:
        config = ComparisonConfig(
            baselines_dir=args.baselines_dir or run_dir / "baselines",
            server_epochs=args.server_epochs, oracle_epochs=args.oracle_epochs,
        )
        corpus = _run_corpus(run_dir, args)
        beside = [model_from_bytes(path.read_bytes())[0] for path in args.beside]
        for path, other in zip(args.beside, beside):
            if other.config.vocab_size != tokenizer.vocab_size:  # one table scores every model with one tokenizer
                raise UserFacingError(f"--beside {path} has a vocabulary of {other.config.vocab_size} tokens, the "
                                      f"run's tokenizer {tokenizer.vocab_size}: compare models of one vocabulary")
        # The run's tokenizer.json has grown beyond the corpus's when the run discovered words.
        rows = comparison_table(model, tokenizer, phones, corpus.proxy_lines(), config, beside=beside,
                                corpus_vocab_size=corpus.tokenizer().vocab_size)
        table = {"model_version": version, "rows": [row.to_dict() for row in rows]}
        write_atomically(run_dir / TABLE_FILE, (json.dumps(json_safe(table), indent=2) + "\n").encode())
        print(markdown_table(rows))
        return 0
    counts = evaluate_phones(model, tokenizer, phones)
    print(json.dumps({"model_version": version, "phones": len(phones), "positions": counts.positions,
                      **counts.metrics()}, indent=2))
    return 0


def _run_corpus(run_dir: Path, args: argparse.Namespace) -> PreparedCorpus:
    """The corpus the run in `run_dir` was made on, as its run record says; the corpus options only for runs
    without a record."""
    record = RunRecord.read(run_dir)
    if record is None:
        return prepare(corpus_config_from_args(args))
    if any(getattr(args, name) is not None for name in ("corpus", "proxy_text", "data_dir")):
        raise UserFacingError(f"{run_dir / RUN_RECORD} says which corpus the run was made on; "
                              "leave out --corpus, --proxy-text and --data-dir")
    corpus_parser = argparse.ArgumentParser()
    add_corpus_arguments(corpus_parser)
    recorded = {name: value for name, value in record.options.items() if name in vars(corpus_parser.parse_args([]))}
    corpus = prepare(corpus_config_from_args(
        corpus_parser.parse_args(as_arguments(corpus_parser, recorded, run_dir / RUN_RECORD))))
    if corpus_checksum(corpus) != record.corpus_checksum:
        raise UserFacingError(f"the corpus at {corpus.path} is not the one {run_dir} was made on "
                              f"(checksum {record.corpus_checksum[:12]} recorded); prepare it again with the "
                              f"recorded options")
    return corpus


DATA_COMMAND = ("data", add_data_arguments, run_data, "fetch and prepare a corpus (cached)")
SIMULATE_COMMAND = (
    "simulate", add_simulate_arguments, run_simulate,
    "provision phones and run federated rounds; writes metrics.jsonl and the final model into --out",
)
EVAL_COMMAND = ("eval", add_eval_arguments, run_eval, "score a saved model on phones' held-out messages")
COMMANDS = (DATA_COMMAND, SIMULATE_COMMAND, EVAL_COMMAND)


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m device_sim", "Simulated phones, their corpus and federated runs.", COMMANDS, argv)
