"""Moving audit rows from the store's outbox to the audit sink: `AuditPump` and `drain_outbox`.

A call's audit row is committed to the store's outbox together with its ledger change
(`Store.settle_call`, `Store.append_audit`), so it survives ``kill -9``. The pump of each
replica moves rows from there to the sink (SQLite ``audit.db`` or PostgreSQL) and drops them
from the outbox only once the sink has committed them. The sink skips rows it already has
(by ``event_id``), so a row written twice (a replica that died before acknowledging, two
replicas flushing at once) is recorded once; a row is never dropped.

Readers of audit data call `AuditPump.flush` (or, outside the proxy, `drain_outbox`) first:
every row in the outbox then, whichever replica claimed it, is in the sink.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from keybrake.auditlog.sinks import AuditSink
from keybrake.store import Store, StoreUnavailable

__all__ = ["AuditPump", "drain_outbox", "with_event_id"]

log = logging.getLogger("keybrake")

BATCH_SIZE = 200
IDLE_INTERVAL = 0.1
# While the outbox stays empty the pause doubles up to this: an idle fleet of many replicas
# costs the shared store a few steps per replica per second, not ten.
IDLE_MAX_INTERVAL = 1.0
MAX_BACKOFF = 5.0
# Rows the store refused to take (it was down): kept in memory until it is back.
MAX_KEPT = 100_000

StoreGetter = Callable[[], Awaitable[Store]]


def with_event_id(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with an ``event_id`` (a new uuid4 hex unless it has one already)."""
    if row.get("event_id"):
        return row
    return {**row, "event_id": uuid.uuid4().hex}


def _for_sink(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the sink gets it: one without an ``event_id`` (appended by an older version)
    gets one derived from its content, the same every time it is written."""
    if row.get("event_id"):
        return row
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
    return {**row, "event_id": f"sha256:{digest[:40]}"}


def _problem(exc: BaseException) -> str:
    """What went wrong, on one line (a database's message, never the rows it was given)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


async def _move(store: Store, sink: AuditSink, batch: Sequence[tuple[str, dict[str, Any]]]) -> int:
    """Write ``batch`` to the sink (off the event loop), then acknowledge it; how many rows."""
    if not batch:
        return 0
    await asyncio.to_thread(sink.write, [_for_sink(row) for _, row in batch])
    await store.audit_ack([i for i, _ in batch])
    return len(batch)


async def drain_outbox(store: Store, sink: AuditSink, limit: int = BATCH_SIZE) -> int:
    """Move every row now in ``store``'s outbox to ``sink``, whichever replica claimed it, in
    batches of ``limit``; returns how many rows were moved. Safe alongside running pumps:
    the sink skips rows it has, and acknowledging a row twice is harmless.

    Example (what ``keybrake audit`` does before it reads the sink)::

        moved = await drain_outbox(store, open_audit_sink("", data_dir))
    """
    moved = 0
    while True:
        # The rows as they are now (their ids are stored as is), not as the store returned them.
        batch: list[tuple[str, dict[str, Any]]] = [
            (i, dict(row)) for i, row in await store.audit_peek(limit)
        ]
        moved += await _move(store, sink, batch)
        if len(batch) < limit:
            return moved


class AuditPump:
    """One replica's mover of audit rows from the outbox to the sink, on the event loop.

    ``start`` runs the loop: a batch claimed by ``consumer`` (`Store.audit_batch`) is written
    to the sink in a thread and acknowledged once written; batches that are not full are
    followed by ``idle_interval`` of sleep, doubled for each empty batch in a row up to
    `IDLE_MAX_INTERVAL`. Failures (store or sink) are logged, counted in
    ``failures`` (consecutive) and retried with backoff; the rows stay in the outbox meanwhile.

    Example::

        pump = AuditPump(runtime.open_store, sink, runtime.instance_id)
        pump.start()
        await pump.flush()  # before reading the sink
        await pump.close()
    """

    def __init__(
        self,
        store: StoreGetter,
        sink: AuditSink,
        consumer: str,
        *,
        batch_size: int = BATCH_SIZE,
        idle_interval: float = IDLE_INTERVAL,
    ) -> None:
        self.sink = sink
        self.consumer = consumer
        self.batch_size = batch_size
        self.idle_interval = idle_interval
        self.written = 0  # rows this pump moved to the sink
        self.dropped = 0  # rows lost: only past MAX_KEPT while the store is down
        self.failures = 0  # consecutive
        self.closed = False
        self._store = store
        self._backlog = 0
        self._kept: collections.deque[dict[str, Any]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        # The loop and `flush` take turns: no row is written twice by the same replica.
        self._turn = asyncio.Lock()

    @property
    def depth(self) -> int:
        """Rows waiting: the outbox's backlog when last looked at, and rows kept in memory."""
        return self._backlog + len(self._kept)

    def start(self) -> None:
        """Start the loop (on the running event loop); harmless when it runs already."""
        if self._task is None or self._task.done():
            self.closed = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    def keep(self, row: dict[str, Any]) -> None:
        """A row the store could not take now: appended to the outbox by the loop, later."""
        if len(self._kept) >= MAX_KEPT:
            self.dropped += 1
            log.error(
                "keybrake: audit row lost: the store has been unavailable for %d rows", MAX_KEPT
            )
            return
        self._kept.append(with_event_id(row))

    async def flush(self, timeout: float = 5.0) -> bool:
        """Move everything now in the outbox (and rows kept in memory) to the sink; False
        (logged) when that failed or took longer than ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self._turn:
                store = await self._store()
                await self._append_kept(store)
                self.written += await drain_outbox(store, self.sink, self.batch_size)
                self._backlog = await store.audit_backlog()
        except TimeoutError:
            log.warning(
                "keybrake: audit flush did not finish in %ss; reading what is there", timeout
            )
            return False
        except Exception as e:
            self.failures += 1
            self._report(e, "audit flush failed")
            return False
        return True

    async def stop(self) -> list[dict[str, Any]]:
        """Stop the loop without flushing (a replaced sink); returns the rows kept in memory,
        for the pump that takes over."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        kept, self._kept = list(self._kept), collections.deque()
        return kept

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the loop, then move what is in the outbox to the sink (rows left there are
        moved by another replica or at the next start)."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if await self.flush(timeout):
            return
        if self._kept:
            self.dropped += len(self._kept)
            log.error(
                "keybrake: %d audit rows lost at shutdown: the store is unavailable",
                len(self._kept),
            )
            self._kept.clear()
        log.error(
            "keybrake: audit rows stay in the store's outbox (%d); the next start moves them",
            self._backlog,
        )

    async def _run(self) -> None:
        # Not at once: mitmdump stops when an error is logged before `running` has returned.
        await asyncio.sleep(self.idle_interval)
        quiet = 0  # empty batches in a row
        while True:
            try:
                async with self._turn:
                    store = await self._store()
                    await self._append_kept(store)
                    batch = await store.audit_batch(self.consumer, self.batch_size)
                    moved = await _move(store, self.sink, batch)
                    self.written += moved
                    self._backlog = await store.audit_backlog()
            except Exception as e:
                self.failures += 1
                self._report(e, "audit rows not moved to the sink")
                await asyncio.sleep(min(MAX_BACKOFF, 0.1 * 2 ** min(self.failures, 6)))
                continue
            self.failures = 0
            quiet = quiet + 1 if not batch else 0
            if moved < self.batch_size:
                # Rows wait in the outbox (committed, and read through by every reader's
                # flush): moving them in batches costs a few store steps per batch, not per row.
                await asyncio.sleep(self._pause(quiet))

    def _pause(self, quiet: int) -> float:
        """The pause after a batch that was not full: ``idle_interval``, doubled for each
        empty one in a row (``quiet``) up to `IDLE_MAX_INTERVAL` (or ``idle_interval`` when
        that is longer)."""
        return max(
            self.idle_interval, min(IDLE_MAX_INTERVAL, self.idle_interval * 2.0 ** min(quiet, 16))
        )

    async def _append_kept(self, store: Store) -> None:
        while self._kept:
            await store.append_audit(self._kept[0])
            self._kept.popleft()

    def _report(self, exc: Exception, what: str) -> None:
        kept = f"; {len(self._kept)} rows kept in memory" if self._kept else ""
        if isinstance(exc, StoreUnavailable):
            # A warning, as every store outage is (mitmdump stops on errors at start).
            log.warning("keybrake: %s (%s)%s; retrying", what, _problem(exc), kept)
        else:
            log.error(
                "keybrake: %s (%s); they stay in the outbox%s; retrying", what, _problem(exc), kept
            )
