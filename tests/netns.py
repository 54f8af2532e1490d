"""Linux network namespaces for tests that need hosts and addresses of their own.

A namespace starts with nothing but a loopback interface: no route leaves it, so a test can
give it any address (say 192.88.99.2, which Python calls global) and be sure no packet ever
leaves the machine. Everything needs root; `netns_unusable` says why not, for a skip.

    with namespaces(2) as (proxy_ns, target_ns):
        link(proxy_ns, "192.88.99.1", target_ns, "192.88.99.2")
        server = target_ns.socket()            # a socket living in target_ns
        server.bind(("192.88.99.2", 443)); server.listen()
        subprocess.run([*proxy_ns.exec_prefix(), "python", "-c", "..."])

Sockets are made inside a namespace by a short-lived thread that enters it (``setns`` only
moves the calling thread), so a test's servers and clients can run in the test process while
the proxy runs as a subprocess under ``ip netns exec``. Namespaces are deleted by
`namespaces` even when the test fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "HOST_A",
    "HOST_B",
    "Netns",
    "Tripwire",
    "http_get",
    "link",
    "namespaces",
    "netns_unusable",
    "two_hosts",
]

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")
# Addresses for a two-host setup: 192.88.99.0/24 is the deprecated 6to4 relay anycast prefix
# (RFC 7526), which Python's ipaddress calls global (so Keybrake's egress check lets it
# through), yet no network uses it any more. Inside namespaces with no other interface and no
# route, nothing sent to it can leave the machine anyway.
HOST_A = "192.88.99.1"
HOST_B = "192.88.99.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@functools.cache
def netns_unusable() -> str | None:
    """Why network namespaces cannot be used here (``None`` when they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"kbprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        err = getattr(e, "stderr", b"") or b""
        return f"`ip netns add` failed: {err.decode(errors='replace').strip() or e}"
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", probe)
    return None


class Netns:
    """One network namespace (created by `namespaces`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def ip(self, *args: str) -> None:
        """``ip -n NAME …`` (raises on failure)."""
        _ip("-n", self.name, *args)

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread that has entered this namespace; return what it returns.

        Sockets created by ``fn`` live in the namespace for good, whichever thread uses them.
        """
        out: dict[str, Any] = {}

        def enter_and_run() -> None:
            try:
                fd = os.open(NETNS_DIR / self.name, os.O_RDONLY)
                try:
                    os.setns(fd, os.CLONE_NEWNET)
                finally:
                    os.close(fd)
                out["value"] = fn()
            except BaseException as e:
                out["error"] = e

        t = threading.Thread(target=enter_and_run, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]  # type: ignore[no-any-return]

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside this namespace."""
        return self.call(lambda: socket.socket(family, kind))

    def connect(self, address: tuple[str, int], timeout: float = 10) -> socket.socket:
        """A TCP connection made from inside this namespace."""
        return self.call(lambda: socket.create_connection(address, timeout=timeout))


def link(
    a: Netns, a_addr: str, b: Netns, b_addr: str, prefix: int = 24, name: str = "veth0"
) -> None:
    """Join two namespaces with a veth pair, ``a_addr/prefix`` in ``a`` and ``b_addr`` in ``b``.

    The pair is created inside the namespaces (never in the host's), so names cannot clash
    with other tests and nothing is added to the host's own network. Give each link of a
    namespace its own ``name`` (the interface's name at both ends).
    """
    a.ip("link", "add", name, "type", "veth", "peer", "name", name, "netns", b.name)
    a.ip("addr", "add", f"{a_addr}/{prefix}", "dev", name)
    b.ip("addr", "add", f"{b_addr}/{prefix}", "dev", name)
    a.ip("link", "set", name, "up")
    b.ip("link", "set", name, "up")


@contextlib.contextmanager
def namespaces(count: int, prefix: str = "kbt") -> Iterator[list[Netns]]:
    """``count`` fresh namespaces (loopback up, nothing else), deleted afterwards."""
    made: list[Netns] = []
    try:
        for _ in range(count):
            ns = Netns(f"{prefix}{os.getpid()}{uuid.uuid4().hex[:8]}")
            _ip("netns", "add", ns.name)
            made.append(ns)
            ns.ip("link", "set", "lo", "up")
        yield made
    finally:
        for ns in made:
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("netns", "del", ns.name)


@contextlib.contextmanager
def two_hosts(prefix: str = "kbt") -> Iterator[tuple[Netns, Netns]]:
    """Two namespaces joined by a veth pair: ``a`` has `HOST_A`, ``b`` has `HOST_B`."""
    with namespaces(2, prefix) as (a, b):
        link(a, HOST_A, b, HOST_B)
        yield a, b


class Tripwire:
    """A TCP listener that counts the connections it accepts (and may echo their bytes).

    Put one where an attacker points the proxy and assert ``accepted == 0`` afterwards: proof
    that nothing was connected, not merely that the answer was a refusal.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, ns: Netns | None = None, echo: bool = False
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(16)
            return s

        self.sock = ns.call(make) if ns is not None else make()
        self.sock.settimeout(0.05)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self.echo = echo
        self.accepted = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.accepted += 1
            if self.echo:
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            else:
                conn.close()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    self.received += data
                    conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> Tripwire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_get(ns: Netns, host: str, port: int, path: str, timeout: float = 2) -> tuple[int, bytes]:
    """A plain ``GET`` from inside ``ns``: (status, body). Raises ``OSError`` if it fails."""
    with ns.connect((host, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        raise OSError(f"not an HTTP answer: {data[:80]!r}")
    return int(head.split(b" ", 2)[1]), body
