"""``kill -9`` of one of two replicas sharing Redis (store and audit outbox) and PostgreSQL
(audit sink) under load. Afterwards: every answer a client got has exactly one audit row,
the budget counts at least what the vendor charged and at most the calls the dead replica
had in flight on top, an idempotent request still replays, and the dead replica restarts
cleanly on the same store. (One replica on SQLite: test_faults.py.)"""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from tests.conftest import REDIS_URL, KeybrakeProcess, audit_query
from tests.fakes import FakeStripe
from tests.reliability.conftest import (
    USD,
    ChargeLoad,
    charge,
    code_of,
    key_detail,
    usd_micros,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

THREADS = 4  # client threads per replica: at most this many calls in flight at the dead one
IDEM = "kill9-replicas-idem-1"


@dataclass(frozen=True)
class Answer:
    """One response a client received."""

    status: int
    pi_id: str | None  # the PaymentIntent of a 200
    request_id: str | None  # the vendor's ``Request-Id`` header
    code: str | None  # the error code of anything else


def answer_of(r: httpx.Response) -> Answer:
    if r.status_code == 200:
        return Answer(200, str(r.json()["id"]), r.headers.get("Request-Id"), None)
    return Answer(r.status_code, None, r.headers.get("Request-Id"), code_of(r))


def clients(kb: KeybrakeProcess, vault_key: str, threads: int = THREADS) -> ChargeLoad[Answer]:
    """``threads`` workers sending $1 charges to one replica until stopped."""
    return ChargeLoad(kb, [vault_key], threads, lambda _, r: answer_of(r))


def audit_via_api(kb: KeybrakeProcess, key_id: str) -> list[dict[str, Any]]:
    """Every audit row of ``key_id`` as ``GET /vault/audit`` pages them (oldest first). The
    first page flushes the store's outbox into the sink: read-your-writes."""
    rows: list[dict[str, Any]] = []
    before = ""
    while True:
        r = kb.admin("GET", f"/vault/audit?key={key_id}&since=2h&limit=1000{before}")
        assert r.status_code == 200, r.text
        page = r.json()
        rows += page["data"]
        if page["next_before"] is None:
            return sorted(rows, key=lambda row: int(row["id"]))
        before = f"&before={page['next_before']}"


def instance_of(kb: KeybrakeProcess) -> str:
    return str(httpx.get(f"{kb.admin_url}/healthz", timeout=5).json()["instance"])


def wait_vendor_quiet(fake: FakeStripe, quiet: float, timeout: float = 15) -> None:
    """Until the fake's ledger has not grown for ``quiet`` seconds (calls the dead replica
    had forwarded are still executed by the vendor, after its delay)."""
    last = [len(fake.ledger), time.monotonic()]

    def settled() -> bool:
        n = len(fake.ledger)
        if n != last[0]:
            last[:] = [n, time.monotonic()]
        return time.monotonic() - last[1] >= quiet

    wait_for(settled, timeout, "the vendor to finish the calls in flight")


def two_replicas(
    factory: Any, fake: FakeStripe, prefix: str, audit_url: str, claim_idle_ms: int = 30_000
) -> tuple[KeybrakeProcess, KeybrakeProcess]:
    """Two ``keybrake run`` sharing one Redis store (and outbox) and one PostgreSQL sink; a
    batch a replica claimed is taken over by another after ``claim_idle_ms``."""
    store = f"redis://127.0.0.1:6379/0?prefix={prefix}&audit_claim_idle_ms={claim_idle_ms}"
    extra = ["--set", f"keybrake_audit={audit_url}"]
    a: KeybrakeProcess = factory({"stripe": fake}, store=store, extra_args=extra)
    b: KeybrakeProcess = factory({"stripe": fake}, store=store, extra_args=extra)
    assert instance_of(a) != instance_of(b)
    return a, b


def outbox_length(prefix: str) -> int:
    with redis.Redis.from_url(REDIS_URL) as r:
        return int(r.xlen(f"{prefix}audit"))


def test_kill_9_of_one_of_two_redis_replicas_under_load(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    postgres_audit_url: str,
) -> None:
    a, b = two_replicas(keybrake_factory, fake_stripe, redis_prefix, postgres_audit_url)
    a_instance, b_instance = instance_of(a), instance_of(b)
    key = a.issue_key(daily_usd_cap=100_000, agent_run_label="reliability/kill9-replicas")
    key_id, vk = key["key_id"], key["vault_key"]

    first = charge(a, vk, 700, idem=IDEM)
    assert first.status_code == 200, first.text
    first_id = first.json()["id"]

    fake_stripe.delay_seconds = 0.2  # calls are in flight at the vendor when A dies
    on_a, on_b = clients(a, vk).start(), clients(b, vk).start()
    try:
        wait_for(
            lambda: on_a.count() >= 10 and on_b.count() >= 10, 30, "load through both replicas"
        )
        # A dies with calls in flight (each waits 0.2 s at the vendor): on a loaded machine
        # its clients can all be between two calls at any given moment.
        wait_for(lambda: on_a.in_flight >= 2, 30, "calls in flight through A")
        on_a.stop_evt.set()  # A's clients finish the request they are in, then stop
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        killed_at = time.monotonic()
        on_a.join()
        # The load goes on through B for a moment (longer than the vendor's delay).
        b_at_kill = on_b.count()
        wait_for(
            lambda: on_b.count() >= b_at_kill + 2 * THREADS and time.monotonic() - killed_at > 1.0,
            30,
            "load through B after the kill",
        )
    finally:
        on_a.join()
        on_b.join()
    fake_stripe.delay_seconds = 0
    wait_vendor_quiet(fake_stripe, quiet=0.5)

    # ------------------------------------------------------------------ the clients' view
    answers = [answer_of(first), *on_a.answers, *on_b.answers]
    assert {x.status for x in answers} == {200}, Counter(x.code for x in answers)
    assert on_b.lost == 0, "B dropped calls"
    in_flight = on_a.lost  # A's calls that got no answer: those it had in flight
    assert 1 <= in_flight <= THREADS, "nothing was in flight at A when it died"
    answered_ids = [x.pi_id for x in answers]
    assert len(set(answered_ids)) == len(answered_ids)

    # --------------------------------------------------- the audit log, read through B
    rows = audit_via_api(b, key_id)
    assert rows == audit_query(postgres_audit_url, "SELECT * FROM audit ORDER BY id")
    # Nothing of A's is left in the outbox: B's read flushed it, claimed by A or not.
    assert outbox_length(redis_prefix) == 0
    event_ids = [r["event_id"] for r in rows]
    assert all(event_ids) and len(set(event_ids)) == len(event_ids), "an event_id twice"
    assert {r["outcome"] for r in rows} == {"ok"}, Counter(r["outcome"] for r in rows)
    by_pi = Counter(r["vendor_object_id"] for r in rows)
    # Every answer any client received has exactly one row, on the replica that answered.
    missing = [pi for pi in answered_ids if by_pi[pi] == 0]
    assert not missing, f"{len(missing)} answered calls without an audit row: {missing[:5]}"
    assert [pi for pi, n in by_pi.items() if n > 1] == []
    instance = {r["vendor_object_id"]: r["instance"] for r in rows}
    assert {instance[x.pi_id] for x in on_b.answers} == {b_instance}
    assert {instance[x.pi_id] for x in [answer_of(first), *on_a.answers]} == {a_instance}
    for r in rows:
        assert r["vendor_request_id"], r
    answered_rids = {x.request_id for x in answers}
    assert {r["vendor_request_id"] for r in rows if r["vendor_object_id"] in answered_ids} == (
        answered_rids
    )
    # The only rows without an answer: calls A settled before dying, whose answer was lost.
    extra_rows = [r for r in rows if r["vendor_object_id"] not in set(answered_ids)]
    assert len(extra_rows) <= in_flight, (len(extra_rows), in_flight)
    assert {r["instance"] for r in extra_rows} <= {a_instance}
    assert len(rows) == len(answers) + len(extra_rows)

    # ------------------------------------------------------------------------ the money
    vendor = [e for e in fake_stripe.ledger if e.status == 200 and e.object_id]
    charged = fake_stripe.charged_usd_micros()
    assert len(vendor) == len(fake_stripe.ledger), "the vendor failed a call"
    vendor_ids = {e.object_id for e in vendor}
    assert set(by_pi) <= vendor_ids, "an audit row for a charge the vendor never made"
    # Charges without a row: forwarded by A, not settled when it died.
    unsettled = vendor_ids - set(by_pi)
    assert len(unsettled) + len(extra_rows) <= in_flight, (unsettled, extra_rows, in_flight)
    spent = usd_micros(key_detail(b, key_id)["spent_today_usd"])
    settled = sum(int(r["actual_micros"]) for r in rows)
    # Conservative and counted once: every charge, plus at most one $1 estimate per call A had
    # in flight (admitted, then never settled: it stays reserved).
    assert charged <= spent <= charged + in_flight * USD, (charged, spent, in_flight)
    assert settled <= spent <= settled + (in_flight - len(extra_rows)) * USD
    assert charged == 7 * USD + (len(vendor) - 1) * USD

    # ----------------------------------------------- idempotency survives A, through B
    n = len(fake_stripe.ledger)
    again = charge(b, vk, 700, idem=IDEM)
    assert again.status_code == 200, again.text
    assert again.headers.get("X-Keybrake-Replayed") == "true"
    assert again.json()["id"] == first_id
    assert len(fake_stripe.ledger) == n, "the replay reached the vendor"
    assert usd_micros(key_detail(b, key_id)["spent_today_usd"]) == spent

    # -------------------------------------------- A restarts on the same store and serves
    a.start()
    a_instance2 = instance_of(a)
    assert a_instance2 != a_instance
    r = charge(a, vk, 100)
    assert r.status_code == 200, r.text
    assert usd_micros(r.headers["X-Keybrake-Spent-Usd"]) == spent + USD
    # Its pump (and B's) moved nothing twice: the rows from before, the replay, the new call.
    after = audit_via_api(a, key_id)
    assert after[: len(rows)] == rows
    new = after[len(rows) :]
    assert [(x["outcome"], x["instance"]) for x in new] == [
        ("replayed", b_instance),
        ("ok", a_instance2),
    ]
    assert new[0]["vendor_object_id"] in (first_id, None)
    assert new[1]["vendor_object_id"] == r.json()["id"]
    assert len({x["event_id"] for x in after}) == len(after)
    time.sleep(0.5)  # both pumps keep running: still nothing moved twice
    assert audit_via_api(b, key_id) == after


def pending_of(prefix: str, consumer: str) -> int:
    """Outbox rows delivered to ``consumer`` and not acknowledged (``XINFO CONSUMERS``)."""
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as r:
        for c in r.xinfo_consumers(f"{prefix}audit", "audit"):
            if c["name"] == consumer:
                return int(c["pending"])
    return 0


def sink_writers_waiting(audit_url: str) -> int:
    """Connections waiting for a lock on the sink's table (a pump in the middle of a batch)."""
    import psycopg

    with psycopg.connect(audit_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'audit'::regclass"
        ).fetchone()
    return int(row[0]) if row else 0


def test_rows_a_killed_replica_had_claimed_are_moved_by_the_survivors_pump(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    postgres_audit_url: str,
) -> None:
    """A dies with a batch it took from the outbox not yet in the sink (the sink's table is
    locked meanwhile, so it cannot be written). No reader flushes: B's own pump claims the
    batch once it has been idle for ``audit_claim_idle_ms`` (the store URL's, 10 s here: long
    enough to see the batch wait, default 30 s) and moves it; each answered call then has
    exactly one row."""
    import psycopg

    a, b = two_replicas(
        keybrake_factory, fake_stripe, redis_prefix, postgres_audit_url, claim_idle_ms=10_000
    )
    a_instance = instance_of(a)
    key = a.issue_key(daily_usd_cap=100_000, agent_run_label="reliability/kill9-claim")
    key_id, vk = key["key_id"], key["vault_key"]
    fake_stripe.delay_seconds = 0.1
    on_a, on_b = clients(a, vk, threads=2).start(), clients(b, vk, threads=2).start()
    locker = psycopg.connect(postgres_audit_url)
    try:
        wait_for(lambda: on_a.count() >= 3 and on_b.count() >= 3, 30, "load on both")
        # Writers of the sink now wait for the lock: each pump is stuck with a batch.
        locker.execute("LOCK TABLE audit IN EXCLUSIVE MODE")
        wait_for(lambda: sink_writers_waiting(postgres_audit_url) == 2, 10, "both pumps to wait")
        assert pending_of(redis_prefix, a_instance) > 0
        on_a.stop_evt.set()
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        on_a.join()
        stuck = pending_of(redis_prefix, a_instance)
        assert stuck > 0
        b_at_kill = on_b.count()
        wait_for(lambda: on_b.count() >= b_at_kill + 4, 30, "load through B after the kill")
        on_b.join()
        locker.rollback()  # the sink can be written again
    finally:
        on_a.join()
        on_b.join()
        locker.close()
    fake_stripe.delay_seconds = 0

    answers = [*on_a.answers, *on_b.answers]
    assert {x.status for x in answers} == {200}, Counter(x.code for x in answers)
    answered_ids = {x.pi_id for x in answers}

    def sink_pis() -> Counter[str]:
        # Straight from PostgreSQL: a read through the admin API would flush the outbox.
        return Counter(r["vendor_object_id"] for r in audit_query(postgres_audit_url))

    # B moves everything but A's batch at once; that batch waits for the claim.
    wait_for(lambda: outbox_length(redis_prefix) == stuck, 15, "B to move all but A's batch")
    assert pending_of(redis_prefix, a_instance) == stuck
    before_claim = len(audit_query(postgres_audit_url))
    wait_for(lambda: outbox_length(redis_prefix) == 0, 45, "B's pump to claim A's batch")
    assert pending_of(redis_prefix, a_instance) == 0

    rows = audit_query(postgres_audit_url)
    assert len(rows) == before_claim + stuck, "A's batch was in the sink before the claim"
    by_pi = sink_pis()
    assert answered_ids <= set(by_pi), f"answered, no row: {sorted(answered_ids - set(by_pi))}"
    assert [pi for pi, n in by_pi.items() if n > 1] == []
    assert len(rows) - len(answered_ids) <= on_a.lost <= 2
    assert len({r["event_id"] for r in rows}) == len(rows)
    # Claimed rows keep the replica that answered them.
    instances = {r["vendor_object_id"]: r["instance"] for r in rows}
    assert {instances[x.pi_id] for x in on_a.answers} == {a_instance}
    # A reader sees the same rows now: nothing more to flush, nothing written twice.
    assert audit_via_api(b, key_id) == rows
