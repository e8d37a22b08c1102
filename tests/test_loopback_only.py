"""Nothing of ours listens beyond loopback: what a test's processes listen on, read from /proc.

`listening_beyond_loopback()` (tests/helpers.py) lists the TCP sockets that a process and
all its descendants listen on (Linux's /proc/net/tcp and tcp6, matched to the processes'
open sockets) at an address outside 127.0.0.0/8 and ::1. tests/test_ray_executor.py calls it
while its two-node Ray cluster and an aggregator run, and while a Ray started for a run
does; the test here shows that it sees such a socket, in this process or in a child.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from aggregator.process import free_port
from tests.helpers import listening_beyond_loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_socket_listening_on_every_interface_is_seen_in_this_process_and_in_a_child(host: str):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as everywhere, socket.socket() as loopback:
        everywhere.bind((host, 0))
        everywhere.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        port = free_port()
        child = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); "
                                   "s.listen(); print('ready', flush=True); sys.stdin.read()", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout.readline() == "ready\n"
            found = {(str(listener.address), listener.port, listener.pid) for listener in listening_beyond_loopback()}
        finally:
            child.communicate("", timeout=30)
        assert (host, everywhere.getsockname()[1], os.getpid()) in found
        assert ("0.0.0.0", port, child.pid) in found
        assert loopback.getsockname()[1] not in {port for _, port, _ in found}
