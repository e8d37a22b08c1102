"""`fedkb demo` / `python -m web_demo`: serve the keyboard page on the aggregator's latest model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from keyboard_model.serving import serve as serve_app
from keyboard_model.commands import run_command
from web_demo.app import create_app
from web_demo.config import DemoConfig

DEFAULTS = DemoConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", default=DEFAULTS.aggregator_url, metavar="URL",
                        help="aggregator to take the global model and tokenizer from (default: %(default)s)")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to serve the page on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULTS.port, help="port to serve the page on (default: %(default)s)")
    parser.add_argument("--refresh-seconds", type=float, default=DEFAULTS.refresh_seconds, metavar="SECONDS",
                        help="how often to check the aggregator for a newer model version (default: %(default)s)")
    parser.add_argument("--phone-dir", type=Path, default=DEFAULTS.phone_dir,
                        help="where 'this browser is a phone' keeps its typing history (default: %(default)s)")
    parser.add_argument("--phone-check-in", type=float, default=DEFAULTS.phone_check_in_s, metavar="SECONDS",
                        help="how often that phone asks the aggregator to train while eligible (default: %(default)s)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME", dest="allowed_hosts",
                        help="a host name (or *.domain, or IP address) the page may be opened by, besides --host, "
                             "localhost, 127.0.0.1 and ::1; requests naming any other host are refused. Repeatable; "
                             "give the machine's name or address when serving on 0.0.0.0 to other machines")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(aggregator_url=args.aggregator, host=args.host, port=args.port,
                      refresh_seconds=args.refresh_seconds, phone_dir=args.phone_dir,
                      phone_check_in_s=args.phone_check_in, allowed_hosts=tuple(args.allowed_hosts))


def run(args: argparse.Namespace) -> int:
    serve(config_from_args(args))
    return 0


def serve(config: DemoConfig) -> None:
    """Serve the page until Ctrl-C."""
    # Only the demo's own messages (model loads, aggregator trouble); uvicorn keeps its own logging.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("demo: %(message)s"))
    logger = logging.getLogger("web_demo")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    print(f"demo: open http://{config.host}:{config.port} (model from {config.aggregator_url})", flush=True)
    serve_app(create_app(config), config.host, config.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web_demo", description=__doc__)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))
