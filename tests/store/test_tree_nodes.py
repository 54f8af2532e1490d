"""The budget tree issuer → run label → key on every backend: each call reserves against every
node on its path in the one admission step (caps per day and lifetime, request rates), every
way of finishing a reservation finishes every node, and a label's keys stay in one tree."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import threading

import pytest
from tests.store.conftest import USD, StoreFactory, make_key

from keybrake.store import (
    AdmissionRequest,
    IssuerRecord,
    KeyRecord,
    LabelBudget,
    LabelTreeConflict,
    Settlement,
    Store,
)

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
DAY = "2030-01-01"


def make_issuer(
    issuer_id: str = "iss_1",
    *,
    daily: int | None = None,
    lifetime: int | None = None,
    rate: int | None = None,
    prefix: str = "beam/",
) -> IssuerRecord:
    return IssuerRecord(
        issuer_id=issuer_id,
        token_sha256=hashlib.sha256(issuer_id.encode()).hexdigest(),
        name=issuer_id,
        vendors=("stripe",),
        label_prefix=prefix,
        allowed_endpoints=(("stripe", ("POST /v1/payment_intents",)),),
        max_daily_cap_micros=100 * USD,
        max_expires_in_seconds=86400,
        created_at=NOON - dt.timedelta(days=1),
        budget_daily_micros=daily,
        budget_lifetime_micros=lifetime,
        max_requests_per_minute=rate,
    )


def minted(key_id: str, label: str, issuer_id: str = "iss_1", **kw: object) -> KeyRecord:
    return dataclasses.replace(make_key(key_id, label=label, **kw), issuer_id=issuer_id)  # type: ignore[arg-type]


def paid(key_id: str, rid: str, micros: int, now: dt.datetime = NOON) -> AdmissionRequest:
    return AdmissionRequest(key_id, now, reservation_id=rid, estimate_micros=micros)


def free(key_id: str, now: dt.datetime = NOON) -> AdmissionRequest:
    return AdmissionRequest(key_id, now)


async def settle(store: Store, key: KeyRecord, rid: str, rows: object, actual: int) -> bool:
    return await store.settle_call(
        Settlement(
            key.key_id,
            key.agent_run_label,
            key.vendor,
            NOON,
            reservation_id=rid,
            ledger_rows=rows,  # type: ignore[arg-type]
            finish="settled",
            actual_micros=actual,
        )
    )


async def test_the_issuer_node_caps_every_key_it_minted(store: Store) -> None:
    await store.create_issuer(make_issuer(daily=5 * USD))
    a, b = minted("kb_a", "beam/run-1"), minted("kb_b", "beam/run-2")
    await store.create_key(a)
    await store.create_key(b)
    for n in range(5):
        key = (a, b)[n % 2]
        assert (await store.admit(paid(key.key_id, f"res_{n}", USD))).status == "admitted"
    refused = await store.admit(paid("kb_a", "res_x", 1))
    assert (refused.status, refused.code) == ("refused", "cap_exhausted")
    assert refused.exceeded is not None
    assert (refused.exceeded.scope, refused.exceeded.window) == ("issuer:iss_1", DAY)
    assert refused.exceeded.node == "issuer"
    assert refused.exceeded.used_micros == 5 * USD
    # Nothing of the refused call was reserved anywhere.
    usage = await store.tree_usage([("issuer:iss_1", DAY), ("key:kb_a", DAY)])
    assert usage == {("issuer:iss_1", DAY): (0, 5 * USD), ("key:kb_a", DAY): (0, 3 * USD)}


async def test_the_issuer_lifetime_cap_spans_days(store: Store) -> None:
    await store.create_issuer(make_issuer(lifetime=3 * USD))
    key = minted("kb_a", "beam/run-1")
    await store.create_key(key)
    for n in range(3):
        day = NOON + dt.timedelta(days=n)
        assert (await store.admit(paid("kb_a", f"res_{n}", USD, day))).status == "admitted"
    refused = await store.admit(paid("kb_a", "res_x", 1, NOON + dt.timedelta(days=4)))
    assert refused.code == "cap_exhausted" and refused.exceeded is not None
    assert refused.exceeded.scope == "issuer-lifetime:iss_1"


async def test_a_label_lifetime_cap_is_shared_by_its_keys_across_days(store: Store) -> None:
    await store.create_key(make_key("kb_a", label="run-1"))
    await store.create_key(make_key("kb_b", label="run-1"))
    await store.set_label_limits(LabelBudget("run-1", None, 2 * USD, None))
    assert await store.get_label_limits("run-1") == LabelBudget("run-1", None, 2 * USD, None)
    assert (await store.admit(paid("kb_a", "res_1", USD))).status == "admitted"
    later = NOON + dt.timedelta(days=1)
    assert (await store.admit(paid("kb_b", "res_2", USD, later))).status == "admitted"
    refused = await store.admit(paid("kb_a", "res_3", 1, later + dt.timedelta(days=1)))
    assert refused.exceeded is not None and refused.exceeded.scope == "label-lifetime:run-1"
    # The daily cap alone (set_label_budget) leaves the lifetime cap as it is.
    await store.set_label_budget("run-1", 50 * USD)
    assert await store.get_label_limits("run-1") == LabelBudget("run-1", 50 * USD, 2 * USD, None)
    await store.set_label_limits(LabelBudget("run-1"))
    assert await store.get_label_limits("run-1") == LabelBudget("run-1")


async def test_a_label_rate_limit_counts_every_key_of_the_label(store: Store) -> None:
    for key_id in ("kb_a", "kb_b", "kb_c"):
        await store.create_key(make_key(key_id, label="run-1"))
    await store.create_key(make_key("kb_other", label="run-2"))
    await store.set_label_limits(LabelBudget("run-1", max_requests_per_minute=3))
    results = [await store.admit(free(k)) for k in ("kb_a", "kb_b", "kb_c", "kb_a", "kb_b")]
    assert [r.status for r in results] == ["admitted"] * 3 + ["refused"] * 2
    assert {(r.code, r.detail, r.rate_limit) for r in results[3:]} == {("rate_limited", "label", 3)}
    assert all(r.retry_after_seconds >= 1 for r in results[3:])
    # Another label is not counted with it; a minute later the label has room again.
    assert (await store.admit(free("kb_other"))).status == "admitted"
    later = NOON + dt.timedelta(seconds=70)
    assert (await store.admit(free("kb_c", later))).status == "admitted"


async def test_a_refused_request_is_counted_at_no_level(store: Store) -> None:
    """The key's own limit refuses: the label's count is not spent by it, and the other way."""
    await store.create_key(make_key("kb_a", label="run-1"))
    await store.create_key(make_key("kb_b", label="run-1"))
    await store.set_label_limits(LabelBudget("run-1", max_requests_per_minute=3))
    limited = dataclasses.replace(free("kb_a"), rate_limit=1)
    assert (await store.admit(limited)).status == "admitted"
    for _ in range(3):
        refused = await store.admit(limited)
        assert (refused.code, refused.detail) == ("rate_limited", "key")
    # The label counted only the one admitted request of kb_a: two more fit.
    assert [(await store.admit(free("kb_b"))).status for _ in range(3)] == [
        "admitted",
        "admitted",
        "refused",
    ]


async def test_an_issuer_rate_limit_counts_every_label_under_it(store: Store) -> None:
    await store.create_issuer(make_issuer(rate=2))
    await store.create_key(minted("kb_a", "beam/run-1"))
    await store.create_key(minted("kb_b", "beam/run-2"))
    assert (await store.admit(free("kb_a"))).status == "admitted"
    assert (await store.admit(free("kb_b"))).status == "admitted"
    refused = await store.admit(free("kb_a"))
    assert (refused.code, refused.detail, refused.rate_limit) == ("rate_limited", "issuer", 2)


async def test_settling_releasing_and_recovery_finish_every_node(store: Store) -> None:
    await store.create_issuer(make_issuer(daily=100 * USD, lifetime=100 * USD))
    key = minted("kb_a", "beam/run-1")
    await store.create_key(key)
    await store.set_label_limits(LabelBudget("beam/run-1", 50 * USD, 50 * USD))
    first = await store.admit(paid("kb_a", "res_1", 3 * USD))
    assert [s for s, _ in first.ledger_rows] == [
        "key:kb_a",
        "key-lifetime:kb_a",
        "label:beam/run-1",
        "label-lifetime:beam/run-1",
        "issuer:iss_1",
        "issuer-lifetime:iss_1",
    ]
    assert await settle(store, key, "res_1", first.ledger_rows, 2 * USD)
    assert set((await store.tree_usage(first.ledger_rows)).values()) == {(2 * USD, 0)}
    second = await store.admit(paid("kb_a", "res_2", 4 * USD))
    assert await store.release("res_2")
    third = await store.admit(paid("kb_a", "res_3", 5 * USD))
    assert await store.recover_reservations(NOON + dt.timedelta(seconds=1)) == 1
    assert second.ledger_rows == third.ledger_rows == first.ledger_rows
    assert set((await store.tree_usage(first.ledger_rows)).values()) == {(7 * USD, 0)}


async def test_a_hold_raised_past_the_issuer_cap_is_refused(store: Store) -> None:
    await store.create_issuer(make_issuer(daily=5 * USD))
    key = minted("kb_a", "beam/run-1")
    await store.create_key(key)
    await store.admit(paid("kb_a", "res_1", USD))
    assert await store.hold("res_1", "stripe", "pi_1", 2 * USD)
    raised = await store.raise_hold("res_1", 6 * USD, key)
    assert not raised.ok and raised.exceeded is not None
    assert raised.exceeded.scope == "issuer:iss_1"
    assert (await store.raise_hold("res_1", 5 * USD, key)).ok
    usage = await store.tree_usage([("issuer:iss_1", DAY), ("label:beam/run-1", DAY)])
    assert set(usage.values()) == {(0, 5 * USD)}


async def test_reserve_outside_admission_counts_the_issuer_too(store: Store) -> None:
    await store.create_issuer(make_issuer(daily=2 * USD))
    key = minted("kb_a", "beam/run-1")
    await store.create_key(key)
    assert (await store.reserve(key, "res_1", 2 * USD, NOON)).ok
    refused = await store.reserve(key, "res_2", 1, NOON)
    assert not refused.ok and refused.exceeded is not None
    assert refused.exceeded.scope == "issuer:iss_1"
    assert [b.scope for b in await store.budgets(key, NOON)] == ["key:kb_a", "issuer:iss_1"]


async def test_a_label_lives_in_one_tree(store: Store) -> None:
    await store.create_issuer(make_issuer("iss_1"))
    await store.create_issuer(make_issuer("iss_2"))
    await store.create_key(make_key("kb_op", label="beam/op-run"))
    await store.create_key(minted("kb_1", "beam/run-1", "iss_1"))
    # An issuer under a label the operator's keys use; the operator under an issuer's; an
    # issuer under another issuer's.
    for record in (
        minted("kb_x1", "beam/op-run", "iss_1"),
        make_key("kb_x2", label="beam/run-1"),
        minted("kb_x3", "beam/run-1", "iss_2"),
    ):
        with pytest.raises(LabelTreeConflict):
            await store.create_key(record)
        assert await store.get_key(record.key_id) is None
    # Keys of the same tree join freely.
    await store.create_key(make_key("kb_op2", label="beam/op-run"))
    await store.create_key(minted("kb_2", "beam/run-1", "iss_1"))


async def test_the_issuer_cap_is_exact_under_concurrency(make_store: StoreFactory) -> None:
    """Four threads, each with its own store object (a replica), spend through keys of two
    labels under one issuer: the issuer's cap ends exactly spent, never more."""
    first = make_store()
    await first.open()
    await first.create_issuer(make_issuer(daily=30 * USD))
    keys = [minted(f"kb_{i}", f"beam/run-{i % 2}", daily=100 * USD) for i in range(4)]
    for key in keys:
        await first.create_key(key)
    await first.set_label_limits(LabelBudget("beam/run-0", 17 * USD))
    await first.close()
    admitted: list[int] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        async def run() -> None:
            store = make_store()
            await store.open()
            try:
                key = keys[index]
                for n in range(15):
                    rid = f"res_{index}_{n}"
                    got = await store.admit(paid(key.key_id, rid, USD))
                    if got.status == "admitted":
                        assert await settle(store, key, rid, got.ledger_rows, USD)
                        with lock:
                            admitted.append(index)
                    else:
                        assert got.code == "cap_exhausted"
            finally:
                await store.close()

        asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 30
    assert sum(1 for i in admitted if i % 2 == 0) <= 17
    check = make_store()
    await check.open()
    usage = await check.tree_usage(
        [("issuer:iss_1", DAY), ("label:beam/run-0", DAY), ("label:beam/run-1", DAY)]
    )
    await check.close()
    assert usage[("issuer:iss_1", DAY)] == (30 * USD, 0)
    run0, run1 = usage[("label:beam/run-0", DAY)], usage[("label:beam/run-1", DAY)]
    assert run0[0] + run1[0] == 30 * USD and run0[0] <= 17 * USD
