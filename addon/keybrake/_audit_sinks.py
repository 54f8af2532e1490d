"""Where audit rows go: an embedded SQLite database (sqlite-utils) or a shared PostgreSQL table.

Both sinks have the same schema (`COLUMNS`) so reports and `datasette` work on either. The
`AuditWriter` takes rows from the event loop and writes them in batches on its own thread.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "COLUMNS",
    "AuditSink",
    "AuditWriter",
    "PostgresAuditSink",
    "SQLiteAuditSink",
    "open_audit_sink",
]

log = logging.getLogger("keybrake")

TABLE = "audit"
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
}
INDEXES: list[tuple[str, ...]] = [
    ("label", "ts"),
    ("key_id", "ts"),
    ("vendor_request_id",),
    ("ts",),
]


class AuditSink(Protocol):
    """Writes batches of audit rows; raises on failure (the writer retries)."""

    placeholder: str

    def write(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class SQLiteAuditSink:
    """``<data dir>/audit.db``, written with sqlite-utils; open it with ``datasette audit.db``."""

    placeholder = "?"

    def __init__(self, path: Path) -> None:
        import sqlite_utils

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Created on the event loop, written from the writer thread (serialised by the lock).
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.conn.execute("PRAGMA journal_mode=WAL")
        self.db.conn.execute("PRAGMA busy_timeout=5000")
        # WAL + NORMAL: durable across process crashes, one fsync per checkpoint.
        self.db.conn.execute("PRAGMA synchronous=NORMAL")
        table = self.db.table(TABLE)
        if not table.exists():
            table.create({"id": int, **{c: _py(t) for c, t in COLUMNS.items()}}, pk="id")
        # A database made by an earlier version gets the columns added since.
        for column, sql_type in COLUMNS.items():
            if column not in table.columns_dict:
                table.add_column(column, _py(sql_type))
        for cols in INDEXES:
            table.create_index(list(cols), if_not_exists=True)

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """All rows or none: a failed batch is retried whole, never half-written twice."""
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                self.db.table(TABLE).insert_all(rows, batch_size=500)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.conn.execute(sql, list(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


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

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        names = list(COLUMNS)
        sql = f"INSERT INTO {TABLE} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"  # noqa: S608 (constant names)
        with self._lock:
            if self.conn is None or self.conn.closed:
                self._connect()
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.executemany(sql, [[r.get(n) for n in names] for r in rows])

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


def _py(sql_type: str) -> type:
    return {"TEXT": str, "INTEGER": int, "REAL": float}[sql_type]


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


_STOP = object()


class AuditWriter:
    """Batches rows onto a sink from a background thread; `close` flushes everything.

    A failing sink is retried (rows are kept, in order) and reported loudly; rows are only
    dropped past ``max_pending`` (and every drop is logged with its count).
    """

    def __init__(
        self,
        sink: AuditSink,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        max_pending: int = 200_000,
    ) -> None:
        self.sink = sink
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._queue: queue.Queue[Any] = queue.Queue()
        self.written = 0
        self.dropped = 0
        self.failures = 0  # consecutive
        self.closed = False
        self._thread = threading.Thread(target=self._run, name="keybrake-audit", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, row: dict[str, Any]) -> None:
        if self.closed:
            # After shutdown began: write through, so late answers are still recorded.
            try:
                self.sink.write([row])
                self.written += 1
            except Exception as e:
                self.dropped += 1
                log.error("keybrake: audit row lost at shutdown: %s", e)
            return
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            log.error("keybrake: audit backlog full (%d rows); row dropped", self.max_pending)
            return
        self._queue.put(row)

    def close(self, timeout: float = 30) -> None:
        """Flush everything queued and stop the thread; later rows are written through."""
        if self.closed:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error(
                "keybrake: audit writer did not finish in %ss; %d rows pending", timeout, self.depth
            )
        self.closed = True

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        stopping = False
        while not (stopping and not pending):
            if not stopping:
                try:
                    item = self._queue.get(timeout=self.flush_interval)
                except queue.Empty:
                    item = None
                # Collect for up to flush_interval after the first row: one transaction
                # per batch, not per row, under load.
                deadline = time.monotonic() + self.flush_interval
                while item is not None:
                    if item is _STOP:
                        stopping = True
                        break
                    pending.append(item)
                    if len(pending) >= self.batch_size:
                        break
                    left = deadline - time.monotonic()
                    try:
                        item = self._queue.get(timeout=left) if left > 0 else None
                    except queue.Empty:
                        item = None
            if not pending:
                continue
            try:
                self.sink.write(pending)
                self.written += len(pending)
                pending = []
                self.failures = 0
            except Exception as e:
                self.failures += 1
                log.error(
                    "keybrake: audit write failed (%s); %d rows kept, retrying", e, len(pending)
                )
                time.sleep(min(2.0, 0.2 * self.failures))
                if stopping and self.failures > 6:  # about 4 s of retries at shutdown
                    log.error("keybrake: giving up on %d audit rows at shutdown", len(pending))
                    return
