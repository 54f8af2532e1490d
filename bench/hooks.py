"""Where Keybrake's per-call time goes: its addons' hooks timed in process, without sockets.

    .venv/bin/python bench/hooks.py [--n 3000] [--store redis] [--profile 25]

Loads the real addon chain (``keybrake.addon.addons``) into mitmproxy's test context with
the shipped policies and a real store, issues a key through the admin API, then runs ``n``
vendor calls (``POST /v1/payment_intents`` with a canned ``succeeded`` PaymentIntent as the
vendor's answer) through every addon's ``requestheaders``/``request``/``responseheaders``/
``response`` hooks in chain order, timing each addon's hooks separately (CPU time of this
thread and wall time). No TLS, no network to the vendor: what remains is exactly the work
Keybrake adds to each call on the proxy's event loop (plus, for Redis, its round trips).
``--profile N`` also prints the N functions with the most cumulative time (cProfile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import io
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECRET = "sk_test_bench" + "0123456789abcdefghijklmn"
ADMIN_TOKEN = f"kba_bench_{uuid.uuid4().hex}"
REDIS_URL = "redis://127.0.0.1:6379/0"
HOOKS = ("requestheaders", "request", "responseheaders", "response")


def _flow(vault_key: str) -> Any:
    from mitmproxy import http
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import tflow, tutils

    req = tutils.treq(
        method=b"POST",
        scheme=b"https",
        host="api.stripe.com",
        port=443,
        path=b"/v1/payment_intents",
        headers=http.Headers(
            [
                (b"Host", b"api.stripe.com"),
                (b"Authorization", f"Bearer {vault_key}".encode()),
                (b"Content-Type", b"application/x-www-form-urlencoded"),
                (b"User-Agent", b"Stripe/v1 PythonBindings/16.1.0"),
            ]
        ),
        content=b"amount=100&currency=usd&confirm=true&payment_method=pm_card_visa",
    )
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    f.client_conn.sni = "api.stripe.com"
    return f


def _admin_flow(body: dict[str, Any]) -> Any:
    from mitmproxy import http
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import tflow, tutils

    req = tutils.treq(
        method=b"POST",
        scheme=b"http",
        host="127.0.0.1",
        port=1,
        path=b"/vault/keys",
        headers=http.Headers(
            [
                (b"Host", b"127.0.0.1:8081"),
                (b"Authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                (b"Content-Type", b"application/json"),
            ]
        ),
        content=json.dumps(body).encode(),
    )
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:1@8081")
    f.client_conn.sni = None
    return f


def _time_store_calls(runtime: Any, into: dict[str, float]) -> None:
    """Accumulate this thread's CPU time spent in each store method (``into[op]``) and in the
    whole store call as the addons see it, wrappers included (``into["outer:" + op]``)."""

    def wrap(obj: Any, name: str, key: str) -> None:
        method = getattr(obj, name)

        async def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return await method(*a, **kw)
            finally:
                into[key] += time.thread_time() - t0

        setattr(obj, name, timed)

    outer = runtime.store
    inner = getattr(outer, "inner", outer)  # the metrics addon wraps the store (TimedStore)
    ops = [n for n in dir(inner) if not n.startswith("_") and inspect.iscoroutinefunction(
        getattr(inner, n))]  # fmt: skip
    for op in ops:
        wrap(inner, op, op)
    if outer is not inner:
        runtime.store = _Outer(outer, into)


class _Outer:
    """Times every store call the addons make, through whatever wraps the store."""

    def __init__(self, store: Any, into: dict[str, float]) -> None:
        self._store = store
        self._into = into

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return await attr(*a, **kw)
            finally:
                self._into["outer:" + name] += time.thread_time() - t0

        return timed


async def run(args: argparse.Namespace, data_dir: Path) -> None:
    os.environ["STRIPE_SECRET_KEY"] = SECRET
    os.environ["KEYBRAKE_ADMIN_TOKEN"] = ADMIN_TOKEN
    from mitmproxy import hooks as mhooks
    from mitmproxy import http
    from mitmproxy.proxy.layers.http import _hooks as hl
    from mitmproxy.test import taddons

    from bench.upstream import payment_intent
    from keybrake import addon as kb

    prefix = f"kbbench-hooks:{uuid.uuid4().hex[:8]}:"
    store = f"{REDIS_URL}?prefix={prefix}" if args.store == "redis" else ""
    tctx = taddons.context(*kb.addons)
    # The shipped policies, with Stripe's upstream set to an address never connected: what a
    # deployment's egress pinning would do once per connection is not per-call work.
    policies = data_dir / "policies"
    policies.mkdir()
    for f in (ROOT / "policies").glob("*.yaml"):
        text = f.read_text()
        if f.name == "stripe.yaml":
            text += "\nupstream: {url: 'https://127.0.0.1:9'}\n"
        (policies / f.name).write_text(text)
    tctx.options.update(
        keybrake_data_dir=str(data_dir),
        keybrake_policies=str(policies),
        keybrake_store=store or f"sqlite:///{data_dir / 'keybrake.db'}",
    )
    mgr = tctx.master.addons
    await mgr.trigger_event(mhooks.RunningHook())

    admin = _admin_flow(
        {
            "vendor": "stripe",
            "daily_usd_cap": "100000000",
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "expires_in": "6h",
            "agent_run_label": "bench",
            # Counted (the store call is measured) but never reached.
            "max_requests_per_minute": 1_000_000,
        }
    )
    for a in kb.addons:
        await mgr.invoke_addon(a, hl.HttpRequestHook(admin))
    assert admin.response is not None and admin.response.status_code == 201, admin.response
    vault_key = json.loads(admin.response.content or b"")["vault_key"]

    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    store_cpu: dict[str, float] = defaultdict(float)
    _time_store_calls(kb.runtime, store_cpu)
    names = {id(a): getattr(a, "name", type(a).__name__) for a in kb.addons}
    events = {
        "requestheaders": hl.HttpRequestHeadersHook,
        "request": hl.HttpRequestHook,
        "responseheaders": hl.HttpResponseHeadersHook,
        "response": hl.HttpResponseHook,
    }

    async def one_call() -> None:
        f = _flow(vault_key)
        for hook in HOOKS:
            if hook == "responseheaders":
                assert f.response is None, f.response and f.response.text
                f.response = http.Response.make(
                    200,
                    payment_intent(100, "usd"),
                    {"Content-Type": "application/json", "Request-Id": "req_bench"},
                )
            event = events[hook](f)
            for a in kb.addons:
                c0, w0 = time.thread_time(), time.perf_counter()
                await mgr.invoke_addon(a, event)
                cpu[names[id(a)]] += time.thread_time() - c0
                wall[names[id(a)]] += time.perf_counter() - w0
        assert f.response.status_code == 200

    for _ in range(200):  # warm up
        await one_call()
    cpu.clear()
    wall.clear()
    store_cpu.clear()
    profiler = cProfile.Profile() if args.profile else None
    c0, w0 = time.thread_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    segment, seg_c0, seg_cpu = max(1, args.n // args.segments), time.thread_time(), []
    for i in range(args.n):
        await one_call()
        if (i + 1) % segment == 0:
            seg_cpu.append(1000 * (time.thread_time() - seg_c0) / segment)
            seg_c0 = time.thread_time()
    if profiler:
        profiler.disable()
    total_cpu, total_wall = time.thread_time() - c0, time.perf_counter() - w0

    if profiler and args.self_time:
        stats = pstats.Stats(profiler).sort_stats("tottime")
        stats.print_stats(*([args.only] if args.only else []), args.profile)
    print(f"store: {args.store}; {args.n} calls through the real addon chain (no sockets)")
    print(f"{'addon':<22}{'CPU ms/call':>13}{'wall ms/call':>14}")
    for name in sorted(cpu, key=lambda k: -cpu[k]):
        print(f"{name:<22}{1000 * cpu[name] / args.n:>13.3f}{1000 * wall[name] / args.n:>14.3f}")
    print(
        f"{'all (incl. harness)':<22}{1000 * total_cpu / args.n:>13.3f}"
        f"{1000 * total_wall / args.n:>14.3f}"
    )
    if args.segments > 1:
        # A cost per call that grows with the calls made (a table, a cache, the heap) shows
        # here; a flat row is what O(1) per call looks like.
        print("CPU ms/call by segment of the run:", " ".join(f"{c:.3f}" for c in seg_cpu))
    inner = {k: v for k, v in store_cpu.items() if not k.startswith("outer:")}
    outer = sum(v for k, v in store_cpu.items() if k.startswith("outer:"))
    print(
        f"store calls made by the addons: {1000 * outer / args.n:.3f} ms/call CPU, of which "
        f"{1000 * sum(inner.values()) / args.n:.3f} in the {args.store} store itself:"
    )
    for op in sorted(inner, key=lambda k: -inner[k]):
        print(f"  {op:<26}{1000 * inner[op] / args.n:>8.3f} ms/call")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(
            *([args.only] if args.only else []), args.profile
        )
        print(out.getvalue())

    t0 = time.perf_counter()
    await mgr.trigger_event(mhooks.DoneHook())
    print(f"shutdown (flushes the audit writer's backlog): {time.perf_counter() - t0:.2f}s")
    if args.store == "redis":
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        for k in r.scan_iter(f"{prefix}*", count=1000):
            r.delete(k)
        r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument(
        "--segments", type=int, default=1, metavar="K", help="also print CPU per call for K parts"
    )
    ap.add_argument("--self-time", action="store_true", help="sort the profile by self time")
    ap.add_argument(
        "--only", metavar="REGEX", help="profile rows of matching files only (e.g. addon/keybrake)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(args, Path(d)))


if __name__ == "__main__":
    main()
