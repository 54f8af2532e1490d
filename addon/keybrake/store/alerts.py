"""The alert outbox: alerts fired once per window, and their deliveries queued durably.

Beside the audit outbox and in the same store, so a proxy restart (``kill -9`` too) or a
receiver outage loses no alert, and every replica sharing the store shares it:

- `AlertOutbox.fire` decides "first" atomically in the store (SQLite: ``INSERT OR IGNORE``
  on the dedupe key in one ``BEGIN IMMEDIATE`` with the queued rows; Redis: the dedupe key
  read and set with the queued rows in one script, ``alert_fire.lua``). A window's end is
  judged by the caller's ``now``, as every window of the store is. Two replicas crossing the
  same threshold at once queue one set of deliveries.
- `AlertOutbox.due` claims the deliveries that are due, each for a lease (another replica
  does not send it meanwhile; a replica that died leaves it due again when the lease ends).
- `AlertOutbox.retry` puts a failed one back with its next time; `AlertOutbox.done` moves
  it to the log of recent deliveries (`AlertOutbox.recent`).

Rows are plain JSON objects made by `keybrake.proxy.alerts`: the alert and the webhook's
name, never a webhook's secret or URL.

Redis keys, under one hash tag so each script stays on one slot of a Redis Cluster:
``<prefix>{alerts}fired:<dedupe>`` (string; expires with its window), ``{alerts}seq`` (hash
of counters), ``{alerts}outbox`` (hash id → row), ``{alerts}due`` (sorted set id → due ms)
and ``{alerts}log`` (sorted set by finishing order, trimmed to `LOG_LENGTH`). The scripts use
only the commands of the README's ``ACL SETUSER`` line.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from keybrake.store._base import Store
from keybrake.store._common import epoch_micros
from keybrake.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from keybrake.store.redis import RedisStore

__all__ = ["LOG_LENGTH", "AlertOutbox", "alert_outbox"]

LOG_LENGTH: Final = 200
"""How many finished deliveries the log keeps (newest first)."""

_SQL: Final = importlib.resources.files("keybrake.store").joinpath("alerts.sql").read_text("utf-8")


def _ms(moment: dt.datetime) -> int:
    return epoch_micros(moment) // 1000


class AlertOutbox(Protocol):
    """The durable queue of alert deliveries in a store (see the module)."""

    async def fire(
        self,
        dedupe: str,
        rows: Sequence[dict[str, Any]],
        now: dt.datetime,
        expires_at: dt.datetime | None,
    ) -> bool:
        """Queue ``rows`` (due now) unless ``dedupe`` fired already and has not expired;
        True when this call was the first. ``expires_at`` None: it never fires again."""

    async def due(
        self, now: dt.datetime, limit: int, lease_seconds: float
    ) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``limit`` queued rows due at ``now``, as ``(id, row)``, each claimed for
        ``lease_seconds``."""

    async def retry(self, row_id: str, row: dict[str, Any], next_at: dt.datetime) -> None:
        """Keep ``row`` (with its new attempt count and error) queued, due at ``next_at``."""

    async def done(self, row_id: str, row: dict[str, Any]) -> bool:
        """Drop the row from the queue and log ``row`` as finished; False (nothing changed)
        when another replica finished it first."""

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """Finished deliveries, newest first."""

    async def pending(self, limit: int) -> list[dict[str, Any]]:
        """Queued deliveries (with their ``id`` and ``next_at`` ms), oldest first."""


class _SQLiteAlerts:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self._ready = False

    def _conn_ready(self) -> None:
        if self._ready:
            return
        with self.store._session() as conn:
            conn.executescript(_SQL)
        self._ready = True

    async def fire(
        self,
        dedupe: str,
        rows: Sequence[dict[str, Any]],
        now: dt.datetime,
        expires_at: dt.datetime | None,
    ) -> bool:
        self._conn_ready()
        now_ms = _ms(now)
        with self.store._transaction() as conn:
            conn.execute(
                "DELETE FROM alert_fired WHERE dedupe = ? AND expires_at IS NOT NULL "
                "AND expires_at <= ?",
                (dedupe, now_ms),
            )
            cur = conn.execute(
                "INSERT OR IGNORE INTO alert_fired (dedupe, fired_at, expires_at) VALUES (?, ?, ?)",
                (dedupe, now_ms, None if expires_at is None else _ms(expires_at)),
            )
            if cur.rowcount != 1:
                return False
            conn.executemany(
                "INSERT INTO alert_outbox (row, next_at) VALUES (?, ?)",
                [(json.dumps(r), now_ms) for r in rows],
            )
        return True

    async def due(
        self, now: dt.datetime, limit: int, lease_seconds: float
    ) -> list[tuple[str, dict[str, Any]]]:
        self._conn_ready()
        now_ms = _ms(now)
        with self.store._session() as conn:  # most polls find nothing: no write lock for them
            (waiting,) = conn.execute(
                "SELECT COUNT(*) FROM alert_outbox WHERE next_at <= ?", (now_ms,)
            ).fetchone()
        if not waiting:
            return []
        with self.store._transaction() as conn:
            found = conn.execute(
                "SELECT id, row FROM alert_outbox WHERE next_at <= ? ORDER BY next_at, id LIMIT ?",
                (now_ms, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE alert_outbox SET next_at = ? WHERE id = ?",
                [(now_ms + int(lease_seconds * 1000), i) for i, _ in found],
            )
        return [(str(i), json.loads(r)) for i, r in found]

    async def retry(self, row_id: str, row: dict[str, Any], next_at: dt.datetime) -> None:
        self._conn_ready()
        with self.store._transaction() as conn:
            conn.execute(
                "UPDATE alert_outbox SET row = ?, next_at = ? WHERE id = ?",
                (json.dumps(row), _ms(next_at), int(row_id)),
            )

    async def done(self, row_id: str, row: dict[str, Any]) -> bool:
        self._conn_ready()
        with self.store._transaction() as conn:
            cur = conn.execute("DELETE FROM alert_outbox WHERE id = ?", (int(row_id),))
            if cur.rowcount != 1:
                return False
            conn.execute("INSERT INTO alert_log (row) VALUES (?)", (json.dumps(row),))
            conn.execute(
                "DELETE FROM alert_log WHERE id <= (SELECT MAX(id) FROM alert_log) - ?",
                (LOG_LENGTH,),
            )
        return True

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        self._conn_ready()
        with self.store._session() as conn:
            found = conn.execute(
                "SELECT row FROM alert_log ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [json.loads(r) for (r,) in found]

    async def pending(self, limit: int) -> list[dict[str, Any]]:
        self._conn_ready()
        with self.store._session() as conn:
            found = conn.execute(
                "SELECT id, row, next_at FROM alert_outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [{**json.loads(r), "id": str(i), "next_at_ms": n} for i, r, n in found]


class _RedisAlerts:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._scripts: dict[str, Any] = {}
        self._client: object | None = None

    def _k(self, *parts: str) -> str:
        return self.store.prefix + "{alerts}" + ":".join(parts)

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        async with self.store._guard() as client:
            if client is not self._client:  # a new client (first use, or the store's replaced)
                package = importlib.resources.files("keybrake.store")
                self._scripts = {
                    n: client.register_script(package.joinpath(f"{n}.lua").read_text("utf-8"))
                    for n in ("alert_fire", "alert_due", "alert_finish")
                }
                self._client = client
            return await self._scripts[name](keys=keys, args=args)

    async def fire(
        self,
        dedupe: str,
        rows: Sequence[dict[str, Any]],
        now: dt.datetime,
        expires_at: dt.datetime | None,
    ) -> bool:
        end = 0 if expires_at is None else _ms(expires_at)
        backstop = 0 if expires_at is None else int((expires_at - now).total_seconds()) + 86_400
        first = await self._run(
            "alert_fire",
            [self._k("fired", dedupe), self._k("seq"), self._k("outbox"), self._k("due")],
            [str(end), str(_ms(now)), str(max(1, backstop)) if end else "0"]
            + [json.dumps(r) for r in rows],
        )
        return bool(first)

    async def due(
        self, now: dt.datetime, limit: int, lease_seconds: float
    ) -> list[tuple[str, dict[str, Any]]]:
        flat = await self._run(
            "alert_due",
            [self._k("outbox"), self._k("due")],
            [str(_ms(now)), str(limit), str(int(lease_seconds * 1000))],
        )
        return [(_text(flat[i]), json.loads(_text(flat[i + 1]))) for i in range(0, len(flat), 2)]

    async def retry(self, row_id: str, row: dict[str, Any], next_at: dt.datetime) -> None:
        await self._run(
            "alert_finish",
            [self._k("outbox"), self._k("due"), self._k("log"), self._k("seq")],
            ["retry", row_id, json.dumps(row), str(_ms(next_at))],
        )

    async def done(self, row_id: str, row: dict[str, Any]) -> bool:
        finished = await self._run(
            "alert_finish",
            [self._k("outbox"), self._k("due"), self._k("log"), self._k("seq")],
            ["done", row_id, json.dumps(row), str(LOG_LENGTH)],
        )
        return bool(finished)

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        async with self.store._guard() as client:
            found = await client.zrevrange(self._k("log"), 0, limit - 1)
        return [json.loads(_text(r).partition("\n")[2]) for r in found]

    async def pending(self, limit: int) -> list[dict[str, Any]]:
        async with self.store._guard() as client:
            ids: Any = await client.zrange(self._k("due"), 0, limit - 1, withscores=True)
            out = []
            for raw_id, score in ids:
                row = await client.hget(self._k("outbox"), raw_id)
                if row is not None:
                    out.append(
                        {**json.loads(_text(row)), "id": _text(raw_id), "next_at_ms": int(score)}
                    )
        return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_OUTBOXES: dict[int, AlertOutbox] = {}


def alert_outbox(store: Store) -> AlertOutbox:
    """The alert outbox of ``store`` (a `SQLiteStore` or a `RedisStore`, or a wrapper of one
    with an ``inner`` attribute, such as the metrics' timing proxy); one per store object."""
    inner: Any = store
    while hasattr(inner, "inner"):
        inner = inner.inner
    found = _OUTBOXES.get(id(inner))
    if found is not None and getattr(found, "store", None) is inner:
        return found
    outbox: AlertOutbox
    if isinstance(inner, SQLiteStore):
        outbox = _SQLiteAlerts(inner)
    else:
        from keybrake.store.redis import RedisStore

        if not isinstance(inner, RedisStore):
            raise TypeError(f"no alert outbox for {type(inner).__name__}")
        outbox = _RedisAlerts(inner)
    _OUTBOXES[id(inner)] = outbox
    return outbox
