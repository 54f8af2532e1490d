"""What a vendor call leaves behind in Redis: nothing but what is documented to stay.

Many admissions and settlements on the real Redis (a prefix of their own), then the keys under
the prefix are counted. A finished call leaves no reservation, no remembered-amount key and no
counter of its own; what stays per call is an owner record per object it created (the 90-day
ownership window) and an idempotency entry per idempotency key (its TTL), and both expire.
"""

from __future__ import annotations

import collections
import datetime as dt
import json

import pytest
import redis
from tests.store.conftest import (
    REDIS_URL,
    USD,
    make_key,
)

from keybrake.store import (
    AdmissionRequest,
    IdempotencyClaim,
    KeyRecord,
    RedisStore,
    Settlement,
    StoredResponse,
)

pytestmark = pytest.mark.redis

BODY = b'{"id": "pi_x", "object": "payment_intent", "amount": 2000}'
# Under the prefix whatever the number of calls: the key record, its secret, the key lists,
# the label budgets, the audit stream, the open reservations, the rate counts, the key's
# object and idempotency indexes, its remembered amounts, the usage hashes (key day,
# key lifetime, label day and lifetime) and the label's home tree (one per label).
PER_KEY_AND_BUDGET = {
    "label-home",
    "key",
    "secret",
    "keys",
    "keys-expiring",
    "label-budgets",
    "audit",
    "rate",
    "objs",
    "idem-index",
    "amounts",
    "usage",
    "open-reservations",
}


def kinds(prefix: str) -> collections.Counter[str]:
    """How many keys of each kind (the name's first part) are under ``prefix``."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = [n.decode() for n in client.scan_iter(match=f"{prefix}*", count=1000)]
        return collections.Counter(n.removeprefix(prefix).split(":", 1)[0] for n in names)
    finally:
        client.close()


def ttls(prefix: str, kind: str) -> list[int]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [int(client.ttl(n)) for n in client.scan_iter(match=f"{prefix}{kind}:*")]
    finally:
        client.close()


async def calls(
    store: RedisStore,
    key: KeyRecord,
    start: int,
    count: int,
    *,
    idempotent: bool,
    creates: bool,
    finish: str = "settled",
) -> None:
    """``count`` paid calls, each admitted then settled, as the proxy makes them."""
    for i in range(start, start + count):
        now = dt.datetime.now(dt.UTC)
        scope = f"POST /v1/payment_intents idem-{i}"
        claim = IdempotencyClaim(scope, "h", 3600, 600, 10**6) if idempotent else None
        admission = await store.admit(
            AdmissionRequest(
                key.key_id,
                now,
                reservation_id=f"res_{i}",
                estimate_micros=USD,
                rate_limit=10**6,
                idempotency=claim,
                max_objects=10**6 if creates else None,
            )
        )
        assert admission.status == "admitted", admission
        await store.settle_call(
            Settlement(
                key_id=key.key_id,
                label=key.agent_run_label,
                vendor="stripe",
                now=now,
                reservation_id=f"res_{i}",
                ledger_rows=admission.ledger_rows,
                finish=finish,  # type: ignore[arg-type]
                actual_micros=USD // 2,
                created=(f"pi_{i}",) if creates else (),
                remember=(f"pi_{i}", USD // 2) if creates else None,
                idempotency_scope=scope if idempotent else None,
                idempotency_response=StoredResponse(200, (("content-type", "x"),), BODY),
                idempotency_ttl_seconds=3600,
                idempotency_sha256="h",
                audit={"event_id": f"res_{i}"},
            )
        )


def live_key(key_id: str) -> KeyRecord:
    now = dt.datetime.now(dt.UTC)
    return make_key(
        key_id, label="fleet", daily=10**6 * USD, created_at=now - dt.timedelta(hours=1)
    )


@pytest.mark.parametrize("finish", ["settled", "released", "unknown"])
async def test_a_finished_call_leaves_no_key_of_its_own(
    redis_store: RedisStore, finish: str
) -> None:
    key = live_key("kb_footprint")
    await redis_store.create_key(key)
    await redis_store.set_label_budget("fleet", 10**6 * USD)
    await calls(redis_store, key, 0, 20, idempotent=False, creates=False, finish=finish)
    after_20 = kinds(redis_store.prefix)

    await calls(redis_store, key, 20, 200, idempotent=False, creates=False, finish=finish)

    assert kinds(redis_store.prefix) == after_20
    assert set(after_20) <= PER_KEY_AND_BUDGET
    assert sum(after_20.values()) <= len(PER_KEY_AND_BUDGET) + 2  # three usage hashes


async def test_what_stays_per_call_is_documented_and_expires(redis_store: RedisStore) -> None:
    keys = [live_key(f"kb_fp{i}") for i in range(3)]
    for key in keys:
        await redis_store.create_key(key)
    n = 0
    for key in keys:
        await calls(redis_store, key, n, 60, idempotent=True, creates=True)
        n += 60

    found = kinds(redis_store.prefix)

    # One idempotency entry per idempotency key, one owner record per object created...
    assert found["idm"] == n and found["owner"] == n
    # ... and nothing else grows with the number of calls.
    rest = {kind: count for kind, count in found.items() if kind not in {"idm", "owner"}}
    assert set(rest) <= PER_KEY_AND_BUDGET
    assert sum(rest.values()) <= 4 + len(keys) * 8  # shared + per vault key and its budgets
    assert found["res"] == 0 and found["amount"] == 0
    # Both kinds expire: the idempotency TTL, the 90-day ownership window.
    assert all(0 < t <= 3600 for t in ttls(redis_store.prefix, "idm"))
    assert all(0 < t <= 90 * 86400 for t in ttls(redis_store.prefix, "owner"))
    for kind in ("rate", "objs", "idem-index", "amounts"):
        assert all(t > 0 for t in ttls(redis_store.prefix, kind)), kind
    # Forgetting a key (revoked, or expired) drops what it kept.
    await redis_store.revoke_key(keys[0].key_id, dt.datetime.now(dt.UTC))
    after = kinds(redis_store.prefix)
    assert after["idm"] == n - 60 and after["owner"] == n - 60
    assert await redis_store.recall_amount(keys[1].key_id, "stripe", "pi_60") == USD // 2
    assert await redis_store.recall_amount(keys[0].key_id, "stripe", "pi_0") is None


async def test_a_response_kept_for_replay_is_compact_and_kept_while_replayable(
    redis_store: RedisStore,
) -> None:
    now = dt.datetime.now(dt.UTC)
    # A key with ten minutes left: its responses are never replayed after that.
    key = make_key("kb_short", daily=100 * USD, created_at=now - dt.timedelta(days=30, minutes=-10))
    await redis_store.create_key(key)
    body = json.dumps(
        {"id": "pi_1", "object": "payment_intent", "items": list(range(400))}, indent=2
    )
    response = StoredResponse(
        200, (("Content-Type", "application/json"), ("Request-Id", "r")), body.encode()
    )
    claim = IdempotencyClaim("POST /v1/payment_intents k1", "h1", 86400, 600, 100)
    admitted = await redis_store.admit(
        AdmissionRequest(
            key.key_id, now, reservation_id="res_1", estimate_micros=USD, idempotency=claim
        )
    )
    assert admitted.status == "admitted"
    await redis_store.settle_call(
        Settlement(
            key_id=key.key_id,
            label="",
            vendor="stripe",
            now=now,
            reservation_id="res_1",
            ledger_rows=admitted.ledger_rows,
            finish="settled",
            actual_micros=USD,
            idempotency_scope=claim.scope,
            idempotency_response=response,
            idempotency_ttl_seconds=86400,
            idempotency_sha256=claim.body_sha256,
        )
    )

    replay = await redis_store.admit(
        AdmissionRequest(
            key.key_id, now, reservation_id="res_2", estimate_micros=USD, idempotency=claim
        )
    )

    assert replay.status == "replay" and replay.response == response
    client = redis.Redis.from_url(REDIS_URL)
    try:
        (name,) = client.scan_iter(match=f"{redis_store.prefix}idm:*")
        assert int(client.strlen(name)) < len(body) // 3
        assert 0 < int(client.ttl(name)) <= 10 * 60 + 60
    finally:
        client.close()
