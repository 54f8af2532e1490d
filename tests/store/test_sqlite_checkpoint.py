"""The SQLite store copies its write-ahead log into the file on a thread of its own
(`keybrake.store._checkpoint`), not in the commit that finds the log long (only past
`FALLBACK_PAGES`): the log stays bounded, every committed change reaches the file, and the
thread ends with the store."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
import sqlite3
import threading
import time

import pytest
from tests.store.conftest import USD, make_key, paid_call

from keybrake.store import SQLiteStore
from keybrake.store._checkpoint import FALLBACK_PAGES, INTERVAL, WalCheckpointer

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
PAGE = 4096


def _thread_of(checkpointer: WalCheckpointer) -> threading.Thread:
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive() and thread.name == "keybrake-wal-checkpoint"
    return thread


async def _calls(store: SQLiteStore, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await paid_call(store, "kb_a", "run", f"res_{i}", NOON, estimate=1, actual=1)


def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


async def test_the_log_is_copied_into_the_file_by_the_thread_and_stays_bounded(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    started = time.monotonic()  # before any commit could start the thread
    await store.open()
    await store.create_key(make_key("kb_a", label="run", daily=10_000 * USD))
    # A commit checkpoints only past FALLBACK_PAGES (SQLite's own default is 1,000).
    with store._session() as conn:
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == FALLBACK_PAGES
    # Back to back, with no pause in which a passive checkpoint could catch up: ~10 pages
    # each, ~30,000 in all, that a log never started over would hold (~120 MB: 600 calls
    # left 25 MB before it was started over).
    await _calls(store, 3000)
    elapsed = time.monotonic() - started
    checkpointer = store._checkpointer
    thread = _thread_of(checkpointer)
    # Each checkpoint takes the GIL from the event loop: at most one per INTERVAL.
    assert 1 <= checkpointer.runs <= elapsed / INTERVAL + 1, (checkpointer.runs, elapsed)
    # The log started over at FALLBACK_PAGES at the latest, and its file was cut back then.
    assert (tmp_path / "state.db-wal").stat().st_size < 2 * FALLBACK_PAGES * PAGE
    # Once the store is quiet, one more checkpoint has copied every committed page.
    assert _wait_for(lambda: _fully_checkpointed(path))
    await store.close()
    assert not thread.is_alive(), "the thread outlived the store"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM audit_outbox").fetchone()[0] == 3000


def _fully_checkpointed(path: pathlib.Path) -> bool:
    with sqlite3.connect(path) as db:
        busy, log_frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return bool(busy == 0 and log_frames == copied)


async def test_a_store_closed_and_opened_again_checkpoints_again(tmp_path: pathlib.Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    await store.create_key(make_key("kb_a", label="run", daily=10_000 * USD))
    await _calls(store, 20)
    assert _wait_for(lambda: store._checkpointer.runs > 0)
    first = _thread_of(store._checkpointer)
    await store.close()
    assert not first.is_alive()
    before = store._checkpointer.runs
    await store.open()
    await _calls(store, 20, start=20)
    assert _wait_for(lambda: store._checkpointer.runs > before)
    second = _thread_of(store._checkpointer)
    await store.close()
    assert second is not first and not second.is_alive()


def test_a_failing_checkpoint_is_logged_once_and_tried_again(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory where the database should be: every checkpoint fails.
    bad = tmp_path / "state.db"
    bad.mkdir()
    checkpointer = WalCheckpointer(bad, busy_timeout=0.1)
    with caplog.at_level(logging.WARNING, logger="keybrake"):
        checkpointer.nudge()
        thread = _thread_of(checkpointer)
        for _ in range(4):
            time.sleep(0.08)
            checkpointer.nudge()
        time.sleep(0.08)
        checkpointer.stop()
    failures = [r for r in caplog.records if "checkpointing" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert str(bad) in failures[0].getMessage()
    assert checkpointer.runs == 0
    assert not thread.is_alive()
