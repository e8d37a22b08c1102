"""Nothing of ours listens beyond loopback: what a test's processes listen on, read from /proc.

`listening_beyond_loopback()` lists the TCP sockets that a process and all its descendants
listen on (Linux's /proc/net/tcp and tcp6, matched to the processes' open sockets) at an
address outside 127.0.0.0/8 and ::1. tests/test_ray_executor.py calls it while its two-node
Ray cluster and an aggregator run, and while a Ray started for a run does; the test here
shows that it sees such a socket, in this process or in a child.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from aggregator.process import free_port

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
