"""What a vendor call leaves behind in the SQLite store: its reservation goes when it finishes.

A finished reservation's amount is in the usage rows and its audit row; earlier versions kept
the row (``reservations``, with its state and two more indexes), one per paid call, so the
file grew with every call and each commit wrote pages of three B-trees nobody read again.
Now an open reservation is a row of ``open_reservations`` (one B-tree) deleted when it
finishes, as on Redis; a file an earlier version wrote keeps its open reservations, which
still finish and are recovered as before.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import sqlite3

from tests.store.conftest import USD, make_key, paid_call

from keybrake.store import SQLiteStore

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def _reservations(path: pathlib.Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("SELECT id, estimate_micros FROM open_reservations"))


def _tables(path: pathlib.Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


async def test_a_finished_reservation_leaves_no_row_and_an_open_one_stays(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        key = make_key("kb_a", label="run", daily=100 * USD)
        await store.create_key(key)
        finishes = {"res_settled": "settled", "res_released": "released", "res_unknown": "unknown"}
        for rid, finish in finishes.items():
            finished = await paid_call(
                store, "kb_a", "run", rid, NOON, estimate=2 * USD, actual=USD, finish=finish
            )
            assert finished is True
        assert (await store.reserve(key, "res_open", 3 * USD, NOON)).ok

        assert _reservations(path) == [("res_open", 3 * USD)]
        # What the deleted rows held is in the ledger: $1 settled, $0 released, the $2
        # estimate of the unknown one; the open one's $3 still reserved.
        (day, *_rest) = await store.budgets(key, NOON)
        assert (day.spent_micros, day.reserved_micros) == (3 * USD, 3 * USD)
        # Finishing again finds nothing to finish, as before.
        assert await store.settle("res_settled", USD) is False
        assert await store.release("res_open") is True
        assert _reservations(path) == []
    finally:
        await store.close()


# The table as versions before `open_reservations` made it.
OLD_RESERVATIONS = """
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    budgets TEXT NOT NULL,
    estimate_micros INTEGER NOT NULL,
    actual_micros INTEGER,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'released', 'unknown')),
    created_at INTEGER NOT NULL,
    finished_at REAL
);
CREATE INDEX reservations_open ON reservations (state, created_at);
"""


async def test_a_file_an_earlier_version_wrote_keeps_its_open_reservations(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    key = make_key("kb_a", label="run", daily=100 * USD)
    await store.create_key(key)
    for rid, usd in (("res_a", 2), ("res_b", 3)):
        assert (await store.reserve(key, rid, usd * USD, NOON)).ok
    await store.close()
    # As an earlier version left the file: both open reservations in `reservations`, with
    # hundreds of finished ones, and no `open_reservations`.
    with sqlite3.connect(path) as conn:
        opened = conn.execute(
            "SELECT id, key_id, budgets, estimate_micros, created_at FROM open_reservations"
        ).fetchall()
        conn.execute("DROP TABLE open_reservations")
        conn.executescript(OLD_RESERVATIONS)
        conn.executemany(
            "INSERT INTO reservations (id, key_id, budgets, estimate_micros, state, created_at) "
            "VALUES (?, ?, ?, ?, 'reserved', ?)",
            opened,
        )
        conn.executemany(
            "INSERT INTO reservations (id, key_id, budgets, estimate_micros, actual_micros, "
            "state, created_at, finished_at) VALUES (?, 'kb_a', '[]', 5, 5, ?, 0, 0)",
            [(f"res_old_{i}", ("settled", "released", "unknown")[i % 3]) for i in range(300)],
        )

    store = SQLiteStore(path)
    await store.open()
    try:
        assert "reservations" not in _tables(path) and "reservations_open" not in _tables(path)
        assert _reservations(path) == [("res_a", 2 * USD), ("res_b", 3 * USD)]
        (day, *_rest) = await store.budgets(key, NOON)
        assert (day.spent_micros, day.reserved_micros) == (0, 5 * USD)
        # They finish as before: one settled, the other recovered as a crash's.
        assert await store.settle("res_a", USD) is True
        assert await store.recover_reservations(NOON + dt.timedelta(hours=1)) == 1
        (day, *_rest) = await store.budgets(key, NOON)
        assert (day.spent_micros, day.reserved_micros) == (4 * USD, 0)
        assert _reservations(path) == []
    finally:
        await store.close()
    # Opened again, nothing moves twice.
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    assert "reservations" not in _tables(path)
