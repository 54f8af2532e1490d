"""Where ``keybrake audit`` reads rows, and `AuditFollower`, which ``--follow`` polls.

Two sources answer the same two questions (the newest rows; the rows written after an id):
`LocalAuditSource` reads the audit log after moving the store's outbox to it, and
`RemoteAuditSource` asks a proxy's admin API (``GET /vault/audit``, which moves the outbox
first too). Audit row ids only grow, so the largest id printed is the cursor.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from keybrake.auditlog.reports import audit_rows

if TYPE_CHECKING:
    from keybrake.auditlog.sinks import AuditSink
    from keybrake.cli._admin_api import RemoteAdmin
    from keybrake.store import Store

__all__ = ["AuditFollower", "AuditSource", "LocalAuditSource", "RemoteAuditSource"]

Row = dict[str, Any]
Reader = Callable[..., Coroutine[Any, Any, Any]]
_PAGE = 500


class AuditSource(Protocol):
    def newest(self, limit: int) -> list[Row]:
        """Up to ``limit`` rows, newest first."""

    def after(self, row_id: int) -> list[Row]:
        """Every row written after ``row_id``, oldest first."""


class LocalAuditSource:
    """The audit log (``--audit``) with the store's outbox moved to it before each read.

    ``read(store, sink, query, quiet=...)`` is the command line's outbox-then-query step.
    """

    def __init__(
        self,
        store: Store,
        sink: AuditSink,
        filters: Mapping[str, str | None],
        since: dt.datetime,
        until: dt.datetime | None,
        *,
        read: Reader,
        warn: Callable[[str], None],
    ) -> None:
        self.store, self.sink, self.read = store, sink, read
        self.filters: dict[str, Any] = {
            "label": filters.get("label"),
            "key_id": filters.get("key"),
            "vendor": filters.get("vendor"),
            "outcome": filters.get("outcome"),
        }
        self.since, self.until = since, until
        self._warned = False

    def _query(self, **kw: Any) -> list[Row]:
        async def query(_: Store | None) -> list[Row]:
            return audit_rows(self.sink, since=self.since, until=self.until, **self.filters, **kw)

        rows: list[Row] = asyncio.run(self.read(self.store, self.sink, query, quiet=self._warned))
        self._warned = True  # warn once, not at every look
        return rows

    def newest(self, limit: int) -> list[Row]:
        return self._query(limit=limit)

    def after(self, row_id: int) -> list[Row]:
        rows: list[Row] = []
        while True:
            page = self._query(limit=_PAGE, after_id=row_id)
            rows += page
            if len(page) < _PAGE:
                return rows
            row_id = int(page[-1]["id"])


class RemoteAuditSource:
    """``GET /vault/audit`` on a proxy's admin API, paged with ``before``."""

    def __init__(
        self,
        api: RemoteAdmin,
        filters: Mapping[str, str | None],
        since: str,
        until: str | None,
    ) -> None:
        self.api = api
        self.params: dict[str, str | int | None] = {**filters, "since": since, "until": until}

    def newest(self, limit: int) -> list[Row]:
        rows: list[Row] = self.api.items("/vault/audit", {**self.params, "limit": limit})
        return rows

    def after(self, row_id: int) -> list[Row]:
        newer: list[Row] = []
        before: int | None = None
        while True:
            page = self.api.items("/vault/audit", {**self.params, "limit": _PAGE, "before": before})
            newer += [r for r in page if int(r["id"]) > row_id]
            if len(page) < _PAGE or int(page[-1]["id"]) <= row_id:
                return newer[::-1]
            before = int(page[-1]["id"])


class AuditFollower:
    """``tail -f`` for the audit log: the newest ``limit`` rows first, then each new row once.

    >>> follower = AuditFollower(source, limit=10)  # doctest: +SKIP
    >>> for row in follower.poll(): print(row["id"])  # doctest: +SKIP
    """

    def __init__(self, source: AuditSource, limit: int) -> None:
        self.source, self.limit = source, limit
        self.cursor: int | None = None

    def poll(self) -> list[Row]:
        """The rows not printed yet, oldest first."""
        if self.cursor is None:
            rows = self.source.newest(self.limit)[::-1]
            self.cursor = 0
        else:
            rows = self.source.after(self.cursor)
        if rows:
            self.cursor = max(self.cursor, *(int(r["id"]) for r in rows))
        return rows
