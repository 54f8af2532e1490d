"""The alert outbox's contract (`keybrake.store.alerts`), on SQLite and the real Redis (as an
ACL user, over TLS, and on a Redis Cluster): an alert fires once per dedupe key until its
window expires, even from two store objects at once (two replicas); deliveries are claimed
for a lease, retried when due, finished once, and survive a "restart" (a new store object)."""

from __future__ import annotations

import asyncio
import datetime as dt

from tests.store.conftest import StoreFactory

from keybrake.store import Store
from keybrake.store.alerts import LOG_LENGTH, alert_outbox

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)


def rows(*hooks: str) -> list[dict[str, object]]:
    return [{"webhook": h, "dedupe": "d", "alert": {"kind": "threshold"}} for h in hooks]


async def test_an_alert_fires_once_per_dedupe_key_until_its_window_ends(store: Store) -> None:
    outbox = alert_outbox(store)
    end = NOON + dt.timedelta(days=2)
    assert await outbox.fire("threshold:key_day:k1:2030-01-01:50", rows("a", "b"), NOON, end)
    assert not await outbox.fire("threshold:key_day:k1:2030-01-01:50", rows("a"), NOON, end)
    assert await outbox.fire("threshold:key_day:k1:2030-01-01:80", rows("a"), NOON, end)
    assert len(await outbox.pending(100)) == 3
    # A lifetime window never expires; a daily one may fire again once it has.
    assert await outbox.fire("threshold:key_lifetime:k1:lifetime:50", [], NOON, None)
    assert not await outbox.fire("threshold:key_lifetime:k1:lifetime:50", [], NOON, None)
    later = end + SECOND
    assert await outbox.fire("threshold:key_day:k1:2030-01-01:50", rows("a"), later, later + SECOND)


async def test_two_replicas_firing_the_same_alert_at_once_queue_it_once(
    make_store: StoreFactory,
) -> None:
    stores = [make_store() for _ in range(2)]
    for s in stores:
        await s.open()
    try:
        firsts = await asyncio.gather(
            *(
                alert_outbox(stores[i % 2]).fire(f"cap_hit:k{i // 8}", rows("a"), NOON, None)
                for i in range(16)
            )
        )
        assert sum(firsts) == 2  # k0 and k1, once each, whichever replica was first
        assert len(await alert_outbox(stores[0]).pending(100)) == 2
    finally:
        for s in stores:
            await s.close()


async def test_deliveries_are_leased_retried_finished_once_and_survive_a_restart(
    make_store: StoreFactory,
) -> None:
    first = make_store()
    await first.open()
    outbox = alert_outbox(first)
    await outbox.fire("k", rows("a", "b"), NOON, None)
    claimed = await outbox.due(NOON, 10, lease_seconds=30)
    assert sorted(str(r["webhook"]) for _, r in claimed) == ["a", "b"]
    assert await outbox.due(NOON + SECOND, 10, 30) == []  # leased: nobody else sends them
    (a_id, a_row), (b_id, b_row) = sorted(claimed, key=lambda c: str(c[1]["webhook"]))
    assert await outbox.done(a_id, {**a_row, "result": "delivered"})
    assert not await outbox.done(a_id, {**a_row, "result": "delivered"})  # finished once
    await outbox.retry(b_id, {**b_row, "attempts": 1, "error": "HTTP 500"}, NOON + 5 * SECOND)
    await first.close()  # a restart: the queue is in the store

    second = make_store()
    await second.open()
    try:
        outbox = alert_outbox(second)
        assert await outbox.due(NOON + 4 * SECOND, 10, 30) == []
        (again,) = await outbox.due(NOON + 5 * SECOND, 10, 30)
        assert again[0] == b_id and again[1]["attempts"] == 1 and again[1]["error"] == "HTTP 500"
        # A lease that ran out (the replica died mid-send) makes it due again.
        (retaken,) = await outbox.due(NOON + 36 * SECOND, 10, 30)
        assert retaken[0] == b_id
        assert await outbox.done(b_id, {**again[1], "result": "failed"})
        assert [r["result"] for r in await outbox.recent(10)] == ["failed", "delivered"]
        assert await outbox.pending(10) == []
    finally:
        await second.close()


async def test_the_log_keeps_the_most_recent_deliveries(store: Store) -> None:
    outbox = alert_outbox(store)
    await outbox.fire("many", rows(*(f"h{i}" for i in range(LOG_LENGTH + 5))), NOON, None)
    order = []
    for row_id, row in await outbox.due(NOON, LOG_LENGTH + 5, 30):
        await outbox.done(row_id, {**row, "result": "delivered"})
        order.append(row["webhook"])
    recent = await outbox.recent(LOG_LENGTH + 50)
    assert [r["webhook"] for r in recent] == order[::-1][:LOG_LENGTH]
