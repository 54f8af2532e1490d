"""What mitmproxy's event dispatch costs per call, with mitmdump's whole chain and with the
chain ``keybrake run`` keeps (`keybrake.proxy.mitm_chain.UNLOADED` removed).

    .venv/bin/python bench/dispatch.py [--n 20000]

Builds a real ``DumpMaster`` (no listeners started), then triggers the events one proxied
HTTP call raises (``requestheaders``, ``request``, ``responseheaders``, ``response``) on a
test flow ``n`` times through ``AddonManager.trigger_event``, and prints the CPU time per
call of this thread for each chain. No Keybrake addon is loaded: this is the part of bare
mitmdump's per-call cost that the unloading removes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))


async def measure(n: int, prune: bool, cached: bool = False) -> tuple[int, float]:
    from mitmproxy import hooks, options
    from mitmproxy.http import HTTPFlow
    from mitmproxy.proxy.layers import http as layers_http
    from mitmproxy.test import tflow
    from mitmproxy.tools.dump import DumpMaster

    from keybrake.proxy import _dispatch
    from keybrake.proxy.mitm_chain import UNLOADED

    master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
    if prune:
        master.addons.chain = [a for a in master.addons.chain if type(a).__name__ not in UNLOADED]
    if cached:
        _dispatch.install(master)
    flow: HTTPFlow = tflow.tflow(resp=True)
    events = [
        layers_http.HttpRequestHeadersHook(flow),
        layers_http.HttpRequestHook(flow),
        layers_http.HttpResponseHeadersHook(flow),
        layers_http.HttpResponseHook(flow),
    ]
    for e in events * 100:  # warm up
        await master.addons.handle_lifecycle(e)
    t0 = time.thread_time()
    for _ in range(n):
        for e in events:
            await master.addons.handle_lifecycle(e)
    spent = time.thread_time() - t0
    del hooks
    return len(master.addons.chain), 1000 * spent / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    for prune, cached, name in (
        (False, False, "mitmdump's chain"),
        (True, False, "keybrake run's chain"),
        (True, True, "... with HookCache"),
    ):
        count, ms = asyncio.run(measure(args.n, prune, cached))
        print(f"{name:<22} {count:>3} addons  {ms:.4f} ms CPU per call (4 events + updates)")


if __name__ == "__main__":
    main()
