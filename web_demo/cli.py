"""`fedkb demo` / `python -m web_demo`: serve the keyboard page on the aggregator's latest model."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from keyboard_model.arguments import port
from keyboard_model.commands import Parser, run_command
from web_demo.config import DemoConfig

DEFAULTS = DemoConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", default=DEFAULTS.aggregator_url, metavar="URL",
                        help="aggregator to take the global model and tokenizer from (default: %(default)s)")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to serve the page on (default: %(default)s)")
    parser.add_argument("--port", type=port, default=DEFAULTS.port,
                        help="port to serve the page on (default: %(default)s)")
    parser.add_argument("--refresh-seconds", type=float, default=DEFAULTS.refresh_seconds, metavar="SECONDS",
                        help="how often to check the aggregator for a newer model version (default: %(default)s)")
    parser.add_argument("--run", type=Path, default=DEFAULTS.run_dir, metavar="RUN", dest="run_dir",
                        help="the training run's folder (fedkb simulate --out): the dashboard adds its training loss, "
                             "central evaluation and comparison table, and says when the run has ended")
    parser.add_argument("--phone-dir", type=Path,
                        help="where 'this browser is a phone' keeps its typing history "
                             "(default: RUN/browser-phone with --run, else runs/browser-phone)")
    parser.add_argument("--phone-check-in", type=float, default=DEFAULTS.phone_check_in_s, metavar="SECONDS",
                        help="how often that phone asks the aggregator to train while eligible (default: %(default)s)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME", dest="allowed_hosts",
                        help="a host name (or *.domain, or IP address) the page may be opened by, besides --host, "
                             "localhost, 127.0.0.1 and ::1; requests naming any other host are refused. Repeatable; "
                             "give the machine's name or address when serving on 0.0.0.0 to other machines")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(aggregator_url=args.aggregator, host=args.host, port=args.port,
                      refresh_seconds=args.refresh_seconds, run_dir=args.run_dir, phone_dir=args.phone_dir,
                      phone_check_in_s=args.phone_check_in, allowed_hosts=tuple(args.allowed_hosts))


def run(args: argparse.Namespace) -> int:
    serve(config_from_args(args))
    return 0


def serve(config: DemoConfig, listener: socket.socket | None = None) -> None:
    """Serve the page until Ctrl-C, on `listener` if the caller bound the port already (`fedkb up` does, before it
    trains), else on `config.port`, bound now."""
    # Here, not at the top: the page's app and the server import torch and uvicorn, which `--help` does without.
    from keyboard_model.serving import bind, bound_port
    from keyboard_model.serving import serve as serve_app
    from web_demo.app import create_app

    listener = listener or bind(config.host, config.port)
    # Only the demo's own messages (model loads, aggregator trouble); uvicorn keeps its own logging.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("demo: %(message)s"))
    logger = logging.getLogger("web_demo")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with listener:
        app = create_app(config)
        print(f"demo: open http://{config.host}:{bound_port(listener)} (model from {config.aggregator_url})",
              flush=True)
        serve_app(app, listener)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m web_demo", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(prog=parser.prog)
    return run_command(run, parser.parse_args(argv))
