"""The `Store` contract for the hot path: one atomic admission and one atomic settlement that
carries its audit row, and the audit outbox they write to. Every test runs against SQLite and
the real Redis (and Redis as an ACL user, and over TLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from tests.store.conftest import USD, StoreFactory, make_key

from keybrake.store import (
    AdmissionRequest,
    Hold,
    IdempotencyClaim,
    KeyRecord,
    ObjectOwner,
    Settlement,
    SQLiteStore,
    Store,
    StoredResponse,
)

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
RESPONSE = StoredResponse(200, (("Content-Type", "application/json"),), b'{"id":"pi_1"}')


def claim(scope: str = "idem:k1", body: str = "h1", max_entries: int = 100) -> IdempotencyClaim:
    return IdempotencyClaim(scope, body, 60, 30, max_entries)


def paid(key: KeyRecord, rid: str, micros: int, **kw: object) -> AdmissionRequest:
    return AdmissionRequest(key.key_id, NOON, reservation_id=rid, estimate_micros=micros, **kw)  # type: ignore[arg-type]


def settled(
    key: KeyRecord, rid: str | None, rows: tuple[tuple[str, str], ...], **kw: object
) -> Settlement:
    return Settlement(
        key.key_id, key.agent_run_label, "stripe", NOON, reservation_id=rid, ledger_rows=rows, **kw
    )  # type: ignore[arg-type]


def usage(store_budgets: tuple[object, ...]) -> list[tuple[int, int]]:
    return [(b.spent_micros, b.reserved_micros) for b in store_budgets]  # type: ignore[attr-defined]


async def test_admission_reserves_over_every_budget(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=10 * USD, usd_cap=50 * USD)
    await store.create_key(key)
    await store.set_label_budget("run-1", 20 * USD)

    admitted = await store.admit(paid(key, "res_1", 3 * USD))

    assert admitted.status == "admitted" and admitted.key == key
    assert usage(admitted.budgets) == [(0, 3 * USD)] * 3
    assert [r[0] for r in admitted.ledger_rows] == [
        "key:kb_a",
        "key-lifetime:kb_a",
        "label:run-1",
        "label-lifetime:run-1",
    ]
    assert usage(await store.budgets(key, NOON)) == [(0, 3 * USD)] * 3


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"revoked_at": NOON}, "vault_key_revoked"),
        ({"expires_at": NOON}, "vault_key_expired"),
        ({"suspended_at": NOON, "suspended_reason": "overrun"}, "key_suspended"),
    ],
)
async def test_a_key_that_may_not_call_is_refused_and_nothing_changes(
    store: Store, change: dict[str, object], code: str
) -> None:
    key = dataclasses.replace(make_key("kb_a", daily=10 * USD), **change)  # type: ignore[arg-type]
    await store.create_key(key)

    refused = await store.admit(paid(key, "res_1", USD, idempotency=claim(), rate_limit=5))

    assert (refused.status, refused.code) == ("refused", code)
    assert usage(await store.budgets(key, NOON)) == [(0, 0)]
    assert (await store.idempotency_begin("kb_a", "idem:k1", "h1", 60, 30, 9)).status == "started"


async def test_an_unknown_key_is_refused(store: Store) -> None:
    refused = await store.admit(AdmissionRequest("kb_never", NOON))
    assert (refused.status, refused.code, refused.key) == ("refused", "vault_key_unknown", None)


async def test_revocation_is_seen_by_the_very_next_admission(
    store: Store, make_store: StoreFactory
) -> None:
    key = make_key("kb_a")
    await store.create_key(key)
    other = make_store()  # another replica on the same state
    await other.open()
    try:
        assert (await other.admit(AdmissionRequest("kb_a", NOON))).status == "admitted"
        await store.revoke_key("kb_a", NOON)
        assert (await other.admit(AdmissionRequest("kb_a", NOON))).code == "vault_key_revoked"
    finally:
        await other.close()


async def test_each_admission_answers_the_key_as_stored_now(
    store: Store, make_store: StoreFactory
) -> None:
    # A replica that has admitted a key before (and keeps what it learnt of it) still
    # answers every admission with the record as it stands: caps changed by another replica,
    # then changed back, are seen each time.
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    other = make_store()
    await other.open()
    try:
        for _ in range(2):
            assert (await store.admit(AdmissionRequest("kb_a", NOON))).key == key
        await other.set_key_caps("kb_a", daily_cap_micros=3 * USD, usd_cap_micros=9 * USD)
        seen = (await store.admit(AdmissionRequest("kb_a", NOON))).key
        assert seen == dataclasses.replace(key, daily_cap_micros=3 * USD, usd_cap_micros=9 * USD)
        await other.set_key_caps("kb_a", daily_cap_micros=10 * USD, clear_usd_cap=True)
        assert (await store.admit(AdmissionRequest("kb_a", NOON))).key == key
        await other.revoke_key("kb_a", NOON)
        refused = await store.admit(AdmissionRequest("kb_a", NOON))
        assert refused.code == "vault_key_revoked"
        assert refused.key == dataclasses.replace(key, revoked_at=NOON)
    finally:
        await other.close()


async def test_caps_are_read_as_stored_now(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD)
    await store.create_key(key)
    stale = dataclasses.replace(key, daily_cap_micros=500 * USD)  # what a caller may believe
    refused = await store.admit(paid(stale, "res_1", 6 * USD))
    assert (refused.status, refused.code) == ("refused", "cap_exhausted")
    assert refused.exceeded is not None and refused.exceeded.cap_micros == 5 * USD


async def test_the_rate_limit_counts_every_admission(store: Store) -> None:
    key = make_key("kb_a")
    await store.create_key(key)
    codes = [
        (await store.admit(AdmissionRequest("kb_a", NOON, rate_limit=3))).code for _ in range(5)
    ]
    assert codes == [None, None, None, "rate_limited", "rate_limited"]
    refused = await store.admit(AdmissionRequest("kb_a", NOON, rate_limit=3))
    assert 1 <= refused.retry_after_seconds <= 65


async def test_a_refused_reservation_claims_no_idempotency_key(store: Store) -> None:
    key = make_key("kb_a", daily=2 * USD)
    await store.create_key(key)
    refused = await store.admit(paid(key, "res_1", 3 * USD, idempotency=claim()))
    assert refused.code == "cap_exhausted"
    admitted = await store.admit(paid(key, "res_2", USD, idempotency=claim()))
    assert admitted.status == "admitted"


async def test_idempotency_through_admission_and_settlement(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    first = await store.admit(paid(key, "res_1", USD, idempotency=claim()))
    assert first.status == "admitted"
    assert (await store.admit(paid(key, "res_2", USD, idempotency=claim()))).code == (
        "idempotency_in_flight"
    )
    assert (await store.admit(paid(key, "res_2", USD, idempotency=claim(body="h2")))).code == (
        "idempotency_mismatch"
    )
    await store.settle_call(
        settled(
            key,
            "res_1",
            first.ledger_rows,
            finish="settled",
            actual_micros=USD,
            idempotency_scope="idem:k1",
            idempotency_response=RESPONSE,
            idempotency_ttl_seconds=60,
            idempotency_sha256="h1",
        )
    )
    replay = await store.admit(paid(key, "res_3", USD, idempotency=claim()))
    assert (replay.status, replay.response) == ("replay", RESPONSE)
    assert usage(await store.budgets(key, NOON)) == [(USD, 0)]  # the replay reserved nothing


async def test_an_abandoned_claim_can_be_made_again(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    first = await store.admit(paid(key, "res_1", USD, idempotency=claim()))
    await store.settle_call(
        settled(key, "res_1", first.ledger_rows, finish="released", idempotency_scope="idem:k1")
    )
    assert (await store.admit(paid(key, "res_2", USD, idempotency=claim()))).status == "admitted"


async def test_quotas_are_checked_in_the_admission(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    await store.record_objects(key, "stripe", ["pi_1", "pi_2"], NOON)
    refused = await store.admit(AdmissionRequest("kb_a", NOON, max_objects=2))
    assert (refused.code, refused.detail) == ("quota_exceeded", "objects")
    assert (await store.admit(AdmissionRequest("kb_a", NOON, max_objects=3))).status == "admitted"
    await store.admit(AdmissionRequest("kb_a", NOON, idempotency=claim("idem:a", max_entries=1)))
    refused = await store.admit(
        AdmissionRequest("kb_a", NOON, idempotency=claim("idem:b", max_entries=1))
    )
    assert (refused.code, refused.detail) == ("quota_exceeded", "idempotency")


async def test_quotas_count_live_entries_once(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    await store.record_objects(key, "stripe", ["pi_1", "pi_2"], NOON)
    await store.record_objects(key, "stripe", ["pi_1"], NOON)  # the same object again
    assert await store.count_objects("kb_a") == 2
    refused = await store.admit(AdmissionRequest("kb_a", NOON, max_objects=2))
    assert (refused.code, refused.detail) == ("quota_exceeded", "objects")
    assert (await store.admit(AdmissionRequest("kb_a", NOON, max_objects=3))).status == "admitted"

    # An entry claimed again after it expired, and one abandoned and claimed again, are one
    # entry each: two live entries fill a quota of two, not three or four.
    short = IdempotencyClaim("idem:a", "h1", 1, 30, 2)
    first = await store.admit(AdmissionRequest("kb_a", NOON, idempotency=short))
    assert first.status == "admitted"
    await store.settle_call(
        settled(key, None, (), idempotency_scope="idem:a", idempotency_response=RESPONSE,
                idempotency_ttl_seconds=1, idempotency_sha256="h1")
    )  # fmt: skip
    await asyncio.sleep(1.2)
    again = await store.admit(AdmissionRequest("kb_a", NOON, idempotency=short))
    assert again.status == "admitted"  # expired: claimed anew
    await store.admit(AdmissionRequest("kb_a", NOON, idempotency=claim("idem:b", max_entries=9)))
    await store.settle_call(settled(key, None, (), idempotency_scope="idem:b"))  # abandoned
    await store.admit(AdmissionRequest("kb_a", NOON, idempotency=claim("idem:b", max_entries=9)))
    refused = await store.admit(
        AdmissionRequest("kb_a", NOON, idempotency=claim("idem:c", max_entries=2))
    )
    assert (refused.code, refused.detail) == ("quota_exceeded", "idempotency")
    admitted = await store.admit(
        AdmissionRequest("kb_a", NOON, idempotency=claim("idem:c", max_entries=3))
    )
    assert admitted.status == "admitted"


async def test_sqlite_counts_expired_objects_out_and_fills_counts_of_an_older_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keybrake.db"
    store = SQLiteStore(path)
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)  # recorded then: expired since
    await store.record_objects(key, "stripe", ["pi_old1", "pi_old2"], long_ago)
    await store.record_objects(key, "stripe", ["pi_1", "pi_2"], NOON)
    assert (await store.admit(AdmissionRequest("kb_a", NOON, max_objects=3))).status == "admitted"
    await store.record_objects(key, "stripe", ["pi_3"], NOON)
    await store.close()
    # A file from before the counts: no count table, no triggers.
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "DROP TRIGGER objects_counted; DROP TRIGGER objects_uncounted; "
            "DROP TRIGGER idempotency_counted; DROP TRIGGER idempotency_uncounted; "
            "DROP TABLE key_counts;"
        )
    conn.close()
    reopened = SQLiteStore(path)
    assert await reopened.count_objects("kb_a") == 3
    refused = await reopened.admit(AdmissionRequest("kb_a", NOON, max_objects=3))
    assert (refused.code, refused.detail) == ("quota_exceeded", "objects")
    await reopened.close()


@pytest.mark.parametrize(
    ("finish", "actual", "after"),
    [("settled", 2 * USD, (2 * USD, 0)), ("released", 0, (0, 0)), ("unknown", 0, (3 * USD, 0))],
)
async def test_settlement_finishes_once_and_carries_its_audit_row(
    store: Store, finish: str, actual: int, after: tuple[int, int]
) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    admitted = await store.admit(paid(key, "res_1", 3 * USD))
    row = {"key_id": "kb_a", "outcome": finish, "actual_micros": actual}
    done = settled(
        key, "res_1", admitted.ledger_rows, finish=finish, actual_micros=actual, audit=row
    )

    assert await store.settle_call(done)
    assert not await store.settle_call(dataclasses.replace(done, audit=None))

    assert usage(await store.budgets(key, NOON)) == [after]
    batch = await store.audit_batch("replica-1", 10)
    assert [r for _, r in batch] == [row]


async def test_settlement_holds_records_and_remembers(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=10 * USD)
    await store.create_key(key)
    admitted = await store.admit(paid(key, "res_1", 5 * USD))
    await store.settle_call(
        settled(
            key,
            "res_1",
            admitted.ledger_rows,
            finish="held",
            hold=("pi_1", 4 * USD),
            created=("pi_1",),
            remember=("pi_1", 4 * USD),
        )
    )
    assert await store.holds("stripe", "pi_1") == (Hold("res_1", "kb_a", 4 * USD),)
    assert await store.object_owner("stripe", "pi_1") == ObjectOwner("kb_a", "run-1")
    assert await store.recall_amount("kb_a", "stripe", "pi_1") == 4 * USD
    assert usage(await store.budgets(key, NOON)) == [(0, 4 * USD)]
    assert await store.recover_reservations(NOON + dt.timedelta(days=1)) == 0  # held


async def test_a_free_call_settles_without_a_reservation(store: Store) -> None:
    key = make_key("kb_a")
    await store.create_key(key)
    assert (await store.admit(AdmissionRequest("kb_a", NOON))).status == "admitted"
    assert not await store.settle_call(settled(key, None, (), audit={"outcome": "ok"}))
    assert [r for _, r in await store.audit_batch("c", 10)] == [{"outcome": "ok"}]


async def test_the_outbox_is_moved_once_and_survives_a_restart(
    store: Store, make_store: StoreFactory
) -> None:
    for i in range(5):
        await store.append_audit({"n": i})
    assert await store.audit_backlog() == 5
    first = await store.audit_batch("replica-1", 3)
    assert [r["n"] for _, r in first] == [0, 1, 2]
    await store.audit_ack([i for i, _ in first])
    again = make_store()
    await again.open()
    try:
        rest = await again.audit_batch("replica-1", 10)
        assert [r["n"] for _, r in rest] == [3, 4]
        await again.audit_ack([i for i, _ in rest])
        assert await again.audit_backlog() == 0
        assert await again.audit_batch("replica-1", 10) == []
    finally:
        await again.close()


async def test_unacknowledged_rows_are_read_again(store: Store) -> None:
    await store.append_audit({"n": 1})
    first = await store.audit_batch("replica-1", 10)
    again = await store.audit_batch("replica-1", 10)  # the sink failed: not acknowledged
    assert [r for _, r in first] == [r for _, r in again] == [{"n": 1}]


async def test_concurrent_admissions_never_exceed_the_cap(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    results = await asyncio.gather(
        *(store.admit(paid(key, f"res_{i}", 3 * USD)) for i in range(10))
    )
    assert sum(r.status == "admitted" for r in results) == 3
    assert usage(await store.budgets(key, NOON)) == [(0, 9 * USD)]


async def test_peek_sees_every_row_whoever_claimed_it_and_any_consumer_may_ack(
    store: Store, make_store: StoreFactory
) -> None:
    for i in range(4):
        await store.append_audit({"n": i})
    claimed = await store.audit_batch("replica-1", 2)  # replica-1 claims two and stalls
    assert [r["n"] for _, r in claimed] == [0, 1]

    peeked = await store.audit_peek(10)
    assert [r["n"] for _, r in peeked] == [0, 1, 2, 3]  # claimed or not, oldest first
    assert [r["n"] for _, r in await store.audit_peek(3)] == [0, 1, 2]
    assert await store.audit_peek(10) == peeked  # peeking claims nothing

    other = make_store()  # another replica flushes everything it sees
    await other.open()
    try:
        await other.audit_ack([i for i, _ in peeked])
    finally:
        await other.close()
    assert await store.audit_peek(10) == []
    assert await store.audit_backlog() == 0
    await store.audit_ack([i for i, _ in claimed])  # the owner's late ack: a no-op
    assert await store.audit_batch("replica-1", 10) == []
    assert await store.audit_batch("replica-2", 10) == []

    await store.append_audit({"n": 4})
    assert [r["n"] for _, r in await store.audit_batch("replica-1", 10)] == [4]


async def test_caps_changed_are_read_by_the_next_admission(
    store: Store, make_store: StoreFactory
) -> None:
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    assert (await store.admit(paid(key, "res_1", 6 * USD))).status == "admitted"
    other = make_store()  # another replica on the same state
    await other.open()
    try:
        # Lowered below what is reserved already: refused from now on, nothing moves.
        lowered = await store.set_key_caps("kb_a", daily_cap_micros=5 * USD)
        assert lowered is not None and lowered.daily_cap_micros == 5 * USD
        refused = await other.admit(paid(key, "res_2", 1))
        assert (refused.status, refused.code) == ("refused", "cap_exhausted")
        assert (await store.budgets(lowered, NOON))[0].reserved_micros == 6 * USD
        raised = await store.set_key_caps("kb_a", daily_cap_micros=20 * USD, usd_cap_micros=7 * USD)
        assert raised is not None and (raised.daily_cap_micros, raised.usd_cap_micros) == (
            20 * USD,
            7 * USD,
        )
        # The lifetime cap counts the reservation made before it was set.
        assert (await other.admit(paid(key, "res_3", 2 * USD))).code == "cap_exhausted"
        cleared = await store.set_key_caps("kb_a", clear_usd_cap=True)
        assert cleared is not None and cleared.usd_cap_micros is None
        assert cleared.daily_cap_micros == 20 * USD
        assert (await other.admit(paid(key, "res_4", 2 * USD))).status == "admitted"
        assert await store.set_key_caps("kb_never", daily_cap_micros=USD) is None
    finally:
        await other.close()


async def test_sqlite_runs_a_lone_call_at_once_and_shares_a_transaction_otherwise(
    tmp_path: Path,
) -> None:
    """Group commit: calls asked for in one turn of the loop share one transaction; a lone
    call (nothing else ready to run) does not wait a turn for company that cannot come."""
    store = SQLiteStore(tmp_path / "keybrake.db")
    key = make_key("kb_a", daily=10 * USD)
    await store.create_key(key)
    commits: list[str] = []
    store._connect().set_trace_callback(
        lambda sql: commits.append(sql) if sql == "COMMIT" else None
    )
    await asyncio.sleep(0)  # the loop's ready queue is empty now
    lone = store.admit(paid(key, "res_lone", USD))
    with pytest.raises(StopIteration) as done:
        lone.send(None)  # finishes without suspending: no turn of the loop waited
    assert (done.value.value.status, len(commits)) == ("admitted", 1)
    # Together: one commit for all of them, each admitted in the order asked.
    results = await asyncio.gather(*(store.admit(paid(key, f"res_{i}", USD)) for i in range(5)))
    assert [r.status for r in results] == ["admitted"] * 5
    assert len(commits) == 2
    assert [b.reserved_micros for b in results[-1].budgets] == [6 * USD] * len(results[-1].budgets)
    await store.close()
