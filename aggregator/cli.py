"""`fedkb aggregator` / `python -m aggregator`: run the aggregation service."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.adaptive_clipping import default_count_stddev
from aggregator.api.protocol import ENROLMENT_SECRET_ENV, OPERATOR_TOKEN_ENV
from aggregator.mechanisms import DEFAULT_MECHANISM, MECHANISMS
from aggregator.rules import DEFAULT_RULE, RULES
from keyboard_model.arguments import (
    at_least,
    existing_file,
    fraction,
    multiple,
    network,
    new_file,
    number,
    port,
    positive_float,
    positive_int,
    probability,
    quantile,
    seconds,
)
from keyboard_model.cli_options import add_model_arguments, model_config_from_args
from keyboard_model.commands import Parser, run_command
from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

# The options' choices and defaults, written out: the modules that define them (aggregator.config, .strategies,
# keyboard_model.weights) import torch, which takes seconds, and `--help` or a refused option must answer at once.
# tests/test_cli.py checks that the options' defaults make exactly AggregatorConfig's defaults.
DB_PATH = Path("aggregator.sqlite")
HOST, PORT = "127.0.0.1", 8600
SERVER_LEARNING_RATES = {"fedadagrad": 0.03, "fedadam": 0.01, "fedavg": 1.0, "fedavgm": 0.5, "fedyogi": 0.01}
DP_MECHANISMS = tuple(MECHANISMS)
MODEL_ENCODINGS = ("float32", "int8")
TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=new_file, default=DB_PATH,
                        help="SQLite database for rounds and models (default: %(default)s)")
    parser.add_argument("--tokenizer", type=existing_file, default=None,
                        help="tokenizer.json of a prepared corpus (`fedkb aggregator`: default, the default corpus's, "
                             "prepared if needed)")
    parser.add_argument("--host", default=HOST, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port, default=PORT, help="port to listen on (default: %(default)s)")
    # A listening socket bound by the parent process (aggregator/process.py), so that no one takes the port first.
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    add_round_arguments(parser)
    add_model_arguments(parser)


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the round protocol, shared with `fedkb simulate` when it starts its own aggregator."""
    parser.add_argument("--clients-per-round", type=positive_int, default=10,
                        help="updates that close a round (default: %(default)s)")
    parser.add_argument("--round-deadline", type=seconds(1), default=300.0,
                        help="seconds after which a round closes with the updates it has (default: %(default)s)")
    parser.add_argument("--over-selection", type=multiple, default=1.3,
                        help="devices selected per round, as a multiple of the goal (default: %(default)s)")
    parser.add_argument("--min-report-fraction", type=fraction, default=0.5,
                        help="share of the goal that makes a round count at its deadline (default: %(default)s)")
    parser.add_argument("--simulated-clock", action="store_true",
                        help="run rounds on a simulator's clock, set through PUT /clock (for simulations)")
    parser.add_argument("--server-optimizer", choices=sorted(SERVER_LEARNING_RATES), default="fedavgm",
                        help="how the mean update moves the global model (default: %(default)s)")
    parser.add_argument("--server-lr", type=positive_float, default=None,
                        help="server learning rate (default: the optimiser's own: " + ", ".join(
                            f"{name} {rate:g}" for name, rate in SERVER_LEARNING_RATES.items()) + ")")
    parser.add_argument("--serving-average", type=probability, default=0.95, metavar="DECAY",
                        help="the served model (what keyboards suggest with) averages the global models with this "
                             "decay, about the last 1 / (1 - DECAY) rounds; phones train from the global model; 0 "
                             "serves the global model (default: %(default)s)")
    parser.add_argument("--aggregation-rule", choices=sorted(RULES), default=DEFAULT_RULE,
                        help="how a plain round's updates are combined: mean (FedAvg, weighted by examples), or, "
                             "robust to a few poisoned updates and unweighted, the coordinate-wise median or "
                             "trimmed_mean (Yin et al. 2018); private and secure rounds use mean "
                             "(default: %(default)s)")
    parser.add_argument("--trim-fraction", type=number(float, lambda value: 0 <= value < 0.5, "in [0, 0.5)"),
                        default=0.1,
                        help="trimmed_mean: the share of the updates dropped from each end, for each value "
                             "(default: %(default)s)")
    parser.add_argument("--max-examples", type=positive_int, default=1_000,
                        help="most examples one update may claim; more is refused (default: %(default)s)")
    parser.add_argument("--max-update-norm", type=positive_float, default=20.0,
                        help="largest L2 norm of an update; larger ones are refused (default: %(default)s)")
    parser.add_argument("--max-eval-positions", type=positive_int, default=2_000,
                        help="most predictions one device's evaluation may claim (default: %(default)s)")
    parser.add_argument("--eval-share", type=fraction, default=0.3,
                        help="share of each round's selected devices asked to score the model they download "
                             "(federated evaluation; default: %(default)s)")
    parser.add_argument("--download", choices=MODEL_ENCODINGS, default="float32",
                        help="how selected phones download the model: int8 is about a quarter of float32's bytes "
                             "(default: %(default)s)")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="run secure aggregation: the server learns only each round's sum of updates")
    parser.add_argument("--secagg-phase", type=seconds(1), default=120.0,
                        help="seconds each key, share and unmask phase waits for devices (default: %(default)s)")
    parser.add_argument("--secagg-ring-bits", type=int, choices=(8, 16, 32), default=8,
                        help="masked updates are integers modulo 2**bits; 8 is the size of an int8 update "
                             "(default: %(default)s)")
    privacy = parser.add_argument_group("differential privacy (off unless --noise-multiplier is given)")
    privacy.add_argument("--noise-multiplier", type=positive_float, default=None,
                         help="Gaussian noise on each round's sum, as a multiple of --clip-norm")
    privacy.add_argument("--clip-norm", type=positive_float, default=1.0,
                         help="L2 norm phones clip their updates to; with --clip-quantile, where it starts "
                              "(default: %(default)s)")
    privacy.add_argument("--clip-quantile", type=quantile, default=None, metavar="GAMMA",
                         help="adaptive clipping (Andrew et al. 2021): the clip norm follows this quantile of the "
                              "update norms (0.5: the median), learnt from one noised bit per phone; "
                              "--noise-multiplier then covers updates and bits together (default: a fixed clip norm)")
    privacy.add_argument("--clip-learning-rate", type=positive_float, default=0.2,
                         help="adaptive clipping: the clip norm's geometric step (default: %(default)s)")
    privacy.add_argument("--clip-count-stddev", type=positive_float, default=None,
                         help="adaptive clipping: Gaussian noise on the sum of the phones' bits; must be more than "
                              "half of --noise-multiplier (default: --clients-per-round / 20)")
    privacy.add_argument("--population", type=positive_int, default=None,
                         help="phones that could take part, for the accountant's sampling rate "
                              "(default: those enrolled)")
    privacy.add_argument("--dp-delta", type=probability, default=None,
                         help="delta at which epsilon is reported (default: 1 / population)")
    privacy.add_argument("--dp-mechanism", choices=DP_MECHANISMS, default=DEFAULT_MECHANISM,
                         help="fedavg: independent noise each round, epsilon assuming phones are sampled uniformly; "
                              "ftrl: DP-FTRL, noise correlated across rounds (BLT matrix factorisation, jax-privacy), "
                              "epsilon and rho for phones taking part at most once per --min-separation rounds, no "
                              "sampling assumed (default: %(default)s)")
    privacy.add_argument("--min-separation", type=positive_int, default=10, metavar="B",
                         help="DP-FTRL: a phone that took part in one of the last B released rounds is told to retry "
                              "later (default: %(default)s)")
    privacy.add_argument("--dp-rounds", type=positive_int, default=1000,
                         help="DP-FTRL: rounds the correlated noise is optimised for; later rounds are still noised "
                              "and accounted for (default: %(default)s)")
    audit = parser.add_argument_group(
        "empirical privacy audit", "Canary clients (Andrew et al. 2024): the aggregator inserts clients whose update "
        "is a random direction scaled to the clip norm, keeps as many directions held out, and estimates epsilon "
        "from how well the model's movement tells them apart; recorded in each audited round (audit_*).")
    audit.add_argument("--canary-clients", type=at_least(0), default=0, metavar="K",
                       help="canary clients to insert, 0 or at least 2; K more are held out (default: none)")
    audit.add_argument("--audit-every", type=positive_int, default=10, metavar="N",
                       help="estimate epsilon from the canaries after every N rounds (default: %(default)s)")
    discovery = parser.add_argument_group(
        "word discovery", "TrieHH (Zhu et al. 2020): discovery rounds in which phones vote on words the model does not "
        "know; the words enough of them vote for join the vocabulary, with (epsilon, delta)-DP and no noise.")
    discovery.add_argument("--discover-words", action="store_true",
                           help="discover new words: the vocabulary grows by the words many phones type")
    discovery.add_argument("--discover-every", type=positive_int, default=20, metavar="N",
                           help="with --discover-words: a discovery after every N training rounds (default: "
                                "%(default)s)")
    discovery.add_argument("--discovery-epsilon", type=positive_float, default=8.0,
                           help="epsilon one discovery spends; picks the threshold and sampling (default: %(default)s)")
    discovery.add_argument("--discovery-delta", type=quantile, default=1e-6,
                           help="delta one discovery spends (default: %(default)s)")
    discovery.add_argument("--discovery-max-word-length", type=number(int, lambda n: 1 <= n <= 63, "1 to 63"),
                           default=12, metavar="L",
                           help="characters of the longest word a discovery can find; it takes up to L + 1 rounds "
                                "(default: %(default)s)")
    discovery.add_argument("--discovery-theta", type=at_least(2), default=None,
                           help="votes a prefix needs to join the trie, instead of those the epsilon picks (with "
                                "--discovery-sampling-rate)")
    discovery.add_argument("--discovery-sampling-rate", type=fraction, default=None,
                           help="share of the phones asked to vote each discovery round (with --discovery-theta)")
    admission = parser.add_argument_group(
        "admission", f"Credentials come from the environment, never the command line: {OPERATOR_TOKEN_ENV} (the "
                     f"operator's token, which PUT /clock needs) and {ENROLMENT_SECRET_ENV} (the secret devices "
                     "outside the trusted networks must show to enrol).")
    admission.add_argument("--selection-window", type=seconds(0), default=10.0,
                           help="seconds of check-ins drawn from at random when selecting; 0 takes devices first "
                                "come, first served (default: %(default)s)")
    admission.add_argument("--trusted-network", type=network, action="append", default=None, metavar="CIDR",
                           help="client addresses that enrol without the secret and without rate limits; repeat for "
                                f"more, or 'none' (default: {' '.join(TRUSTED_NETWORKS)})")
    admission.add_argument("--enrolments-per-minute", type=positive_int, default=30,
                           help="enrolments per client address outside the trusted networks (default: %(default)s)")
    admission.add_argument("--checkins-per-minute", type=positive_int, default=120,
                           help="check-ins per client address outside the trusted networks (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial model (default: %(default)s)")
    parser.add_argument("--init-model", type=existing_file, default=None,
                        help="start a new database from this saved model.safetensors (default: a fresh model)")
    parser.add_argument("--keep-models", type=at_least(0), default=5, metavar="N",
                        help="model versions the database keeps, each with its optimiser state: the newest N, version "
                             "0 and those --keep-every marks; older ones are deleted as new ones are committed. 0 "
                             "keeps every version (default: %(default)s)")
    parser.add_argument("--keep-every", type=at_least(0), default=0, metavar="K",
                        help="with --keep-models, keep every version that is a multiple of K as well (default: "
                             "%(default)s, none)")


def check_round_options(args: argparse.Namespace) -> None:
    """Refuse round options that do not go together, in the options' own names, before any work (AggregatorConfig
    checks the same for code that builds it)."""
    if args.clip_norm > args.max_update_norm:
        raise UserFacingError(f"--clip-norm ({args.clip_norm}) must be at most --max-update-norm "
                              f"({args.max_update_norm})")
    if args.population is not None and args.population < args.clients_per_round:
        raise UserFacingError(f"--population ({args.population}) must be at least --clients-per-round "
                              f"({args.clients_per_round})")
    if args.aggregation_rule != DEFAULT_RULE and (args.secure_aggregation or args.noise_multiplier is not None):
        raise UserFacingError(f"--aggregation-rule {args.aggregation_rule} is for plain rounds: with "
                              f"--secure-aggregation or --noise-multiplier, rounds aggregate a sum; use {DEFAULT_RULE}")
    if args.dp_mechanism != DEFAULT_MECHANISM and args.noise_multiplier is None:
        raise UserFacingError(f"--dp-mechanism {args.dp_mechanism} needs --noise-multiplier")
    if args.clip_quantile is not None:
        if args.noise_multiplier is None:
            raise UserFacingError("--clip-quantile (adaptive clipping) needs --noise-multiplier")
        count_stddev = args.clip_count_stddev or default_count_stddev(args.clients_per_round)
        if count_stddev <= args.noise_multiplier / 2:
            raise UserFacingError(f"--clip-count-stddev ({count_stddev:g}) "
                                  "must be more than half of --noise-multiplier "
                                  f"({args.noise_multiplier}): the clipping bits would spend all the privacy it allows")
    if args.canary_clients and args.aggregation_rule != DEFAULT_RULE:
        raise UserFacingError(f"--canary-clients join the round's sum; --aggregation-rule {args.aggregation_rule} "
                              f"does not sum (a canary would be one more input to it): use {DEFAULT_RULE}")
    if args.canary_clients == 1:
        raise UserFacingError("--canary-clients must be 0 or at least 2: one canary's score cannot be told from "
                              "the held-out ones' spread")
    if args.discover_words:
        clashes = {"--secure-aggregation": args.secure_aggregation, "--canary-clients": args.canary_clients,
                   "--dp-mechanism ftrl": args.noise_multiplier is not None and args.dp_mechanism == "ftrl"}
        for option, on in clashes.items():
            if on:
                raise UserFacingError(f"--discover-words does not go with {option} yet: discovery's votes are not "
                                      "masked, and canary directions and DP-FTRL's noise keep the model's first shape")
        if (args.discovery_theta is None) != (args.discovery_sampling_rate is None):
            raise UserFacingError("give --discovery-theta and --discovery-sampling-rate together, or neither")
    if args.selection_window >= args.round_deadline:
        raise UserFacingError(f"--selection-window ({args.selection_window} s) must be shorter than --round-deadline "
                              f"({args.round_deadline} s)")


def round_settings(args: argparse.Namespace) -> dict:
    """The AggregatorConfig fields that `add_round_arguments` sets."""
    return dict(
        clients_per_round=args.clients_per_round,
        round_deadline_s=args.round_deadline,
        over_selection=args.over_selection,
        min_report_fraction=args.min_report_fraction,
        simulated_clock=args.simulated_clock,
        server_optimizer=args.server_optimizer,
        server_learning_rate=args.server_lr,
        serving_average=args.serving_average,
        aggregation_rule=args.aggregation_rule,
        trim_fraction=args.trim_fraction,
        max_examples_per_update=args.max_examples,
        max_update_norm=args.max_update_norm,
        max_eval_positions=args.max_eval_positions,
        eval_share=args.eval_share,
        download_encoding=args.download,
        secure_aggregation=args.secure_aggregation,
        secagg_phase_s=args.secagg_phase,
        secagg_ring_bits=args.secagg_ring_bits,
        noise_multiplier=args.noise_multiplier,
        clip_norm=args.clip_norm,
        clip_quantile=args.clip_quantile,
        clip_learning_rate=args.clip_learning_rate,
        clip_count_stddev=args.clip_count_stddev,
        population=args.population,
        dp_delta=args.dp_delta,
        dp_mechanism=args.dp_mechanism,
        min_separation=args.min_separation,
        dp_rounds=args.dp_rounds,
        canary_clients=args.canary_clients,
        audit_every=args.audit_every,
        discover_every=args.discover_every if args.discover_words else 0,
        discovery_epsilon=args.discovery_epsilon,
        discovery_delta=args.discovery_delta,
        discovery_max_word_length=args.discovery_max_word_length,
        discovery_theta=args.discovery_theta,
        discovery_sampling_rate=args.discovery_sampling_rate,
        seed=args.seed,
        initial_model=args.init_model,
        keep_models=args.keep_models,
        keep_every=args.keep_every,
        selection_window_s=args.selection_window,
        trusted_networks=tuple(n for n in args.trusted_network or TRUSTED_NETWORKS if n != "none"),
        enrolments_per_minute=args.enrolments_per_minute,
        checkins_per_minute=args.checkins_per_minute,
        operator_token=os.environ.get(OPERATOR_TOKEN_ENV) or None,
        enrolment_secret=os.environ.get(ENROLMENT_SECRET_ENV) or None,
    )


def config_from_args(args: argparse.Namespace, tokenizer_path: Path) -> AggregatorConfig:
    from aggregator.config import AggregatorConfig
    from keyboard_model.tokenizer import KeyboardTokenizer

    tokenizer = KeyboardTokenizer.from_file(tokenizer_path)
    return AggregatorConfig(
        db_path=args.db,
        tokenizer_path=tokenizer_path,
        model=model_config_from_args(args, tokenizer.vocab_size),
        host=args.host,
        port=args.port,
        **round_settings(args),
    )


def listener_from_args(args: argparse.Namespace) -> socket.socket:
    """The socket to serve on: the parent's (--listen-fd), else `--host`:`--port` bound now, before any other work."""
    from keyboard_model.serving import bind

    if args.listen_fd is not None:
        return socket.socket(fileno=args.listen_fd)
    return bind(args.host, args.port)


def run(args: argparse.Namespace, listener: socket.socket | None = None) -> int:
    import torch

    from aggregator.app import create_app
    from keyboard_model.serving import bound_port, serve

    check_round_options(args)
    with listener or listener_from_args(args) as bound:
        if args.tokenizer is None:
            raise UserFacingError("give the corpus's tokenizer with --tokenizer (`fedkb aggregator` prepares the "
                                  "default corpus's when none is given)")
        config = config_from_args(args, args.tokenizer)
        # Uploads are checked and summed on several request threads at once; one torch thread each
        # keeps them from fighting over the cores (measured: more updates per second).
        torch.set_num_threads(1)
        app = create_app(config)
        print(f"aggregator: serving on http://{config.host}:{bound_port(bound)} with database {config.db_path}",
              flush=True)
        serve(app, bound)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m aggregator", description=__doc__)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))
