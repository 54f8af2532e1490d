"""Per-call cost of the two `Store` backends on the hot path, in process, without the proxy.

    .venv/bin/python bench/store_ops.py [--n 3000] [--only sqlite|redis]

Runs what one paid vendor call asks of the store (``POST /v1/payment_intents`` with the
request-rate limit on, an object quota, a fresh idempotency claim): one `Store.admit`, then
one `Store.settle_call` that settles the reservation, records the created object, remembers
its amount, stores the idempotent response and appends the audit row. Prints the mean CPU
time of each on the calling thread (``time.thread_time``), and, for Redis, the server's CPU
per call (``INFO cpu``) and the commands it ran per call (``INFO commandstats``).
Redis runs against 127.0.0.1:6379 under a throw-away prefix that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --addon DIR measures another checkout's store (e.g. `git archive main addon | tar -x -C DIR`)
ADDON = Path(sys.argv[sys.argv.index("--addon") + 1]) if "--addon" in sys.argv else ROOT / "addon"
for p in (ROOT, ADDON):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from keybrake.store import (  # noqa: E402
    Admission,
    AdmissionRequest,
    IdempotencyClaim,
    KeyRecord,
    Settlement,
    Store,
    StoredResponse,
    open_store,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = b'{"id": "pi_x", "object": "payment_intent", "amount": 2000}' * 20


def claim_hash(sha: str) -> dict[str, str]:
    """``idempotency_sha256=sha`` for a `Settlement` that has the field (a completion names its
    claim's body hash); nothing for an older checkout's (``--addon``)."""
    fields = getattr(Settlement, "__dataclass_fields__", {})
    return {"idempotency_sha256": sha} if "idempotency_sha256" in fields else {}


def _redis_cpu() -> tuple[float, dict[str, int]]:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.info("cpu")  # the INFO connection itself, before the first reading
    cpu = r.info("cpu")
    stats = r.info("commandstats")
    r.close()
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), {
        k: int(v["calls"]) for k, v in stats.items()
    }


def bench_key() -> KeyRecord:
    """A fresh Stripe vault key for the measured calls: caps and a request rate so large that
    nothing is refused."""
    now = dt.datetime.now(dt.UTC)
    return KeyRecord(
        key_id=f"key_{uuid.uuid4().hex[:16]}",
        secret_sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        vendor="stripe",
        agent_run_label="bench",
        daily_cap_micros=10**15,
        allowed_endpoints=("POST /v1/payment_intents",),
        created_at=now,
        expires_at=now + dt.timedelta(hours=1),
        max_requests_per_minute=10**6,
    )


def paid_admission(key: KeyRecord, rid: str, scope: str, sha: str) -> AdmissionRequest:
    """The admission of a paid, idempotent ``POST /v1/payment_intents`` (reservation ``rid``,
    claim ``scope`` with body hash ``sha``) with the request-rate limit and object quota on."""
    return AdmissionRequest(
        key.key_id,
        dt.datetime.now(dt.UTC),
        reservation_id=rid,
        estimate_micros=1_000_000,
        rate_limit=10**6,
        idempotency=IdempotencyClaim(scope, sha, 86400, 600, 10**6),
        max_objects=10**6,
    )


def paid_settlement(
    key: KeyRecord,
    rid: str,
    scope: str,
    sha: str,
    admission: Admission,
    object_id: str,
    actual: int,
    *,
    response: StoredResponse | None = None,
    audit: dict[str, object] | None = None,
) -> Settlement:
    """Its settlement: ``actual`` micro-dollars, the created object recorded and its amount
    remembered, the answer (``response``, else a 1.1 KB JSON body) kept for replay, the audit
    row (``audit``, else a small one)."""
    return Settlement(
        key_id=key.key_id,
        label=key.agent_run_label,
        vendor="stripe",
        now=dt.datetime.now(dt.UTC),
        reservation_id=rid,
        ledger_rows=admission.ledger_rows,
        finish="settled",
        actual_micros=actual,
        created=(object_id,),
        remember=(object_id, actual),
        idempotency_scope=scope,
        idempotency_response=response
        or StoredResponse(200, (("content-type", "application/json"),), BODY),
        idempotency_ttl_seconds=86400,
        **claim_hash(sha),
        audit=audit or {"event_id": rid, "key_id": key.key_id, "dollars_micros": actual},
    )


async def measure(store: Store, n: int, concurrency: int = 1) -> dict[str, float]:
    await store.open()
    key = bench_key()
    await store.create_key(key)
    spent: dict[str, float] = defaultdict(float)

    async def call(i: int) -> None:
        rid = f"res_{uuid.uuid4().hex}"
        scope = f"POST /v1/payment_intents idem-{i}"
        t0 = time.thread_time()
        admission = await store.admit(paid_admission(key, rid, scope, "fp"))
        t1 = time.thread_time()
        assert admission.status == "admitted", admission
        await store.settle_call(
            paid_settlement(key, rid, scope, "fp", admission, f"pi_{i}", 20_000_000)
        )
        t2 = time.thread_time()
        spent["admit"] += t1 - t0
        spent["settle_call"] += t2 - t1

    start = time.thread_time()
    if concurrency == 1:
        for i in range(n):
            await call(i)
    else:
        # Many calls in flight at once, as a busy replica has them (the per-step CPU split
        # is then not meaningful: their awaits interleave).
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                await call(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    # The event-loop thread's CPU for everything (with calls in flight together, the only
    # figure that adds up).
    spent["all, per call"] = time.thread_time() - start
    await store.close()
    return {op: 1000 * s / n for op, s in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--only", choices=("sqlite", "redis"))
    ap.add_argument("--redis-url", help="another Redis than 127.0.0.1:6379 (a private one)")
    ap.add_argument("--addon", help="the addon/ directory whose store to measure")
    ap.add_argument("--concurrency", type=int, default=1, help="calls in flight at once")
    args = ap.parse_args()
    global REDIS_URL
    REDIS_URL = args.redis_url or REDIS_URL
    prefix = f"kbbench-ops:{uuid.uuid4().hex[:8]}:"
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "sqlite"):
            sqlite = open_store(f"sqlite:///{d}/ops.db")
            results["sqlite"] = asyncio.run(measure(sqlite, args.n, args.concurrency))
        if args.only in (None, "redis"):
            cpu0, cmds0 = _redis_cpu()
            store = open_store(f"{REDIS_URL}?prefix={prefix}")
            results["redis"] = asyncio.run(measure(store, args.n, args.concurrency))
            cpu1, cmds1 = _redis_cpu()
            results["redis"]["redis server CPU"] = 1000 * (cpu1 - cpu0) / args.n
            calls = {k: cmds1[k] - cmds0.get(k, 0) for k in cmds1 if cmds1[k] != cmds0.get(k, 0)}
            print("redis commands per call:", {
                k.removeprefix("cmdstat_"): round(v / args.n, 2) for k, v in sorted(calls.items())
            })  # fmt: skip
    if "redis" in results:
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        left = sum(1 for _ in r.scan_iter(f"{prefix}*", count=1000))
        print(f"redis keys left under the prefix after {args.n} calls: {left}")
        for k in r.scan_iter(f"{prefix}*", count=1000):
            r.delete(k)
        r.close()
    ops = sorted({op for res in results.values() for op in res})
    print(f"{'CPU ms per call':<24}" + "".join(f"{b:>10}" for b in results))
    for op in ops:
        print(f"{op:<24}" + "".join(f"{results[b].get(op, 0):>10.3f}" for b in results))


if __name__ == "__main__":
    main()
