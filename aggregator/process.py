"""Start an aggregator as a child process on loopback, for `fedkb simulate`, `fedkb up` and tests."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aggregator.api.protocol import ENROLMENT_SECRET_ENV, OPERATOR_TOKEN_ENV
from aggregator.config import AggregatorConfig
from aggregator.mechanisms import MECHANISMS
from keyboard_model.serving import bind, bound_port


def _stop_with_parent() -> None:
    """Ask Linux to SIGTERM the child if its parent dies without stopping it (e.g. SIGKILL)."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




class LocalAggregator:
    """A `python -m aggregator` child process, stopped cleanly when the context exits."""

    def __init__(self, config: AggregatorConfig, startup_timeout_s: float = 60.0) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        if config.differential_privacy:
            # A mechanism may need long to start (a new DP-FTRL aggregator first optimises its noise).
            self.startup_timeout_s = max(startup_timeout_s, MECHANISMS[config.dp_mechanism].startup_s)
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()
        # Bound here and handed to the child, so that no other program can take the port in between; the config's
        # port 0 asks for any free one.
        listener = bind(config.host, config.port)
        self.port = bound_port(listener)
        self.url = f"http://{config.host}:{self.port}"
        self._listener: socket.socket | None = listener

    def command(self, listen_fd: int) -> list[str]:
        c = self.config
        return [
            sys.executable, "-m", "aggregator", "--db", str(c.db_path), "--tokenizer", str(c.tokenizer_path),
            "--host", c.host, "--port", str(self.port), "--listen-fd", str(listen_fd),
            "--clients-per-round", str(c.clients_per_round),
            "--round-deadline", str(c.round_deadline_s), "--over-selection", str(c.over_selection),
            "--min-report-fraction", str(c.min_report_fraction),
            *(["--simulated-clock"] if c.simulated_clock else []),
            "--server-optimizer", c.server_optimizer,
            *(["--server-lr", str(c.server_learning_rate)] if c.server_learning_rate is not None else []),
            "--serving-average", str(c.serving_average),
            "--aggregation-rule", c.aggregation_rule, "--trim-fraction", str(c.trim_fraction),
            "--max-examples", str(c.max_examples_per_update), "--max-update-norm", str(c.max_update_norm),
            "--max-eval-positions", str(c.max_eval_positions), "--eval-share", str(c.eval_share),
            "--clip-norm", str(c.clip_norm),
            *(["--secure-aggregation"] if c.secure_aggregation else []), "--secagg-phase", str(c.secagg_phase_s),
            "--secagg-ring-bits", str(c.secagg_ring_bits), "--download", c.download_encoding,
            *(["--noise-multiplier", str(c.noise_multiplier)] if c.noise_multiplier is not None else []),
            *(["--population", str(c.population)] if c.population is not None else []),
            *(["--dp-delta", str(c.dp_delta)] if c.dp_delta is not None else []),
            "--dp-mechanism", c.dp_mechanism, "--min-separation", str(c.min_separation),
            *(["--clip-quantile", str(c.clip_quantile)] if c.clip_quantile is not None else []),
            "--clip-learning-rate", str(c.clip_learning_rate),
            *(["--clip-count-stddev", str(c.clip_count_stddev)] if c.clip_count_stddev is not None else []),
            "--dp-rounds", str(c.dp_rounds), "--canary-clients", str(c.canary_clients),
            "--audit-every", str(c.audit_every),
            *(["--discover-words", "--discover-every", str(c.discover_every)] if c.discover_every else []),
            "--discovery-epsilon", str(c.discovery_epsilon), "--discovery-delta", str(c.discovery_delta),
            "--discovery-max-word-length", str(c.discovery_max_word_length),
            *(["--discovery-theta", str(c.discovery_theta)] if c.discovery_theta is not None else []),
            *(["--discovery-sampling-rate", str(c.discovery_sampling_rate)]
              if c.discovery_sampling_rate is not None else []),
            "--seed", str(c.seed), *(["--init-model", str(c.initial_model)] if c.initial_model else []),
            "--keep-models", str(c.keep_models), "--keep-every", str(c.keep_every),
            "--architecture", c.model.architecture,
            # Every size of the architecture's config, each an option of the same name (keyboard_model.cli_options);
            # the vocabulary is the tokenizer's.
            *(arg for size, value in c.model.to_dict().items() if size != "vocab_size"
              for arg in (f"--{size.replace('_', '-')}", str(value))),
            "--selection-window", str(c.selection_window_s), "--enrolments-per-minute", str(c.enrolments_per_minute),
            "--checkins-per-minute", str(c.checkins_per_minute),
            *(arg for network in c.trusted_networks or ["none"] for arg in ("--trusted-network", network)),
        ]

    def environment(self) -> dict[str, str]:
        """The child's environment: the credentials go here, not on its command line, which any user can read."""
        credentials = {OPERATOR_TOKEN_ENV: self.config.operator_token,
                       ENROLMENT_SECRET_ENV: self.config.enrolment_secret}
        inherited = {k: v for k, v in os.environ.items() if k not in credentials}
        return {**inherited, "PYTHONUNBUFFERED": "1", **{k: v for k, v in credentials.items() if v is not None}}

    def __enter__(self) -> LocalAggregator:
        # Its own process group, so a Ctrl-C in the terminal reaches the parent only and
        # the parent decides how the child stops.
        listener, self._listener = self._listener, None
        if listener is None:
            raise RuntimeError("a LocalAggregator starts once; make another for a restart")
        with listener:  # the child has its own copy of the socket
            self.process = subprocess.Popen(
                self.command(listener.fileno()), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.environment(), preexec_fn=_stop_with_parent,
                pass_fds=(listener.fileno(),),
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the aggregator exited with code {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/status", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the aggregator did not answer at {self.url} within {self.startup_timeout_s:.0f} s:\n"
                           f"{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM lets uvicorn finish its requests and close the database; SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        self._log.close()
        if self._listener is not None:  # never started
            self._listener.close()


def local_aggregator_config(workdir: Path, tokenizer_path: Path, **overrides) -> AggregatorConfig:
    """A config for a fresh aggregator on a free loopback port (chosen when `LocalAggregator` binds it), its database
    in `workdir`, with a new operator token for whoever starts it (unless one is given)."""
    operator_token = overrides.pop("operator_token", None) or secrets.token_urlsafe(32)
    return AggregatorConfig(db_path=workdir / "aggregator.sqlite", tokenizer_path=tokenizer_path,
                            port=0, operator_token=operator_token, **overrides)
