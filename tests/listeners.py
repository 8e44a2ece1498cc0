"""The processes under this one and the TCP sockets they listen on, read from /proc (Linux), and a watch that
records the sockets while a test runs: Ray's processes come and go (trial actors, Train workers), so one snapshot
at the end would miss most of them."""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Listener:
    process: str  # /proc/PID/comm: gcs_server, raylet, ray::IDLE, ray::DashboardAgent, python, ...
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.address)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback on a dual socket
        return (mapped or address).is_loopback


def _address(hex_address: str) -> str:
    """/proc/net/tcp's address: 4 (IPv4) or 16 (IPv6, four 32-bit words) bytes, each word little-endian."""
    raw = bytes.fromhex(hex_address)
    return str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """{socket inode: (address, port)} of every TCP socket in state LISTEN (0A) on the machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].split(":")
                found[fields[9]] = (_address(address), int(port, 16))
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while it was read
        children.setdefault(parent, []).append(int(entry))
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def processes_named(name: str, root: int | None = None) -> list[int]:
    """PIDs under ``root`` (this process) whose /proc/PID/comm is ``name`` (15 characters at most)."""
    found = []
    for pid in sorted(_descendants(root or os.getpid())):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(pid)
        except OSError:
            continue
    return found


def listeners(root: int) -> set[Listener]:
    """What ``root`` and every process under it listen on now."""
    inodes, found = _listening_inodes(), set()
    for pid in _descendants(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in inodes:
                found.add(Listener(name, *inodes[link[8:-1]]))
    return found


class ListenerWatch:
    """Every listener of this process's tree seen from ``start`` to ``stop``, polled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s, self.seen = interval_s, set[Listener]()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="listener-watch", daemon=True)
        self._root = os.getpid()

    def _poll(self) -> None:
        while not self._stopped.is_set():
            self.seen |= listeners(self._root)
            self._stopped.wait(self.interval_s)

    def start(self) -> ListenerWatch:
        self._thread.start()
        return self

    def stop(self) -> set[Listener]:
        self._stopped.set()
        self._thread.join()
        return self.seen
