"""The web demo answers only requests addressed to a host name it serves: a page on another site whose name is made
to resolve to 127.0.0.1 (DNS rebinding) must not read or switch on this browser's phone."""

from __future__ import annotations

import time

import httpx
import pytest

from aggregator.process import free_port
from tests.helpers import DemoServer, open_stalled, read_until_closed
from web_demo.cli import main

pytestmark = pytest.mark.timeout(60)

PATHS = ("/", "/dashboard", "/api/phone", "/api/model", "/api/suggest?text=to+be", "/openapi.json")


def refused_everywhere(demo: DemoServer, host: str) -> None:
    headers = {"Host": host}
    with httpx.Client(base_url=demo.url, headers=headers, timeout=5) as client:
        for path in PATHS:
            response = client.get(path)
            assert (response.status_code, response.text) == (400, "Invalid host header"), (host, path)
        assert client.put("/api/phone", json={"enabled": True}).status_code == 400, host
        assert client.post("/api/phone/messages", json={"text": "hi"}).status_code == 400, host


def answered(demo: DemoServer, host: str) -> None:
    with httpx.Client(base_url=demo.url, headers={"Host": host}, timeout=5) as client:
        for path in ("/", "/api/phone"):
            assert client.get(path).status_code == 200, (host, path)


@pytest.mark.slow
def test_the_demo_refuses_other_host_names_and_answers_its_own_on_any_port() -> None:
    with DemoServer(f"http://127.0.0.1:{free_port()}") as demo:
        for host in ("attacker.test", f"attacker.test:{demo.port}", f"localhost.attacker.test:{demo.port}",
                     f"127.0.0.1.nip.io:{demo.port}", f"[::2]:{demo.port}", "keyboard.example"):
            refused_everywhere(demo, host)
        assert httpx.get(f"{demo.url}/api/phone", timeout=5).json()["enabled"] is False  # the PUTs changed nothing

        for host in (f"127.0.0.1:{demo.port}", f"localhost:{demo.port}", f"LocalHost:{demo.port}", f"[::1]:{demo.port}",
                     "localhost", "127.0.0.1:80"):
            answered(demo, host)

        # Two Host headers, the first of them allowed: 400, as RFC 9112 has it (keyboard_model/serving.py).
        request = f"GET /api/phone HTTP/1.1\r\nHost: 127.0.0.1:{demo.port}\r\nHost: attacker.test\r\n\r\n"
        with open_stalled(demo.port, request.encode()) as sock:
            received = read_until_closed(sock, time.monotonic() + 5)
        assert received is not None and received.startswith(b"HTTP/1.1 400 "), received


def test_allowed_host_adds_names_and_patterns() -> None:
    options = ["--allowed-host", "Keyboard.Example", "--allowed-host", "*.lan", "--allowed-host", "fd00::7"]
    with DemoServer(f"http://127.0.0.1:{free_port()}", options=options) as demo:
        for host in (f"keyboard.example:{demo.port}", "KEYBOARD.EXAMPLE", f"phone.lan:{demo.port}",
                     f"[fd00::7]:{demo.port}", f"localhost:{demo.port}"):
            answered(demo, host)
        for host in ("example", f"lan:{demo.port}", f"keyboard.example.attacker.test:{demo.port}"):
            refused_everywhere(demo, host)


def test_an_allowed_host_with_a_port_or_scheme_is_refused_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for bad in ("localhost:8700", "http://keyboard.example", "*"):
        assert main(["--allowed-host", bad]) == 2
        assert f"a host is a name or IP address without a scheme or port, got {bad!r}" in capsys.readouterr().err
