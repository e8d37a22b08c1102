"""What several test files share: plain functions, classes and constants that drive the real aggregator, the
simulated phones, the web demo and the network from a test. The fixtures are in tests/conftest.py."""

from __future__ import annotations

import ipaddress
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import httpx
import torch
from jax_privacy.matrix_factorization import buffered_toeplitz

import aggregator.ftrl  # noqa: F401 (importing it turns on JAX's float64, which BufferedToeplitz.build needs)
from aggregator.api.client import AggregatorClient
from aggregator.api.schemas import EvaluationReport
from aggregator.config import AggregatorConfig
from aggregator.inprocess import InProcessClient
from aggregator.process import free_port, local_aggregator_config
from aggregator.rounds import RoundManager
from aggregator.storage import open_storage
from device_sim.fleet import Fleet, FleetConfig, Participation, typing_times
from device_sim.phone import Phone
from device_sim.secure_aggregation import SecAggPhone
from device_sim.session import update_bytes
from keyboard_model.norms import clip_to_norm
from keyboard_model.secagg import Directory, IdentityKey, RingEncoding
from keyboard_model.train import LocalTrainConfig
from keyboard_model.weights import model_from_bytes, parameter_shapes
from tests.conftest import SMALL_TEXT

# --- the command line ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def fedkb(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedkb", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, cwd=ROOT,
    )


# --- the simulated fleet ------------------------------------------------------------------------------------------


def make_phones(folder: Path, count: int) -> list[Phone]:
    phones = []
    for n in range(count):
        texts = [SMALL_TEXT[(n + t) % len(SMALL_TEXT)] for t in range(10 + n % 5)]
        phones.append(Phone.create(f"phone-{n:05d}", folder / f"phone-{n:05d}", typing_times(texts, typing_days=1.0)))
    return phones


def fleet_config(folder: Path, **changes) -> FleetConfig:
    settings = dict(phones_dir=folder, train=LocalTrainConfig(batch_size=4), workers=2, seed=3) | changes
    return FleetConfig(**settings)


class Tap:
    """Wraps a client and keeps what the phones sent: upload tokens with their bodies, aborts, selections."""

    def __init__(self, client) -> None:
        self.client = client
        self.uploads: dict[str, bytes] = {}
        self.aborts: list[str] = []
        self.evaluations: dict[str, EvaluationReport] = {}
        self.selections: dict[str, tuple[str, int]] = {}  # upload token -> (device token, round)

    def checkin(self, device_token):
        decision = self.client.checkin(device_token)
        if decision.upload_token:
            self.selections[decision.upload_token] = (device_token, decision.round)
        return decision

    def upload(self, round_number, upload_token, update):
        self.uploads[upload_token] = update
        return self.client.upload(round_number, upload_token, update)

    def report_evaluation(self, round_number, upload_token, report):
        self.evaluations[upload_token] = report
        return self.client.report_evaluation(round_number, upload_token, report)

    def abort(self, round_number, upload_token):
        self.aborts.append(upload_token)
        return self.client.abort(round_number, upload_token)

    def __getattr__(self, name):
        return getattr(self.client, name)


def run_fleet(folder: Path, tokenizer_path: Path, model_config, executor, rounds: int, phones: int = 10,
              per_round: int = 3, **settings):
    """`rounds` rounds of `per_round` phones out of `phones` on a simulated clock, in process; the final model and
    the reports."""
    folder.mkdir()
    client = InProcessClient(local_aggregator_config(folder, tokenizer_path, model=model_config,
                                                     clients_per_round=per_round, simulated_clock=True,
                                                     round_deadline_s=3600.0, **settings))
    fleet = Fleet(make_phones(folder / "phones", phones),
                  fleet_config(folder / "phones", vanish_probability=0.0, update_compression="none"), client,
                  executor=executor)
    try:
        reports = [fleet.run_round() for _ in range(rounds)]
    finally:
        fleet.close()
    return model_from_bytes(client.model())[0], reports


def outcome(p: Participation) -> tuple:
    """What became of a selected phone, with how much it trained (None: it never trained)."""
    return p.phone_id, p.outcome, p.result.num_examples if p.result else None


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# --- secure rounds through the real service -----------------------------------------------------------------------

# The identity keys the test's devices trust (the aggregator never sees it); device ids are random, so one will do.
DIRECTORY = Directory()


class Device:
    """A selected device of a secure round, driven step by step by the test."""

    def __init__(self, client: AggregatorClient) -> None:
        self.client = client
        enrolment = client.enrol()
        self.device_token = enrolment.device_token  # to check in again after the round
        decision = client.checkin(enrolment.device_token)
        assert decision.action == "train" and decision.secure_aggregation
        self.round, self.token = decision.round, decision.upload_token
        identity = IdentityKey.generate()
        DIRECTORY.register(enrolment.device_id, identity.public())
        self.part = SecAggPhone(self.round, enrolment.device_id, identity, DIRECTORY)

    def state(self):
        return self.client.secagg_state(self.round, self.token)

    def send_keys(self) -> None:
        self.client.secagg_keys(self.round, self.token, self.part.keys_message())

    def send_shares(self) -> None:
        self.client.secagg_shares(self.round, self.token, self.part.shares_message(self.state()))

    def upload(self, delta, evaluation: EvaluationReport, seed: int, within_clip: bool = False):
        data = self.part.masked_upload(delta, evaluation, within_clip, self.state(), seed)
        return self.client.upload(self.round, self.token, data)

    def confirm(self) -> None:
        self.client.secagg_confirm(self.round, self.token, self.part.confirm_message(self.state()))

    def reveal(self) -> None:
        self.client.secagg_reveal(self.round, self.token, self.part.reveal_message(self.state()))


def wait_for_phase(device: Device, phase: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while (state := device.state()).phase != phase:
        assert time.monotonic() < deadline, f"still in phase {state.phase}, waiting for {phase}"
        time.sleep(0.1)
    return state


def until_collecting(devices: list[Device]):
    """All `devices` send keys and shares; returns the state once the round collects masked inputs."""
    for device in devices:
        device.send_keys()
    wait_for_phase(devices[0], "share")
    for device in devices:
        device.send_shares()
    return wait_for_phase(devices[0], "collect")


def confirm_all(devices: list[Device]):
    """The consistency round: all `devices` sign the survivor set; returns the state once unmasking opens."""
    for device in devices:
        device.confirm()
    return wait_for_phase(devices[0], "unmask")


def finished_round(client: AggregatorClient, timeout_s: float = 20.0):
    """The summary of the aggregator's first round, once it has closed or failed."""
    deadline = time.monotonic() + timeout_s
    while not client.status().recent_rounds:
        assert time.monotonic() < deadline, "the round never ended"
        time.sleep(0.1)
    return client.status().recent_rounds[0]


def random_delta(shapes, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def assert_mean_within_rounding(after, before, mean, state, reporters: int) -> None:
    """`after` is `before` plus `mean`, give or take the rounding of `reporters` updates in the round's ring."""
    residual = torch.cat([(after[name] - before[name] - mean[name]).flatten() for name in before]).double()
    signal = torch.cat([mean[name].flatten() for name in before]).double()
    # Each reporter's stochastic rounding adds at most 1/4 step^2 of variance to each value of the sum.
    noise = math.sqrt(reporters / 4) / RingEncoding(**state.encoding.model_dump()).scale / reporters
    assert residual.std().item() <= 1.05 * noise < signal.std().item()
    assert abs(residual.mean().item()) < 5 * noise / math.sqrt(len(residual))


def start_secure(start_aggregator, small_tokenizer_path, small_model_config, **settings):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, secure_aggregation=True,
                                  server_optimizer="fedavg", secagg_phase_s=1.0, round_deadline_s=60.0, **settings)
    client = AggregatorClient(aggregator.url)
    model, _ = model_from_bytes(client.model())
    return client, model.state_dict()


def secure_client(tmp_path: Path, small_tokenizer_path: Path, small_model_config, devices: int,
                  **settings) -> InProcessClient:
    config = AggregatorConfig(
        db_path=tmp_path / "aggregator.sqlite", tokenizer_path=small_tokenizer_path, model=small_model_config,
        clients_per_round=devices, over_selection=1.0, secure_aggregation=True, server_optimizer="fedavg",
        secagg_phase_s=1.0, round_deadline_s=60.0, selection_window_s=0.0, secagg_ring_bits=16, **settings,
    )
    return InProcessClient(config)


def unmasking_round(client: InProcessClient, devices: int, forge=None):
    """A secure round of `devices` devices that all reported; returns them, their deltas and the round's state. With
    `forge`, the first device deals `forge(its share message)` instead of its own."""
    before, _ = model_from_bytes(client.model())
    members = [Device(client) for _ in range(devices)]
    for device in members:
        device.send_keys()
    wait_for_phase(members[0], "share")
    for device in members:
        if device is members[0] and forge is not None:
            client.secagg_shares(device.round, device.token, forge(device.part.shares_message(device.state())))
        else:
            device.send_shares()
    state = wait_for_phase(members[0], "collect")
    deltas = [random_delta(parameter_shapes(before.state_dict()), seed) for seed in range(devices)]
    for seed, (device, delta) in enumerate(zip(members, deltas)):
        device.upload(delta, None, seed)
    wait_for_phase(members[0], "confirm")
    confirm_all(members)
    return members, deltas, state, before.state_dict()


# --- secure aggregation's protocol in one process, no server ------------------------------------------------------

# The round number of the secure rounds that tests/test_malicious_aggregator.py and tests/test_malicious_phone.py
# play without a server.
ROUND = 7


def enrolled_phones(cohort: int, round_number: int = 7) -> dict[int, SecAggPhone]:
    """Phones `device-000`... with identity keys in one directory (the PKI they trust; the server has no part in it)."""
    directory, phones = Directory(), {}
    for k in range(cohort):
        identity = IdentityKey.generate()
        directory.register(f"device-{k:03d}", identity.public())
        phones[k] = SecAggPhone(round_number, f"device-{k:03d}", identity, directory)
    return phones


# --- differential privacy: DP-FTRL's matrices, adaptive clipping --------------------------------------------------

IDENTITY = buffered_toeplitz.BufferedToeplitz.build(buf_decay=[], output_scale=[])
# A BLT of two buffers, as jax-privacy's optimiser returns them (the one it chose for 10 rounds, separation 2).
TWO_BUFFERS = buffered_toeplitz.BufferedToeplitz.build(buf_decay=[0.99999996, 0.38399551],
                                                      output_scale=[0.09168603, 0.34878843])


def adaptive_manager(tmp_path, small_tokenizer_path, small_model_config, **changes) -> RoundManager:
    settings = dict(model=small_model_config, clients_per_round=4, over_selection=1.0, server_optimizer="fedavg",
                    noise_multiplier=0.01, clip_norm=0.5, clip_quantile=0.5, population=40, selection_window_s=0.0)
    config = AggregatorConfig(db_path=tmp_path / "a.sqlite", tokenizer_path=small_tokenizer_path,
                              **(settings | changes))
    return RoundManager(config, open_storage(config.db_path))


def release_one_round(manager: RoundManager, decisions: list | None = None) -> dict:
    """The round's four selected devices (`decisions`, else four new ones) report updates within the norm; returns
    the round's record."""
    decisions = decisions or [manager.checkin(manager.enrol()[0]) for _ in range(4)]
    shapes = parameter_shapes(model_from_bytes(manager.current_model()[1])[0].state_dict())
    delta = clip_to_norm(random_delta(shapes, 1), decisions[0].clip_norm)
    for decision in decisions:
        manager.submit(decision.round, decision.upload_token, update_bytes(delta, 5, "none", within_clip=True))
    return manager.storage.recent_rounds(1)[0]


# --- the web demo and clients that stall --------------------------------------------------------------------------

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, failure: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(failure())
        time.sleep(0.1)
    return result


class DemoServer:
    """`python -m web_demo` as a child process on a free loopback port, stopped on exit."""

    def __init__(self, aggregator_url: str, refresh_seconds: float = 0.3, phone_dir: Path | None = None,
                 options: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The browser phone's folder: never the repository's runs/; one made here is removed on exit.
        self._own_phone_dir = phone_dir is None
        self.phone_dir = phone_dir or Path(tempfile.mkdtemp(prefix="browser-phone-"))
        self.command = [
            sys.executable, "-m", "web_demo", "--aggregator", aggregator_url,
            "--port", str(self.port), "--refresh-seconds", str(refresh_seconds),
            "--phone-dir", str(self.phone_dir), "--phone-check-in", "0.5", *options,
        ]
        self._log = tempfile.TemporaryFile()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> DemoServer:
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        try:
            wait_for(self._answers, 30, lambda: f"the demo did not answer at {self.url}:\n{self.output()}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the demo exited with code {self.process.returncode}:\n{self.output()}")
        try:
            return httpx.get(self.url, timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def model_info(self) -> dict:
        return httpx.get(f"{self.url}/api/model", timeout=5.0).json()

    def wait_for_model(self, version: int | None = None) -> dict:
        """/api/model once a model (of `version`, if given) is loaded."""
        def loaded() -> dict | None:
            info = self.model_info()
            ready = info["model_version"] is not None and version in (None, info["model_version"])
            return info if ready else None

        return wait_for(loaded, 20, lambda: f"no model {version} in the demo: {self.model_info()}\n{self.output()}")

    def suggest(self, text: str) -> httpx.Response:
        return httpx.get(f"{self.url}/api/suggest", params={"text": text}, timeout=5.0)

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self._own_phone_dir:
            shutil.rmtree(self.phone_dir, ignore_errors=True)


def open_stalled(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    return sock


def read_until_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sends until it closes the connection; None if it is still open at `deadline`."""
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:  # closed with bytes of ours unread
            return received
        if not chunk:
            return received
        received += chunk
    return None


# --- suggestions while typing -------------------------------------------------------------------------------------


def typed_with_deletions(target: str, keystrokes: int, seed: int = 0) -> Iterator[str]:
    """The text box after each keystroke of someone typing `target`, sometimes deleting a few characters, sometimes
    typing something else."""
    rng = random.Random(seed)
    text = ""
    for _ in range(keystrokes):
        if text and rng.random() < 0.15:
            text = text[: -rng.randint(1, min(6, len(text)))]  # backspace a few characters
        else:
            text = target[: len(text) + 1] if target.startswith(text) else text + rng.choice("ab ,")
        yield text


# --- what listens beyond loopback ---------------------------------------------------------------------------------

LISTEN = "0A"  # the state column of /proc/net/tcp


class Listener(NamedTuple):
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    pid: int
    command: str


def listening_beyond_loopback(root: int | None = None) -> list[Listener]:
    """The sockets that `root` (default: this process) or any process descended from it listens on, at an address
    other than loopback: 0.0.0.0 and :: (every interface) count, IPv4 loopback written as IPv6 (::ffff:127.0.0.1)
    does not."""
    owners = _socket_owners(_descendants(os.getpid() if root is None else root))
    found = []
    for address, port, inode in _listening():
        mapped = getattr(address, "ipv4_mapped", None)
        if inode in owners and not (mapped or address).is_loopback:
            found.append(Listener(address, port, owners[inode], _command(owners[inode])))
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue  # not a process
        try:
            # The parent's pid is the second field after the command, which is in parentheses and may hold spaces.
            parent = int((process / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue  # it just ended
        children.setdefault(parent, []).append(int(process.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _socket_owners(pids: set[int]) -> dict[int, int]:
    """Socket inode -> the pid of a process that holds it open."""
    owners = {}
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # ended
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[int(target[len("socket:["):-1])] = pid
    return owners


def _listening() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, socket inode) of every listening TCP socket of this machine's network namespace."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            address, port = fields[1].split(":")
            found.append((_address(bytes.fromhex(address)), int(port, 16), int(fields[9])))
    return found


def _address(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints the address as 32-bit words, each in the machine's byte order.
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
