"""`fedkb`: one command line for every part of fedkeyboard.

    fedkb data        fetch and prepare a corpus (cached)
    fedkb aggregator  run the aggregation service
    fedkb simulate    provision phones and run federated rounds
    fedkb eval        score a saved model on phones' held-out messages
    fedkb demo        serve the browser keyboard
    fedkb up          all of it: data, aggregator, a ~10 minute training run, then the demo
"""

from __future__ import annotations

import sys

from aggregator import cli as aggregator_cli
from device_sim import cli as device_cli
from fedkb import up
from keyboard_model.commands import main_for
from web_demo import cli as demo_cli

COMMANDS = (
    device_cli.COMMANDS[0],
    ("aggregator", aggregator_cli.add_arguments, aggregator_cli.run, "run the aggregation service"),
    ("simulate", device_cli.add_simulate_arguments, device_cli.run_simulate,
     "provision phones and run federated rounds; writes metrics.jsonl and the final model into --out"),
    device_cli.COMMANDS[2],
    ("demo", demo_cli.add_arguments, demo_cli.run, "serve the browser keyboard"),
    ("up", up.add_arguments, up.run, "prepare data, start the aggregator, train with a simulated fleet, serve the demo"),
)


def main(argv: list[str] | None = None) -> int:
    return main_for("fedkb", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
