"""What the Redis hot-path scripts keep so that a vendor call costs Redis few steps, and that
the shortcuts give the same answers as the long way.

- A request-rate hash keeps its running total ('t') and a bucket no later than any it holds
  ('o'): one HMGET instead of summing every bucket. A hash written before those fields were
  kept is counted whole, and a bucket that falls out of the minute is dropped from the total.
- An idempotency claim is written with ``SET NX GET`` (the entry before, or none, in one
  command); a refusal later in the same admission deletes the claim it wrote; a stale
  in-flight claim is taken over.
- A completed claim keeps the claim's expiry (``KEEPTTL``), so the key's idempotency index,
  scored by that expiry when the claim was made, needs no second write; it is completed with
  ``SET XX GET`` only while it is the call's claim, and put back otherwise.
- A reservation names its usage hashes in one field ('usage'); a record written before, one
  field per hash ('usage_1', …), is still settled, released and held, and a record that names
  other hashes than the caller's is refused either way.
- Audit rows the pumps acknowledge leave the outbox stream by trimming its head up to the
  oldest row still pending (``XTRIM MINID``), not one ``XDEL`` each, when no older row is
  pending; otherwise, for rows read without being claimed (``drain_outbox``), and for a Redis
  user without ``XPENDING``/``XTRIM``, they are deleted one by one as before. Either way the
  stream never holds an acknowledged row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from tests._redis import KEYBRAKE_ACL_COMMANDS
from tests.store.conftest import (
    REDIS_URL,
    USD,
    make_key,
)

from keybrake.store import (
    AdmissionRequest,
    IdempotencyClaim,
    RedisStore,
    Settlement,
    StoredResponse,
    StoreUnavailable,
    open_store,
)
from keybrake.store._common import RATE_BUCKET_MS, rate_bucket

pytestmark = pytest.mark.redis

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
RESPONSE = StoredResponse(200, (("Content-Type", "application/json"),), b'{"id":"pi_1"}')
# Key kb_i's claim in most tests here: in flight for 30 s at most, kept an hour.
CLAIM = IdempotencyClaim("scope-1", "b1", 3600, 30, 100)


@pytest.fixture
def store(redis_store: RedisStore) -> RedisStore:
    return redis_store


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield c
    c.close()


def bucket_counts(client: redis.Redis, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in client.hgetall(name).items()}


async def rate_codes(store: RedisStore, key_id: str, now: dt.datetime, n: int) -> list[str | None]:
    return [(await store.admit(AdmissionRequest(key_id, now, rate_limit=4))).code for _ in range(n)]


async def test_a_rate_hash_from_before_the_running_total_is_counted_whole(
    store: RedisStore, client: redis.Redis
) -> None:
    await store.create_key(make_key("kb_r"))
    name = f"{store.prefix}rate:kb_r"
    now_bucket = rate_bucket(NOON)
    # As an older version left it: buckets only. Three requests still count, 50 are stale.
    client.hset(name, mapping={now_bucket: 2, now_bucket - 3: 1, now_bucket - 20: 50})

    assert await rate_codes(store, "kb_r", NOON, 3) == [None, "rate_limited", "rate_limited"]

    counts = bucket_counts(client, name)
    assert str(now_bucket - 20) not in counts  # the stale bucket was dropped
    assert counts.pop("t") == 4 == sum(v for k, v in counts.items() if k != "o")
    assert counts["o"] <= now_bucket - 3
    assert 0 < client.pttl(name) <= 14 * RATE_BUCKET_MS


async def test_the_running_total_follows_the_minute(store: RedisStore, client: redis.Redis) -> None:
    await store.create_key(make_key("kb_r"))
    name = f"{store.prefix}rate:kb_r"
    assert await rate_codes(store, "kb_r", NOON, 5) == [None] * 4 + ["rate_limited"]
    later = NOON + dt.timedelta(seconds=30)
    assert await rate_codes(store, "kb_r", later, 1) == ["rate_limited"]
    # 65 s on, NOON's bucket no longer counts: the total starts again from what is live.
    after = NOON + dt.timedelta(seconds=65)
    assert await rate_codes(store, "kb_r", after, 5) == [None] * 4 + ["rate_limited"]
    counts = bucket_counts(client, name)
    assert counts == {str(rate_bucket(after)): 4, "t": 4, "o": rate_bucket(after)}
    refused = await store.admit(AdmissionRequest("kb_r", after, rate_limit=4))
    assert 60 <= refused.retry_after_seconds <= 65  # from the live buckets, as before


async def admit_claim(store: RedisStore, rid: str, micros: int, body: str = "b1") -> str | None:
    admission = await store.admit(
        AdmissionRequest(
            "kb_i",
            NOON,
            reservation_id=rid,
            estimate_micros=micros,
            idempotency=dataclasses.replace(CLAIM, body_sha256=body),
        )
    )
    return admission.code if admission.status != "admitted" else admission.status


async def test_a_refusal_after_a_new_claim_leaves_no_entry(
    store: RedisStore, client: redis.Redis
) -> None:
    await store.create_key(make_key("kb_i", daily=2 * USD))
    entry = f"{store.prefix}idm:kb_i:scope-1"
    assert await admit_claim(store, "res_1", 3 * USD) == "cap_exhausted"
    assert not client.exists(entry)
    assert client.zcard(f"{store.prefix}idem-index:kb_i") == 0
    assert await admit_claim(store, "res_2", USD) == "admitted"
    assert client.get(entry).startswith("I2:b1")  # type: ignore[union-attr]


async def test_a_stale_claim_is_taken_over_and_a_live_one_is_left_alone(
    store: RedisStore, client: redis.Redis
) -> None:
    await store.create_key(make_key("kb_i"))
    entry = f"{store.prefix}idm:kb_i:scope-1"
    assert await admit_claim(store, "res_1", USD) == "admitted"
    live = client.get(entry)
    assert await admit_claim(store, "res_2", USD) == "idempotency_in_flight"
    assert await admit_claim(store, "res_3", USD, body="other") == "idempotency_mismatch"
    assert client.get(entry) == live  # SET NX wrote nothing over it

    # Started 31 s ago (the claim's in-flight limit is 30 s): another may take it over.
    server_ms = int(client.time()[0]) * 1000
    client.set(entry, f"I2:b1{server_ms - 31_000}", keepttl=True)
    assert await admit_claim(store, "res_4", USD, body="b2") == "admitted"
    taken = client.get(entry)
    assert taken is not None and taken.startswith("I2:b2")
    assert int(taken.removeprefix("I2:b2")) >= server_ms


def completion(**more: Any) -> Settlement:
    """A settlement of key kb_i that completes its claim 'scope-1' with `RESPONSE`."""
    return Settlement(
        "kb_i",
        "",
        "stripe",
        NOON,
        idempotency_scope="scope-1",
        idempotency_response=RESPONSE,
        **more,
    )


async def test_a_completed_claim_keeps_the_claims_expiry_and_its_index_score(
    store: RedisStore, client: redis.Redis
) -> None:
    await store.create_key(make_key("kb_i"))
    entry = f"{store.prefix}idm:kb_i:scope-1"
    admission = await store.admit(
        AdmissionRequest(
            "kb_i",
            NOON,
            reservation_id="res_1",
            estimate_micros=USD,
            idempotency=CLAIM,
        )
    )
    assert admission.status == "admitted"
    score = client.zscore(f"{store.prefix}idem-index:kb_i", entry)
    expires_at = client.pexpiretime(entry)
    assert score is not None and abs(score - expires_at) <= 5

    client.pexpire(entry, 100_000)  # so that a TTL set again would show
    await store.settle_call(
        completion(
            reservation_id="res_1",
            ledger_rows=admission.ledger_rows,
            finish="settled",
            actual_micros=USD,
            idempotency_ttl_seconds=3600,
            idempotency_sha256="b1",
        )
    )
    assert client.get(entry).startswith("D2:b1")  # type: ignore[union-attr]
    assert 0 < client.pttl(entry) <= 100_000
    replay = await store.admit(AdmissionRequest("kb_i", NOON, idempotency=CLAIM))
    assert replay.status == "replay" and replay.response == RESPONSE


async def test_a_claim_that_is_no_longer_the_calls_is_put_back_not_completed(
    store: RedisStore, client: redis.Redis
) -> None:
    await store.create_key(make_key("kb_i"))
    entry = f"{store.prefix}idm:kb_i:scope-1"
    admission = await store.admit(AdmissionRequest("kb_i", NOON, idempotency=CLAIM))
    assert admission.status == "admitted"
    # Taken over meanwhile (stale) by a call with another body, which is still in flight.
    client.set(entry, "I2:b2123", keepttl=True)
    client.pexpire(entry, 100_000)
    await store.settle_call(completion(idempotency_ttl_seconds=3600, idempotency_sha256="b1"))
    assert client.get(entry) == "I2:b2123"
    assert 0 < client.pttl(entry) <= 100_000
    # A completion that does not name its claim is a caller's bug: refused, nothing written.
    with pytest.raises(ValueError, match="body hash"):
        await store.settle_call(completion())
    assert client.get(entry) == "I2:b2123"


async def test_a_reservation_names_its_usage_hashes_in_one_field_and_older_records_finish(
    store: RedisStore, client: redis.Redis
) -> None:
    await store.create_key(make_key("kb_u"))
    res = f"{store.prefix}res:"

    async def admit(rid: str) -> tuple[tuple[str, str], ...]:
        admission = await store.admit(
            AdmissionRequest("kb_u", NOON, reservation_id=rid, estimate_micros=USD)
        )
        assert admission.status == "admitted"
        return admission.ledger_rows

    def as_before(rid: str, names: list[str]) -> None:
        """The record as an older version wrote it: one field per usage hash."""
        client.hdel(res + rid, "usage")
        client.hset(res + rid, mapping={f"usage_{i}": n for i, n in enumerate(names, 1)})

    def settled(rid: str, rows: tuple[tuple[str, str], ...], micros: int) -> Settlement:
        return Settlement(
            "kb_u",
            "",
            "stripe",
            NOON,
            reservation_id=rid,
            ledger_rows=rows,
            finish="settled",
            actual_micros=micros,
        )

    rows = await admit("res_1")
    record = client.hgetall(res + "res_1")
    assert set(record) == {"state", "key_id", "estimate", "created_at", "usage"}
    names = record["usage"].split("\n")
    assert len(names) == 2 and all(client.hget(n, "reserved") == str(USD) for n in names)
    for rid in ("res_2", "res_3", "res_4"):
        await admit(rid)
        as_before(rid, names)

    assert await store.settle_call(settled("res_1", rows, USD))
    assert await store.settle_call(settled("res_2", rows, USD // 2))
    assert await store.release("res_3")
    assert await store.hold("res_4", "stripe", "pi_4", 2 * USD)
    assert [h.reservation_id for h in await store.holds("stripe", "pi_4")] == ["res_4"]
    assert await store.settle("res_4", 2 * USD)
    for name in names:
        assert client.hget(name, "spent") == str(USD + USD // 2 + 2 * USD)
        assert client.hget(name, "reserved") == "0"
    assert client.exists(*(res + r for r in ("res_1", "res_2", "res_3", "res_4"))) == 0

    # A record naming other usage hashes than the caller's is refused, in either format, and
    # nothing is counted.
    for rid, old in (("res_5", False), ("res_6", True)):
        await admit(rid)
        if old:
            as_before(rid, names[:1])
        else:
            client.hset(res + rid, "usage", names[0])
        with pytest.raises(StoreUnavailable, match="usage keys do not match"):
            await store.settle_call(settled(rid, rows, USD))
    assert [client.hget(n, "spent") for n in names] == [str(3 * USD + USD // 2)] * 2
    assert [client.hget(n, "reserved") for n in names] == [str(2 * USD)] * 2


async def test_acknowledged_audit_rows_are_trimmed_and_unclaimed_ones_deleted(
    store: RedisStore, client: redis.Redis
) -> None:
    stream = f"{store.prefix}audit"

    async def append(*event_ids: str) -> None:
        for event_id in event_ids:
            await store.append_audit({"event_id": event_id})

    async def ack(batch: list[tuple[str, dict[str, object]]]) -> list[object]:
        await store.audit_ack([i for i, _ in batch])
        return [row["event_id"] for _, row in batch]

    def left() -> list[str]:
        return [json.loads(f["row"])["event_id"] for _, f in client.xrange(stream)]

    await append("e0", "e1", "e2", "e3", "e4", "e5")
    first = await store.audit_batch("replica-1", 2)
    second = await store.audit_batch("replica-2", 2)
    # Older rows (replica-1's) are still pending: the head stays, these two are deleted.
    assert await ack(second) == ["e2", "e3"]
    assert left() == ["e0", "e1", "e4", "e5"]
    assert client.xpending(stream, "audit")["pending"] == 2
    # None older pending: the head goes, up to the oldest row still pending (e4, now claimed).
    third = await store.audit_batch("replica-2", 10)
    assert await ack(first) == ["e0", "e1"]
    assert left() == ["e4", "e5"]
    # None pending at all: up to the newest row given.
    await append("e6")
    assert await ack(third) == ["e4", "e5"]
    assert left() == ["e6"]
    assert await ack(await store.audit_batch("replica-1", 10)) == ["e6"]
    assert left() == []
    assert client.xpending(stream, "audit")["pending"] == 0

    # Read with XRANGE and never claimed (a reader's flush): deleted one by one, the rows
    # after them left alone.
    await append("p0", "p1", "p2")
    assert await ack(await store.audit_peek(2)) == ["p0", "p1"]
    assert left() == ["p2"]
    assert await ack(await store.audit_batch("replica-1", 10)) == ["p2"]
    assert left() == []


async def test_a_redis_user_without_xtrim_still_drops_acknowledged_audit_rows(
    store: RedisStore, client: redis.Redis
) -> None:
    user, password = f"kb-no-trim-{store.prefix[7:19]}", "kb-test-no-trim-" + "8d02c5e1"
    commands = KEYBRAKE_ACL_COMMANDS.replace("+xpending ", "").replace("+xtrim ", "")
    assert "xtrim" not in commands and "xpending" not in commands
    client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "resetkeys", f"~{store.prefix}*",
        "resetchannels", *commands.split(),
    )  # fmt: skip
    limited = open_store(
        f"redis://{user}:{password}@{REDIS_URL.removeprefix('redis://')}?prefix={store.prefix}"
    )
    try:
        await limited.open()
        for event_id in ("n0", "n1", "n2"):
            await limited.append_audit({"event_id": event_id})
        batch = await limited.audit_batch("replica-1", 2)
        await limited.audit_ack([i for i, _ in batch])
        rows = [json.loads(f["row"])["event_id"] for _, f in client.xrange(f"{store.prefix}audit")]
        assert rows == ["n2"]
        assert client.xpending(f"{store.prefix}audit", "audit")["pending"] == 0
    finally:
        await limited.close()
        client.execute_command("ACL", "DELUSER", user)
