"""`fedkb up`: the whole loop on one machine.

Prepares the default corpus (once), starts an aggregator on loopback, provisions a
phone per Shakespeare role, runs federated rounds for about ten minutes with a
progress bar, scores the final model on every phone, prints how it compares with the n-gram
(the target: 1.2 times its top-1) and a most-frequent-words keyboard, then serves the web demo on the trained model
until Ctrl-C.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from device_sim import cli as device_cli
from device_sim.corpus import prepare
from fedkb import composition
from keyboard_model.arguments import port
from keyboard_model.errors import UserFacingError
from web_demo.cli import serve
from web_demo.config import DemoConfig

DEMO_DEFAULTS = DemoConfig()
# Rounds the README's run of the default `fedkb up` had in its budget (a quiet 2-core Intel Xeon): the last screen
# shows it beside this run's, so that a run cut short by a busy machine says so.
README_ROUNDS = 379


def add_arguments(parser: argparse.ArgumentParser) -> None:
    composition.add_simulate_arguments(parser)
    # Defaults tuned so the run takes about ten minutes on two cores: 540 s of rounds, after the first run's
    # corpus preparation and phone provisioning (about a minute) and before the final scoring (about a minute).
    # The central score every ten rounds: scoring holds up the next round, and the phones score every round anyway.
    # Batches of 4 (four times the local steps of the library's 16): a round costs about a tenth more, and the same
    # ten minutes ended at 10.68% top-1 after 281 rounds against 10.20% after 331 with 16 (README, "Results").
    parser.set_defaults(out=Path("runs/up"), rounds=1_000, time_budget=540.0, clients_per_round=10, eval_every=10,
                        batch_size=4)
    parser.add_argument("--demo-host", default=DEMO_DEFAULTS.host,
                        help="address of the web demo (default: %(default)s)")
    parser.add_argument("--demo-port", type=port, default=DEMO_DEFAULTS.port,
                        help="port of the web demo, taken before training starts (default: %(default)s)")
    parser.add_argument("--no-demo", action="store_true", help="stop after training instead of serving the demo")


def run(args: argparse.Namespace) -> int:
    from keyboard_model.serving import bind  # uvicorn's, which `--help` does without

    if args.in_process and not args.no_demo:
        raise UserFacingError("the demo needs the aggregator service: use --in-process only with --no-demo")
    composition.check_simulate_options(args)
    with ExitStack() as stack:
        # Taken now: a port in use is reported before ten minutes of training, not after.
        demo_listener = (None if args.no_demo
                         else stack.enter_context(bind(args.demo_host, args.demo_port, "--demo-port")))
        corpus = prepare(device_cli.corpus_config_from_args(args))
        summary, aggregator_url = composition.simulate(args, corpus, stack)
        device_cli.finish(summary, corpus, args, README_ROUNDS)
        if demo_listener is None:
            return 0
        print("\nserving the keyboard on the trained model; Ctrl-C stops everything", flush=True)
        serve(DemoConfig(aggregator_url=aggregator_url, host=args.demo_host, port=args.demo_port, run_dir=args.out),
              demo_listener)
    return 0
