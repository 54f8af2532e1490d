"""Helpers for running what ``deploy/`` describes, exactly, inside a network namespace.

Each deployment (container image + compose, Kubernetes, systemd) binds fixed ports
(8080, 8443, 8081): in a namespace of its own it cannot clash with anything. Host names the
files use (``redis``, ``postgres``) resolve to the namespace's loopback through
``/etc/netns/<name>/hosts`` (``ip netns exec`` mounts it over ``/etc/hosts``). The only
changes made to what the files say are `PathMap`'s: absolute paths of the image
(``/var/lib/keybrake``, ``/etc/keybrake``, ``/run/secrets``) moved under a test directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.netns import Netns

DEPLOY = Path(__file__).resolve().parent.parent.parent / "deploy"


class PathMap:
    """Image paths → directories of the test, applied to every argument, variable and file."""

    def __init__(self, root: Path, prefixes: list[str]) -> None:
        self.pairs = [(p, str(root / p.strip("/").replace("/", "-"))) for p in prefixes]

    def __call__(self, text: str) -> str:
        for image, here in self.pairs:
            text = text.replace(image, here)
        return text

    def dir(self, image_path: str) -> Path:
        path = Path(self(image_path))
        path.mkdir(parents=True, exist_ok=True)
        return path


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}`` and ``$$``."""

    def one(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op == ":?":
            raise KeyError(f"compose needs {name}: {rest}")
        return rest if op == ":-" else ""

    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-|:\?)?([^}]*)\}", one, value)
    return out.replace("$$", "$")


@contextlib.contextmanager
def hosts_file(ns: Netns, names: list[str]) -> Iterator[None]:
    """``names`` resolve to 127.0.0.1 for processes started with ``ip netns exec``."""
    directory = Path("/etc/netns") / ns.name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        (directory / "hosts").write_text(
            "127.0.0.1 localhost " + " ".join(names) + "\n::1 localhost\n"
        )
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Relay:
    """A TCP port inside ``ns`` relayed to one on the host's loopback (the shared test
    PostgreSQL), by the test process: nothing is added to any network configuration."""

    def __init__(self, ns: Netns, port: int, target: tuple[str, int]) -> None:
        def listen() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(16)
            return s

        self.sock = ns.call(listen)
        self.sock.settimeout(0.1)
        self.target = target
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                inner, _ = self.sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            try:
                outer = socket.create_connection(self.target, timeout=10)
            except OSError:
                inner.close()
                continue
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def start(
    ns: Netns, cmd: list[str], env: Mapping[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBRAKE_", "PG"))}
    base = {k: v for k, v in base.items() if k.lower() not in ("https_proxy", "http_proxy")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [*ns.exec_prefix(), *cmd],
            env={**base, **env},
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group: `stop` ends what it started too (a shell's pipeline).
            start_new_session=True,
        )


def get(
    ns: Netns,
    port: int,
    path: str,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5,
) -> tuple[int, bytes]:
    """A ``GET`` to ``127.0.0.1:port`` from inside ``ns`` (over TLS with ``tls``)."""
    raw = ns.connect(("127.0.0.1", port), timeout=timeout)
    sock: Any = raw
    if tls is not None:
        sock = tls.wrap_socket(raw, server_hostname=server_name or "127.0.0.1")
    with sock:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        with contextlib.suppress(ssl.SSLError):
            while chunk := sock.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def unverified() -> ssl.SSLContext:
    """What a kubelet probe does with ``scheme: HTTPS``: TLS without verification."""
    c = ssl.create_default_context()
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c


def wait_until_up(
    proc: subprocess.Popen[bytes], ns: Netns, port: int, tls: ssl.SSLContext | None, log: Path
) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            if get(ns, port, "/healthz", tls=tls, timeout=1)[0] == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"not up in 40s:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """``SIGTERM`` to everything `start` started (its process group: a command such as
    compose's ``sh -c "printf … | exec redis-server -"`` leaves redis-server a child of the
    shell), then ``SIGKILL`` to what is left after 20 s."""
    stop_group(proc, 20)


def stop_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """End ``proc``'s process group (started with ``start_new_session``): ``SIGTERM``, then
    ``SIGKILL`` after ``grace`` seconds; returns once no process of it is left (or 5 s
    after the ``SIGKILL``)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(5)
                return
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)
