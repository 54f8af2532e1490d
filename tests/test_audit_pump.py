"""The `AuditPump` and `drain_outbox`: audit rows from the store's outbox to the audit sink.

Real parts only: the SQLite store in a temporary file and the Redis store on 127.0.0.1:6379
(a key prefix per test), the SQLite ``audit.db`` and a PostgreSQL schema of its own. A sink
fails for real (a trigger or a ``NOT VALID`` constraint, see ``tests/test_audit_sinks.py``),
a PostgreSQL connection is killed with ``pg_terminate_backend``, and a store that is down is
a Redis store on a port nothing listens on. Redis replicas are two store objects on one
prefix, with the claim of rows a dead consumer left pending shortened to `CLAIM_MS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests._ports import free_port
from tests.conftest import postgres_schema
from tests.store.conftest import REDIS_URL, delete_prefix, redis_prefix, require_redis
from tests.test_audit_sinks import Backend, pg_backend, rows, seqs, sqlite_backend

from keybrake.auditlog.pump import AuditPump, drain_outbox
from keybrake.store import RedisStore, SQLiteStore, Store

CLAIM_MS = 300

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """New store objects on one state: another replica (Redis) or the same file (SQLite)."""
    prefix = redis_prefix()
    if request.param == "redis":
        require_redis()

    def factory() -> Store:
        if request.param == "sqlite":
            return SQLiteStore(tmp_path / "state.db")
        return RedisStore(REDIS_URL, prefix=prefix, audit_claim_idle_ms=CLAIM_MS)

    yield factory
    if request.param == "redis":
        delete_prefix(prefix)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def sink_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield sqlite_backend(tmp_path)
        return
    with postgres_schema() as url:
        yield pg_backend(url)


def getter(store: Store) -> Callable[[], Any]:
    async def get() -> Store:
        return store

    return get


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        await asyncio.sleep(0.02)


async def append(store: Store, batch: list[dict[str, Any]]) -> None:
    for row in batch:
        await store.append_audit(row)


async def test_rows_in_the_outbox_arrive_once_in_order(store: Store, sink_backend: Backend) -> None:
    sink = sink_backend.make()
    pump = AuditPump(getter(store), sink, "replica-1", batch_size=50)
    await append(store, rows(120))
    pump.start()
    try:
        await wait_until(lambda: pump.written == 120, what="120 rows written")
        assert seqs(sink_backend.source) == list(range(120))
        await wait_until(lambda: pump.depth == 0, what="the backlog to be seen empty")
        assert await store.audit_backlog() == 0
        await append(store, rows(3, start=120))  # and later rows, without a flush
        await wait_until(lambda: pump.written == 123, timeout=3)
        assert pump.failures == 0 and pump.dropped == 0
    finally:
        await pump.close()
        sink.close()
    assert seqs(sink_backend.source) == list(range(123))


async def test_a_batch_written_but_never_acknowledged_is_recorded_once(
    store: Store, make_store: StoreFactory, sink_backend: Backend
) -> None:
    """A replica claims a batch, writes it to the sink and dies before acknowledging it;
    another replica picks the batch up (Redis: once it has been idle `CLAIM_MS`) and writes
    it again: each row is in the sink once, and the outbox ends empty."""
    sink = sink_backend.make()
    await append(store, rows(5))
    dead = await store.audit_batch("replica-dead", 10)
    assert len(dead) == 5
    sink.write([row for _, row in dead])  # ... and the process is killed here

    other = make_store()
    await other.open()
    pump = AuditPump(getter(other), sink, "replica-alive")
    pump.start()
    try:
        await wait_until(lambda: pump.written == 5, what="the dead replica's rows")
        await append(other, rows(2, start=5))
        await wait_until(lambda: pump.written == 7, what="new rows")
    finally:
        await pump.close()
        sink.close()
        await other.close()
    assert seqs(sink_backend.source) == list(range(7))
    assert await store.audit_backlog() == 0


async def test_a_failing_sink_keeps_rows_in_the_outbox_until_it_works(
    store: Store, sink_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    sink = sink_backend.make()
    pump = AuditPump(getter(store), sink, "replica-1", batch_size=10)
    pump.start()
    try:
        await append(store, rows(2))
        await wait_until(lambda: pump.written == 2)
        sink_backend.block("")
        await append(store, rows(25, start=2))
        await wait_until(lambda: pump.failures >= 2, what="failed writes")
        assert seqs(sink_backend.source) == [0, 1]  # nothing got through meanwhile
        assert await store.audit_backlog() == 25  # and nothing left the outbox
        assert "audit rows not moved to the sink" in caplog.text
        assert not await pump.flush(timeout=2)  # a reader's flush fails too, and says so
        sink_backend.unblock()
        await wait_until(lambda: pump.written == 27, timeout=15, what="the rows after repair")
        assert pump.failures == 0 and pump.dropped == 0
    finally:
        await pump.close()
        sink.close()
    assert seqs(sink_backend.source) == list(range(27))  # each once, in order
    assert await store.audit_backlog() == 0


async def test_flush_moves_every_row_at_once_whoever_claimed_it(
    store: Store, make_store: StoreFactory, sink_backend: Backend
) -> None:
    """Read-your-writes: a reader on any replica flushes; rows another replica claimed and
    has not written yet are moved too (that replica's own write and ack later are no-ops)."""
    sink = sink_backend.make()
    await append(store, rows(3))
    claimed = await store.audit_batch("replica-busy", 10)  # claimed, not yet written
    await append(store, rows(450, start=3))

    reader = make_store()
    await reader.open()
    # A loop that would not move anything for a minute: only flush can have done it.
    pump = AuditPump(getter(reader), sink, "replica-reader", idle_interval=60)
    pump.start()
    try:
        assert await pump.flush()
        assert seqs(sink_backend.source) == list(range(453))
        assert pump.written == 453 and pump.depth == 0
        # The busy replica finishes its batch late: nothing changes.
        sink.write([row for _, row in claimed])
        await store.audit_ack([i for i, _ in claimed])
        assert seqs(sink_backend.source) == list(range(453))
        assert await store.audit_backlog() == 0
        assert await store.audit_batch("replica-busy", 10) == []
    finally:
        await pump.close()
        sink.close()
        await reader.close()


async def test_drain_outbox_is_what_the_cli_uses(store: Store, tmp_path: Path) -> None:
    backend = sqlite_backend(tmp_path)
    sink = backend.make()
    try:
        assert await drain_outbox(store, sink) == 0
        await append(store, rows(7))
        assert await drain_outbox(store, sink, limit=3) == 7
        assert await drain_outbox(store, sink) == 0
    finally:
        sink.close()
    assert seqs(backend.source) == list(range(7))


async def test_rows_without_an_event_id_get_one_from_their_content(
    store: Store, tmp_path: Path
) -> None:
    """A row appended without an event_id is still written once however often it is moved."""
    backend = sqlite_backend(tmp_path)
    sink = backend.make()
    await append(store, rows(2, event_id=None))
    batch = await store.audit_peek(10)
    try:
        assert await drain_outbox(store, sink) == 2
        for _, row in batch:  # as if moved again before the acknowledgement
            await store.append_audit(row)
        assert await drain_outbox(store, sink) == 2
    finally:
        sink.close()
    assert seqs(backend.source) == [0, 1]


async def test_close_moves_what_is_left(store: Store, tmp_path: Path) -> None:
    backend = sqlite_backend(tmp_path)
    sink = backend.make()
    pump = AuditPump(getter(store), sink, "replica-1", idle_interval=60)
    pump.start()
    await append(store, rows(10))
    await pump.close()
    assert pump.closed and pump.written == 10
    await pump.close()  # twice is harmless
    sink.close()
    assert seqs(backend.source) == list(range(10))


async def test_rows_the_store_refused_are_kept_and_appended_once_it_is_back(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = sqlite_backend(tmp_path)
    sink = backend.make()
    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="kbtest:down:")
    current = {"store": down}

    async def get() -> Store:
        return current["store"]

    pump = AuditPump(get, sink, "replica-1")
    caplog.set_level(logging.WARNING, "keybrake")
    pump.start()
    try:
        for row in rows(3):
            pump.keep(row)  # what AuditTrail does when append_audit failed
        await wait_until(lambda: pump.failures >= 2, what="failures while the store is down")
        assert pump.depth >= 3
        assert "3 rows kept in memory" in caplog.text
        current["store"] = store  # the store is back
        await wait_until(lambda: pump.written == 3, what="kept rows written")
        assert pump.dropped == 0
    finally:
        await pump.close()
        sink.close()
        await down.close()
    assert seqs(backend.source) == [0, 1, 2]


async def test_postgres_sink_reconnects_after_losing_its_connection(store: Store) -> None:
    with postgres_schema() as url:
        backend = pg_backend(url)
        sink = backend.make()
        pump = AuditPump(getter(store), sink, "replica-1", batch_size=50)
        pump.start()
        try:
            await append(store, rows(10))
            await wait_until(lambda: pump.written == 10)
            pid = sink.conn.info.backend_pid  # type: ignore[attr-defined]
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            await append(store, rows(30, start=10))
            await wait_until(lambda: pump.written == 40, timeout=15)
            assert sink.conn.info.backend_pid != pid  # type: ignore[attr-defined]
        finally:
            await pump.close()
            sink.close()
        assert seqs(url) == list(range(40))


@pytest.mark.redis
async def test_an_idle_pump_polls_less_and_less_and_is_quick_again_once_rows_come(
    tmp_path: Path,
) -> None:
    """An idle fleet of many replicas would otherwise cost the shared Redis ten reads per
    replica per second: the pause doubles while the outbox stays empty (up to 1 s)."""
    from tests._redis import PrivateRedis

    server = PrivateRedis(tmp_path / "redis")
    server.start()
    store = RedisStore(server.url, prefix=redis_prefix())
    await store.open()
    sink = sqlite_backend(tmp_path).make()
    pump = AuditPump(getter(store), sink, "replica-1")

    def reads() -> int:
        """The pump's `audit_batch` steps so far (one EVALSHA each; nothing else sends any)."""
        out = server.cli("INFO", "commandstats").stdout
        line = next((ln for ln in out.splitlines() if ln.startswith("cmdstat_evalsha:")), "")
        return int(line.split("calls=")[1].split(",")[0]) if line else 0

    pump.start()
    try:
        await asyncio.sleep(3.2)
        idle = reads()
        # 0.1 s start, then pauses of 0.1, 0.2, 0.4, 0.8, 1.0 …: about six reads, not thirty.
        assert 3 <= idle <= 9, idle
        await append(store, rows(5))
        await wait_until(lambda: pump.written == 5, timeout=2.5, what="rows after the quiet")
        busy = reads()
        await append(store, rows(5, start=5))
        await wait_until(lambda: pump.written == 10, timeout=2.0, what="rows while busy")
        assert reads() > busy
    finally:
        await pump.close()
        await store.close()
        server.kill()
