"""The audit sinks (embedded SQLite, shared PostgreSQL) and the batching `AuditWriter`.

Everything runs against the real databases: a temporary ``audit.db`` and a schema of its own
on the PostgreSQL at 127.0.0.1:5432. Sink failures are made for real too: a trigger (SQLite)
or a ``NOT VALID`` check constraint (PostgreSQL) added from another connection makes inserts
fail until it is dropped; a terminated backend makes the PostgreSQL connection die.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.conftest import audit_query, postgres_schema

from keybrake._audit_sinks import (
    COLUMNS,
    AuditSink,
    AuditWriter,
    PostgresAuditSink,
    SQLiteAuditSink,
    open_audit_sink,
)


def rows(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    """Rows numbered by ``message_id`` (to check order and duplicates)."""
    return [
        dict.fromkeys(COLUMNS)
        | {
            "ts": f"2026-11-25T10:00:00.{i:06d}Z",
            "key_id": "key_a",
            "label": "billing/nightly",
            "vendor": "stripe",
            "outcome": "ok",
            "actual_micros": 1_000,
            "message_id": str(i),
        }
        | extra
        for i in range(start, start + n)
    ]


def seqs(source: Path | str) -> list[int]:
    return [int(r["message_id"]) for r in audit_query(source, "SELECT * FROM audit ORDER BY id")]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@dataclass
class Backend:
    """A sink factory plus what a test needs to read it and to break it from the outside."""

    kind: str
    source: Path | str  # what `audit_query` reads
    make: Callable[[], AuditSink]
    block: Callable[[str], None]  # make inserts fail ('' = all rows, else rows with this note)
    unblock: Callable[[], None]


def _sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "audit.db"

    def block(note: str) -> None:
        when = f"WHEN NEW.note = '{note}' " if note else ""
        with sqlite3.connect(path) as c:
            c.execute(
                f"CREATE TRIGGER kb_block BEFORE INSERT ON audit {when}"
                "BEGIN SELECT RAISE(ABORT, 'blocked by test'); END"
            )

    def unblock() -> None:
        with sqlite3.connect(path) as c:
            c.execute("DROP TRIGGER IF EXISTS kb_block")

    return Backend("sqlite", path, lambda: SQLiteAuditSink(path), block, unblock)


def _pg_backend(url: str) -> Backend:
    def block(note: str) -> None:
        check = f"note IS DISTINCT FROM '{note}'" if note else "false"
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"ALTER TABLE audit ADD CONSTRAINT kb_block CHECK ({check}) NOT VALID")

    def unblock() -> None:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("ALTER TABLE audit DROP CONSTRAINT IF EXISTS kb_block")

    return Backend("postgresql", url, lambda: PostgresAuditSink(url), block, unblock)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield _sqlite_backend(tmp_path)
        return
    with postgres_schema() as url:
        yield _pg_backend(url)


class Recording:
    """Wraps a real sink to see the batches the writer hands it (writes still go through)."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.placeholder = sink.placeholder
        self.batches: list[int] = []
        self.pause_after_write = 0.0

    def write(self, batch: Sequence[dict[str, Any]]) -> None:
        self.sink.write(batch)
        self.batches.append(len(batch))
        time.sleep(self.pause_after_write)

    def query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return self.sink.query(sql, params)

    def close(self) -> None:
        self.sink.close()


# -- sinks -----------------------------------------------------------------------------------------
def test_schema_and_indexes(backend: Backend) -> None:
    sink = backend.make()
    sink.write(rows(3))
    got = sink.query("SELECT * FROM audit ORDER BY id", [])
    sink.close()
    assert list(got[0]) == ["id", *COLUMNS]
    assert [r["message_id"] for r in got] == ["0", "1", "2"]
    assert got[0]["actual_micros"] == 1_000 and got[0]["status"] is None
    if backend.kind == "sqlite":
        idx = audit_query(backend.source, "SELECT sql FROM sqlite_master WHERE type = 'index'")
        defs = " ".join(str(r["sql"]) for r in idx).replace('"', "")
    else:
        idx = audit_query(
            backend.source, "SELECT indexdef AS sql FROM pg_indexes WHERE tablename = 'audit'"
        )
        defs = " ".join(str(r["sql"]) for r in idx).replace('"', "")
    for cols in ("label, ts", "key_id, ts", "vendor_request_id"):
        assert f"({cols})" in defs


def test_reopening_keeps_rows_and_uses_the_same_table(backend: Backend) -> None:
    first = backend.make()
    first.write(rows(2))
    first.close()
    second = backend.make()  # CREATE ... IF NOT EXISTS: no error, no new table
    second.write(rows(2, start=2))
    second.close()
    assert seqs(backend.source) == [0, 1, 2, 3]


def test_query_uses_the_placeholder(backend: Backend) -> None:
    sink = backend.make()
    sink.write(rows(5))
    p = sink.placeholder
    got = sink.query(f"SELECT message_id FROM audit WHERE message_id IN ({p}, {p})", ["1", "3"])
    sink.close()
    assert sorted(r["message_id"] for r in got) == ["1", "3"]


def test_open_audit_sink_by_url(tmp_path: Path) -> None:
    default = open_audit_sink("", tmp_path / "data")
    assert isinstance(default, SQLiteAuditSink)
    assert default.path == tmp_path / "data" / "audit.db"
    default.close()
    explicit = open_audit_sink(f"sqlite://{tmp_path}/elsewhere/a.db", tmp_path / "data")
    assert isinstance(explicit, SQLiteAuditSink)
    assert explicit.path == tmp_path / "elsewhere" / "a.db"
    explicit.close()
    with postgres_schema() as url:
        pg = open_audit_sink(url, tmp_path)
        assert isinstance(pg, PostgresAuditSink)
        pg.close()
    for bad in ("mysql://x/y", "audit.db", "sqlite://host/a.db"):
        with pytest.raises(ValueError, match="audit URL"):
            open_audit_sink(bad, tmp_path)


def test_unreachable_postgresql_fails_at_open() -> None:
    with pytest.raises(psycopg.OperationalError):
        PostgresAuditSink("postgresql://postgres@127.0.0.1:1/test")


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "sqlite",
        ),
        "postgresql",
    ],
)
def test_a_failed_batch_leaves_nothing_behind(kind: str, tmp_path: Path) -> None:
    with postgres_schema() as url:
        backend = _sqlite_backend(tmp_path) if kind == "sqlite" else _pg_backend(url)
        sink = backend.make()
        backend.block("poison")
        batch = rows(100)
        batch[90]["note"] = "poison"
        with pytest.raises(Exception, match=r"blocked|kb_block"):
            sink.write(batch)
        assert seqs(backend.source) == []
        backend.unblock()
        sink.write(batch)  # what the writer does next: retry the whole batch
        sink.close()
        assert seqs(backend.source) == list(range(100))


# -- the writer ------------------------------------------------------------------------------------
def test_writer_batches_and_keeps_order(backend: Backend) -> None:
    sink = Recording(backend.make())
    writer = AuditWriter(sink, batch_size=200, flush_interval=0.2)
    for r in rows(1000):
        writer.submit(r)
    wait_until(lambda: writer.written == 1000)
    assert sum(sink.batches) == 1000
    assert max(sink.batches) <= 200
    assert len(sink.batches) >= 5
    assert seqs(backend.source) == list(range(1000))
    writer.close()
    assert writer.failures == 0 and writer.dropped == 0


def test_writer_flushes_a_lone_row_within_the_interval(backend: Backend) -> None:
    writer = AuditWriter(backend.make(), batch_size=200, flush_interval=0.2)
    try:
        started = time.monotonic()
        writer.submit(rows(1)[0])
        wait_until(lambda: seqs(backend.source) == [0], timeout=3)
        assert time.monotonic() - started < 1.5
    finally:
        writer.close()


def test_close_flushes_every_pending_row(backend: Backend) -> None:
    writer = AuditWriter(backend.make(), batch_size=200, flush_interval=0.2)
    for r in rows(3000):
        writer.submit(r)
    writer.close()  # no waiting before: close itself must drain the queue
    assert writer.written == 3000
    assert seqs(backend.source) == list(range(3000))


def test_failing_sink_is_retried_without_losing_rows(backend: Backend) -> None:
    writer = AuditWriter(backend.make(), batch_size=50, flush_interval=0.05)
    try:
        for r in rows(20):
            writer.submit(r)
        wait_until(lambda: writer.written == 20)
        backend.block("")
        for r in rows(120, start=20):
            writer.submit(r)
        wait_until(lambda: writer.failures >= 2)
        assert seqs(backend.source) == list(range(20))  # nothing got through meanwhile
        backend.unblock()
        wait_until(lambda: writer.written == 140, timeout=15)
        assert seqs(backend.source) == list(range(140))  # all of them, once, in order
        assert writer.dropped == 0
    finally:
        writer.close()


def test_postgres_sink_reconnects_after_losing_its_connection() -> None:
    with postgres_schema() as url:
        sink = PostgresAuditSink(url)
        writer = AuditWriter(sink, batch_size=50, flush_interval=0.05)
        try:
            for r in rows(10):
                writer.submit(r)
            wait_until(lambda: writer.written == 10)
            pid = sink.conn.info.backend_pid
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            for r in rows(30, start=10):
                writer.submit(r)
            wait_until(lambda: writer.written == 40, timeout=15)
            assert seqs(url) == list(range(40))
            assert sink.conn.info.backend_pid != pid
        finally:
            writer.close()


def test_close_with_a_dead_sink_returns_and_says_so(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AuditWriter(backend.make(), batch_size=50, flush_interval=0.05)
    backend.block("")
    writer.submit(rows(1)[0])
    started = time.monotonic()
    writer.close(timeout=30)
    assert time.monotonic() - started < 10
    assert writer.written == 0
    assert "giving up on 1 audit rows" in caplog.text


def test_a_sink_back_during_shutdown_gets_the_rows(backend: Backend) -> None:
    writer = AuditWriter(backend.make(), batch_size=50, flush_interval=0.05)
    backend.block("")
    writer.submit(rows(1)[0])
    wait_until(lambda: writer.failures >= 1)
    threading.Timer(0.3, backend.unblock).start()
    writer.close()
    assert seqs(backend.source) == [0]


def test_old_transient_failures_do_not_shorten_the_shutdown_retries(tmp_path: Path) -> None:
    backend = _sqlite_backend(tmp_path)
    sink = Recording(backend.make())
    writer = AuditWriter(sink, batch_size=50, flush_interval=0.05)
    backend.block("")
    writer.submit(rows(1)[0])
    wait_until(lambda: writer.failures >= 4)
    backend.unblock()
    wait_until(lambda: writer.written == 1)  # recovered, long before shutdown
    # Row 1 is written, then the writer is held in `write` for 1 s; meanwhile the sink breaks
    # again for 1.5 s, row 2 is submitted and shutdown starts: a short blip during shutdown.
    sink.pause_after_write = 1.0
    writer.submit(rows(1, start=1)[0])
    wait_until(lambda: writer.written == 2)
    backend.block("")
    writer.submit(rows(1, start=2)[0])
    threading.Timer(1.5, backend.unblock).start()
    writer.close()
    assert seqs(backend.source) == [0, 1, 2]
