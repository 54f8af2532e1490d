"""Soak: two proxy replicas sharing Redis, a fake Stripe, a fixed request rate, random faults.

    python bench/soak.py --minutes 2 --rate 20

Prints requests served, refusals by code, dollars over cap (must be 0), audit rows vs
requests answered (must match) and each replica's RSS, sampled every ``--sample-every``
seconds: after the first third of the run (warm-up: caches, connection pools, the allocator
settling) it must be flat, i.e. grow by less than 5 % up to the end, and the least-squares
slope of the later samples is printed in KiB per minute. Exit status 0 only if all three hold.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import KeybrakeProcess, audit_query  # noqa: E402
from tests.fakes import FakeStripe, make_fake_ca  # noqa: E402
from tests.reliability.conftest import USD, charge, code_of, key_detail, usd_micros  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Samples each pid's RSS every ``every`` seconds until stopped."""

    def __init__(self, pids: list[int], every: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.every = every
        self.samples: list[tuple[float, list[int]]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, [rss_kib(p) for p in self.pids]))
            if self._stop_event.wait(self.every):
                break

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append((time.monotonic() - self._t0, [rss_kib(p) for p in self.pids]))

    def report(self) -> bool:
        """Print the series and the verdict; True when every replica is flat after warm-up."""
        end_t = self.samples[-1][0]
        later = [(t, rss) for t, rss in self.samples if t >= end_t / 3]
        flat = True
        for i, pid in enumerate(self.pids):
            series = [rss[i] for _, rss in self.samples]
            warm, end = later[0][1][i], later[-1][1][i]
            slope = _slope([t / 60 for t, _ in later], [rss[i] for _, rss in later])
            growth = (end - warm) / warm if warm else 0.0
            flat = flat and growth < 0.05
            step = max(1, len(series) // 12)
            shown = " ".join(f"{v // 1024}" for v in series[::step])
            print(f"replica {i} (pid {pid}) RSS MiB every {self.every * step:.0f}s: {shown}")
            print(
                f"  start {series[0] // 1024} MiB, after warm-up {warm // 1024} MiB, end "
                f"{end // 1024} MiB, max {max(series) // 1024} MiB; growth after warm-up "
                f"{growth * 100:+.1f}%, slope {slope:+.0f} KiB/min  (flat: < 5%)"
            )
        return flat


def _slope(xs: list[float], ys: list[int]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second")
    ap.add_argument("--cap", type=int, default=200, help="daily cap of each key, USD")
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--workers", type=int, default=16, help="concurrent client requests")
    ap.add_argument("--no-faults", action="store_true", help="inject no faults")
    ap.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling, seconds")
    args = ap.parse_args()
    from keybrake.proxy.ca import ensure_ca

    tmp = Path(tempfile.mkdtemp(prefix="kb-soak-"))
    tls = make_fake_ca(tmp / "fake-ca")
    certs = tmp / "certs"
    ensure_ca(certs)
    prefix = f"kbsoak:{uuid.uuid4().hex[:8]}:"
    store = f"{REDIS}?prefix={prefix}"
    r = redis.Redis.from_url(REDIS)
    answered: Counter[str] = Counter()
    lock = threading.Lock()
    with FakeStripe(tls) as fake:
        replicas = []
        for i in range(2):
            wd = tmp / f"kb{i}"
            wd.mkdir()
            replicas.append(KeybrakeProcess(wd, certs, {"stripe": fake}, tls, store=store).start())
        sampler = RssSampler([kb.proc.pid for kb in replicas if kb.proc], args.sample_every)
        sampler.start()
        keys = [replicas[0].issue_key(daily_usd_cap=args.cap) for _ in range(args.keys)]
        total = int(args.minutes * 60 * args.rate)
        deadline = time.monotonic() + args.minutes * 60 + 60
        faults: Counter[str] = Counter()

        def one(i: int) -> None:
            kb = replicas[i % 2]
            key = keys[i % len(keys)]
            try:
                resp = charge(kb, key["vault_key"], random.choice([100, 250, 999]), timeout=20)
                outcome = "ok" if resp.status_code == 200 else code_of(resp)
            except Exception as e:
                outcome = f"client_error:{type(e).__name__}"
            with lock:
                answered[outcome] += 1

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for i in range(total):
                if time.monotonic() > deadline:
                    break
                roll = 1.0 if args.no_faults else random.random()
                if roll < 0.02:
                    fake.fail_next(1, random.choice([500, 502]), processed=True)
                    faults["vendor_5xx"] += 1
                elif roll < 0.03:
                    fake.reset_connection_next(1, processed=True)
                    faults["reset"] += 1
                elif roll < 0.035:
                    r.execute_command("CLIENT", "PAUSE", "200")
                    faults["redis_pause_200ms"] += 1
                pool.submit(one, i)
                time.sleep(max(0.0, started + (i + 1) / args.rate - time.monotonic()))
        elapsed = time.monotonic() - started  # until the last answer (the pool drained)
        time.sleep(1.0)  # audit writers flush every 0.2 s
        sampler.stop()
        over = 0
        for key in keys:
            spent = usd_micros(key_detail(replicas[0], key["key_id"])["spent_today_usd"])
            over += max(0, spent - args.cap * USD)
        vendor_by_key: Counter[str] = Counter()
        for e in fake.ledger:
            vendor_by_key[e.header("Idempotency-Key") or ""] += e.charged_usd_micros or 0
        charged = fake.charged_usd_micros()
        for kb in replicas:
            kb.stop()
        rows = sum(len(audit_query(kb.data_dir / "audit.db")) for kb in replicas)
    for k in r.scan_iter(f"{prefix}*", count=1000):
        r.delete(k)
    n_answered = sum(v for k, v in answered.items() if not k.startswith("client_error"))
    sent = sum(answered.values())
    print(
        f"requests sent: {sent}  offered at {args.rate}/s for {args.minutes} min; answered in "
        f"{elapsed / 60:.1f} min ({sent / elapsed:.0f}/s achieved)"
    )
    print(f"served (200): {answered['ok']}")
    print("outcomes by code:", dict(sorted(answered.items())))
    print("faults injected:", dict(faults))
    print(f"vendor charged: ${charged / USD:.2f} over {len(keys)} keys capped ${args.cap} each")
    print(f"dollars over cap: ${over / USD:.2f}  (must be 0)")
    print(f"audit rows: {rows}  requests answered: {n_answered}  (must match)")
    flat = sampler.report()
    ok = over == 0 and rows == n_answered and flat
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
