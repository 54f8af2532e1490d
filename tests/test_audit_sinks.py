"""The audit sinks (embedded SQLite, shared PostgreSQL): schema, migration, idempotent writes.

Everything runs against the real databases: a temporary ``audit.db`` and a schema of its own
on the PostgreSQL at 127.0.0.1:5432. Sink failures are made for real too: a trigger (SQLite)
or a ``NOT VALID`` check constraint (PostgreSQL) added from another connection makes inserts
fail until it is dropped (`Backend.block`, also used by ``tests/test_audit_pump.py``).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.conftest import audit_query, postgres_schema

from keybrake.auditlog.sinks import (
    COLUMNS,
    AuditSink,
    PostgresAuditSink,
    SQLiteAuditSink,
    open_audit_sink,
)


def rows(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    """Rows numbered by ``message_id`` (to check order and duplicates), each with its own
    ``event_id``."""
    return [
        dict.fromkeys(COLUMNS)
        | {
            "event_id": uuid.uuid4().hex,
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


@dataclass
class Backend:
    """A sink factory plus what a test needs to read it and to break it from the outside."""

    kind: str
    source: Path | str  # what `audit_query` reads
    make: Callable[[], AuditSink]
    block: Callable[[str], None]  # make inserts fail ('' = all rows, else rows with this note)
    unblock: Callable[[], None]


def sqlite_backend(tmp_path: Path) -> Backend:
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


def pg_backend(url: str) -> Backend:
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
        yield sqlite_backend(tmp_path)
        return
    with postgres_schema() as url:
        yield pg_backend(url)


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
        backend = sqlite_backend(tmp_path) if kind == "sqlite" else pg_backend(url)
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


@pytest.mark.parametrize("n", [0, 1, 3, 4, 17, 64, 65, 129, 199, 200])
def test_a_batch_of_any_size_lands_whole_and_in_order(backend: Backend, n: int) -> None:
    sink = backend.make()
    sink.write(rows(n))
    sink.write(rows(2, start=n))
    sink.close()
    assert seqs(backend.source) == list(range(n + 2))


def test_the_sqlite_sink_writes_a_batch_in_a_few_statements(tmp_path: Path) -> None:
    """SQLite runs each statement with the GIL released: a statement per row made the pump's
    thread take the GIL back once per row, and the busy event loop hand it over each time."""
    sink = SQLiteAuditSink(tmp_path / "audit.db")
    statements: list[str] = []
    sink.conn.set_trace_callback(statements.append)
    sink.write(rows(200))
    sink.close()
    inserts = [s for s in statements if s.startswith("INSERT")]
    assert 1 <= len(inserts) <= 8, len(inserts)  # 3 x 64 rows, 2 x 4
    assert seqs(tmp_path / "audit.db") == list(range(200))


def test_a_row_written_twice_is_kept_once(backend: Backend) -> None:
    """What happens when a replica wrote a batch and died before acknowledging it, or two
    replicas flushed the same rows: the second write of an event_id is skipped."""
    sink = backend.make()
    batch = rows(3)
    sink.write(batch)
    sink.write(batch[1:] + rows(1, start=3))  # two again, one new
    sink.write([batch[0], batch[0]])  # twice in one batch
    sink.close()
    assert seqs(backend.source) == [0, 1, 2, 3]


def test_rows_without_an_event_id_are_all_kept(backend: Backend) -> None:
    """Rows from callers that set no event_id (NULL) are never taken for duplicates."""
    sink = backend.make()
    old = rows(2, event_id=None)
    sink.write(old)
    sink.write(old)
    sink.close()
    assert seqs(backend.source) == [0, 1, 0, 1]


def test_keys_outside_the_schema_are_ignored(backend: Backend) -> None:
    sink = backend.make()
    sink.write([rows(1)[0] | {"no_such_column": "x"}])
    sink.close()
    assert seqs(backend.source) == [0]


OLD_COLUMNS = [c for c in COLUMNS if c != "event_id"]


def test_a_database_without_event_ids_is_migrated(backend: Backend) -> None:
    """An audit table made before event_id existed gets the column and its unique index;
    its rows stay, and new writes are deduplicated."""
    if backend.kind == "sqlite":
        with sqlite3.connect(backend.source) as c:
            c.execute(f"CREATE TABLE audit (id INTEGER PRIMARY KEY, {', '.join(OLD_COLUMNS)})")
            c.execute("INSERT INTO audit (message_id, outcome) VALUES ('0', 'ok')")
    else:
        with psycopg.connect(str(backend.source), autocommit=True) as c:
            cols = ", ".join(f"{col} TEXT" for col in OLD_COLUMNS)
            c.execute(f"CREATE TABLE audit (id BIGINT GENERATED ALWAYS AS IDENTITY, {cols})")
            c.execute("INSERT INTO audit (message_id, outcome) VALUES ('0', 'ok')")
    sink = backend.make()
    batch = rows(2, start=1)
    sink.write(batch)
    sink.write(batch)
    sink.close()
    assert seqs(backend.source) == [0, 1, 2]
    reopened = backend.make()  # a second start: nothing left to migrate
    reopened.write(batch)
    reopened.close()
    assert seqs(backend.source) == [0, 1, 2]
    if backend.kind == "sqlite":
        idx = audit_query(backend.source, "SELECT sql FROM sqlite_master WHERE type = 'index'")
    else:
        idx = audit_query(
            backend.source, "SELECT indexdef AS sql FROM pg_indexes WHERE tablename = 'audit'"
        )
    assert any("UNIQUE" in str(r["sql"]) and "(event_id)" in str(r["sql"]) for r in idx), idx


# What sqlite-utils (which made audit.db up to 2026-12) wrote: a database from then opens as it
# is, and a new one has the same table and index names (for datasette users' saved queries).
SQLITE_UTILS_TABLE = """CREATE TABLE "audit" (
   "id" INTEGER PRIMARY KEY,
   "ts" TEXT,
   "key_id" TEXT,
   "label" TEXT,
   "vendor" TEXT,
   "method" TEXT,
   "path" TEXT,
   "status" INTEGER,
   "outcome" TEXT,
   "code" TEXT,
   "estimate_micros" INTEGER,
   "actual_micros" INTEGER,
   "amount_minor" INTEGER,
   "currency" TEXT,
   "vendor_request_id" TEXT,
   "vendor_object_id" TEXT,
   "idempotency_key" TEXT,
   "vendor_idempotency_key" TEXT,
   "actor" TEXT,
   "message_id" TEXT,
   "latency_ms" REAL,
   "instance" TEXT,
   "note" TEXT,
   "request_body" TEXT,
   "response_body" TEXT,
   "event_id" TEXT
)"""
SQLITE_UTILS_INDEXES = {
    "idx_audit_label_ts",
    "idx_audit_key_id_ts",
    "idx_audit_vendor_request_id",
    "idx_audit_ts",
    "audit_event_id",
}


def test_the_sqlite_schema_is_the_one_earlier_versions_made(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    SQLiteAuditSink(path).close()
    with sqlite3.connect(path) as c:
        (table,) = c.execute("SELECT sql FROM sqlite_master WHERE name = 'audit'").fetchone()
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert table == SQLITE_UTILS_TABLE
    assert names == SQLITE_UTILS_INDEXES
    # Opened again, or opened where that layout already is: nothing to add, rows kept.
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as c:
        c.execute(SQLITE_UTILS_TABLE)
        c.execute("INSERT INTO audit (message_id, event_id) VALUES ('0', 'e0')")
    for start, db in enumerate((path, old, old)):
        sink = SQLiteAuditSink(db)
        sink.write(rows(1, start=start))
        sink.close()
    assert seqs(old) == [0, 1, 2]
