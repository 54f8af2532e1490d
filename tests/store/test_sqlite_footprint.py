"""What a vendor call leaves behind in the SQLite store: its reservation goes when it finishes.

A finished reservation's amount is in the usage rows and its audit row; the row itself was
kept by earlier versions, one per paid call, and the file grew with every call (and each
commit wrote pages of a table and two indexes nobody read). Now it is deleted when it
finishes, as on Redis, and the rows an earlier version left are dropped by housekeeping.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import sqlite3

from tests.store.conftest import USD, make_key

from keybrake.store import AdmissionRequest, Settlement, SQLiteStore

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def _reservations(path: pathlib.Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("SELECT id, state FROM reservations"))


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
            admitted = await store.admit(
                AdmissionRequest("kb_a", NOON, reservation_id=rid, estimate_micros=2 * USD)
            )
            assert admitted.status == "admitted", admitted
            finished = await store.settle_call(
                Settlement(
                    "kb_a",
                    "run",
                    "stripe",
                    NOON,
                    reservation_id=rid,
                    ledger_rows=admitted.ledger_rows,
                    finish=finish,  # type: ignore[arg-type]
                    actual_micros=USD,
                    audit={"event_id": f"ev_{rid}", "key_id": "kb_a", "outcome": "ok"},
                )
            )
            assert finished is True
        assert (await store.reserve(key, "res_open", 3 * USD, NOON)).ok

        assert _reservations(path) == [("res_open", "reserved")]
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


async def test_finished_rows_an_earlier_version_kept_are_dropped_by_housekeeping(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        key = make_key("kb_a", label="run", daily=100 * USD)
        await store.create_key(key)
        assert (await store.reserve(key, "res_open", USD, NOON)).ok
        # As an earlier version left them: finished, with their amounts and times.
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO reservations (id, key_id, budgets, estimate_micros, actual_micros, "
                "state, created_at, finished_at) VALUES (?, 'kb_a', '[]', 5, 5, ?, 0, 0)",
                [(f"res_old_{i}", ("settled", "released", "unknown")[i % 3]) for i in range(300)],
            )

        await store.forget_expired_keys(NOON)

        assert _reservations(path) == [("res_open", "reserved")]
        (day, *_rest) = await store.budgets(key, NOON)
        assert day.reserved_micros == USD
    finally:
        await store.close()
