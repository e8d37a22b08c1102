"""`fedkb`: one command line for every part of fedkeyboard.

    fedkb data        fetch and prepare a corpus (cached)
    fedkb aggregator  run the aggregation service
    fedkb simulate    provision phones and run federated rounds
    fedkb eval        score a saved model on phones' held-out messages
    fedkb demo        serve the browser keyboard
    fedkb up          all of it: data, aggregator, a ~10 minute training run, then the demo
    fedkb plot        recall and loss per round of one or more runs, as a PNG
    fedkb audit       what a run's model is measured to leak (canaries) beside its accountant's epsilon
"""

from __future__ import annotations

from device_sim import cli as device_cli
from fedkb import audit, composition, plot, up
from keyboard_model.commands import main_for
from web_demo import cli as demo_cli

COMMANDS = (
    device_cli.DATA_COMMAND,
    composition.AGGREGATOR_COMMAND,
    composition.SIMULATE_COMMAND,
    device_cli.EVAL_COMMAND,
    ("demo", demo_cli.add_arguments, demo_cli.run, "serve the browser keyboard"),
    ("up", up.add_arguments, up.run,
     "prepare data, start the aggregator, train with a simulated fleet, serve the demo: about ten minutes on two "
     "cores (20 s to start, --time-budget 540 s of rounds, 25 s to score the final model; the first time also about "
     "a minute to fetch and prepare the corpus)"),
    ("plot", plot.add_arguments, plot.run, "draw recall and loss per round of one or more runs into a PNG"),
    ("audit", audit.add_arguments, audit.run,
     "the exposure of a run's canary phrases and its canary clients' empirical epsilon beside the accountant's; "
     "writes a PNG"),
)


def main(argv: list[str] | None = None) -> int:
    return main_for("fedkb", __doc__, COMMANDS, argv)
