"""Class 3 of *Keys are tenants*: one key cannot exhaust what all keys share.

Before, a key allowed only a free ``GET`` stored a response for replay for every request with
a fresh ``Idempotency-Key`` (300 calls, 300 entries, kept 24 hours and after revocation):
about two million stored responses per key per day at the default request rate, enough to
fill the SQLite disk or a ``noeviction`` Redis, after which every key got
``store_unavailable``. Now reads are never kept for replay, each key keeps at most
``keybrake_max_idempotency_entries`` responses and owns at most ``keybrake_max_objects``
objects (``429 quota_exceeded`` for that key only), and a revoked key's entries are dropped.
A paid call's reservation goes when the call is answered (the SQLite store kept one row per
paid call, forever and under no quota).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from tests.conftest import REDIS_URL, KeybrakeProcess
from tests.fakes import FakeStripe
from tests.security.conftest import error_code, key_detail, raw_post, sdk

pytestmark = pytest.mark.e2e

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LIMITS = ["--set", "keybrake_max_idempotency_entries=20", "--set", "keybrake_max_objects=30"]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def kb(
    request: pytest.FixtureRequest, keybrake_factory: Any, fake_stripe: FakeStripe
) -> KeybrakeProcess:
    store = ""
    if request.param == "redis":
        store = f"{REDIS_URL}?prefix={request.getfixturevalue('redis_prefix')}"
    proc: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=store, extra_args=LIMITS
    )
    return proc


def in_store(kb: KeybrakeProcess, sqlite: Callable[[sqlite3.Connection], int], keys: str) -> int:
    """What the store itself keeps: ``sqlite`` counts it in the SQLite file, or the Redis keys
    matching ``keys`` (after the store's prefix) are counted."""
    if not kb.store:
        with sqlite3.connect(kb.data_dir / "keybrake.db") as db:
            return sqlite(db)
    prefix = kb.store.split("prefix=")[1]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return len(list(client.scan_iter(f"{prefix}{keys}", count=1000)))
    finally:
        client.close()


def stored_entries(kb: KeybrakeProcess, key_id: str) -> int:
    """Idempotency entries the store keeps for a key, read from the store itself."""

    def rows(db: sqlite3.Connection) -> int:
        sql = "SELECT COUNT(*) FROM idempotency_entries WHERE key_id = ?"
        return int(db.execute(sql, (key_id,)).fetchone()[0])

    return in_store(kb, rows, f"idm:{key_id}:*")


def test_one_key_cannot_fill_the_store_for_the_others(
    kb: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    hog = kb.issue_key(
        daily_usd_cap="1000",
        allowed_endpoints=["POST /v1/payment_intents", "GET /v1/payment_intents/{id}"],
        max_requests_per_minute=1000,
    )
    other = kb.issue_key(daily_usd_cap="10", allowed_endpoints=["POST /v1/payment_intents"])
    pi = sdk(kb, hog, monkeypatch).v1.payment_intents.create(
        params={"amount": 50, "currency": "usd"}
    )
    base = stored_entries(kb, hog["key_id"])  # the SDK sends an idempotency key of its own
    # Reads with a fresh idempotency key each: nothing is kept for them.
    for _ in range(60):
        r = raw_post(
            kb, hog, f"/v1/payment_intents/{pi.id}", b"", {"Idempotency-Key": uuid.uuid4().hex},
            method="GET",
        )  # fmt: skip
        assert r.status_code == 200, r.text
    assert stored_entries(kb, hog["key_id"]) == base
    # Paid calls with a fresh idempotency key each: the key's share is bounded.
    codes = []
    for _ in range(25):
        r = raw_post(
            kb,
            hog,
            "/v1/payment_intents",
            b"amount=50&currency=usd",
            {**FORM, "Idempotency-Key": uuid.uuid4().hex},
        )
        codes.append(r.status_code if r.status_code == 200 else error_code(r))
    assert codes.count(200) == 20 - base
    assert codes[20 - base :] == ["quota_exceeded"] * (5 + base)
    assert stored_entries(kb, hog["key_id"]) == 20
    # The other key is not affected.
    done = sdk(kb, other, monkeypatch).v1.payment_intents.create(
        params={
            "amount": 100,
            "currency": "usd",
            "confirm": True,
            "payment_method": "pm_card_visa",
        },
        options={"idempotency_key": uuid.uuid4().hex},
    )
    assert done.status == "succeeded"


def test_a_key_owns_at_most_its_share_of_objects(
    kb: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = kb.issue_key(daily_usd_cap="1000", allowed_endpoints=["POST /v1/customers"])
    codes = [
        r.status_code
        if (r := raw_post(kb, key, "/v1/customers", b"email=a%40x.io", FORM)).status_code == 200
        else error_code(r)
        for _ in range(32)
    ]
    assert codes.count(200) == 30 and codes[30:] == ["quota_exceeded"] * 2
    assert len([e for e in fake_stripe.ledger if e.route == "/v1/customers"]) == 30


def test_a_revoked_keys_entries_are_dropped(kb: KeybrakeProcess, fake_stripe: FakeStripe) -> None:
    key = kb.issue_key(daily_usd_cap="100", allowed_endpoints=["POST /v1/payment_intents"])
    for _ in range(5):
        r = raw_post(
            kb,
            key,
            "/v1/payment_intents",
            b"amount=50&currency=usd",
            {**FORM, "Idempotency-Key": uuid.uuid4().hex},
        )
        assert r.status_code == 200
    assert stored_entries(kb, key["key_id"]) == 5
    assert kb.admin("DELETE", f"/vault/keys/{key['key_id']}").status_code == 200
    assert stored_entries(kb, key["key_id"]) == 0
    r = httpx.get(f"{kb.admin_url}/healthz")
    assert r.status_code == 200


def reservation_records(kb: KeybrakeProcess, key_id: str) -> int:
    """Reservation records the store keeps for a key, whatever table or key names hold them."""

    def rows(db: sqlite3.Connection) -> int:
        tables = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%reservation%'"
        ).fetchall()
        sql = "SELECT COUNT(*) FROM {} WHERE key_id = ?"
        return sum(int(db.execute(sql.format(t), (key_id,)).fetchone()[0]) for (t,) in tables)

    return in_store(kb, rows, "res:*")


def test_answered_paid_calls_leave_no_reservation_behind(
    kb: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    # Before, the SQLite store kept a reservation row for every paid call, forever and under
    # no quota: a key with a cap of a few dollars could grow the file without bound with
    # cheap calls. A finished reservation is now deleted, as on Redis.
    key = kb.issue_key(daily_usd_cap="100", allowed_endpoints=["POST /v1/payment_intents"])
    # Confirmed at once: charged, so settled (an unconfirmed one is held until it charges).
    body = b"amount=50&currency=usd&confirm=true&payment_method=pm_card_visa"
    for _ in range(25):
        r = raw_post(kb, key, "/v1/payment_intents", body, FORM)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "succeeded", r.text
    assert len([e for e in fake_stripe.ledger if e.route == "/v1/payment_intents"]) == 25
    assert reservation_records(kb, key["key_id"]) == 0
    # What they reserved is spent, none of it still reserved: $0.50 each.
    detail = key_detail(kb, key)
    assert detail["spent_today_usd"] == "12.50", detail
    assert [b["reserved_usd"] for b in detail["budgets"]] == ["0.00"] * len(detail["budgets"])
