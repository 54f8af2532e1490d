"""Where audit rows go: an embedded SQLite database or a shared PostgreSQL table.

Both sinks have the same schema (`COLUMNS`) so reports and `datasette` work on either. Writes
are idempotent: a row whose ``event_id`` the sink already has is skipped, so a batch written
twice (a replica that died between writing and acknowledging, or two replicas flushing the
same rows) is recorded once. `keybrake.auditlog.pump.AuditPump` moves rows from the store's
outbox here.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "COLUMNS",
    "AuditSink",
    "PostgresAuditSink",
    "SQLiteAuditSink",
    "audit_time",
    "open_audit_sink",
]

log = logging.getLogger("keybrake")

TABLE = "audit"


def audit_time(t: dt.datetime) -> str:
    """The audit log's timestamps: UTC with microseconds, fixed width, so that text order is
    time order in both sinks (``2030-01-01T12:00:00.000000Z``)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# name -> SQLite type; PostgreSQL maps INTEGER to BIGINT, REAL to DOUBLE PRECISION.
COLUMNS: dict[str, str] = {
    "ts": "TEXT",  # UTC ISO-8601 with microseconds and Z: sorts as text
    "key_id": "TEXT",
    "label": "TEXT",
    "vendor": "TEXT",
    "method": "TEXT",
    "path": "TEXT",
    "status": "INTEGER",
    # ok | held | overrun | refused | replayed | vendor_error | unknown
    "outcome": "TEXT",
    "code": "TEXT",  # refusal code
    "estimate_micros": "INTEGER",
    "actual_micros": "INTEGER",
    "amount_minor": "INTEGER",
    "currency": "TEXT",
    "vendor_request_id": "TEXT",
    "vendor_object_id": "TEXT",
    "idempotency_key": "TEXT",  # as the worker sent it
    "vendor_idempotency_key": "TEXT",  # as forwarded: namespaced per vault key
    "actor": "TEXT",
    "message_id": "TEXT",
    "latency_ms": "REAL",
    "instance": "TEXT",
    "note": "TEXT",
    "request_body": "TEXT",
    "response_body": "TEXT",
    # uuid4 hex given when the row is made; unique, so a row written twice is kept once.
    # Rows without one (written by earlier versions) are not deduplicated.
    "event_id": "TEXT",
}
INDEXES: list[tuple[str, ...]] = [
    ("label", "ts"),
    ("key_id", "ts"),
    ("vendor_request_id",),
    ("ts",),
]
# Rows per INSERT statement (the largest that fits the parameter limit first): a batch of 200
# is 3 x 64, 2 x 4; at most a handful of statements per batch, each prepared once.
CHUNK_ROWS = (64, 16, 4, 1)
# UNIQUE allows any number of NULLs (both databases): old rows without an event_id stay.
EVENT_INDEX = f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_event_id ON {TABLE} (event_id)"


class AuditSink(Protocol):
    """Writes batches of audit rows, all or none, skipping rows whose ``event_id`` it already
    has; raises on failure (the pump retries)."""

    placeholder: str

    def write(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class SQLiteAuditSink:
    """``<data dir>/audit.db``: one table, ``audit``; open it with ``datasette audit.db``.

    The schema is the one sqlite-utils made for earlier versions (the same column types and
    index names), so a database from any version opens as it is and gets the columns added
    since.
    """

    placeholder = "?"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Created on the event loop, written from the pump's threads (serialised by the lock).
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        # WAL + NORMAL: durable across process crashes, one fsync per checkpoint.
        conn.execute("PRAGMA synchronous=NORMAL")
        have = {row[1] for row in conn.execute(f'PRAGMA table_info("{TABLE}")')}
        if not have:
            columns = "".join(f',\n   "{c}" {t}' for c, t in COLUMNS.items())
            conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{TABLE}" (\n   "id" INTEGER PRIMARY KEY{columns}\n)'
            )
        # A database made by an earlier version gets the columns added since.
        for column, sql_type in COLUMNS.items():
            if have and column not in have:
                try:
                    conn.execute(f'ALTER TABLE "{TABLE}" ADD COLUMN "{column}" {sql_type}')
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):  # another process was first
                        raise
        for cols in INDEXES:
            quoted = ", ".join(f'"{c}"' for c in cols)
            name = f"idx_{TABLE}_{'_'.join(cols)}"
            conn.execute(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{TABLE}" ({quoted})')
        conn.execute(EVENT_INDEX)
        # Chunk sizes the batch is cut into, each statement prepared once: as many rows as
        # the database takes parameters for, then smaller ones for the rest.
        most = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS)
        one = f"({', '.join(['?'] * len(COLUMNS))})"
        self._inserts = {
            n: f"INSERT OR IGNORE INTO {TABLE} ({', '.join(COLUMNS)}) "  # noqa: S608 (constant names)
            f"VALUES {', '.join([one] * n)}"
            for n in CHUNK_ROWS
            if n <= most or n == 1
        }

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """All rows or none: a failed batch is retried whole, never half-written twice. Rows
        whose ``event_id`` is already here are skipped; keys not in `COLUMNS` are ignored."""
        values = [r.get(n) for r in rows for n in COLUMNS]
        width = len(COLUMNS)
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A few statements of many rows each (largest first), not one per row: SQLite
                # runs each with the GIL released, and this thread taking it back after every
                # row made the busy event loop hand it over each time (a futex call and a
                # context switch per row).
                start, left = 0, len(rows)
                for size, insert in self._inserts.items():
                    while left >= size:
                        end = start + size * width
                        conn.execute(insert, values[start:end])
                        start, left = end, left - size
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def check_writable(self) -> None:
        """Raise unless a row could be written now (takes the write lock, writes nothing)."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

    def query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.conn.execute(sql, list(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self.conn.close()


class PostgresAuditSink:
    """One table shared by every proxy replica (``postgresql://...``), same schema."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self._lock = threading.Lock()
        self._psycopg = psycopg
        self.conn: Any = None
        self._connect()

    def _connect(self) -> None:
        self.conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=3)
        types = {"TEXT": "TEXT", "INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION"}
        cols = ", ".join(f"{c} {types[t]}" for c, t in COLUMNS.items())
        with self.conn.transaction():
            # Two replicas starting together must not race on CREATE TABLE.
            self.conn.execute("SELECT pg_advisory_xact_lock(727274)")
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT GENERATED ALWAYS AS IDENTITY "
                f"PRIMARY KEY, {cols})"
            )
            for column, sql_type in COLUMNS.items():
                self.conn.execute(
                    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {column} {types[sql_type]}"
                )
            for idx in INDEXES:
                name = f"{TABLE}_{'_'.join(idx)}"
                self.conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {name} ON {TABLE} ({', '.join(idx)})"
                )
            self.conn.execute(EVENT_INDEX)

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """All rows or none (one transaction); rows whose ``event_id`` is already here are
        skipped, keys not in `COLUMNS` are ignored."""
        names = list(COLUMNS)
        sql = (
            f"INSERT INTO {TABLE} ({', '.join(names)}) "  # noqa: S608 (constant names)
            f"VALUES ({', '.join(['%s'] * len(names))}) ON CONFLICT (event_id) DO NOTHING"
        )
        with self._lock:
            if self.conn is None or self.conn.closed:
                self._connect()
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.executemany(sql, [[r.get(n) for n in names] for r in rows])

    def check_writable(self) -> None:
        """Raise unless rows could be inserted now (a lock that needs INSERT, rolled back)."""
        with self._lock:
            if self.conn is None or self.conn.closed:
                self._connect()
            with self.conn.transaction(force_rollback=True):
                self.conn.execute(f"LOCK TABLE {TABLE} IN ROW EXCLUSIVE MODE NOWAIT")

    def query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._lock:
            if self.conn is None or self.conn.closed:
                self._connect()
            with self.conn.cursor() as cur:
                cur.execute(sql, list(params))
                names = [d.name for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()


def open_audit_sink(url: str, data_dir: Path) -> AuditSink:
    """``""``/``sqlite:///path`` → SQLite (default ``<data dir>/audit.db``); ``postgresql://`` →
    PostgreSQL."""
    if not url:
        return SQLiteAuditSink(data_dir / "audit.db")
    if url.startswith("sqlite:///"):
        return SQLiteAuditSink(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresAuditSink(url)
    raise ValueError(f"audit URL must be sqlite:///path or postgresql://..., not {url[:40]!r}")
