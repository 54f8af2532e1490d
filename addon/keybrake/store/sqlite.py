"""`SQLiteStore`: the embedded backend, one database file in WAL mode for one proxy process.

Every check-and-change runs in one ``BEGIN IMMEDIATE`` transaction, so several processes (or
several `SQLiteStore` objects) on the same file still never overspend a cap: the write lock is
taken before the budgets are read. Calls are synchronous and sub-millisecond, so the async
methods run them on the event loop under a `threading.Lock` rather than paying for a thread
hop; under write contention a call may wait up to ``busy_timeout`` seconds.

Every `sqlite3.Error` (read-only file or directory, disk full, I/O error, database still locked
after the busy timeout) becomes `StoreUnavailable` naming the file, so the proxy fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.resources
import json
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

from keybrake.store._base import (
    OBJECT_TTL,
    Admission,
    AdmissionRequest,
    BudgetState,
    Hold,
    IdempotencyBegin,
    IdempotencyClaim,
    IssuerRecord,
    KeyRecord,
    LabelBudget,
    LabelTreeConflict,
    ObjectOwner,
    RateResult,
    ReserveResult,
    Settlement,
    StoredResponse,
    StoreUnavailable,
    VendorFreeze,
    utc_day,
)
from keybrake.store._checkpoint import FALLBACK_PAGES, WalCheckpointer
from keybrake.store._common import (
    EPOCH,
    RATE_BUCKETS,
    KeyMemo,
    TreeCaps,
    check_idempotency_times,
    check_label,
    check_label_limits,
    check_micros,
    check_rate_limit,
    epoch_micros,
    rate_bucket,
    rate_verdict,
    usage_plan,
)

__all__ = ["SQLiteStore"]


_AMOUNT_TTL_SECONDS = 30 * 24 * 3600
# A key that may make no call, and the refusal code that says so.
_STATE_CODES = {
    "revoked": "vault_key_revoked",
    "expired": "vault_key_expired",
    "suspended": "key_suspended",
}


# Timestamps the caller passes (``now``, key times) are integer epoch microseconds so they
# round-trip exactly and sort; wall-clock timestamps of the cache are REAL epoch seconds.
def _sql(name: str) -> str:
    """A SQL file of this package (``store/*.sql``), like the Redis store's Lua scripts."""
    return importlib.resources.files("keybrake.store").joinpath(name).read_text("utf-8")


_SCHEMA: Final = _sql("schema.sql")
"""The tables, indexes and triggers (``store/schema.sql``), in one transaction."""
_FILL_COUNTS: Final = _sql("fill_counts.sql")
"""Run inside `_SCHEMA`'s transaction when the file had no ``key_counts`` yet
(``store/fill_counts.sql``)."""


# Columns added after a table was first released: (table, column, declaration).
_ADDED_COLUMNS = (
    ("keys", "max_requests_per_minute", "INTEGER"),
    ("keys", "allowed_accounts", "TEXT NOT NULL DEFAULT '[]'"),
    ("keys", "suspended_at", "INTEGER"),
    ("keys", "suspended_reason", "TEXT"),
    ("keys", "share_objects", "TEXT NOT NULL DEFAULT 'none'"),
    ("keys", "issuer_id", "TEXT"),
    ("issuers", "max_requests_per_minute", "INTEGER"),
)


_T = TypeVar("_T")


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a database made by an earlier version lacks (new ones have them), and
    move the open reservations it kept with every finished one to ``open_reservations``."""
    _move_open_reservations(conn)
    for table, column, decl in _ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process was first
                    raise


def _move_open_reservations(conn: sqlite3.Connection) -> None:
    """Versions before ``open_reservations`` kept every reservation in ``reservations``: the
    open ones are moved (in one transaction with dropping the table; a process that opens the
    file at the same moment finds it gone and does nothing)."""
    if not _has_table(conn, "reservations"):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _has_table(conn, "reservations"):
            conn.execute(
                "INSERT OR IGNORE INTO open_reservations "
                "(id, key_id, budgets, estimate_micros, created_at) "
                "SELECT id, key_id, budgets, estimate_micros, created_at FROM reservations "
                "WHERE state = 'reserved'"
            )
            conn.execute("DROP TABLE reservations")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        is not None
    )


def _moment(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


def _row_to_key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        secret_sha256=row["secret_sha256"],
        vendor=row["vendor"],
        agent_run_label=row["agent_run_label"],
        daily_cap_micros=row["daily_cap_micros"],
        allowed_endpoints=tuple(json.loads(row["allowed_endpoints"])),
        created_at=_moment(row["created_at"]),
        expires_at=_moment(row["expires_at"]),
        usd_cap_micros=row["usd_cap_micros"],
        revoked_at=None if row["revoked_at"] is None else _moment(row["revoked_at"]),
        vendor_account=row["vendor_account"],
        max_requests_per_minute=row["max_requests_per_minute"],
        allowed_accounts=tuple(json.loads(row["allowed_accounts"])),
        suspended_at=None if row["suspended_at"] is None else _moment(row["suspended_at"]),
        suspended_reason=row["suspended_reason"],
        share_objects=row["share_objects"],
        issuer_id=row["issuer_id"],
    )


def _row_to_issuer(row: sqlite3.Row) -> IssuerRecord:
    return IssuerRecord(
        issuer_id=row["issuer_id"],
        token_sha256=row["token_sha256"],
        name=row["name"],
        vendors=tuple(json.loads(row["vendors"])),
        label_prefix=row["label_prefix"],
        allowed_endpoints=tuple(
            (vendor, tuple(eps)) for vendor, eps in json.loads(row["allowed_endpoints"])
        ),
        max_daily_cap_micros=row["max_daily_cap_micros"],
        max_usd_cap_micros=row["max_usd_cap_micros"],
        max_expires_in_seconds=row["max_expires_in_seconds"],
        allowed_accounts=tuple(json.loads(row["allowed_accounts"])),
        budget_daily_micros=row["budget_daily_micros"],
        budget_lifetime_micros=row["budget_lifetime_micros"],
        created_at=_moment(row["created_at"]),
        expires_at=None if row["expires_at"] is None else _moment(row["expires_at"]),
        revoked_at=None if row["revoked_at"] is None else _moment(row["revoked_at"]),
        max_requests_per_minute=row["max_requests_per_minute"],
    )


class SQLiteStore:
    """The `Store` in one SQLite file; the parent directory is created when missing.

    Example::

        store = SQLiteStore(pathlib.Path("/var/lib/keybrake/state.db"))
        await store.open()
        result = await store.reserve(key, "res_1", 2_000_000, now)

    ``busy_timeout`` is how many seconds a write waits for another connection's lock before
    the call fails with `StoreUnavailable`.
    """

    def __init__(self, path: pathlib.Path, *, busy_timeout: float = 5.0) -> None:
        self.path = pathlib.Path(path)
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # The key record last made of each key's row (see `_key_of`).
        self._key_rows = KeyMemo(10_000)
        # Checkpoints off the event loop (see `_checkpoint`), nudged after each commit.
        self._checkpointer = WalCheckpointer(self.path, busy_timeout=busy_timeout)
        # Admissions and settlements waiting for the shared transaction (see `_batched`).
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- plumbing ------------------------------------------------------------------------------
    def _unavailable(self, exc: BaseException | str) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite store {self.path}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unavailable(f"cannot create directory {self.path.parent}: {exc}") from exc
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: we write BEGIN IMMEDIATE / COMMIT ourselves.
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = self._switch_to_wal(conn)
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL (journal_mode is {mode})")
            # NORMAL is durable across process crashes in WAL mode; only a power loss may
            # drop the last transactions, which is the trade-off sqlite documents for WAL.
            conn.execute("PRAGMA synchronous = NORMAL")
            # The log is copied into the file by `WalCheckpointer`'s thread; a commit does it
            # only past FALLBACK_PAGES (SQLite's default: 1,000, milliseconds on the event loop).
            conn.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {(FALLBACK_PAGES + 100) * 4096}")
            counted = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'key_counts'"
            ).fetchone()
            # A full scan of two tables: only for a file made before the counts existed.
            schema = _SCHEMA if counted else _SCHEMA.replace("COMMIT;", _FILL_COUNTS + "COMMIT;")
            conn.executescript(schema)
            _migrate(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            raise self._unavailable(exc) from exc
        self._conn = conn
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> object:
        """``PRAGMA journal_mode = WAL``, retried: on a new file, processes opening it at the
        same moment get "database is locked" at once (this pragma ignores busy_timeout)."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def _drop_connection(self) -> None:
        # After a failure start over with a fresh connection on the next call, so the store
        # recovers by itself once the disk or the permissions are fixed.
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connect()
            except sqlite3.Error as exc:
                self._drop_connection()
                raise self._unavailable(exc) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the write lock is held before anything is read."""
        with self._session() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        self._checkpointer.nudge()

    async def _batched(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """``op(conn)`` inside a ``BEGIN IMMEDIATE`` transaction shared with the admissions
        and settlements made in the same turn of the event loop (group commit).

        Under concurrency one ``BEGIN``/``COMMIT`` and one write of each page they touch
        (the key's usage rows, counters, the end of the ledger and of the outbox) serve many
        calls; alone, a call waits one loop turn. The ops run one after the other in the
        order they were asked, each seeing the ones before it, exactly as separate
        transactions would; nothing is answered before the commit. A call cancelled before
        its turn is not run. When the transaction fails every call in it fails
        (`StoreUnavailable`: the callers fail closed); when one op raises anything else, the
        transaction is rolled back and each op is run again in a transaction of its own, so
        one call's failure is never another's.

        A lone call does not wait: when no batch is open and nothing else is ready to run in
        this turn of the loop (its ready queue is empty), no other op can join the batch, so
        the op runs at once in a transaction of its own, exactly what a batch of one would do
        a turn later (that turn cost ~15 µs of CPU per op, two per vendor call).
        """
        loop = asyncio.get_running_loop()
        if not self._batch and not getattr(loop, "_ready", True):
            with self._transaction() as conn:
                return op(conn)
        future: asyncio.Future[_T] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._run_batch)
        self._batch.append((op, future))
        return await future

    def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        batch = [(op, future) for op, future in batch if not future.cancelled()]
        if not batch:
            return
        try:
            with self._transaction() as conn:
                results = [op(conn) for op, _ in batch]
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, StoreUnavailable):
                for one in batch:
                    self._batch = [one]
                    self._run_batch()
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _label_cap(conn: sqlite3.Connection, label: str) -> int | None:
        if not label:
            return None
        row = conn.execute(
            "SELECT daily_cap_micros FROM label_budgets WHERE label = ?", (label,)
        ).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _usage(conn: sqlite3.Connection, scope: str, window: str) -> tuple[int, int]:
        row = conn.execute(
            "SELECT spent_micros, reserved_micros FROM budget_usage"
            ' WHERE scope = ? AND "window" = ?',
            (scope, window),
        ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    @staticmethod
    def _tree_caps(conn: sqlite3.Connection, key: KeyRecord) -> TreeCaps:
        """The limits of the label and issuer nodes above ``key``, as stored now."""
        label_life = label_rate = iss_daily = iss_life = iss_rate = None
        if key.agent_run_label:
            row = conn.execute(
                "SELECT lifetime_cap_micros, max_requests_per_minute FROM label_limits "
                "WHERE label = ?",
                (key.agent_run_label,),
            ).fetchone()
            if row is not None:
                label_life, label_rate = row[0], row[1]
        if key.issuer_id:
            row = conn.execute(
                "SELECT budget_daily_micros, budget_lifetime_micros, max_requests_per_minute "
                "FROM issuers WHERE issuer_id = ?",
                (key.issuer_id,),
            ).fetchone()
            if row is not None:
                iss_daily, iss_life, iss_rate = row[0], row[1], row[2]
        return TreeCaps(None, label_life, label_rate, iss_daily, iss_life, iss_rate)

    def _budget_states(
        self,
        conn: sqlite3.Connection,
        key: KeyRecord,
        now: dt.datetime,
        tree: TreeCaps | None = None,
    ) -> tuple[list[tuple[str, str, int | None]], list[BudgetState]]:
        if tree is None:
            tree = self._tree_caps(conn, key)
        plan = usage_plan(key, utc_day(now), self._label_cap(conn, key.agent_run_label), tree)
        states = [
            BudgetState(scope, window, cap, *self._usage(conn, scope, window))
            for scope, window, cap in plan
            if cap is not None
        ]
        return plan, states

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the directory, the file and the tables; purge expired cache rows."""
        with self._transaction() as conn:
            now = time.time()
            conn.execute("DELETE FROM idempotency_entries WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM key_amounts WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM objects WHERE expires_at <= ?", (now,))

    async def close(self) -> None:
        self._checkpointer.stop()
        with self._lock:
            self._drop_connection()

    async def clock_skew(self) -> float | None:
        """``None``: every process using this file runs on this host's clock."""
        return None

    async def ping(self) -> None:
        """Check the file can be written: a read-only, full or locked database is unavailable."""
        with self._session() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Reading is not enough: a read-only file still answers SELECT. This empty
                # DELETE needs write access yet changes nothing, and is rolled back anyway.
                conn.execute("DELETE FROM label_budgets WHERE 0")
            finally:
                conn.execute("ROLLBACK")

    # -- vault keys ----------------------------------------------------------------------------
    async def create_key(self, record: KeyRecord) -> None:
        """Insert ``record``; `ValueError` when its ``key_id`` or secret hash already exists."""
        check_label(record.agent_run_label)
        values = (
            record.key_id,
            record.secret_sha256,
            record.vendor,
            record.agent_run_label,
            record.daily_cap_micros,
            record.usd_cap_micros,
            json.dumps(list(record.allowed_endpoints)),
            record.vendor_account,
            epoch_micros(record.created_at),
            epoch_micros(record.expires_at),
            None if record.revoked_at is None else epoch_micros(record.revoked_at),
            record.max_requests_per_minute,
            json.dumps(list(record.allowed_accounts)),
            None if record.suspended_at is None else epoch_micros(record.suspended_at),
            record.suspended_reason,
            record.share_objects,
            record.issuer_id,
        )
        with self._transaction() as conn:
            self._claim_home(conn, record.agent_run_label, record.issuer_id)
            try:
                conn.execute(
                    "INSERT INTO keys (key_id, secret_sha256, vendor, agent_run_label, "
                    "daily_cap_micros, usd_cap_micros, allowed_endpoints, vendor_account, "
                    "created_at, expires_at, revoked_at, max_requests_per_minute, "
                    "allowed_accounts, suspended_at, suspended_reason, share_objects, "
                    "issuer_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            except sqlite3.IntegrityError as exc:
                raise ValueError(
                    f"vault key {record.key_id!r} or its secret hash already exists"
                ) from exc

    @staticmethod
    def _claim_home(conn: sqlite3.Connection, label: str, issuer_id: str | None) -> None:
        """Fix the budget tree of ``label`` by its first key, or refuse a key of another tree
        (`LabelTreeConflict`). A label whose keys predate the record takes its first key's."""
        if not label:
            return
        row = conn.execute("SELECT issuer_id FROM label_homes WHERE label = ?", (label,)).fetchone()
        if row is None:
            first = conn.execute(
                "SELECT issuer_id FROM keys WHERE agent_run_label = ? "
                "ORDER BY created_at, key_id LIMIT 1",
                (label,),
            ).fetchone()
            home = (first[0] or "") if first is not None else (issuer_id or "")
            conn.execute("INSERT INTO label_homes VALUES (?, ?)", (label, home))
        else:
            home = row[0]
        if home != (issuer_id or ""):
            raise LabelTreeConflict(label, home or None)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        with self._session() as conn:
            row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _row_to_key(row)

    async def get_key_by_secret_hash(self, secret_sha256: str) -> KeyRecord | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT * FROM keys WHERE secret_sha256 = ?", (secret_sha256,)
            ).fetchone()
        return None if row is None else _row_to_key(row)

    async def list_keys(self) -> list[KeyRecord]:
        """All keys, newest ``created_at`` first (ties: larger ``key_id`` first)."""
        with self._session() as conn:
            rows = conn.execute(
                "SELECT * FROM keys ORDER BY created_at DESC, key_id DESC"
            ).fetchall()
        return [_row_to_key(row) for row in rows]

    async def revoke_key(self, key_id: str, now: dt.datetime) -> KeyRecord | None:
        revoked_at = epoch_micros(now)
        with self._transaction() as conn:
            conn.execute(
                "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (revoked_at, key_id),
            )
            row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is not None:
                self._forget(conn, key_id)
        return None if row is None else _row_to_key(row)

    async def suspend_key(self, key_id: str, now: dt.datetime, reason: str) -> KeyRecord | None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE keys SET suspended_at = ?, suspended_reason = ? "
                "WHERE key_id = ? AND suspended_at IS NULL",
                (epoch_micros(now), reason, key_id),
            )
            row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _row_to_key(row)

    async def resume_key(self, key_id: str) -> KeyRecord | None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE keys SET suspended_at = NULL, suspended_reason = NULL WHERE key_id = ?",
                (key_id,),
            )
            row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _row_to_key(row)

    async def set_key_caps(
        self,
        key_id: str,
        *,
        daily_cap_micros: int | None = None,
        usd_cap_micros: int | None = None,
        clear_usd_cap: bool = False,
    ) -> KeyRecord | None:
        """See `Store.set_key_caps`: one UPDATE in a ``BEGIN IMMEDIATE`` transaction, which
        `admit` (also ``BEGIN IMMEDIATE``) runs before or after, never during."""
        for name, micros in (("daily_cap_micros", daily_cap_micros), ("usd_cap", usd_cap_micros)):
            if micros is not None:
                check_micros(name, micros)
        with self._transaction() as conn:
            if daily_cap_micros is not None:
                conn.execute(
                    "UPDATE keys SET daily_cap_micros = ? WHERE key_id = ?",
                    (daily_cap_micros, key_id),
                )
            if usd_cap_micros is not None or clear_usd_cap:
                conn.execute(
                    "UPDATE keys SET usd_cap_micros = ? WHERE key_id = ?",
                    (usd_cap_micros, key_id),
                )
            row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _row_to_key(row)

    # -- issuer tokens ---------------------------------------------------------------------------
    async def create_issuer(self, record: IssuerRecord) -> None:
        """Insert ``record``; `ValueError` when its id or token hash already exists."""
        values = (
            record.issuer_id,
            record.token_sha256,
            record.name,
            json.dumps(list(record.vendors)),
            record.label_prefix,
            json.dumps([[vendor, list(eps)] for vendor, eps in record.allowed_endpoints]),
            record.max_daily_cap_micros,
            record.max_usd_cap_micros,
            record.max_expires_in_seconds,
            json.dumps(list(record.allowed_accounts)),
            record.budget_daily_micros,
            record.budget_lifetime_micros,
            epoch_micros(record.created_at),
            None if record.expires_at is None else epoch_micros(record.expires_at),
            None if record.revoked_at is None else epoch_micros(record.revoked_at),
            record.max_requests_per_minute,
        )
        with self._transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO issuers (issuer_id, token_sha256, name, vendors, label_prefix, "
                    "allowed_endpoints, max_daily_cap_micros, max_usd_cap_micros, "
                    "max_expires_in_seconds, allowed_accounts, budget_daily_micros, "
                    "budget_lifetime_micros, created_at, expires_at, revoked_at, "
                    "max_requests_per_minute) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            except sqlite3.IntegrityError as exc:
                raise ValueError(
                    f"issuer {record.issuer_id!r} or its token hash already exists"
                ) from exc

    async def get_issuer(self, issuer_id: str) -> IssuerRecord | None:
        with self._session() as conn:
            row = conn.execute("SELECT * FROM issuers WHERE issuer_id = ?", (issuer_id,)).fetchone()
        return None if row is None else _row_to_issuer(row)

    async def get_issuer_by_token_hash(self, token_sha256: str) -> IssuerRecord | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT * FROM issuers WHERE token_sha256 = ?", (token_sha256,)
            ).fetchone()
        return None if row is None else _row_to_issuer(row)

    async def list_issuers(self) -> list[IssuerRecord]:
        """All issuer tokens, newest ``created_at`` first (ties: larger id first)."""
        with self._session() as conn:
            rows = conn.execute(
                "SELECT * FROM issuers ORDER BY created_at DESC, issuer_id DESC"
            ).fetchall()
        return [_row_to_issuer(row) for row in rows]

    async def revoke_issuer(self, issuer_id: str, now: dt.datetime) -> IssuerRecord | None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE issuers SET revoked_at = ? WHERE issuer_id = ? AND revoked_at IS NULL",
                (epoch_micros(now), issuer_id),
            )
            row = conn.execute("SELECT * FROM issuers WHERE issuer_id = ?", (issuer_id,)).fetchone()
        return None if row is None else _row_to_issuer(row)

    # -- vendor freezes ----------------------------------------------------------------------------
    async def freeze_vendor(self, vendor: str, reason: str, now: dt.datetime) -> VendorFreeze:
        """One row of ``frozen_vendors``, read by `admit` in its own transaction."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO frozen_vendors VALUES (?, ?, ?) ON CONFLICT (vendor) DO NOTHING",
                (vendor, reason, epoch_micros(now)),
            )
            row = conn.execute(
                "SELECT * FROM frozen_vendors WHERE vendor = ?", (vendor,)
            ).fetchone()
        return VendorFreeze(row["vendor"], row["reason"], _moment(row["frozen_at"]))

    async def unfreeze_vendor(self, vendor: str) -> bool:
        with self._transaction() as conn:
            gone = conn.execute("DELETE FROM frozen_vendors WHERE vendor = ?", (vendor,))
        return gone.rowcount > 0

    async def frozen_vendors(self) -> list[VendorFreeze]:
        with self._session() as conn:
            rows = conn.execute("SELECT * FROM frozen_vendors ORDER BY vendor").fetchall()
        return [VendorFreeze(r["vendor"], r["reason"], _moment(r["frozen_at"])) for r in rows]

    # -- request rate --------------------------------------------------------------------------
    async def count_request(self, key_id: str, limit: int, now: dt.datetime) -> RateResult:
        check_rate_limit(limit)
        with self._transaction() as conn:
            return self._count(conn, key_id, limit, now)

    @classmethod
    def _count(
        cls, conn: sqlite3.Connection, key_id: str, limit: int, now: dt.datetime
    ) -> RateResult:
        verdict = cls._rate_check(conn, key_id, limit, now)
        if verdict.ok:
            cls._rate_add(conn, key_id, now)
        return verdict

    @staticmethod
    def _rate_add(conn: sqlite3.Connection, key_id: str, now: dt.datetime) -> None:
        conn.execute(
            "INSERT INTO request_counts VALUES (?, ?, 1) ON CONFLICT (key_id, bucket) "
            "DO UPDATE SET count = count + 1",
            (key_id, rate_bucket(now)),
        )

    @staticmethod
    def _rate_check(
        conn: sqlite3.Connection, key_id: str, limit: int, now: dt.datetime
    ) -> RateResult:
        """Whether one more request of ``key_id`` (a key id, or ``label:<label>`` /
        ``issuer:<id>`` for a node of the budget tree) fits; nothing is counted."""
        bucket = rate_bucket(now)
        oldest = bucket - RATE_BUCKETS + 1
        counts = dict(
            conn.execute(
                "SELECT bucket, count FROM request_counts WHERE key_id = ?", (key_id,)
            ).fetchall()
        )
        if any(b < oldest for b in counts):  # once per bucket (5 s), not on every call
            conn.execute(
                "DELETE FROM request_counts WHERE key_id = ? AND bucket < ?", (key_id, oldest)
            )
        return rate_verdict(limit, counts, bucket, now)

    # -- budgets and the reservation ledger ----------------------------------------------------
    async def set_label_budget(self, label: str, daily_cap_micros: int | None) -> None:
        if daily_cap_micros is not None:
            check_micros("daily_cap_micros", daily_cap_micros)
        with self._transaction() as conn:
            if daily_cap_micros is None:
                conn.execute("DELETE FROM label_budgets WHERE label = ?", (label,))
            else:
                conn.execute(
                    "INSERT INTO label_budgets VALUES (?, ?) ON CONFLICT (label) "
                    "DO UPDATE SET daily_cap_micros = excluded.daily_cap_micros",
                    (label, daily_cap_micros),
                )

    async def get_label_budget(self, label: str) -> int | None:
        with self._session() as conn:
            return self._label_cap(conn, label)

    async def set_label_limits(self, limits: LabelBudget) -> None:
        check_label_limits(limits)
        with self._transaction() as conn:
            label = limits.label
            if limits.daily_cap_micros is None:
                conn.execute("DELETE FROM label_budgets WHERE label = ?", (label,))
            else:
                conn.execute(
                    "INSERT INTO label_budgets VALUES (?, ?) ON CONFLICT (label) "
                    "DO UPDATE SET daily_cap_micros = excluded.daily_cap_micros",
                    (label, limits.daily_cap_micros),
                )
            if limits.lifetime_cap_micros is None and limits.max_requests_per_minute is None:
                conn.execute("DELETE FROM label_limits WHERE label = ?", (label,))
            else:
                conn.execute(
                    "INSERT INTO label_limits VALUES (?, ?, ?) ON CONFLICT (label) DO UPDATE "
                    "SET lifetime_cap_micros = excluded.lifetime_cap_micros, "
                    "max_requests_per_minute = excluded.max_requests_per_minute",
                    (label, limits.lifetime_cap_micros, limits.max_requests_per_minute),
                )

    async def get_label_limits(self, label: str) -> LabelBudget:
        with self._session() as conn:
            daily = self._label_cap(conn, label)
            row = conn.execute(
                "SELECT lifetime_cap_micros, max_requests_per_minute FROM label_limits "
                "WHERE label = ?",
                (label,),
            ).fetchone()
        life, rate = (None, None) if row is None else (row[0], row[1])
        return LabelBudget(label, daily, life, rate)

    async def tree_usage(
        self, scopes: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, int]]:
        with self._session() as conn:
            return {(scope, window): self._usage(conn, scope, window) for scope, window in scopes}

    async def reserve(
        self,
        key: KeyRecord,
        reservation_id: str,
        estimate_micros: int,
        now: dt.datetime,
    ) -> ReserveResult:
        """Check every capped budget and reserve ``estimate_micros`` in all of them, or none.

        A ``reservation_id`` already in the ledger is never reserved twice: the call changes
        nothing and answers ``ok=True`` with the current budgets, so a retry is harmless.
        """
        check_micros("estimate_micros", estimate_micros)
        with self._transaction() as conn:
            return self._reserve(conn, key, reservation_id, estimate_micros, now)[0]

    def _reserve(
        self,
        conn: sqlite3.Connection,
        key: KeyRecord,
        reservation_id: str,
        estimate_micros: int,
        now: dt.datetime,
        *,
        fresh: bool = False,
        tree: TreeCaps | None = None,
    ) -> tuple[ReserveResult, tuple[tuple[str, str], ...]]:
        """`reserve` inside a transaction; also the usage rows reserved in. ``fresh``: the
        id was made for this call (admission), so it cannot be in the ledger already."""
        plan, states = self._budget_states(conn, key, now, tree)
        rows = tuple((scope, window) for scope, window, _cap in plan)
        if (
            not fresh
            and conn.execute(
                "SELECT 1 FROM open_reservations WHERE id = ?", (reservation_id,)
            ).fetchone()
        ):
            return ReserveResult(True, reservation_id, tuple(states)), rows
        for state in states:
            assert state.cap_micros is not None  # only capped budgets are reported
            if state.spent_micros + state.reserved_micros + estimate_micros > state.cap_micros:
                return ReserveResult(False, reservation_id, tuple(states), exceeded=state), rows
        if rows:
            conn.execute(
                'INSERT INTO budget_usage (scope, "window", reserved_micros) VALUES '  # noqa: S608 (placeholders only)
                + ", ".join(["(?, ?, ?)"] * len(rows))
                + ' ON CONFLICT (scope, "window") '
                "DO UPDATE SET reserved_micros = reserved_micros + excluded.reserved_micros",
                [v for scope, window in rows for v in (scope, window, estimate_micros)],
            )
        conn.execute(
            "INSERT INTO open_reservations (id, key_id, budgets, estimate_micros, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                reservation_id,
                key.key_id,
                json.dumps([list(r) for r in rows]),
                estimate_micros,
                epoch_micros(now),
            ),
        )
        after = tuple(
            dataclasses.replace(state, reserved_micros=state.reserved_micros + estimate_micros)
            for state in states
        )
        return ReserveResult(True, reservation_id, after), rows

    @staticmethod
    def _open_reservation(conn: sqlite3.Connection, reservation_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT key_id, budgets, estimate_micros FROM open_reservations WHERE id = ?",
            (reservation_id,),
        ).fetchone()
        return row

    @staticmethod
    def _move_reserved(conn: sqlite3.Connection, budgets: str, delta: int) -> None:
        """Add ``delta`` (may be negative) to the reserved amount of a reservation's rows."""
        for scope, window in json.loads(budgets):
            conn.execute(
                'INSERT INTO budget_usage (scope, "window", reserved_micros) VALUES (?, ?, 0) '
                'ON CONFLICT (scope, "window") DO NOTHING',
                (scope, window),
            )
            conn.execute(
                "UPDATE budget_usage SET reserved_micros = MAX(0, reserved_micros + ?) "
                'WHERE scope = ? AND "window" = ?',
                (delta, scope, window),
            )

    def _finish(self, conn: sqlite3.Connection, reservation_id: str, actual: int | None) -> bool:
        """Finish one open reservation at ``actual`` (settled; 0 when released); None means
        "the estimate" (unknown). False when it is not open (finished already, or never)."""
        row = self._open_reservation(conn, reservation_id)
        if row is None:
            return False
        estimate = int(row["estimate_micros"])
        spent = estimate if actual is None else actual
        rows = json.loads(row["budgets"])
        # MAX(0, …): a usage row is never driven negative, even if it was edited by hand.
        if rows:
            conn.execute(
                'INSERT INTO budget_usage (scope, "window", spent_micros) VALUES '  # noqa: S608 (placeholders only)
                + ", ".join(["(?, ?, ?)"] * len(rows))
                + ' ON CONFLICT (scope, "window") DO UPDATE SET '
                "spent_micros = spent_micros + excluded.spent_micros, "
                "reserved_micros = MAX(0, reserved_micros - ?)",
                [*(v for scope, window in rows for v in (scope, window, spent)), estimate],
            )
        # Deleted, as on Redis: its amount is in the usage rows and its audit row.
        conn.execute("DELETE FROM open_reservations WHERE id = ?", (reservation_id,))
        conn.execute("DELETE FROM holds WHERE reservation_id = ?", (reservation_id,))
        return True

    async def settle(self, reservation_id: str, actual_micros: int) -> bool:
        check_micros("actual_micros", actual_micros)
        with self._transaction() as conn:
            return self._finish(conn, reservation_id, actual_micros)

    async def release(self, reservation_id: str) -> bool:
        with self._transaction() as conn:
            return self._finish(conn, reservation_id, 0)

    async def mark_unknown(self, reservation_id: str) -> bool:
        with self._transaction() as conn:
            return self._finish(conn, reservation_id, None)

    async def budgets(self, key: KeyRecord, now: dt.datetime) -> tuple[BudgetState, ...]:
        with self._session() as conn:
            # A read transaction so the label cap and the usage rows come from one snapshot.
            conn.execute("BEGIN")
            try:
                _plan, states = self._budget_states(conn, key, now)
            finally:
                conn.execute("COMMIT")
        return tuple(states)

    async def recover_reservations(self, older_than: dt.datetime) -> int:
        before = epoch_micros(older_than)
        with self._transaction() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM open_reservations WHERE created_at < ? "
                    "AND id NOT IN (SELECT reservation_id FROM holds)",
                    (before,),
                )
            ]
            return sum(self._finish(conn, rid, None) for rid in ids)

    # -- holds ---------------------------------------------------------------------------------
    async def hold(
        self, reservation_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> bool:
        check_micros("amount_micros", amount_micros)
        with self._transaction() as conn:
            return self._hold(conn, reservation_id, vendor, object_id, amount_micros)

    def _hold(
        self,
        conn: sqlite3.Connection,
        reservation_id: str,
        vendor: str,
        object_id: str,
        amount_micros: int,
    ) -> bool:
        row = self._open_reservation(conn, reservation_id)
        if row is None:
            return False
        self._move_reserved(conn, row["budgets"], amount_micros - row["estimate_micros"])
        conn.execute(
            "UPDATE open_reservations SET estimate_micros = ? WHERE id = ?",
            (amount_micros, reservation_id),
        )
        conn.execute(
            "INSERT INTO holds VALUES (?, ?, ?, ?) ON CONFLICT (reservation_id) DO UPDATE "
            "SET vendor = excluded.vendor, object_id = excluded.object_id",
            (reservation_id, vendor, object_id, row["key_id"]),
        )
        return True

    async def holds(self, vendor: str, object_id: str) -> tuple[Hold, ...]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT h.reservation_id, h.key_id, r.estimate_micros FROM holds h "
                "JOIN open_reservations r ON r.id = h.reservation_id "
                "WHERE h.vendor = ? AND h.object_id = ? "
                "ORDER BY r.created_at, r.id",
                (vendor, object_id),
            ).fetchall()
        return tuple(Hold(row[0], row[1], int(row[2])) for row in rows)

    async def raise_hold(
        self, reservation_id: str, amount_micros: int, key: KeyRecord
    ) -> ReserveResult:
        check_micros("amount_micros", amount_micros)
        with self._transaction() as conn:
            row = self._open_reservation(conn, reservation_id)
            if row is None:
                return ReserveResult(False, reservation_id, ())
            delta = amount_micros - int(row["estimate_micros"])
            rows = [tuple(pair) for pair in json.loads(row["budgets"])]
            caps = {scope: cap for scope, _w, cap in self._caps(conn, key, rows)}
            states = [
                BudgetState(scope, window, caps[scope], *self._usage(conn, scope, window))
                for scope, window in rows
                if caps.get(scope) is not None
            ]
            for state in states:
                assert state.cap_micros is not None
                if delta > 0 and (
                    state.spent_micros + state.reserved_micros + delta > state.cap_micros
                ):
                    return ReserveResult(False, reservation_id, tuple(states), exceeded=state)
            self._move_reserved(conn, row["budgets"], delta)
            conn.execute(
                "UPDATE open_reservations SET estimate_micros = ? WHERE id = ?",
                (amount_micros, reservation_id),
            )
        after = tuple(
            dataclasses.replace(s, reserved_micros=max(0, s.reserved_micros + delta))
            for s in states
        )
        return ReserveResult(True, reservation_id, after)

    def _caps(
        self, conn: sqlite3.Connection, key: KeyRecord, rows: list[tuple[str, ...]]
    ) -> list[tuple[str, str, int | None]]:
        """The caps of a reservation's usage rows, whatever day they are for."""
        day = next((w for scope, w in rows if scope.startswith("key:")), "")
        return usage_plan(
            key, day, self._label_cap(conn, key.agent_run_label), self._tree_caps(conn, key)
        )

    # -- objects and remembered amounts -----------------------------------------------------
    async def record_objects(
        self, key: KeyRecord, vendor: str, object_ids: Sequence[str], now: dt.datetime
    ) -> None:
        with self._transaction() as conn:
            self._record(conn, key.key_id, key.agent_run_label, vendor, object_ids, now)

    @staticmethod
    def _record(
        conn: sqlite3.Connection,
        key_id: str,
        label: str,
        vendor: str,
        object_ids: Sequence[str],
        now: dt.datetime,
    ) -> None:
        expires = now.timestamp() + OBJECT_TTL.total_seconds()
        conn.executemany(
            "INSERT INTO objects VALUES (?, ?, ?, ?, ?) ON CONFLICT (vendor, object_id) "
            "DO UPDATE SET expires_at = excluded.expires_at WHERE key_id = excluded.key_id",
            [(vendor, oid, key_id, label, expires) for oid in object_ids],
        )

    async def object_owner(self, vendor: str, object_id: str) -> ObjectOwner | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT key_id, label FROM objects WHERE vendor = ? AND object_id = ? "
                "AND expires_at > ?",
                (vendor, object_id, time.time()),
            ).fetchone()
        return None if row is None else ObjectOwner(row[0], row[1])

    async def count_objects(self, key_id: str) -> int:
        with self._transaction() as conn:
            return self._live_count(conn, "objects", key_id)

    @staticmethod
    def _live_count(conn: sqlite3.Connection, kind: str, key_id: str) -> int:
        """The key's live objects or idempotency entries: its expired rows are deleted (the
        triggers keep ``key_counts`` in step), then one row is read. Inside a write."""
        table = "objects" if kind == "objects" else "idempotency_entries"
        conn.execute(
            f"DELETE FROM {table} WHERE key_id = ? AND expires_at <= ?",  # noqa: S608
            (key_id, time.time()),
        )
        row = conn.execute(
            "SELECT n FROM key_counts WHERE key_id = ? AND kind = ?", (key_id, kind)
        ).fetchone()
        return 0 if row is None else int(row[0])

    async def remember_amount(
        self, key_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> None:
        check_micros("amount_micros", amount_micros)
        with self._transaction() as conn:
            self._remember(conn, key_id, vendor, object_id, amount_micros)

    @staticmethod
    def _remember(
        conn: sqlite3.Connection, key_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> None:
        conn.execute(
            "INSERT INTO key_amounts VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key_id, vendor, object_id) "
            "DO UPDATE SET micros = excluded.micros, expires_at = excluded.expires_at",
            (key_id, vendor, object_id, amount_micros, time.time() + _AMOUNT_TTL_SECONDS),
        )

    async def recall_amount(self, key_id: str, vendor: str, object_id: str) -> int | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT micros FROM key_amounts WHERE key_id = ? AND vendor = ? "
                "AND object_id = ? AND expires_at > ?",
                (key_id, vendor, object_id, time.time()),
            ).fetchone()
        return None if row is None else int(row[0])

    async def forget_expired_keys(self, now: dt.datetime) -> int:
        with self._transaction() as conn:
            gone = sum(
                conn.execute(
                    f"DELETE FROM {table} WHERE key_id IN "  # noqa: S608
                    "(SELECT key_id FROM keys WHERE expires_at <= ?)",
                    (epoch_micros(now),),
                ).rowcount
                for table in ("key_amounts", "idempotency_entries", "objects")
            )
            conn.execute(
                "DELETE FROM key_counts WHERE key_id IN "
                "(SELECT key_id FROM keys WHERE expires_at <= ?)",
                (epoch_micros(now),),
            )
            return gone

    async def forget_key(self, key_id: str) -> int:
        with self._transaction() as conn:
            return self._forget(conn, key_id)

    @staticmethod
    def _forget(conn: sqlite3.Connection, key_id: str) -> int:
        gone = sum(
            conn.execute(f"DELETE FROM {table} WHERE key_id = ?", (key_id,)).rowcount  # noqa: S608
            for table in ("key_amounts", "idempotency_entries", "objects")
        )
        conn.execute("DELETE FROM key_counts WHERE key_id = ?", (key_id,))
        return gone

    # -- idempotency cache ---------------------------------------------------------------------
    async def idempotency_begin(
        self,
        key_id: str,
        scope: str,
        body_sha256: str,
        ttl_seconds: int,
        in_flight_seconds: int,
        max_entries: int,
    ) -> IdempotencyBegin:
        """Claim ``scope``; see `Store.idempotency_begin`.

        Order of the checks: an expired entry or a stale claim (in flight for more than
        ``in_flight_seconds``) is replaced (``started``); otherwise a different body hash is
        ``mismatch``; otherwise ``in_flight`` or ``replay``. A new claim when the key already
        has ``max_entries`` live entries is ``full``.
        """
        check_idempotency_times(ttl_seconds, in_flight_seconds)
        claim = IdempotencyClaim(scope, body_sha256, ttl_seconds, in_flight_seconds, max_entries)
        with self._transaction() as conn:
            found = self._idem_check(conn, key_id, claim)
            if found.status == "started":
                self._idem_claim(conn, key_id, claim)
            return found

    @staticmethod
    def _idem_check(
        conn: sqlite3.Connection, key_id: str, claim: IdempotencyClaim
    ) -> IdempotencyBegin:
        """What claiming ``claim`` would find; ``started`` means it may be claimed."""
        now = time.time()
        row = conn.execute(
            "SELECT * FROM idempotency_entries WHERE key_id = ? AND scope = ?",
            (key_id, claim.scope),
        ).fetchone()
        stale = row is not None and (
            row["expires_at"] <= now
            or (row["state"] == "in_flight" and now - row["started_at"] > claim.in_flight_seconds)
        )
        if row is None:
            live = SQLiteStore._live_count(conn, "idempotency", key_id)
            return IdempotencyBegin("full" if live >= claim.max_entries else "started")
        if stale:
            return IdempotencyBegin("started")
        if row["body_sha256"] != claim.body_sha256:
            return IdempotencyBegin("mismatch")
        if row["state"] == "in_flight":
            return IdempotencyBegin("in_flight")
        response = StoredResponse(
            status_code=int(row["status_code"]),
            headers=tuple((str(k), str(v)) for k, v in json.loads(row["headers"])),
            body=bytes(row["body"]),
        )
        return IdempotencyBegin("replay", response)

    @staticmethod
    def _idem_claim(conn: sqlite3.Connection, key_id: str, claim: IdempotencyClaim) -> None:
        now = time.time()
        # An upsert, not INSERT OR REPLACE: a replaced row would be counted twice in
        # key_counts (REPLACE's implicit delete fires no trigger).
        conn.execute(
            "INSERT INTO idempotency_entries (key_id, scope, body_sha256, state, started_at, "
            "expires_at) VALUES (?, ?, ?, 'in_flight', ?, ?) ON CONFLICT (key_id, scope) "
            "DO UPDATE SET body_sha256 = excluded.body_sha256, state = 'in_flight', "
            "status_code = NULL, headers = NULL, body = NULL, "
            "started_at = excluded.started_at, expires_at = excluded.expires_at",
            (key_id, claim.scope, claim.body_sha256, now, now + claim.ttl_seconds),
        )

    @staticmethod
    def _idem_finish(
        conn: sqlite3.Connection,
        key_id: str,
        scope: str,
        response: StoredResponse | None,
        ttl_seconds: int,
    ) -> None:
        """Complete the in-flight claim with ``response``, or drop it when None."""
        if response is None:
            conn.execute(
                "DELETE FROM idempotency_entries WHERE key_id = ? AND scope = ? "
                "AND state = 'in_flight'",
                (key_id, scope),
            )
            return
        conn.execute(
            "UPDATE idempotency_entries SET state = 'done', status_code = ?, headers = ?, "
            "body = ?, expires_at = ? WHERE key_id = ? AND scope = ? AND state = 'in_flight'",
            (
                response.status_code,
                json.dumps([list(pair) for pair in response.headers]),
                response.body,
                time.time() + ttl_seconds,
                key_id,
                scope,
            ),
        )

    async def idempotency_complete(
        self, key_id: str, scope: str, response: StoredResponse, ttl_seconds: int
    ) -> None:
        """Store ``response`` on the in-flight claim of ``scope``; no-op when there is none
        (abandoned, expired or already complete), since its body hash would be unknown."""
        check_idempotency_times(ttl_seconds, 0)
        with self._transaction() as conn:
            self._idem_finish(conn, key_id, scope, response, ttl_seconds)

    async def idempotency_abandon(self, key_id: str, scope: str) -> None:
        """Drop the in-flight claim of ``scope``; a completed response is kept."""
        with self._transaction() as conn:
            self._idem_finish(conn, key_id, scope, None, 1)

    # -- one call, two steps -------------------------------------------------------------------
    async def admit(self, request: AdmissionRequest) -> Admission:
        """See `Store.admit`: one ``BEGIN IMMEDIATE`` transaction (shared, see `_batched`)."""
        check_micros("estimate_micros", request.estimate_micros)
        if request.rate_limit is not None:
            check_rate_limit(request.rate_limit)
        if request.idempotency is not None:
            check_idempotency_times(
                request.idempotency.ttl_seconds, request.idempotency.in_flight_seconds
            )
        return await self._batched(lambda conn: self._admit(conn, request))

    def _key_of(self, row: sqlite3.Row) -> KeyRecord:
        """The record of a ``keys`` row, made once per content of the row (every admission
        reads the row again)."""
        values = tuple(row)
        key = self._key_rows.get(values[0], values)
        return key if key is not None else self._key_rows.put(values[0], values, _row_to_key(row))

    def _admit(self, conn: sqlite3.Connection, request: AdmissionRequest) -> Admission:
        row = conn.execute("SELECT * FROM keys WHERE key_id = ?", (request.key_id,)).fetchone()
        if row is None:
            return Admission("refused", code="vault_key_unknown")
        key = self._key_of(row)
        state = key.state(request.now)
        if state != "active":
            return Admission("refused", key, code=_STATE_CODES[state])
        frozen = conn.execute(
            "SELECT reason FROM frozen_vendors WHERE vendor = ?", (key.vendor,)
        ).fetchone()
        if frozen is not None:
            return Admission("refused", key, code="vendor_frozen", detail=frozen[0])
        tree = self._tree_caps(conn, key)
        counted = [
            (node, name, limit)
            for node, name, limit in (
                ("key", key.key_id, request.rate_limit),
                ("label", f"label:{key.agent_run_label}", tree.label_rate),
                ("issuer", f"issuer:{key.issuer_id}", tree.issuer_rate),
            )
            if limit is not None
        ]
        for node, name, limit in counted:
            rate = self._rate_check(conn, name, limit, request.now)
            if not rate.ok:
                return Admission(
                    "refused",
                    key,
                    code="rate_limited",
                    detail=node,
                    retry_after_seconds=rate.retry_after_seconds,
                    rate_limit=limit,
                )
        for _node, name, _limit in counted:
            self._rate_add(conn, name, request.now)
        if request.max_objects is not None:
            owned = self._live_count(conn, "objects", key.key_id)
            if owned >= request.max_objects:
                return Admission("refused", key, code="quota_exceeded", detail="objects")
        claim = request.idempotency
        if claim is not None:
            found = self._idem_check(conn, key.key_id, claim)
            if found.status == "replay":
                return Admission("replay", key, response=found.response)
            if found.status != "started":
                code = "quota_exceeded" if found.status == "full" else f"idempotency_{found.status}"
                return Admission("refused", key, code=code, detail="idempotency")
        budgets: tuple[BudgetState, ...] = ()
        rows: tuple[tuple[str, str], ...] = ()
        if request.reservation_id is not None:
            reserved, rows = self._reserve(
                conn,
                key,
                request.reservation_id,
                request.estimate_micros,
                request.now,
                fresh=True,
                tree=tree,
            )
            budgets = reserved.budgets
            if not reserved.ok:
                return Admission(
                    "refused",
                    key,
                    code="cap_exhausted",
                    budgets=budgets,
                    exceeded=reserved.exceeded,
                )
        if claim is not None:
            self._idem_claim(conn, key.key_id, claim)
        return Admission("admitted", key, budgets=budgets, ledger_rows=rows)

    async def settle_call(self, settlement: Settlement) -> bool:
        """See `Store.settle_call`: one ``BEGIN IMMEDIATE`` transaction, audit row included
        (shared, see `_batched`)."""
        return await self._batched(lambda conn: self._settle_call(conn, settlement))

    def _settle_call(self, conn: sqlite3.Connection, s: Settlement) -> bool:
        finished = False
        if s.reservation_id is not None and s.finish is not None:
            if s.finish == "held":
                assert s.hold is not None
                finished = self._hold(conn, s.reservation_id, s.vendor, *s.hold)
            else:
                actual = {"settled": s.actual_micros, "released": 0, "unknown": None}
                finished = self._finish(conn, s.reservation_id, actual[s.finish])
        if s.created:
            self._record(conn, s.key_id, s.label, s.vendor, s.created, s.now)
        if s.remember is not None:
            self._remember(conn, s.key_id, s.vendor, *s.remember)
        if s.idempotency_scope is not None:
            self._idem_finish(
                conn,
                s.key_id,
                s.idempotency_scope,
                s.idempotency_response,
                s.idempotency_ttl_seconds,
            )
        if s.audit is not None:
            conn.execute("INSERT INTO audit_outbox (row) VALUES (?)", (json.dumps(s.audit),))
        return finished

    # -- the audit outbox ----------------------------------------------------------------------
    async def append_audit(self, row: dict[str, object]) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO audit_outbox (row) VALUES (?)", (json.dumps(row),))

    async def audit_batch(self, consumer: str, limit: int) -> list[tuple[str, dict[str, object]]]:
        """One process uses a store file: every row in the outbox is this consumer's."""
        with self._session() as conn:
            rows = conn.execute(
                "SELECT id, row FROM audit_outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [(str(i), json.loads(r)) for i, r in rows]

    async def audit_peek(self, limit: int) -> list[tuple[str, dict[str, object]]]:
        """Nothing is claimed in SQLite: the same rows as `audit_batch`."""
        return await self.audit_batch("", limit)

    async def audit_ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM audit_outbox WHERE id = ?", [(int(i),) for i in ids])

    async def audit_backlog(self) -> int:
        with self._session() as conn:
            (n,) = conn.execute("SELECT COUNT(*) FROM audit_outbox").fetchone()
        return int(n)
