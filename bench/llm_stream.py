"""Streamed AI answers: time to first byte and CPU per call, Keybrake against bare mitmdump.

    .venv/bin/python bench/llm_stream.py                  # about a minute
    .venv/bin/python bench/llm_stream.py --calls 300 --rounds 3 --json out.json

Starts the fake OpenAI of the tests (``tests/fakes/openai.py``, HTTPS, in this process) with
an answer of 8 server-sent events 10 ms apart, and two forward proxies in front of it:

1. **bare** ``mitmdump`` streaming every answer (a two-line script setting
   ``flow.response.stream``), with ``map_remote`` sending api.openai.com to the fake; same
   CA and options as Keybrake;
2. **Keybrake on SQLite** (``keybrake run``), the OpenAI policy's ``upstream:`` at the fake,
   one vault key with a cap nothing reaches.

One client per target sends sequential ``POST /v1/chat/completions`` with ``stream: true``
(``max_tokens`` set, no ``stream_options``: Keybrake asks for the usage and strips it again)
over a keep-alive ``CONNECT`` tunnel, and measures the time to the first byte of the body
(the first event) and to the end of the answer. Rounds are interleaved; medians are printed,
with the proxy's CPU per call (``/proc/<pid>/stat``) and the ratio bare ÷ Keybrake.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from tests.fakes.openai import FakeOpenAI  # noqa: E402
from tests.fakes.tls import load_or_make_fake_ca  # noqa: E402

from bench.run import BIN, free_port, wait_port  # noqa: E402

URL = "https://api.openai.com/v1/chat/completions"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Stream a short answer."}],
    "max_tokens": 200,
    "stream": True,
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_call(client: httpx.Client, credential: str) -> tuple[float, float]:
    """(time to the first body byte, time to the end of the answer), in ms."""
    started = time.perf_counter()
    first = 0.0
    headers = {"Authorization": f"Bearer {credential}"}
    with client.stream("POST", URL, json=BODY, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            if chunk and not first:
                first = time.perf_counter()
    return (first - started) * 1000, (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150, help="calls per target per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kb-llm-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    tls = load_or_make_fake_ca(work / "fake-tls")
    fake = FakeOpenAI(tls, reply_tokens=40).start()
    fake.event_delay = 0.01
    try:
        from keybrake.proxy.ca import ensure_ca

        certs = work / "certs"
        bundle = ensure_ca(certs)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}

        def spawn(name: str, cmd: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
            log = work / f"{name}.log"
            proc = subprocess.Popen(
                cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**env, **extra}, cwd=work
            )
            procs.append(proc)
            return proc

        bare_port = free_port()
        # Streams every answer as Keybrake streams a metered one (stream_large_bodies would
        # stream the request body too, which map_remote then rewrites too late).
        streamer = work / "stream_answers.py"
        streamer.write_text("def responseheaders(flow):\n    flow.response.stream = True\n")
        bare = spawn(
            "bare",
            [str(BIN / "mitmdump"), "--mode", f"regular@127.0.0.1:{bare_port}",
             "--set", f"confdir={certs}", "--set", "connection_strategy=lazy",
             "--set", "upstream_cert=false", "-s", str(streamer),
             "--set", f"ssl_verify_upstream_trusted_ca={tls.ca_pem}",
             "--map-remote", f"|https://api.openai.com/|{fake.url}/"],
            {},
        )  # fmt: skip
        wait_port(bare_port, bare, work / "bare.log")

        policies = work / "policies"
        policies.mkdir()
        data = yaml.safe_load((ROOT / "policies" / "openai.yaml").read_text())
        data["upstream"] = {"url": fake.url, "ca_file": str(tls.ca_pem)}
        (policies / "openai.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        kb_port, admin_port = free_port(), free_port()
        token = f"kba_bench_{uuid.uuid4().hex}"
        kb = spawn(
            "keybrake",
            [str(BIN / "keybrake"), "run", "--proxy-port", str(kb_port),
             "--admin-port", str(admin_port), "--data-dir", str(work / "data"),
             "--policies", str(policies), "--certs-dir", str(certs)],
            {"KEYBRAKE_ADMIN_TOKEN": token, **fake.env()},
        )  # fmt: skip
        wait_port(admin_port, kb, work / "keybrake.log")
        admin = f"http://127.0.0.1:{admin_port}"
        for _ in range(100):
            if httpx.get(f"{admin}/healthz", timeout=2).status_code == 200:
                break
            time.sleep(0.1)
        issued = httpx.post(
            f"{admin}/vault/keys",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "vendor": "openai",
                "daily_usd_cap": 100_000,
                "allowed_endpoints": ["POST /v1/chat/completions"],
                "expires_in": "2h",
                "agent_run_label": "bench/llm-stream",
                "max_requests_per_minute": 1_000_000,
            },
            timeout=10,
        )
        assert issued.status_code == 201, issued.text
        key = issued.json()["vault_key"]

        ctx = ssl.create_default_context(cafile=str(bundle))
        targets: dict[str, tuple[int, int, str]] = {
            "bare mitmdump": (bare_port, bare.pid, fake.api_key),
            "keybrake sqlite": (kb_port, kb.pid, key),
        }
        figures: dict[str, dict[str, list[float]]] = {
            name: {"ttfb": [], "total": [], "cpu": []} for name in targets
        }
        clients = {
            name: httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=ctx, timeout=30)
            for name, (port, _, _) in targets.items()
        }
        for name, (_, _, credential) in targets.items():  # warm-up
            for _ in range(20):
                one_call(clients[name], credential)
        for _ in range(args.rounds):
            for name, (_, pid, credential) in targets.items():
                before = cpu_seconds(pid)
                calls = [one_call(clients[name], credential) for _ in range(args.calls)]
                figures[name]["cpu"].append((cpu_seconds(pid) - before) * 1000 / args.calls)
                figures[name]["ttfb"].append(statistics.median(c[0] for c in calls))
                figures[name]["total"].append(statistics.median(c[1] for c in calls))
        summary: dict[str, Any] = {
            name: {k: round(statistics.median(v), 3) for k, v in f.items()}
            for name, f in figures.items()
        }
        bare_f, kb_f = summary["bare mitmdump"], summary["keybrake sqlite"]
        summary["added_ttfb_ms"] = round(kb_f["ttfb"] - bare_f["ttfb"], 3)
        summary["cpu_ratio"] = round(bare_f["cpu"] / kb_f["cpu"], 3)
        print(f"{'target':<16} {'ttfb p50 ms':>12} {'answer p50 ms':>14} {'CPU ms/call':>12}")
        for name in targets:
            f = summary[name]
            print(f"{name:<16} {f['ttfb']:>12.2f} {f['total']:>14.2f} {f['cpu']:>12.2f}")
        print(
            f"added time to first byte: {summary['added_ttfb_ms']:+.2f} ms; "
            f"CPU per call bare / keybrake: {summary['cpu_ratio']:.2f}"
        )
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        for client in clients.values():
            client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
