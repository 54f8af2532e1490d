"""What the command line checks before it starts anything: each mistake becomes one line.

A data dir that cannot be written, a port another process listens on, and a store that is
new (a mistyped ``--data-dir`` makes one) are found here, before ``keybrake run`` prints its
banner, rather than as a traceback or a log line after it::

    >>> check_listen("127.0.0.1", 8080, "--proxy-port")  # doctest: +SKIP
    PreflightError: cannot listen on 127.0.0.1:8080 (--proxy-port): address already in use; ...
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

from keybrake.store import SQLiteStore, Store

__all__ = ["PreflightError", "check_data_dir", "check_listen", "new_sqlite_file"]


class PreflightError(Exception):
    """A mistake found before starting; the message says what to fix, in one line."""


def check_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` if missing and prove it can be written (a file is made and removed).

    Root ignores permission bits but not ``chattr +i`` or a read-only mount: only a real
    write tells.
    """
    where = data_dir.expanduser().absolute()
    if where.exists() and not where.is_dir():
        raise PreflightError(
            f"data dir {where} is a file, not a directory: pass another --data-dir"
        )
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".keybrake-write-check-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(
            f"data dir {where} is not writable ({e.strerror}): fix its permissions or pass "
            "another --data-dir (or KEYBRAKE_DATA_DIR)"
        ) from None


def check_listen(host: str, port: int, flag: str) -> None:
    """Bind ``host:port`` the way mitmproxy will (``SO_REUSEADDR``, IPv6 only on IPv6), then
    let it go: a port another process listens on is found before the proxy starts."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise PreflightError(f"--listen-host {host!r}: {e.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PreflightError(
                        f"cannot listen on {host}:{port} ({flag}): address already in use; "
                        f"stop what listens there or pass another {flag}"
                    ) from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise PreflightError(
                        f"cannot listen on {host}:{port} (--listen-host): {host} is not an "
                        "address of this host"
                    ) from None
                raise PreflightError(
                    f"cannot listen on {host}:{port} ({flag}): {e.strerror}"
                ) from None


def new_sqlite_file(store: Store) -> Path | None:
    """The database file a SQLite store will create on open (``None``: it exists, or the
    store is not SQLite). A new file under a mistyped ``--data-dir`` is worth saying."""
    if isinstance(store, SQLiteStore) and not store.path.exists():
        return store.path.resolve()
    return None
