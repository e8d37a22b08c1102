"""How a run is put together: which aggregator the phones talk to, through which client, on which tokenizer.

The phones (`device_sim`) and the server (`aggregator`) know each other only through
the wire contract (`aggregator/api/`); this module joins them. `fedkb simulate` runs
its fleet against a running aggregator (`--aggregator URL`), against one it starts on
loopback for the run, or against the aggregator's round code in this process
(`--in-process`); `fedkb aggregator` serves the default corpus's tokenizer unless told
another.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator import cli as aggregator_cli
from device_sim import cli as device_cli
from device_sim.corpus import CorpusConfig, PreparedCorpus, prepare
from device_sim.run_record import start_record
from keyboard_model.cli_options import add_model_arguments, model_config_from_args
from keyboard_model.commands import add_config_argument
from keyboard_model.errors import UserFacingError

if TYPE_CHECKING:
    from device_sim.simulation import SimulationSummary

# The experiments shipped with the package (package data), named by `--config NAME`.
EXPERIMENTS = Path(__file__).with_name("experiments")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, EXPERIMENTS)
    parser.add_argument("--aggregator", default=None,
                        help="URL of a running aggregator (default: start one on loopback for this run)")
    parser.add_argument("--in-process", action="store_true",
                        help="call the aggregator's round code directly instead of over HTTP (faster research runs)")
    device_cli.add_fleet_arguments(parser)
    # The round options, for when the simulation starts its own aggregator (on simulated time).
    aggregator_cli.add_round_arguments(parser)
    # Simulated seconds: an hour, six ticks, lets slow phones at the edge of the night report.
    parser.set_defaults(round_deadline=3600.0)
    add_model_arguments(parser)
    # The aggregator's --seed seeds its initial model; a simulation hands the same seed to its fleet.
    seed = next(action for action in parser._actions if action.dest == "seed")
    seed.help = ("seeds everything random in the run: the initial model (unless --init-model), which users become "
                 "phones, their eligibility and speed, each phone's training batches, and the central evaluation "
                 "sample (default: %(default)s)")


def simulation_options(args: argparse.Namespace) -> dict[str, object]:
    """The options of `fedkb simulate` among `args` (`fedkb up` adds the demo's): what a run record holds."""
    names = vars(_simulate_parser().parse_args([]))
    return {name: value for name, value in vars(args).items() if name in names and name != "config"}


def _simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser


def check_simulate_options(args: argparse.Namespace) -> None:
    """Refuse options that do not go together, before any work."""
    if args.aggregator is not None and args.in_process:
        raise UserFacingError("--in-process runs its own aggregator; it cannot be combined with --aggregator")
    device_cli.executor_from_args(args)  # refuses --executor, --device and --phones-per-pass that do not go together
    device_cli.canary_config_from_args(args)  # refuses canary options that do not go together
    aggregator_cli.check_round_options(args)


def simulate(args: argparse.Namespace, corpus: PreparedCorpus, stack: ExitStack) -> tuple[SimulationSummary, str]:
    """Run the simulation against `--aggregator`, a local one kept open on `stack`, or in process."""
    # Here, not at the top: the aggregator's modules import torch, which `--help` and a refused option do without.
    from aggregator.api.client import AggregatorClient
    from aggregator.inprocess import InProcessClient
    from aggregator.process import LocalAggregator, local_aggregator_config

    if args.aggregator is not None:
        client = stack.enter_context(closing(device_cli.remote_client(args.aggregator)))
        client.status()  # one that does not answer is reported before the run folder is made
        start_record(args.out, args.command, simulation_options(args), corpus)
        return device_cli.simulate_with(args, corpus, client), args.aggregator
    start_record(args.out, args.command, simulation_options(args), corpus)
    # The simulator drives its own aggregator's clock, so that deadlines are simulated time; and it knows how many
    # phones the fleet has, which is the population the privacy accountant samples from.
    own = {"simulated_clock": True, "population": args.population or args.phones or len(corpus.users())}
    config = local_aggregator_config(
        args.out, corpus.tokenizer_path, model=model_config_from_args(args, corpus.manifest["vocab_size"]),
        **aggregator_cli.round_settings(args) | own,
    )
    if args.in_process:
        in_process = stack.enter_context(closing(InProcessClient(config)))
        return device_cli.simulate_with(args, corpus, in_process), in_process.url
    url = stack.enter_context(LocalAggregator(config)).url
    print(f"started an aggregator at {url} (database {config.db_path})", flush=True)
    client = stack.enter_context(closing(AggregatorClient(url, operator_token=config.operator_token)))
    return device_cli.simulate_with(args, corpus, client), url


def run_simulate(args: argparse.Namespace) -> int:
    check_simulate_options(args)
    corpus = prepare(device_cli.corpus_config_from_args(args))
    with ExitStack() as stack:
        summary, _ = simulate(args, corpus, stack)
    device_cli.finish(summary, corpus, args)
    return 0


def run_aggregator(args: argparse.Namespace) -> int:
    listener = aggregator_cli.listener_from_args(args)  # a port in use is reported before the corpus is prepared
    if args.tokenizer is None:
        args.tokenizer = prepare(CorpusConfig()).tokenizer_path
    return aggregator_cli.run(args, listener)


SIMULATE_COMMAND = (
    "simulate", add_simulate_arguments, run_simulate,
    "provision phones and run federated rounds; writes metrics.jsonl and the final model into --out",
)
AGGREGATOR_COMMAND = ("aggregator", aggregator_cli.add_arguments, run_aggregator, "run the aggregation service")
