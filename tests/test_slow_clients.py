"""A client that never finishes sending its request does not hold a connection for long (keyboard_model/serving.py)."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from aggregator.app import create_app
from aggregator.process import free_port, local_aggregator_config
from keyboard_model.model import ModelConfig
from keyboard_model.serving import HEADER_TIMEOUT_S, uvicorn_options
from tests.helpers import DemoServer, open_stalled, read_until_closed

pytestmark = pytest.mark.timeout(120)

# Requests that stop part way: nothing at all, half a request line, headers without the blank line that ends them,
# and a body that stops 990 bytes short of its Content-Length.
STALLED = [
    b"",
    b"GET /sta",
    b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123456789",
]
# Time allowed for the server to act on a deadline once it has passed (a loaded CI machine is slow).
SLACK_S = 3.0


async def echo(scope: dict, receive: Callable, send: Callable) -> None:
    """Answers with the body it read."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(app: Callable = echo, log_level: str = "error", **limits: float) -> Iterator[int]:
    """`app` served in a thread on a loopback port (yielded) with these deadlines, as both command lines serve."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="off" if app is echo else "on",
                            log_level=log_level, **uvicorn_options(**limits))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(10)


def test_two_hundred_stalled_requests_are_answered_408_and_closed_while_others_are_served() -> None:
    with serving(header_timeout_s=1.0, body_timeout_s=1.0) as port, ExitStack() as sockets:
        opened = time.monotonic()
        stalled = [sockets.enter_context(open_stalled(port, STALLED[i % len(STALLED)])) for i in range(200)]
        # Meanwhile, well inside the deadlines, a whole request is answered.
        answer = httpx.post(f"http://127.0.0.1:{port}/echo", content=b"hello", timeout=5)
        assert (answer.status_code, answer.content) == (200, b"hello")
        assert time.monotonic() - opened < 1.0, "too slow to tell the stalled requests from the deadline"

        for i, sock in enumerate(stalled):
            received = read_until_closed(sock, opened + 1.0 + SLACK_S)
            assert received is not None, f"connection {i} ({STALLED[i % len(STALLED)]!r}) is still open"
            assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received
            assert received.endswith(b"did not arrive within 1 s"), received
        assert time.monotonic() - opened >= 1.0  # not closed before its time


def test_a_body_dripped_in_slower_than_the_deadline_is_cut_off() -> None:
    """The body deadline is for the whole body, not between bytes: a trickle cannot keep it open."""
    with serving(header_timeout_s=1.0, body_timeout_s=1.0) as port, \
            open_stalled(port, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n") as sock:
        started = time.monotonic()
        try:
            while time.monotonic() - started < 1.0 + SLACK_S and not select.select([sock], [], [], 0.1)[0]:
                sock.sendall(b"x")
        except OSError:  # the server closed between two bytes
            pass
        assert read_until_closed(sock, time.monotonic() + 0.5) is not None, "the server still takes a byte every 0.1 s"
        assert 1.0 <= time.monotonic() - started < 1.0 + SLACK_S


@pytest.mark.slow
def test_slow_but_timely_requests_are_served_and_each_request_gets_its_own_deadline() -> None:
    with serving(header_timeout_s=1.0, body_timeout_s=1.0) as port, open_stalled(port, b"") as sock:
        sock.settimeout(5)
        # Three requests on one kept-alive connection, each sent in pieces over 0.6 s: 1.8 s in all, longer than
        # either deadline, but none of them late.
        for number in range(3):
            body = f"request {number}".encode()
            pieces = [b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                      b"Content-Length: %d\r\n\r\n" % len(body), body[:4], body[4:]]
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.2)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(body), answer


def test_headers_larger_than_the_limit_are_refused_long_before_their_deadline() -> None:
    with serving(header_timeout_s=60.0, body_timeout_s=60.0, max_header_bytes=16 * 1024) as port, \
            open_stalled(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n") as sock:
        started = time.monotonic()
        try:
            for _ in range(100):  # 100 kB of headers, never ending
                sock.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
        except OSError:  # the server closed while we were still sending
            pass
        received = read_until_closed(sock, started + SLACK_S)
        assert received is not None, "the server is still reading headers"
        # The 431 is lost when the server's close resets the connection before we read it.
        assert received == b"" or received.startswith(b"HTTP/1.1 431 "), received


def test_body_bytes_that_arrive_with_headers_do_not_count_towards_their_limit() -> None:
    body = b"b" * 100_000
    upload = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    with serving(header_timeout_s=5.0, body_timeout_s=5.0, max_header_bytes=16 * 1024) as port, \
            open_stalled(port, upload + second[:30]) as sock:
        # The server read the upload and the start of a second, pipelined request together: the upload's body is
        # not the second request's headers.
        time.sleep(0.3)
        sock.sendall(second[30:])
        received = read_until_closed(sock, time.monotonic() + 5)
        assert received is not None and received.count(b"HTTP/1.1 200 OK\r\n") == 2, (received or b"")[:200]
        assert body in received and received.endswith(b"ok")


def test_a_request_with_two_host_headers_is_refused() -> None:
    """RFC 9112, section 3.2: 400. An app reads the first Host header, and whatever routes by another would see a
    request that passed a host check it never had."""
    with serving(header_timeout_s=5.0, body_timeout_s=5.0) as port:
        for hosts in (["127.0.0.1", "attacker.test"], ["attacker.test", "127.0.0.1"], ["127.0.0.1", "127.0.0.1"]):
            head = "".join(f"{name}: {host}\r\n" for name, host in zip(("Host", "HOST"), hosts))
            with open_stalled(port, f"POST /echo HTTP/1.1\r\n{head}Content-Length: 2\r\n\r\nok".encode()) as sock:
                received = read_until_closed(sock, time.monotonic() + SLACK_S)
            assert received is not None and received.startswith(b"HTTP/1.1 400 "), received
            assert received.endswith(b"a request may have one Host header, not more"), received
        # One is answered.
        answer = httpx.post(f"http://127.0.0.1:{port}/echo", content=b"ok", timeout=5)
        assert (answer.status_code, answer.content) == (200, b"ok")


@pytest.mark.slow
def test_the_aggregator_and_the_demo_close_stalled_connections(
    start_aggregator: Callable, small_tokenizer_path: Path, small_model_config: ModelConfig,
) -> None:
    """Both command lines serve with the deadlines, at their defaults."""
    aggregator = start_aggregator(small_tokenizer_path, small_model_config)
    with DemoServer(aggregator.url) as demo, ExitStack() as sockets:
        ports = [aggregator.port, demo.port]
        opened = time.monotonic()
        stalled = [sockets.enter_context(open_stalled(port, request)) for port in ports for request in STALLED[:3]]
        assert httpx.get(f"{aggregator.url}/status", timeout=5).status_code == 200
        assert httpx.get(f"{demo.url}/api/model", timeout=5).status_code == 200

        for sock in stalled:
            received = read_until_closed(sock, opened + HEADER_TIMEOUT_S + SLACK_S)
            assert received is not None, f"still open after {HEADER_TIMEOUT_S + SLACK_S} s"
            assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received


def test_each_body_that_misses_its_deadline_is_one_line_in_the_aggregator_log_not_a_traceback(
    tmp_path: Path, small_tokenizer_path: Path, small_model_config: ModelConfig,
) -> None:
    """The aggregator reads its bodies itself (aggregator/request_body.py): the disconnect a late body ends in once
    escaped as an error, and 100 slow phones logged 100 tracebacks."""
    config = local_aggregator_config(tmp_path, small_tokenizer_path, model=small_model_config, clients_per_round=4,
                                     selection_window_s=0.0)
    log: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = log.append  # type: ignore[method-assign]
    server_log = logging.getLogger("uvicorn.error")
    try:
        with serving(create_app(config), log_level="warning", header_timeout_s=5.0, body_timeout_s=1.0) as port:
            server_log.addHandler(handler)  # once uvicorn has configured its logging, until it has stopped
            url = f"http://127.0.0.1:{port}"
            tokens = [httpx.post(f"{url}/devices").json()["device_token"] for _ in range(4)]
            decisions = [httpx.post(f"{url}/checkin", headers={"Authorization": f"Bearer {token}"}).json()
                         for token in tokens]
            # Two updates and two evaluations (a JSON body), each stopping part way.
            heads = [f"POST /rounds/{decision['round']}/{route} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {decision['upload_token']}\r\nContent-Length: 1000\r\n\r\n{{"
                     for decision, route in zip(decisions, ["updates", "evaluations"] * 2)]
            with ExitStack() as sockets:
                stalled = [sockets.enter_context(open_stalled(port, head.encode())) for head in heads]
                for sock in stalled:
                    received = read_until_closed(sock, time.monotonic() + 1.0 + SLACK_S)
                    assert received is not None and received.startswith(b"HTTP/1.1 408 "), received
    finally:
        server_log.removeHandler(handler)
    assert [record.getMessage() for record in log] == [
        "Closing a connection whose request body did not arrive within 1 s."] * 4
