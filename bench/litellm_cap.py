"""64 AI agents against one $1.00 budget: Keybrake and LiteLLM's proxy side by side.

    make bench-litellm                       # builds .venv/litellm once, then runs this
    .venv/bin/python bench/litellm_cap.py --litellm .venv/litellm/bin/litellm --json out.json

One fake OpenAI (``tests/fakes/openai.py``: HTTPS, in this process, bills from the usage it
states, at list prices) per run. 64 agents, each an ``AsyncOpenAI`` client with the SDK's
retries off, call ``gpt-4o`` with ``max_completion_tokens=2000`` (the fake answers 2,000
tokens: $0.02 a call) until the proxy refuses one, then stop. What the fake billed is the
truth; "over" is what it billed past $1.00.

Budgets measured (LiteLLM 1.108; its *key* budgets live in its Prisma-backed database, and
Prisma fetches its engine binaries from the network when it is set up, which this project's
machines may not do, so the budgets below are the ones LiteLLM enforces without a database):

- **LiteLLM provider budget** (``router_settings.provider_budget_config``: openai $1/day),
  one worker; two workers (``--num_workers 2``) without Redis; two workers sharing Redis;
- **LiteLLM deployment budget** (``litellm_params.max_budget: 1``), two workers with Redis;
- **Keybrake**: one ``keybrake run`` on SQLite; two replicas on Redis (agents alternate).

Then a throughput phase per proxy (one process each, 16 agents, cheap calls, a budget nothing
reaches): requests per second per process and proxy CPU per call (the process and its
children, from ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import openai  # noqa: E402
from tests.fakes.openai import FakeOpenAI  # noqa: E402
from tests.fakes.tls import FakeTLS, load_or_make_fake_ca  # noqa: E402

from bench.run import BIN, free_port, wait_port  # noqa: E402

AGENTS = 64
CAP_USD = 1
HI = [{"role": "user", "content": "Plan the next step."}]
# LiteLLM keeps its budget counters under fixed names (``provider_spend:openai:1d``): a DB of
# their own, emptied of those names before each run.
LITELLM_REDIS_DB = 11


@dataclass
class Proxy:
    """A started proxy: where agents send calls, with which credential, and its processes."""

    name: str
    base_urls: list[str]
    credential: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and every live descendant (LiteLLM's workers are child processes)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class Bench:
    def __init__(self, litellm: Path, work: Path) -> None:
        self.litellm = litellm
        self.work = work
        self.tls: FakeTLS = load_or_make_fake_ca(work / "fake-tls")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}

    def spawn(self, name: str, cmd: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}.log"
        proc = subprocess.Popen(
            cmd,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**self.env, **extra},
            cwd=self.work,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    # -- LiteLLM

    def litellm_proxy(
        self, name: str, fake: FakeOpenAI, budget: str, workers: int, redis: bool
    ) -> Proxy:
        deployment: dict[str, Any] = {
            "model": "openai/gpt-4o",
            "api_base": f"{fake.url}/v1",
            "api_key": fake.api_key,
        }
        router: dict[str, Any] = {}
        if budget == "provider":
            router["provider_budget_config"] = {
                "openai": {"budget_limit": CAP_USD, "time_period": "1d"}
            }
        elif budget == "deployment":
            deployment |= {"max_budget": CAP_USD, "budget_duration": "1d"}
        if redis:
            import redis as redis_py

            url = f"redis://127.0.0.1:6379/{LITELLM_REDIS_DB}"
            client = redis_py.Redis.from_url(url)
            for pattern in ("provider_spend:*", "deployment_spend:*", "tag_spend:*"):
                for k in client.scan_iter(pattern):
                    client.delete(k)
            client.close()
            router["redis_url"] = url
        master = f"sk-bench-{uuid.uuid4().hex}"
        config = {
            "model_list": [{"model_name": "gpt-4o", "litellm_params": deployment}],
            "router_settings": router,
            "litellm_settings": {"num_retries": 0, "drop_params": False},
            "general_settings": {"master_key": master},
        }
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        proc = self.spawn(
            name,
            [str(self.litellm), "--config", str(path), "--host", "127.0.0.1",
             "--port", str(port), "--num_workers", str(workers)],
            {"SSL_VERIFY": str(self.tls.ca_pem), "LITELLM_LOG": "ERROR",
             "DISABLE_SCHEMA_UPDATE": "true", "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"},
        )  # fmt: skip
        wait_port(port, proc, self.work / f"{name}.log", timeout=180)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every worker up and answering
            try:
                r = httpx.get(f"{base}/health/liveliness", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return Proxy(name, [f"{base}/v1"], master, [proc])

    # -- Keybrake

    def keybrake(self, name: str, fake: FakeOpenAI, replicas: int, store: str | None) -> Proxy:
        policies = self.work / f"{name}-policies"
        policies.mkdir()
        data = yaml.safe_load((ROOT / "policies" / "openai.yaml").read_text())
        data["upstream"] = {"url": fake.url, "ca_file": str(self.tls.ca_pem)}
        (policies / "openai.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        token = f"kba_bench_{uuid.uuid4().hex}"
        procs, bases = [], []
        for i in range(replicas):
            port, admin_port = free_port(), free_port()
            data_dir = self.work / f"{name}-{i}"
            cmd = [str(BIN / "keybrake"), "run", "--proxy-port", str(port),
                   "--admin-port", str(admin_port), "--data-dir", str(data_dir),
                   "--policies", str(policies), "--certs-dir", str(self.work / "c")]  # fmt: skip
            if store:
                cmd += ["--store", store]
            proc = self.spawn(f"{name}-{i}", cmd, {"KEYBRAKE_ADMIN_TOKEN": token, **fake.env()})
            wait_port(admin_port, proc, self.work / f"{name}-{i}.log")
            procs.append(proc)
            bases.append(f"http://127.0.0.1:{admin_port}")
        issued = httpx.post(
            f"{bases[0]}/vault/keys",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "vendor": "openai",
                "daily_usd_cap": CAP_USD,
                "allowed_endpoints": ["POST /v1/chat/completions"],
                "expires_in": "2h",
                "agent_run_label": f"bench/{name}",
                "max_requests_per_minute": 1_000_000,
            },
            timeout=10,
        )
        assert issued.status_code == 201, issued.text
        return Proxy(name, [f"{b}/openai/v1" for b in bases], issued.json()["vault_key"], procs)


async def agents(proxy: Proxy, n: int, max_tokens: int, calls_each: int | None) -> Counter[str]:
    """``n`` agents calling until refused (or ``calls_each`` calls); what the calls ended as."""
    outcomes: Counter[str] = Counter()
    clients = [
        openai.AsyncOpenAI(
            api_key=proxy.credential,
            base_url=proxy.base_urls[i % len(proxy.base_urls)],
            max_retries=0,
            timeout=60,
        )
        for i in range(n)
    ]

    async def agent(i: int) -> None:
        done = 0
        while calls_each is None or done < calls_each:
            try:
                await clients[i].chat.completions.create(
                    model="gpt-4o", messages=HI, max_completion_tokens=max_tokens
                )
            except openai.APIStatusError as e:
                outcomes[f"refused {e.status_code}"] += 1
                return
            except openai.APIError as e:
                outcomes[f"error {type(e).__name__}"] += 1
                return
            outcomes["ok"] += 1
            done += 1

    try:
        await asyncio.gather(*(agent(i) for i in range(n)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return outcomes


_REDIS = {"redis": True}
RUNS: list[tuple[str, dict[str, Any]]] = [
    ("litellm provider budget, 1 worker", {"litellm": "provider", "workers": 1}),
    ("litellm provider budget, 2 workers", {"litellm": "provider", "workers": 2}),
    ("litellm provider budget, 2 workers + redis", {"litellm": "provider", "workers": 2, **_REDIS}),
    ("litellm deployment budget, 2 workers + redis",
     {"litellm": "deployment", "workers": 2, **_REDIS}),
    ("keybrake sqlite, 1 process", {"keybrake": 1}),
    ("keybrake redis, 2 replicas", {"keybrake": 2, **_REDIS}),
]  # fmt: skip


_RUN_IDS = itertools.count()


def start(bench: Bench, spec: dict[str, Any], fake: FakeOpenAI) -> Proxy:
    run = next(_RUN_IDS)
    if "litellm" in spec:
        return bench.litellm_proxy(
            f"litellm{run}", fake, spec["litellm"], spec["workers"], bool(spec.get("redis"))
        )
    prefix = f"kbbench{uuid.uuid4().hex[:8]}:"
    store = f"redis://127.0.0.1:6379/0?prefix={prefix}" if spec.get("redis") else None
    return bench.keybrake(f"keybrake{run}", fake, spec["keybrake"], store)


def cap_runs(bench: Bench) -> list[dict[str, Any]]:
    results = []
    for name, spec in RUNS:
        with FakeOpenAI(bench.tls, reply_tokens=5_000) as fake:
            proxy = start(bench, spec, fake)
            began = time.monotonic()
            outcomes = asyncio.run(agents(proxy, AGENTS, 2_000, None))
            elapsed = time.monotonic() - began
            billed = fake.charged_usd_micros()
            bench.stop_all()
        row = {
            "run": name,
            "billed_usd": billed / 1e6,
            "over_cap_usd": max(0, billed - CAP_USD * 1_000_000) / 1e6,
            "calls_billed": len(fake.ledger),
            "outcomes": dict(outcomes),
            "seconds": round(elapsed, 2),
        }
        print(
            f"{name:<46} billed ${row['billed_usd']:.2f}  over ${row['over_cap_usd']:.2f}  "
            f"{row['calls_billed']} calls  {dict(outcomes)}",
            flush=True,
        )
        results.append(row)
    return results


def throughput(bench: Bench, calls: int) -> list[dict[str, Any]]:
    results = []
    for name, spec in [
        ("litellm, 1 worker (no budget reached)", {"litellm": "provider", "workers": 1}),
        ("keybrake sqlite, 1 process", {"keybrake": 1}),
    ]:
        with FakeOpenAI(bench.tls, reply_tokens=20) as fake:
            proxy = start(bench, spec, fake)
            asyncio.run(agents(proxy, 4, 16, 5))  # warm-up
            pid = proxy.procs[0].pid
            cpu0, began = tree_cpu_seconds(pid), time.monotonic()
            outcomes = asyncio.run(agents(proxy, 16, 16, calls // 16))
            elapsed = time.monotonic() - began
            cpu = tree_cpu_seconds(pid) - cpu0
            bench.stop_all()
        ok = outcomes["ok"]
        row = {
            "run": name,
            "calls": ok,
            "rps_per_process": round(ok / elapsed, 1),
            "cpu_ms_per_call": round(cpu * 1000 / max(ok, 1), 2),
            "outcomes": dict(outcomes),
        }
        print(
            f"{name:<46} {row['rps_per_process']:>7.1f} req/s  "
            f"{row['cpu_ms_per_call']:>6.2f} ms CPU/call  {dict(outcomes)}",
            flush=True,
        )
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--litellm",
        type=Path,
        default=ROOT / ".venv" / "litellm" / "bin" / "litellm",
        help="the litellm command of a venv with litellm[proxy] (make bench-litellm builds one)",
    )
    parser.add_argument("--calls", type=int, default=800, help="calls in the throughput phase")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not args.litellm.exists():
        parser.error(f"{args.litellm} not found: run `make bench-litellm` (or pass --litellm)")
    for name in ("HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"):
        os.environ.pop(name, None)
    bench = Bench(args.litellm.resolve(), Path(tempfile.mkdtemp(prefix="kb-litellm-bench-")))
    try:
        figures = {"cap": cap_runs(bench), "throughput": throughput(bench, args.calls)}
    finally:
        bench.stop_all()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
