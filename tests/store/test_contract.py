"""The `Store` contract: every test runs against SQLite and against the real Redis server."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import os
import pathlib
import random
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests._redis import PrivateRedis
from tests.store.conftest import USD, StoreFactory, make_key

from keybrake.store import (
    BudgetState,
    IdempotencyBegin,
    RedisStore,
    SQLiteStore,
    Store,
    StoredResponse,
    StoreUnavailable,
    open_store,
)

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


# -- vault keys ------------------------------------------------------------------------------


async def test_store_satisfies_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)
    await store.ping()
    await store.open()  # idempotent


async def test_clock_skew_is_measured_against_the_shared_clock(store: Store) -> None:
    skew = await store.clock_skew()
    if isinstance(store, SQLiteStore):
        assert skew is None  # one host, one clock
    else:
        # Redis runs on this host: same clock, so only the measurement's noise remains.
        assert skew is not None and abs(skew) < 0.5, skew


async def test_create_then_get_by_id_and_by_secret_hash(store: Store) -> None:
    record = make_key("kb_a", label="run-1", usd_cap=7 * USD)
    record = dataclass_replace(
        record,
        vendor_account="AC123",
        max_requests_per_minute=1500,
        # Microseconds and a non-UTC offset must survive the round trip (same instant).
        created_at=dt.datetime(
            2030, 1, 1, 9, 30, 1, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))
        ),
    )
    await store.create_key(record)

    assert await store.get_key("kb_a") == record
    assert await store.get_key_by_secret_hash(record.secret_sha256) == record
    assert await store.get_key("kb_missing") is None
    assert await store.get_key_by_secret_hash("0" * 64) is None


async def test_create_refuses_a_taken_id_or_secret_hash(store: Store) -> None:
    original = make_key("kb_a", daily=3 * USD)
    await store.create_key(original)

    with pytest.raises(ValueError, match="kb_a"):
        await store.create_key(make_key("kb_a", daily=9 * USD))
    with pytest.raises(ValueError):
        await store.create_key(
            dataclass_replace(make_key("kb_b"), secret_sha256=original.secret_sha256)
        )

    assert await store.get_key("kb_a") == original
    assert await store.get_key("kb_b") is None
    assert [k.key_id for k in await store.list_keys()] == ["kb_a"]


async def test_list_keys_newest_first(store: Store) -> None:
    for key_id, day in [("kb_mid", 2), ("kb_old", 1), ("kb_new", 3)]:
        await store.create_key(make_key(key_id, created_at=NOON + day * DAY))

    assert [k.key_id for k in await store.list_keys()] == ["kb_new", "kb_mid", "kb_old"]


async def test_list_keys_empty(store: Store) -> None:
    assert await store.list_keys() == []


async def test_revoke_is_idempotent_and_keeps_the_first_time(store: Store) -> None:
    await store.create_key(make_key("kb_a"))

    first = await store.revoke_key("kb_a", NOON)
    again = await store.revoke_key("kb_a", NOON + DAY)

    assert first is not None and first.revoked_at == NOON
    assert again is not None and again.revoked_at == NOON
    stored = await store.get_key("kb_a")
    assert stored is not None and stored.state(NOON) == "revoked"
    assert await store.revoke_key("kb_missing", NOON) is None


# -- budgets -----------------------------------------------------------------------------------


async def test_label_budget_set_get_remove(store: Store) -> None:
    assert await store.get_label_budget("run-1") is None
    await store.set_label_budget("run-1", 5 * USD)
    await store.set_label_budget("run-1", 6 * USD)
    assert await store.get_label_budget("run-1") == 6 * USD
    await store.set_label_budget("run-1", None)
    assert await store.get_label_budget("run-1") is None
    await store.set_label_budget("run-1", None)  # removing twice is fine


async def test_reserve_reports_every_budget_after_the_step(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=5 * USD, usd_cap=20 * USD)
    await store.create_key(key)
    await store.set_label_budget("run-1", 8 * USD)

    result = await store.reserve(key, "res_1", 2 * USD, NOON)

    assert result.ok and result.exceeded is None and result.reservation_id == "res_1"
    assert result.budgets == (
        BudgetState("key:kb_a", "2030-01-01", 5 * USD, 0, 2 * USD),
        BudgetState("key-lifetime:kb_a", "lifetime", 20 * USD, 0, 2 * USD),
        BudgetState("label:run-1", "2030-01-01", 8 * USD, 0, 2 * USD),
    )
    assert await store.budgets(key, NOON) == result.budgets
    assert result.budgets[0].remaining_micros == 3 * USD


async def test_budgets_without_lifetime_or_label_cap(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=5 * USD)
    await store.create_key(key)

    assert (await store.reserve(key, "res_1", USD, NOON)).budgets == (
        BudgetState("key:kb_a", "2030-01-01", 5 * USD, 0, USD),
    )


async def test_refused_reserve_changes_nothing(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD)
    assert (await store.reserve(key, "res_1", 3 * USD, NOON)).ok

    refused = await store.reserve(key, "res_2", 3 * USD, NOON)

    before = BudgetState("key:kb_a", "2030-01-01", 5 * USD, 0, 3 * USD)
    assert not refused.ok
    assert refused.exceeded == before
    assert refused.budgets == (before,)
    assert await store.budgets(key, NOON) == (before,)
    # The refused reservation was never recorded ...
    assert not await store.settle("res_2", USD)
    assert not await store.release("res_2")
    # ... so its id may be used once there is room.
    assert await store.release("res_1")
    assert (await store.reserve(key, "res_2", 3 * USD, NOON)).ok


async def test_exact_cap_is_fully_usable(store: Store) -> None:
    key = make_key("kb_a", daily=3 * USD)

    results = [await store.reserve(key, f"res_{i}", USD, NOON) for i in range(4)]

    assert [r.ok for r in results] == [True, True, True, False]
    assert results[3].exceeded == BudgetState("key:kb_a", "2030-01-01", 3 * USD, 0, 3 * USD)
    assert (await store.budgets(key, NOON))[0].remaining_micros == 0
    # A zero estimate still fits a full (not overspent) budget.
    assert (await store.reserve(key, "res_free", 0, NOON)).ok


async def test_daily_window_rolls_over_at_midnight_utc(store: Store) -> None:
    key = make_key("kb_a", daily=2 * USD)
    last_moment = dt.datetime(2030, 1, 1, 23, 59, 59, 999999, tzinfo=dt.UTC)
    midnight = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    # 01:00 at UTC+5 is still 20:00 on January 1st in UTC.
    east = dt.datetime(2030, 1, 2, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))

    assert (await store.reserve(key, "res_1", 2 * USD, last_moment)).ok
    assert not (await store.reserve(key, "res_2", USD, last_moment)).ok
    assert not (await store.reserve(key, "res_3", USD, east)).ok
    after = await store.reserve(key, "res_4", 2 * USD, midnight)

    assert after.ok
    assert after.budgets == (BudgetState("key:kb_a", "2030-01-02", 2 * USD, 0, 2 * USD),)
    assert (await store.budgets(key, last_moment))[0].reserved_micros == 2 * USD


async def test_lifetime_cap_spans_days(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD, usd_cap=7 * USD)
    assert (await store.reserve(key, "res_1", 5 * USD, NOON)).ok
    assert await store.settle("res_1", 5 * USD)

    refused = await store.reserve(key, "res_2", 3 * USD, NOON + DAY)
    accepted = await store.reserve(key, "res_3", 2 * USD, NOON + DAY)

    assert not refused.ok
    assert refused.exceeded == BudgetState("key-lifetime:kb_a", "lifetime", 7 * USD, 5 * USD, 0)
    assert accepted.ok
    assert accepted.budgets == (
        BudgetState("key:kb_a", "2030-01-02", 5 * USD, 0, 2 * USD),
        BudgetState("key-lifetime:kb_a", "lifetime", 7 * USD, 5 * USD, 2 * USD),
    )


async def test_label_budget_is_shared_and_checked_in_the_same_step(store: Store) -> None:
    a = make_key("kb_a", label="run-42", daily=10 * USD)
    b = make_key("kb_b", label="run-42", daily=10 * USD)
    other = make_key("kb_c", label="run-43", daily=10 * USD)
    await store.set_label_budget("run-42", 5 * USD)

    assert (await store.reserve(a, "res_a", 3 * USD, NOON)).ok
    refused = await store.reserve(b, "res_b1", 3 * USD, NOON)

    assert not refused.ok
    assert refused.exceeded == BudgetState("label:run-42", "2030-01-01", 5 * USD, 0, 3 * USD)
    # Refused by the label: b's own budget did not move either.
    assert (await store.budgets(b, NOON))[0] == BudgetState(
        "key:kb_b", "2030-01-01", 10 * USD, 0, 0
    )
    assert (await store.reserve(b, "res_b2", 2 * USD, NOON)).ok
    assert (await store.budgets(a, NOON))[1].reserved_micros == 5 * USD
    assert (await store.reserve(other, "res_c", 5 * USD, NOON)).ok


async def test_first_exceeded_budget_is_reported_in_order(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=2 * USD, usd_cap=2 * USD)
    await store.set_label_budget("run-1", USD)

    refused = await store.reserve(key, "res_1", 3 * USD, NOON)

    assert refused.exceeded is not None and refused.exceeded.scope == "key:kb_a"


async def test_label_cap_set_later_counts_the_days_earlier_spend(store: Store) -> None:
    # Chosen semantics: label usage is tracked even while the label has no cap.
    key = make_key("kb_a", label="run-1", daily=10 * USD)
    assert (await store.reserve(key, "res_1", 4 * USD, NOON)).ok
    await store.set_label_budget("run-1", 5 * USD)

    refused = await store.reserve(key, "res_2", 2 * USD, NOON)

    assert refused.exceeded == BudgetState("label:run-1", "2030-01-01", 5 * USD, 0, 4 * USD)


# -- finishing reservations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actual", "spent_after"), [(USD // 2, USD // 2), (3 * USD, 3 * USD), (0, 0)]
)
async def test_settle_replaces_the_estimate_by_the_actual_cost(
    store: Store, actual: int, spent_after: int
) -> None:
    key = make_key("kb_a", label="run-1", daily=2 * USD, usd_cap=10 * USD)
    await store.set_label_budget("run-1", 5 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok

    assert await store.settle("res_1", actual)

    budgets = await store.budgets(key, NOON)
    assert [(b.spent_micros, b.reserved_micros) for b in budgets] == [(spent_after, 0)] * 3


async def test_settle_above_the_estimate_blocks_further_spend(store: Store) -> None:
    key = make_key("kb_a", daily=2 * USD)
    assert (await store.reserve(key, "res_1", USD, NOON)).ok
    assert await store.settle("res_1", 3 * USD)  # the vendor charged more than estimated

    refused = await store.reserve(key, "res_2", 0, NOON)

    assert not refused.ok
    assert refused.budgets[0].remaining_micros == 0


async def test_release_drops_the_reservation(store: Store) -> None:
    key = make_key("kb_a", daily=2 * USD, usd_cap=5 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok

    assert await store.release("res_1")

    assert [(b.spent_micros, b.reserved_micros) for b in await store.budgets(key, NOON)] == [
        (0, 0),
        (0, 0),
    ]


async def test_mark_unknown_keeps_the_estimate_as_spent(store: Store) -> None:
    key = make_key("kb_a", daily=2 * USD, usd_cap=5 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok

    assert await store.mark_unknown("res_1")

    assert [(b.spent_micros, b.reserved_micros) for b in await store.budgets(key, NOON)] == [
        (2 * USD, 0),
        (2 * USD, 0),
    ]


FINISHERS = ["settle", "release", "mark_unknown"]


async def finish(store: Store, how: str, reservation_id: str) -> bool:
    if how == "settle":
        return await store.settle(reservation_id, USD)
    if how == "release":
        return await store.release(reservation_id)
    return await store.mark_unknown(reservation_id)


@pytest.mark.parametrize("first", FINISHERS)
@pytest.mark.parametrize("second", FINISHERS)
async def test_a_reservation_is_finished_at_most_once(
    store: Store, first: str, second: str
) -> None:
    key = make_key("kb_a", daily=5 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    assert await finish(store, first, "res_1")
    after_first = await store.budgets(key, NOON)

    assert not await finish(store, second, "res_1")

    assert await store.budgets(key, NOON) == after_first


@pytest.mark.parametrize("how", FINISHERS)
async def test_finishing_an_unknown_reservation_is_refused(store: Store, how: str) -> None:
    assert not await finish(store, how, "res_never")


async def test_settle_counts_in_the_day_of_the_reservation(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD)
    late = dt.datetime(2030, 1, 1, 23, 59, 59, tzinfo=dt.UTC)
    assert (await store.reserve(key, "res_1", 2 * USD, late)).ok

    assert await store.settle("res_1", USD)  # the answer arrives after midnight

    assert (await store.budgets(key, late))[0] == BudgetState(
        "key:kb_a", "2030-01-01", 5 * USD, USD, 0
    )
    assert (await store.budgets(key, late + DAY))[0] == BudgetState(
        "key:kb_a", "2030-01-02", 5 * USD, 0, 0
    )


async def test_a_reservation_id_is_never_reserved_twice(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok

    again = await store.reserve(key, "res_1", 2 * USD, NOON)

    assert again.ok
    assert again.budgets == (BudgetState("key:kb_a", "2030-01-01", 5 * USD, 0, 2 * USD),)


async def test_ledger_survives_a_restart(store: Store, make_store: StoreFactory) -> None:
    key = make_key("kb_a", daily=5 * USD)
    await store.create_key(key)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    await store.close()

    restarted = make_store()
    await restarted.open()
    try:
        assert await restarted.get_key("kb_a") == key
        assert await restarted.settle("res_1", USD)
        assert (await restarted.budgets(key, NOON))[0].spent_micros == USD
    finally:
        await restarted.close()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
async def test_amounts_must_be_non_negative_integers(store: Store, bad: object) -> None:
    key = make_key("kb_a")
    with pytest.raises(ValueError):
        await store.reserve(key, "res_1", bad, NOON)  # type: ignore[arg-type]
    assert (await store.reserve(key, "res_1", USD, NOON)).ok
    with pytest.raises(ValueError):
        await store.settle("res_1", bad)  # type: ignore[arg-type]
    assert (await store.budgets(key, NOON))[0].reserved_micros == USD


async def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.reserve(make_key(), "res_1", USD, dt.datetime(2030, 1, 1, 12))


async def test_recover_reservations_marks_old_open_ones_unknown(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    for hour, reservation_id in [(9, "res_settled"), (10, "res_old"), (12, "res_new")]:
        assert (await store.reserve(key, reservation_id, 2 * USD, NOON.replace(hour=hour))).ok
    assert await store.settle("res_settled", USD)

    recovered = await store.recover_reservations(older_than=NOON.replace(hour=11))

    assert recovered == 1
    assert (await store.budgets(key, NOON))[0] == BudgetState(
        "key:kb_a", "2030-01-01", 10 * USD, 3 * USD, 2 * USD
    )
    assert not await store.settle("res_old", 0)  # now unknown: counted, and final
    assert await store.settle("res_new", 0)
    assert await store.recover_reservations(older_than=NOON + DAY) == 0


# -- amounts ---------------------------------------------------------------------------------------


async def test_remember_and_recall_amounts(store: Store) -> None:
    assert await store.recall_amount("kb_a", "stripe", "pi_1") is None
    await store.remember_amount("kb_a", "stripe", "pi_1", 1_234_567)
    await store.remember_amount("kb_a", "stripe", "pi_2", 1)
    await store.remember_amount("kb_a", "stripe", "pi_2", 2)

    assert await store.recall_amount("kb_a", "stripe", "pi_1") == 1_234_567
    assert await store.recall_amount("kb_a", "stripe", "pi_2") == 2
    assert await store.recall_amount("kb_a", "twilio", "pi_1") is None


# -- idempotency -----------------------------------------------------------------------------------

RESPONSE = StoredResponse(
    status_code=201,
    headers=(("content-type", "application/json"), ("request-id", "req_1")),
    body=b'{"id": "pi_1"}\x00\xff',
)


async def test_idempotency_begin_states(store: Store) -> None:
    assert await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100) == IdempotencyBegin(
        "started"
    )
    assert await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100) == IdempotencyBegin(
        "in_flight"
    )
    assert await store.idempotency_begin("kb_a", "k1", "h2", 60, 30, 100) == IdempotencyBegin(
        "mismatch"
    )

    await store.idempotency_complete("kb_a", "k1", RESPONSE, 60)

    assert await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100) == IdempotencyBegin(
        "replay", RESPONSE
    )
    assert await store.idempotency_begin("kb_a", "k1", "h2", 60, 30, 100) == IdempotencyBegin(
        "mismatch"
    )
    assert await store.idempotency_begin("kb_b", "k1", "h1", 60, 30, 100) == IdempotencyBegin(
        "started"
    )


async def test_idempotent_replay_survives_a_restart(store: Store, make_store: StoreFactory) -> None:
    assert (await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100)).status == "started"
    await store.idempotency_complete("kb_a", "k1", RESPONSE, 60)
    await store.close()

    restarted = make_store()
    await restarted.open()
    try:
        assert await restarted.idempotency_begin(
            "kb_a", "k1", "h1", 60, 30, 100
        ) == IdempotencyBegin("replay", RESPONSE)
    finally:
        await restarted.close()


async def test_idempotency_abandon_frees_the_claim(store: Store) -> None:
    assert (await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100)).status == "started"
    await store.idempotency_abandon("kb_a", "k1")
    await store.idempotency_complete("kb_a", "k1", RESPONSE, 60)  # no claim: nothing stored

    assert (await store.idempotency_begin("kb_a", "k1", "h2", 60, 30, 100)).status == "started"


async def test_idempotency_abandon_keeps_a_completed_response(store: Store) -> None:
    assert (await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100)).status == "started"
    await store.idempotency_complete("kb_a", "k1", RESPONSE, 60)
    await store.idempotency_abandon("kb_a", "k1")

    assert (await store.idempotency_begin("kb_a", "k1", "h1", 60, 30, 100)).status == "replay"


async def test_idempotency_stale_claims_and_expired_responses(store: Store) -> None:
    assert (await store.idempotency_begin("kb_a", "crashed", "h1", 60, 1, 100)).status == "started"
    assert (
        await store.idempotency_begin("kb_a", "crashed", "h1", 60, 1, 100)
    ).status == "in_flight"
    assert (await store.idempotency_begin("kb_a", "short", "h1", 60, 30, 100)).status == "started"
    await store.idempotency_complete("kb_a", "short", RESPONSE, 1)
    assert (await store.idempotency_begin("kb_a", "short", "h1", 60, 30, 100)).status == "replay"

    await asyncio.sleep(1.3)

    # In flight for longer than in_flight_seconds: the crashed request's claim is taken over.
    assert (await store.idempotency_begin("kb_a", "crashed", "h2", 60, 1, 100)).status == "started"
    assert (
        await store.idempotency_begin("kb_a", "crashed", "h2", 60, 1, 100)
    ).status == "in_flight"
    # Stored for ttl_seconds only.
    assert (await store.idempotency_begin("kb_a", "short", "h1", 60, 30, 100)).status == "started"


# -- request rate ----------------------------------------------------------------------------
SECOND = dt.timedelta(seconds=1)


async def test_request_rate_admits_up_to_the_limit_then_says_when(store: Store) -> None:
    results = [await store.count_request("kb_a", 5, NOON) for _ in range(7)]

    assert [r.ok for r in results] == [True] * 5 + [False] * 2
    # Counted in the 5-second bucket starting at NOON, which stops counting 65 s later.
    assert results[5].retry_after_seconds == 65
    # Another key has its own count.
    assert (await store.count_request("kb_b", 5, NOON)).ok


async def test_request_rate_counts_the_last_minute_and_says_when_room_appears(
    store: Store,
) -> None:
    for _ in range(3):
        assert (await store.count_request("kb_a", 5, NOON + 10 * SECOND)).ok
    for _ in range(2):
        assert (await store.count_request("kb_a", 5, NOON + 40 * SECOND)).ok

    refused = await store.count_request("kb_a", 5, NOON + 50 * SECOND)
    assert not refused.ok
    # The three of 12:00:10 stop counting with their bucket (12:00:10-15) at 12:01:15.
    assert refused.retry_after_seconds == 25
    # A minute after them they still count (their bucket is within the last 65 s) ...
    assert not (await store.count_request("kb_a", 5, NOON + 72 * SECOND)).ok
    # ... and at 12:01:15 they are gone: three fit next to the two of 12:00:40.
    at = NOON + 75 * SECOND
    assert [(await store.count_request("kb_a", 5, at)).ok for _ in range(4)] == [True] * 3 + [False]
    # Next room: the two of 12:00:40 go at 12:01:45.
    assert (await store.count_request("kb_a", 5, at)).retry_after_seconds == 30


async def test_no_minute_ever_holds_more_than_the_limit(store: Store) -> None:
    """Bursts and pauses at random times over ten minutes: every 60 s holds at most
    ``limit`` admitted requests; under constant pressure the limit is nearly used."""
    rng = random.Random(7)
    limit = 20
    t = NOON + dt.timedelta(milliseconds=rng.randrange(60_000))
    admitted: list[float] = []
    while t < NOON + 10 * 60 * SECOND:
        if (await store.count_request("kb_a", limit, t)).ok:
            admitted.append(t.timestamp())
        t += dt.timedelta(milliseconds=rng.choice([1, 5, 50, 400, 3_000, 9_000]))
    for i, start in enumerate(admitted):
        in_minute = bisect.bisect_left(admitted, start + 60) - i
        assert in_minute <= limit, (i, in_minute)
    assert len(admitted) >= 5 * limit  # the pauses left room more than once

    # Constant pressure (a request every 100 ms): a limit per 65 s at least, the price of
    # counting whole 5-second buckets, and never a limit per 60 s more.
    t, steady = NOON, 0
    while t < NOON + 10 * 60 * SECOND:
        steady += (await store.count_request("kb_b", limit, t)).ok
        t += dt.timedelta(milliseconds=100)
    assert limit * (600 // 65) <= steady <= limit * 10, steady


async def test_concurrent_requests_never_exceed_the_rate_limit(store: Store) -> None:
    now = NOON + 20 * SECOND
    results = await asyncio.gather(*(store.count_request("kb_a", 50, now) for _ in range(200)))
    assert sum(r.ok for r in results) == 50
    assert all(r.retry_after_seconds == 65 for r in results if not r.ok)


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
async def test_request_rate_refuses_a_nonsense_limit(store: Store, limit: object) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.count_request("kb_a", limit, NOON)  # type: ignore[arg-type]


async def test_sqlite_database_of_an_earlier_version_gains_the_rate_column(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TABLE keys (key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL UNIQUE, "
            "vendor TEXT NOT NULL, agent_run_label TEXT NOT NULL, "
            "daily_cap_micros INTEGER NOT NULL, usd_cap_micros INTEGER, "
            "allowed_endpoints TEXT NOT NULL, vendor_account TEXT, "
            "created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, revoked_at INTEGER)"
        )
        conn.execute(
            "INSERT INTO keys VALUES ('kb_old', 'ab', 'stripe', '', 1, NULL, '[]', NULL, 0, 1, "
            "NULL)"
        )
        conn.commit()
    store = SQLiteStore(path)
    try:
        await store.open()
        old = await store.get_key("kb_old")
        assert old is not None and old.max_requests_per_minute is None
        new = dataclass_replace(make_key("kb_new"), max_requests_per_minute=60)
        await store.create_key(new)
        assert await store.get_key("kb_new") == new
    finally:
        await store.close()
    # A second process opening it later finds the column there already.
    again = SQLiteStore(path)
    try:
        await again.open()
        assert (await again.get_key("kb_new")) == new
    finally:
        await again.close()


# -- concurrency -----------------------------------------------------------------------------------


async def test_concurrent_reserves_never_exceed_the_cap(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=50 * USD)
    await store.create_key(key)

    results = await asyncio.gather(*(store.reserve(key, f"res_{i}", USD, NOON) for i in range(200)))

    assert sum(r.ok for r in results) == 50
    assert (await store.budgets(key, NOON))[0].reserved_micros == 50 * USD


def test_sqlite_threads_with_their_own_store_share_one_cap(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    key = make_key("kb_a", daily=50 * USD)
    start = threading.Barrier(4, timeout=30)  # a thread that failed to open must not hang us

    def worker(thread: int) -> int:
        async def reserve_all() -> int:
            store = SQLiteStore(path)
            await store.open()
            start.wait()
            results = await asyncio.gather(
                *(store.reserve(key, f"res_{thread}_{i}", USD, NOON) for i in range(50))
            )
            await store.close()
            return sum(r.ok for r in results)

        return asyncio.run(reserve_all())

    with ThreadPoolExecutor(max_workers=4) as pool:
        accepted = sum(pool.map(worker, range(4)))

    assert accepted == 50

    async def reserved() -> int:
        store = SQLiteStore(path)
        try:
            return (await store.budgets(key, NOON))[0].reserved_micros
        finally:
            await store.close()

    assert asyncio.run(reserved()) == 50 * USD


# -- failures: fail closed, recover by itself ----------------------------------------------------


@pytest.mark.redis
async def test_redis_outage_fails_closed_then_recovers(tmp_path: pathlib.Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    redis_server = PrivateRedis(tmp_path).start()
    port = redis_server.port
    store = RedisStore(redis_server.url, prefix="outage:")
    key = make_key("kb_a", daily=5 * USD)
    try:
        await store.open()
        await store.create_key(key)
        assert (await store.reserve(key, "res_1", USD, NOON)).ok

        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
            await store.reserve(key, "res_2", USD, NOON)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 5

        redis_server.start()
        # The same object reconnects and reloads its scripts (nothing was persisted).
        await store.ping()
        assert await store.get_key("kb_a") is None
        assert (await store.reserve(key, "res_3", USD, NOON)).ok
        assert await store.settle("res_3", USD)
    finally:
        await store.close()
        redis_server.kill()


@contextlib.contextmanager
def read_only(path: pathlib.Path) -> Iterator[None]:
    """Make ``path`` read-only, also for root (who ignores permission bits): ``chattr +i``."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    try:
        if os.geteuid() == 0:
            made = shutil.which("chattr") and subprocess.run(
                ["chattr", "+i", str(path)], capture_output=True
            )
            if not made or made.returncode != 0:
                pytest.skip("running as root without `chattr +i`: cannot make a path read-only")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


async def test_sqlite_read_only_directory_is_unavailable(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    store = SQLiteStore(directory / "state.db")
    with read_only(directory):
        with pytest.raises(StoreUnavailable, match=r"state\.db"):
            await store.open()
        with pytest.raises(StoreUnavailable, match=r"state\.db"):
            await store.reserve(make_key(), "res_1", USD, NOON)
    # Recovers by itself once the directory is writable again.
    assert (await store.reserve(make_key(), "res_1", USD, NOON)).ok
    await store.close()


async def test_sqlite_read_only_file_is_unavailable(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    writable = SQLiteStore(path)
    await writable.create_key(make_key("kb_a"))
    await writable.close()

    store = SQLiteStore(path)
    with read_only(path):
        with pytest.raises(StoreUnavailable, match=r"state\.db"):
            await store.open()
        with pytest.raises(StoreUnavailable, match=r"state\.db"):
            await store.reserve(make_key(), "res_1", USD, NOON)
        with pytest.raises(StoreUnavailable):
            await store.ping()
    await store.close()


@pytest.mark.parametrize("where", ["directory", "below_a_file"])
async def test_sqlite_unusable_path_is_unavailable(tmp_path: pathlib.Path, where: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path if where == "directory" else tmp_path / "file" / "state.db"

    with pytest.raises(StoreUnavailable, match=str(path)):
        await SQLiteStore(path).open()


async def test_sqlite_not_a_database_is_unavailable(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a SQLite database" * 100)

    with pytest.raises(StoreUnavailable, match=r"state\.db"):
        await SQLiteStore(path).open()


async def test_sqlite_locked_beyond_the_busy_timeout_is_unavailable(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.reserve(make_key(), "res_1", USD, NOON)
        assert time.monotonic() - started < 2
    finally:
        other.execute("ROLLBACK")
        other.close()

    assert (await store.reserve(make_key(), "res_1", USD, NOON)).ok
    await store.close()


# -- open_store --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/keybrake/state.db", "/var/lib/keybrake/state.db"),
        ("sqlite:data/state.db", "data/state.db"),
        ("sqlite:state.db", "state.db"),
        ("sqlite:///tmp/with%20space.db", "/tmp/with space.db"),
        ("SQLITE:///x.db", "/x.db"),
    ],
)
def test_open_store_sqlite_urls(url: str, path: str) -> None:
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    assert store.path == pathlib.Path(path)


@pytest.mark.parametrize(
    ("url", "redis_url", "prefix"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", "keybrake:"),
        ("redis://h:6379/2?prefix=kb-prod:", "redis://h:6379/2", "kb-prod:"),
        (
            "rediss://:pw@h:6380/0?prefix=p:&ssl_cert_reqs=none",
            "rediss://:***@h:6380/0?ssl_cert_reqs=none",  # store.url never shows a password
            "p:",
        ),
    ],
)
def test_open_store_redis_urls(url: str, redis_url: str, prefix: str) -> None:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert (store.url, store.prefix) == (redis_url, prefix)


@pytest.mark.parametrize(
    "url", ["postgres://localhost/db", "state.db", "sqlite://host/state.db", "sqlite:", ""]
)
def test_open_store_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="store URL"):
        open_store(url)


def test_redis_password_is_not_in_messages() -> None:
    assert "secret" not in repr(RedisStore("redis://user:secret@h:6379/0"))


def dataclass_replace[T](record: T, **changes: object) -> T:
    import dataclasses

    return dataclasses.replace(record, **changes)  # type: ignore[type-var]
