"""Per-operation cost of the two `Store` backends, in process, without the proxy.

    .venv/bin/python bench/store_ops.py [--n 3000]

Runs the store calls one vendor call makes on the proxy's hot path (key lookup, reserve,
settle, remember the amount), one after the other on one event loop, and prints the mean
wall time of each: how much of Keybrake's per-call cost (see ``bench/run.py``) is the store.
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
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from keybrake.store import KeyRecord, Store, open_store  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"


async def measure(store: Store, n: int) -> dict[str, float]:
    await store.open()
    now = dt.datetime.now(dt.UTC)
    secret = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    key = KeyRecord(
        key_id=f"key_{uuid.uuid4().hex[:16]}",
        secret_sha256=secret,
        vendor="stripe",
        agent_run_label="bench",
        daily_cap_micros=10**15,
        allowed_endpoints=("POST /v1/payment_intents",),
        created_at=now,
        expires_at=now + dt.timedelta(hours=1),
    )
    await store.create_key(key)
    spent: dict[str, float] = defaultdict(float)
    for i in range(n):
        rid = f"res_{uuid.uuid4().hex}"
        t0 = time.thread_time()
        await store.get_key_by_secret_hash(secret)
        t1 = time.thread_time()
        await store.reserve(key, rid, 1_000_000, dt.datetime.now(dt.UTC))
        t2 = time.thread_time()
        await store.settle(rid, 1_000_000)
        t3 = time.thread_time()
        await store.remember_amount(key.key_id, "stripe", f"pi_{i}", 1_000_000)
        t4 = time.thread_time()
        spent["get_key_by_secret_hash"] += t1 - t0
        spent["reserve"] += t2 - t1
        spent["settle"] += t3 - t2
        spent["remember_amount"] += t4 - t3
    await store.close()
    return {op: 1000 * s / n for op, s in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    prefix = f"kbbench-ops:{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as d:
        results = {
            "sqlite": asyncio.run(measure(open_store(f"sqlite:///{d}/ops.db"), args.n)),
            "redis": asyncio.run(measure(open_store(f"{REDIS_URL}?prefix={prefix}"), args.n)),
        }
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for k in r.scan_iter(f"{prefix}*", count=1000):
        r.delete(k)
    r.close()
    ops = list(results["sqlite"])
    print(f"{'ms per call':<24}" + "".join(f"{b:>10}" for b in results))
    for op in ops:
        print(f"{op:<24}" + "".join(f"{results[b][op]:>10.3f}" for b in results))
    print(f"{'total':<24}" + "".join(f"{sum(results[b].values()):>10.3f}" for b in results))


if __name__ == "__main__":
    main()
