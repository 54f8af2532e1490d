"""The `Store` contract for keys as tenants: object owners, amounts remembered per key, the
per-key bound on idempotency entries, and what goes when a key is revoked or expires. Every
test runs against SQLite and the real Redis (and Redis as an ACL user, and over TLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

from tests.store.conftest import USD, make_key

from keybrake.store import IdempotencyBegin, ObjectOwner, Store, StoredResponse

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
RESPONSE = StoredResponse(200, (("Content-Type", "application/json"),), b'{"id":"pi_1"}')


async def test_the_first_owner_of_an_object_stays(store: Store) -> None:
    a = make_key("kb_a", label="run-1")
    b = make_key("kb_b", label="run-2")
    # Stored: on a cluster a key's entries are in its label's tree, found from its id.
    await store.create_key(a)
    await store.create_key(b)
    await store.record_objects(a, "stripe", ["pi_1", "pi_2"], NOON)
    await store.record_objects(b, "stripe", ["pi_2", "pi_3"], NOON)

    assert await store.object_owner("stripe", "pi_1") == ObjectOwner("kb_a", "run-1")
    assert await store.object_owner("stripe", "pi_2") == ObjectOwner("kb_a", "run-1")
    assert await store.object_owner("stripe", "pi_3") == ObjectOwner("kb_b", "run-2")
    assert await store.object_owner("stripe", "pi_4") is None
    assert await store.object_owner("twilio", "pi_1") is None
    assert (await store.count_objects("kb_a"), await store.count_objects("kb_b")) == (2, 1)


async def test_amounts_are_remembered_per_key(store: Store) -> None:
    await store.remember_amount("kb_a", "stripe", "pi_1", 5 * USD)
    await store.remember_amount("kb_b", "stripe", "pi_1", 45 * USD)

    assert await store.recall_amount("kb_a", "stripe", "pi_1") == 5 * USD
    assert await store.recall_amount("kb_b", "stripe", "pi_1") == 45 * USD
    assert await store.recall_amount("kb_c", "stripe", "pi_1") is None


async def test_a_key_keeps_at_most_its_share_of_idempotency_entries(store: Store) -> None:
    for i in range(3):
        begun = await store.idempotency_begin("kb_a", f"idem:{i}", "h", 60, 30, 3)
        assert begun == IdempotencyBegin("started")
    await store.idempotency_complete("kb_a", "idem:0", RESPONSE, 60)

    assert await store.idempotency_begin("kb_a", "idem:9", "h", 60, 30, 3) == IdempotencyBegin(
        "full"
    )
    # Its existing entries still answer, and other keys are not affected.
    assert (await store.idempotency_begin("kb_a", "idem:0", "h", 60, 30, 3)).status == "replay"
    assert (await store.idempotency_begin("kb_a", "idem:1", "h", 60, 30, 3)).status == "in_flight"
    assert (await store.idempotency_begin("kb_b", "idem:9", "h", 60, 30, 3)).status == "started"
    # An abandoned claim frees its place.
    await store.idempotency_abandon("kb_a", "idem:2")
    assert (await store.idempotency_begin("kb_a", "idem:9", "h", 60, 30, 3)).status == "started"


async def test_concurrent_claims_never_exceed_the_bound(store: Store) -> None:
    results = await asyncio.gather(
        *(store.idempotency_begin("kb_a", f"idem:{i}", "h", 60, 30, 5) for i in range(20))
    )
    assert sum(r.status == "started" for r in results) == 5
    assert sum(r.status == "full" for r in results) == 15


async def test_scopes_of_two_keys_never_meet(store: Store) -> None:
    assert (await store.idempotency_begin("kb_a", "idem:k", "h1", 60, 30, 9)).status == "started"
    await store.idempotency_complete("kb_a", "idem:k", RESPONSE, 60)

    assert (await store.idempotency_begin("kb_b", "idem:k", "h2", 60, 30, 9)).status == "started"


async def test_revoking_a_key_forgets_what_the_store_kept_for_it(store: Store) -> None:
    a, b = make_key("kb_a"), make_key("kb_b")
    for key in (a, b):
        await store.create_key(key)
        await store.record_objects(key, "stripe", [f"pi_{key.key_id}"], NOON)
        await store.remember_amount(key.key_id, "stripe", "pi_x", USD)
        await store.idempotency_begin(key.key_id, "idem:1", "h", 60, 30, 9)
        await store.idempotency_complete(key.key_id, "idem:1", RESPONSE, 60)
    assert (await store.reserve(a, "res_1", USD, NOON)).ok
    assert await store.hold("res_1", "stripe", "pi_kb_a", USD)

    await store.revoke_key("kb_a", NOON)

    assert await store.recall_amount("kb_a", "stripe", "pi_x") is None
    assert await store.object_owner("stripe", "pi_kb_a") is None
    assert await store.count_objects("kb_a") == 0
    assert (await store.idempotency_begin("kb_a", "idem:1", "h", 60, 30, 9)).status == "started"
    # Money stays: the hold and the budget are not part of what is forgotten.
    assert [h.reservation_id for h in await store.holds("stripe", "pi_kb_a")] == ["res_1"]
    assert (await store.budgets(a, NOON))[0].reserved_micros == USD
    # The other key keeps everything.
    assert await store.recall_amount("kb_b", "stripe", "pi_x") == USD
    assert await store.object_owner("stripe", "pi_kb_b") == ObjectOwner("kb_b", "")
    assert (await store.idempotency_begin("kb_b", "idem:1", "h", 60, 30, 9)).status == "replay"


async def test_expired_keys_are_forgotten_by_housekeeping(store: Store) -> None:
    short = dataclasses.replace(make_key("kb_short"), expires_at=NOON + dt.timedelta(hours=1))
    long = make_key("kb_long")
    for key in (short, long):
        await store.create_key(key)
        await store.remember_amount(key.key_id, "stripe", "pi_1", USD)

    await store.forget_expired_keys(NOON)
    assert await store.recall_amount("kb_short", "stripe", "pi_1") == USD

    assert await store.forget_expired_keys(NOON + dt.timedelta(hours=2)) >= 1
    assert await store.recall_amount("kb_short", "stripe", "pi_1") is None
    assert await store.recall_amount("kb_long", "stripe", "pi_1") == USD
