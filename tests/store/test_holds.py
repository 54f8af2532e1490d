"""The `Store` contract for holds (money a vendor object can move later), suspended keys and
the accounts a key may act on: every test runs against SQLite and against the real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest
from tests.store.conftest import USD, StoreFactory, make_key

from keybrake.store import BudgetState, Hold, Store

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def usage(budgets: tuple[BudgetState, ...]) -> list[tuple[int, int]]:
    return [(b.spent_micros, b.reserved_micros) for b in budgets]


# -- holds -----------------------------------------------------------------------------------------
async def test_a_hold_keeps_the_amount_reserved_at_what_the_vendor_says(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD, usd_cap=50 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok

    assert await store.hold("res_1", "stripe", "pi_1", 3 * USD)

    assert usage(await store.budgets(key, NOON)) == [(0, 3 * USD), (0, 3 * USD)]
    assert await store.holds("stripe", "pi_1") == (Hold("res_1", "kb_a", 3 * USD),)
    assert await store.holds("stripe", "pi_2") == ()
    assert await store.holds("twilio", "pi_1") == ()


async def test_a_held_reservation_is_finished_once_and_unlinked(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    assert await store.hold("res_1", "stripe", "pi_1", 2 * USD)

    assert await store.settle("res_1", 2 * USD)

    assert not await store.release("res_1")
    assert await store.holds("stripe", "pi_1") == ()
    assert usage(await store.budgets(key, NOON)) == [(2 * USD, 0)]


async def test_releasing_a_hold_frees_the_cap(store: Store) -> None:
    key = make_key("kb_a", daily=2 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    assert await store.hold("res_1", "stripe", "pi_1", 2 * USD)
    assert not (await store.reserve(key, "res_2", USD, NOON)).ok

    assert await store.release("res_1")

    assert (await store.reserve(key, "res_2", USD, NOON)).ok


async def test_crash_recovery_leaves_holds_alone(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    assert (await store.reserve(key, "res_held", 2 * USD, NOON)).ok
    assert (await store.reserve(key, "res_open", USD, NOON)).ok
    assert await store.hold("res_held", "stripe", "pi_1", 2 * USD)

    assert await store.recover_reservations(older_than=NOON + DAY) == 1

    assert await store.holds("stripe", "pi_1") == (Hold("res_held", "kb_a", 2 * USD),)
    assert await store.release("res_held")  # still open: a vendor answer can finish it
    assert usage(await store.budgets(key, NOON)) == [(USD, 0)]


async def test_only_open_reservations_can_be_held(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    assert (await store.reserve(key, "res_1", USD, NOON)).ok
    assert await store.settle("res_1", USD)

    assert not await store.hold("res_1", "stripe", "pi_1", USD)
    assert not await store.hold("res_never", "stripe", "pi_1", USD)
    assert await store.holds("stripe", "pi_1") == ()


async def test_holds_of_one_object_are_listed_oldest_first(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    for hour, reservation_id in [(11, "res_b"), (9, "res_a")]:
        assert (await store.reserve(key, reservation_id, USD, NOON.replace(hour=hour))).ok
        assert await store.hold(reservation_id, "stripe", "ii_1", USD)

    assert [h.reservation_id for h in await store.holds("stripe", "ii_1")] == ["res_a", "res_b"]


async def test_raise_hold_is_checked_against_the_cap(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD, usd_cap=20 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    assert await store.hold("res_1", "stripe", "pi_1", 2 * USD)

    refused = await store.raise_hold("res_1", 6 * USD, key)
    assert not refused.ok
    assert refused.exceeded is not None and refused.exceeded.scope == "key:kb_a"
    assert usage(await store.budgets(key, NOON)) == [(0, 2 * USD), (0, 2 * USD)]

    raised = await store.raise_hold("res_1", 5 * USD, key)
    assert raised.ok
    assert usage(raised.budgets) == [(0, 5 * USD), (0, 5 * USD)]
    assert usage(await store.budgets(key, NOON)) == [(0, 5 * USD), (0, 5 * USD)]
    assert await store.holds("stripe", "pi_1") == (Hold("res_1", "kb_a", 5 * USD),)

    lowered = await store.raise_hold("res_1", USD, key)
    assert lowered.ok
    assert usage(await store.budgets(key, NOON)) == [(0, USD), (0, USD)]


async def test_raise_hold_counts_in_the_day_of_the_reservation(store: Store) -> None:
    key = make_key("kb_a", daily=3 * USD)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    assert await store.hold("res_1", "stripe", "pi_1", 2 * USD)
    # The next day has its whole cap, but the hold lives in the day it was reserved in.
    assert (await store.reserve(key, "res_2", 3 * USD, NOON + DAY)).ok

    assert not (await store.raise_hold("res_1", 4 * USD, key)).ok
    assert (await store.raise_hold("res_1", 3 * USD, key)).ok

    assert usage(await store.budgets(key, NOON)) == [(0, 3 * USD)]
    assert usage(await store.budgets(key, NOON + DAY)) == [(0, 3 * USD)]


async def test_raise_hold_of_a_finished_reservation_is_refused(store: Store) -> None:
    key = make_key("kb_a", daily=5 * USD)
    assert (await store.reserve(key, "res_1", USD, NOON)).ok
    assert await store.release("res_1")

    result = await store.raise_hold("res_1", 2 * USD, key)

    assert not result.ok and result.budgets == ()
    assert usage(await store.budgets(key, NOON)) == [(0, 0)]


async def test_raise_hold_checks_the_label_budget(store: Store) -> None:
    key = make_key("kb_a", label="run-1", daily=10 * USD)
    await store.set_label_budget("run-1", 3 * USD)
    assert (await store.reserve(key, "res_1", USD, NOON)).ok

    refused = await store.raise_hold("res_1", 4 * USD, key)

    assert not refused.ok
    assert refused.exceeded is not None and refused.exceeded.scope == "label:run-1"


async def test_concurrent_raises_never_exceed_the_cap(store: Store) -> None:
    key = make_key("kb_a", daily=10 * USD)
    for i in range(10):
        assert (await store.reserve(key, f"res_{i}", 0, NOON)).ok

    results = await asyncio.gather(*(store.raise_hold(f"res_{i}", 3 * USD, key) for i in range(10)))

    assert sum(r.ok for r in results) == 3
    assert usage(await store.budgets(key, NOON)) == [(0, 9 * USD)]


async def test_holds_survive_a_restart(store: Store, make_store: StoreFactory) -> None:
    key = make_key("kb_a", daily=10 * USD)
    assert (await store.reserve(key, "res_1", USD, NOON)).ok
    assert await store.hold("res_1", "stripe", "cs_1", USD)
    again = make_store()
    await again.open()
    try:
        assert await again.holds("stripe", "cs_1") == (Hold("res_1", "kb_a", USD),)
    finally:
        await again.close()


# -- suspension and accounts -----------------------------------------------------------------------
async def test_suspend_keeps_the_first_reason_and_resume_lifts_it(store: Store) -> None:
    key = make_key("kb_a")
    await store.create_key(key)

    first = await store.suspend_key("kb_a", NOON, "estimate overrun on pi_1")
    again = await store.suspend_key("kb_a", NOON + DAY, "another reason")

    assert first is not None and again is not None
    assert again.suspended_at == NOON and again.suspended_reason == "estimate overrun on pi_1"
    assert again.state(NOON + DAY) == "suspended"
    fetched = await store.get_key_by_secret_hash(key.secret_sha256)
    assert fetched is not None and fetched.state(NOON) == "suspended"

    resumed = await store.resume_key("kb_a")
    assert resumed is not None and resumed.suspended_at is None
    assert resumed.suspended_reason is None and resumed.state(NOON) == "active"
    assert await store.resume_key("kb_a") == resumed  # harmless when not suspended
    assert await store.suspend_key("kb_never", NOON, "x") is None
    assert await store.resume_key("kb_never") is None


async def test_a_revoked_key_stays_revoked_when_suspended(store: Store) -> None:
    await store.create_key(make_key("kb_a"))
    await store.revoke_key("kb_a", NOON)

    suspended = await store.suspend_key("kb_a", NOON, "overrun")

    assert suspended is not None and suspended.state(NOON) == "revoked"


@pytest.mark.parametrize("accounts", [(), ("acct_1",), ("acct_1", "acct_2")])
async def test_allowed_accounts_round_trip(store: Store, accounts: tuple[str, ...]) -> None:
    key = dataclasses.replace(make_key("kb_a"), allowed_accounts=accounts)
    await store.create_key(key)

    assert await store.get_key("kb_a") == key
