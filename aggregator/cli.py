"""`fedkb aggregator` / `python -m aggregator`: run the aggregation service."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from aggregator.app import create_app
from aggregator.api.protocol import ENROLMENT_SECRET_ENV, OPERATOR_TOKEN_ENV
from aggregator.config import AggregatorConfig
from keyboard_model.serving import serve
from aggregator.strategy import STRATEGIES
from keyboard_model.cli_options import add_model_arguments, model_config_from_args
from keyboard_model.commands import run_command
from keyboard_model.errors import UserFacingError
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.weights import MODEL_ENCODINGS

DEFAULTS = AggregatorConfig(db_path=Path("aggregator.sqlite"), tokenizer_path=Path("tokenizer.json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, default=DEFAULTS.db_path, help="SQLite database for rounds and models (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json of a prepared corpus (`fedkb aggregator`: default, the default corpus's, "
                             "prepared if needed)")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULTS.port, help="port to listen on (default: %(default)s)")
    add_round_arguments(parser)
    add_model_arguments(parser)


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the round protocol, shared with `fedkb simulate` when it starts its own aggregator."""
    parser.add_argument("--clients-per-round", type=int, default=DEFAULTS.clients_per_round,
                        help="updates that close a round (default: %(default)s)")
    parser.add_argument("--round-deadline", type=float, default=DEFAULTS.round_deadline_s,
                        help="seconds after which a round closes with the updates it has (default: %(default)s)")
    parser.add_argument("--over-selection", type=float, default=DEFAULTS.over_selection,
                        help="devices selected per round, as a multiple of the goal (default: %(default)s)")
    parser.add_argument("--min-report-fraction", type=float, default=DEFAULTS.min_report_fraction,
                        help="share of the goal that makes a round count at its deadline (default: %(default)s)")
    parser.add_argument("--simulated-clock", action="store_true",
                        help="run rounds on a simulator's clock, set through PUT /clock (for simulations)")
    parser.add_argument("--server-optimizer", choices=sorted(STRATEGIES), default=DEFAULTS.server_optimizer,
                        help="how the mean update moves the global model (default: %(default)s)")
    parser.add_argument("--server-lr", type=float, default=None,
                        help="server learning rate (default: the optimiser's own: fedavg 1.0, fedavgm 0.5, fedadam 0.01)")
    parser.add_argument("--max-examples", type=int, default=DEFAULTS.max_examples_per_update,
                        help="most examples one update may claim; more is refused (default: %(default)s)")
    parser.add_argument("--max-update-norm", type=float, default=DEFAULTS.max_update_norm,
                        help="largest L2 norm of an update; larger ones are refused (default: %(default)s)")
    parser.add_argument("--max-eval-positions", type=int, default=DEFAULTS.max_eval_positions,
                        help="most predictions one device's evaluation may claim (default: %(default)s)")
    parser.add_argument("--download", choices=MODEL_ENCODINGS, default=DEFAULTS.download_encoding,
                        help="how selected phones download the model: int8 is about a quarter of float32's bytes "
                             "(default: %(default)s)")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="run secure aggregation: the server learns only each round's sum of updates")
    parser.add_argument("--secagg-phase", type=float, default=DEFAULTS.secagg_phase_s,
                        help="seconds each key, share and unmask phase waits for devices (default: %(default)s)")
    parser.add_argument("--secagg-ring-bits", type=int, choices=(8, 16, 32), default=DEFAULTS.secagg_ring_bits,
                        help="masked updates are integers modulo 2**bits; 8 is the size of an int8 update "
                             "(default: %(default)s)")
    privacy = parser.add_argument_group("differential privacy (off unless --noise-multiplier is given)")
    privacy.add_argument("--noise-multiplier", type=float, default=None,
                         help="Gaussian noise on each round's sum, as a multiple of --clip-norm")
    privacy.add_argument("--clip-norm", type=float, default=DEFAULTS.clip_norm,
                         help="L2 norm phones clip their updates to (default: %(default)s)")
    privacy.add_argument("--population", type=int, default=None,
                         help="phones that could take part, for the accountant's sampling rate (default: those enrolled)")
    privacy.add_argument("--dp-delta", type=float, default=None,
                         help="delta at which epsilon is reported (default: 1 / population)")
    admission = parser.add_argument_group(
        "admission", f"Credentials come from the environment, never the command line: {OPERATOR_TOKEN_ENV} (the "
                     f"operator's token, which PUT /clock needs) and {ENROLMENT_SECRET_ENV} (the secret devices "
                     "outside the trusted networks must show to enrol).")
    admission.add_argument("--selection-window", type=float, default=DEFAULTS.selection_window_s,
                           help="seconds of check-ins drawn from at random when selecting; 0 takes devices first "
                                "come, first served (default: %(default)s)")
    admission.add_argument("--trusted-network", action="append", default=None, metavar="CIDR",
                           help="client addresses that enrol without the secret and without rate limits; repeat for "
                                f"more, or 'none' (default: {' '.join(DEFAULTS.trusted_networks)})")
    admission.add_argument("--enrolments-per-minute", type=int, default=DEFAULTS.enrolments_per_minute,
                           help="enrolments per client address outside the trusted networks (default: %(default)s)")
    admission.add_argument("--checkins-per-minute", type=int, default=DEFAULTS.checkins_per_minute,
                           help="check-ins per client address outside the trusted networks (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the initial model (default: %(default)s)")
    parser.add_argument("--init-model", type=Path, default=None,
                        help="start a new database from this saved model.safetensors (default: a fresh model)")


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
        max_examples_per_update=args.max_examples,
        max_update_norm=args.max_update_norm,
        max_eval_positions=args.max_eval_positions,
        download_encoding=args.download,
        secure_aggregation=args.secure_aggregation,
        secagg_phase_s=args.secagg_phase,
        secagg_ring_bits=args.secagg_ring_bits,
        noise_multiplier=args.noise_multiplier,
        clip_norm=args.clip_norm,
        population=args.population,
        dp_delta=args.dp_delta,
        seed=args.seed,
        initial_model=args.init_model,
        selection_window_s=args.selection_window,
        trusted_networks=tuple(n for n in args.trusted_network or DEFAULTS.trusted_networks if n != "none"),
        enrolments_per_minute=args.enrolments_per_minute,
        checkins_per_minute=args.checkins_per_minute,
        operator_token=os.environ.get(OPERATOR_TOKEN_ENV) or None,
        enrolment_secret=os.environ.get(ENROLMENT_SECRET_ENV) or None,
    )


def config_from_args(args: argparse.Namespace, tokenizer_path: Path) -> AggregatorConfig:
    tokenizer = KeyboardTokenizer.from_file(tokenizer_path)
    return AggregatorConfig(
        db_path=args.db,
        tokenizer_path=tokenizer_path,
        model=model_config_from_args(args, tokenizer.vocab_size),
        host=args.host,
        port=args.port,
        **round_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    if args.tokenizer is None:
        raise UserFacingError("give the corpus's tokenizer with --tokenizer (`fedkb aggregator` prepares the default "
                              "corpus's when none is given)")
    config = config_from_args(args, args.tokenizer)
    # Uploads are checked and summed on several request threads at once; one torch thread each
    # keeps them from fighting over the cores (measured: more updates per second).
    torch.set_num_threads(1)
    print(f"aggregator: serving on http://{config.host}:{config.port} with database {config.db_path}", flush=True)
    serve(create_app(config), config.host, config.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator", description=__doc__)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))
