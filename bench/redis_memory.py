"""Redis memory per vault key, per call in flight and per call kept, for ``maxmemory`` sizing.

    .venv/bin/python bench/redis_memory.py [--keys 200] [--calls 20]

On a private ``redis-server`` (free loopback port, nothing persisted), through `RedisStore`
as the proxy uses it: ``--keys`` vault keys (two labels) each make ``--calls`` paid calls
with an idempotency key that create an object (``POST /v1/payment_intents`` with a
Stripe-sized answer, ``bench/upstream.py``'s), then as many calls are admitted and left in
flight. Prints ``INFO memory`` ``used_memory`` deltas per unit and ``MEMORY USAGE`` of one
key of each kind. The audit outbox is drained as the replicas do (its rows are counted
apart: they stay only while no replica moves them to the audit log).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
# --addon DIR measures another checkout's store (e.g. `git archive main addon | tar -x -C DIR`)
ADDON = Path(sys.argv[sys.argv.index("--addon") + 1]) if "--addon" in sys.argv else ROOT / "addon"
for p in (ROOT, ADDON):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.run import free_port  # noqa: E402
from bench.store_ops import paid_settlement  # noqa: E402
from bench.upstream import payment_intent  # noqa: E402
from keybrake.store import (  # noqa: E402
    Admission,
    AdmissionRequest,
    IdempotencyClaim,
    KeyRecord,
    RedisStore,
    StoredResponse,
)

USD = 1_000_000
HEADERS = (("Content-Type", "application/json"), ("Request-Id", "req_" + "x" * 14))


def audit_row(key_id: str, rid: str) -> dict[str, object]:
    """About the size of the proxy's audit row for a paid call."""
    return {
        "event_id": rid,
        "ts": dt.datetime.now(dt.UTC).isoformat(),
        "key_id": key_id,
        "label": "fleet-0",
        "vendor": "stripe",
        "method": "POST",
        "path": "/v1/payment_intents",
        "status": 200,
        "outcome": "settled",
        "estimate_micros": USD,
        "dollars_micros": USD,
        "vendor_request_id": "req_" + "x" * 14,
        "actor": "worker-1",
        "message_id": uuid.uuid4().hex,
    }


async def measure(url: str, keys: int, calls: int) -> list[str]:
    store = RedisStore(url, prefix="keybrake:")
    client = redis.Redis.from_url(url)
    await store.open()
    used = lambda: int(client.info("memory")["used_memory"])  # noqa: E731
    now = dt.datetime.now(dt.UTC)
    base = used()
    records = []
    for i in range(keys):
        key = KeyRecord(
            key_id=f"key_{uuid.uuid4().hex[:24]}",
            secret_sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
            vendor="stripe",
            agent_run_label=f"fleet-{i % 2}",
            daily_cap_micros=10**6 * USD,
            allowed_endpoints=("POST /v1/payment_intents", "GET /v1/payment_intents/{id}"),
            created_at=now,
            expires_at=now + dt.timedelta(hours=6),
            max_requests_per_minute=600,
        )
        await store.create_key(key)
        records.append(key)
    after_keys = used()

    async def admit(key: KeyRecord, n: int) -> tuple[Admission, str, str]:
        rid, scope = f"res_{uuid.uuid4().hex}", f"POST /v1/payment_intents {uuid.uuid4()}"
        admission = await store.admit(
            AdmissionRequest(
                key.key_id,
                dt.datetime.now(dt.UTC),
                reservation_id=rid,
                estimate_micros=USD,
                rate_limit=600,
                idempotency=IdempotencyClaim(scope, hashlib.sha256(b"%d" % n).hexdigest(),
                                             86400, 600, 10_000),
                max_objects=100_000,
            )
        )  # fmt: skip
        assert admission.status == "admitted", admission
        return admission, rid, scope

    for n in range(calls):
        for key in records:
            admission, rid, scope = await admit(key, n)
            body = payment_intent(100, "usd")
            oid = body.split(b'"id": "', 1)[1].split(b'"', 1)[0].decode()
            await store.settle_call(
                paid_settlement(
                    key,
                    rid,
                    scope,
                    hashlib.sha256(b"%d" % n).hexdigest(),
                    admission,
                    oid,
                    USD,
                    response=StoredResponse(200, HEADERS, body),
                    audit=audit_row(key.key_id, rid),
                )
            )
    before_drain = used()
    backlog = await store.audit_backlog()
    while rows := await store.audit_batch("bench", 1000):
        await store.audit_ack([i for i, _ in rows])
    after_calls = used()
    for key in records:
        await admit(key, -1)
    in_flight = used()

    kinds: collections.Counter[str] = collections.Counter()
    sample: dict[str, int] = {}
    for name in client.scan_iter(match="keybrake:*", count=1000):
        kind = name.decode().removeprefix("keybrake:").split(":", 1)[0]
        kinds[kind] += 1
        if kind not in sample:
            sample[kind] = int(client.memory_usage(name) or 0)
    await store.close()
    client.close()
    total_calls = keys * calls
    return [
        f"{keys} vault keys, {calls} settled calls each ({total_calls}), then {keys} in flight",
        f"  per vault key (record, secret, indexes):    {(after_keys - base) / keys:8.0f} bytes",
        f"  per settled call kept (its idempotency entry, owner record, index entries): "
        f"{(after_calls - after_keys) / total_calls:8.0f} bytes",
        f"  per audit row waiting in the outbox:        "
        f"{(before_drain - after_calls) / max(1, backlog):8.0f} bytes",
        f"  per call in flight (reservation, claim):    "
        f"{(in_flight - after_calls) / keys:8.0f} bytes",
        "  keys by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        "  MEMORY USAGE of one of each: "
        + ", ".join(f"{k} {v}" for k, v in sorted(sample.items())),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--addon", help="the addon/ directory whose store to measure")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keybrake-mem-"))
    port = free_port()
    pidfile = work / "redis.pid"
    subprocess.run(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(pidfile),
         "--logfile", str(work / "redis.log"), "--dir", str(work)],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
        print("\n".join(asyncio.run(measure(url, args.keys, args.calls))))
    finally:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
