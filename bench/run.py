"""Keybrake against bare mitmdump, measured in the same run on the same machine.

    make bench                      # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --rounds 5 --requests 5000 --json out.json

Starts a fast local stand-in for ``api.stripe.com`` (``bench/upstream.py``, HTTPS) and three
proxies in front of it, all forward proxies the client reaches with ``CONNECT``:

1. **bare** ``mitmdump`` (``map_remote`` sends api.stripe.com to the stand-in; same CA,
   ``connection_strategy=lazy`` and ``upstream_cert=false`` as Keybrake),
2. **Keybrake on SQLite** (``keybrake run``, the default embedded store),
3. **Keybrake on Redis** (``keybrake run --store redis://127.0.0.1:6379/0?prefix=…``),

plus the stand-in reached **directly** (no proxy) as a floor. For each, in interleaved
rounds: requests/s of ``POST /v1/payment_intents`` from ``--concurrency`` keep-alive clients
(a cap so large nothing is refused; every answer must be 200), and the latency of sequential
calls from one client. Prints medians over the rounds, the proxies' CPU per call (during
the throughput run, and during the latency run: one call at a time) and the ratios to bare
mitmdump (*Hot path*'s targets: bare CPU ÷ Keybrake CPU >= 0.80, stretch 0.90; added p50
<= 1 ms).

``--idempotency-keys`` sends a fresh ``Idempotency-Key`` on every call, as the stripe SDK
does for POSTs when retries are enabled; Keybrake then also claims and stores the response
in its idempotency cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.load import Result, latency, stripe_request, throughput  # noqa: E402

BIN = Path(sys.executable).parent
REDIS_URL = "redis://127.0.0.1:6379/0"
STRIPE_SECRET = "sk_test_bench" + "0123456789abcdefghijklmn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class Target:
    """One way of reaching the stand-in vendor."""

    name: str
    proxy_port: int | None
    credential: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # proxy CPU per call, all threads
    loop_cpu_ms: list[float] = field(default_factory=list)  # ... of the event-loop thread
    seq_cpu_ms: list[float] = field(default_factory=list)  # proxy CPU per sequential call
    latencies: list[Result] = field(default_factory=list)

    @property
    def proxy(self) -> tuple[str, int] | None:
        return None if self.proxy_port is None else ("127.0.0.1", self.proxy_port)


def user_sys_ticks(stat: Path) -> tuple[int, int]:
    """User and system CPU (clock ticks) of a ``/proc/…/stat`` file: utime, stime."""
    fields = stat.read_text().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def _ticks(stat: Path) -> int:
    return sum(user_sys_ticks(stat))


def proc_cpu_seconds(target: Target) -> tuple[float, float]:
    """CPU time (user + system) the target's proxy process has used so far: all threads, and
    the main thread alone (the asyncio event loop where mitmproxy and the addons run)."""
    if not target.procs:
        return 0.0, 0.0
    pid = target.procs[0].pid
    hz = os.sysconf("SC_CLK_TCK")
    total = _ticks(Path(f"/proc/{pid}/stat"))
    main = _ticks(Path(f"/proc/{pid}/task/{pid}/stat"))
    return total / hz, main / hz


class Bench:
    # Seconds a proxy may take to listen and answer /healthz (more under valgrind).
    startup_timeout = 30.0

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_prefix = f"kbbench:{uuid.uuid4().hex[:10]}:"
        self.used_redis = False

    # -- processes --------------------------------------------------------------------------
    def spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        proc = subprocess.Popen(
            cmd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=self.work,
        )
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.used_redis:
            try:
                import redis

                r = redis.Redis.from_url(REDIS_URL)
                for k in r.scan_iter(f"{self.redis_prefix}*", count=1000):
                    r.delete(k)
                r.close()
            except Exception as e:  # the benchmark result stands; say what was left behind
                print(f"(could not clean Redis prefix {self.redis_prefix}: {e})")

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> list[Target]:
        from tests.fakes.tls import load_or_make_fake_ca

        from keybrake.proxy.ca import ensure_ca

        self.fake_tls = load_or_make_fake_ca(self.work / "fake-tls")
        self.certs = self.work / "certs"
        self.bundle = ensure_ca(self.certs)
        self.client_ctx = ssl.create_default_context(cafile=str(self.bundle))
        self.direct_ctx = ssl.create_default_context(cafile=str(self.fake_tls.ca_pem))

        up, uplog = self.spawn(
            "upstream",
            [sys.executable, str(ROOT / "bench" / "upstream.py"), "--cert-dir",
             str(self.fake_tls.directory)],
        )  # fmt: skip
        assert up.stdout is None
        deadline = time.monotonic() + 20
        while not uplog.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.upstream_port = int(uplog.read_text().split()[0])
        self.upstream_url = f"https://127.0.0.1:{self.upstream_port}"

        targets = [Target("direct (no proxy)", None, STRIPE_SECRET), self.start_bare()]
        base = self.args.baseline
        if not self.args.skip_sqlite:
            if base is not None:
                targets.append(self.start_keybrake("baseline sqlite", "", base))
            targets.append(self.start_keybrake("keybrake sqlite", ""))
        if not self.args.skip_redis:
            store = f"{REDIS_URL}?prefix={self.redis_prefix}"
            self.used_redis = True
            if base is not None:
                targets.append(self.start_keybrake("baseline redis", store + "b:", base))
            targets.append(self.start_keybrake("keybrake redis", store))
        return targets

    def start_bare(self) -> Target:
        port = free_port()
        cmd = [
            str(BIN / "mitmdump"),
            "--mode", f"regular@127.0.0.1:{port}",
            "--set", f"confdir={self.certs}",
            "--set", "connection_strategy=lazy",
            "--set", "upstream_cert=false",
            "--set", f"ssl_verify_upstream_trusted_ca={self.fake_tls.ca_pem}",
            "--map-remote", f"|https://api.stripe.com/|{self.upstream_url}/",
        ]  # fmt: skip
        proc, log = self.spawn("bare-mitmdump", cmd)
        wait_port(port, proc, log, self.startup_timeout)
        return Target("bare mitmdump", port, STRIPE_SECRET, [proc])

    def start_keybrake(self, name: str, store: str, code: Path | None = None) -> Target:
        """``keybrake run`` on ``store``; ``code``: another checkout's package directory
        (``…/addon``) to run instead of this one's (``--baseline``)."""
        slug = name.replace(" ", "-")
        workdir = self.work / slug
        policies = workdir / "policies"
        policies.mkdir(parents=True)
        for f in sorted((ROOT / "policies").glob("*.yaml")):
            data = yaml.safe_load(f.read_text())
            if data["vendor"] == "stripe":
                data["upstream"] = {"url": self.upstream_url, "ca_file": str(self.fake_tls.ca_pem)}
            (policies / f.name).write_text(yaml.safe_dump(data, sort_keys=False))
        port, admin_port = free_port(), free_port()
        token = f"kba_bench_{uuid.uuid4().hex}"
        cmd = [
            str(BIN / "keybrake"), "run",
            "--proxy-port", str(port),
            "--admin-port", str(admin_port),
            "--data-dir", str(workdir / "data"),
            "--policies", str(policies),
            "--certs-dir", str(self.certs),
        ]  # fmt: skip
        if store:
            cmd += ["--store", store]
        env = {"KEYBRAKE_ADMIN_TOKEN": token, "STRIPE_SECRET_KEY": STRIPE_SECRET}
        if code is not None:
            env["PYTHONPATH"] = str(code)
        for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY"):
            os.environ.pop(var, None)
        proc, log = self.spawn(slug, cmd, env)
        wait_port(admin_port, proc, log, self.startup_timeout)
        admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{admin}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        r = httpx.post(
            f"{admin}/vault/keys",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "vendor": "stripe",
                "daily_usd_cap": "100000000",  # nothing is refused: every call reaches Stripe
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "6h",
                "agent_run_label": "bench",
                # Every request is counted (that store call is measured) but none refused.
                "max_requests_per_minute": 1_000_000,
            },
            timeout=self.startup_timeout,
        )
        if r.status_code != 201:
            raise RuntimeError(f"{name}: issuing a key failed: {r.status_code} {r.text}")
        wait_port(port, proc, log, self.startup_timeout)
        return Target(name, port, r.json()["vault_key"], [proc])

    # -- profiling --------------------------------------------------------------------------
    def start_profilers(self, targets: list[Target]) -> list[tuple[subprocess.Popen[bytes], Path]]:
        out_dir: Path = self.args.profile
        out_dir.mkdir(parents=True, exist_ok=True)
        spies = []
        for t in targets:
            if not t.procs:
                continue
            out = out_dir / f"{t.name.replace(' ', '-')}.txt"
            spy = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--pid", str(t.procs[0].pid), "--rate", "250",
                 "--format", "raw", "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            spies.append((spy, out))
        time.sleep(1)
        return spies

    def stop_profilers(self, spies: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
        from bench.pyspy_summary import summarize_profile

        for spy, _ in spies:
            spy.send_signal(signal.SIGINT)
        a = self.args
        calls = a.warmup + a.rounds * (a.requests + a.sequential)
        for spy, out in spies:
            spy.wait(30)
            print()
            print("\n".join(summarize_profile(out, rate=250, requests=calls)))

    # -- measuring --------------------------------------------------------------------------
    def request_factory(self, target: Target) -> Any:
        run = uuid.uuid4().hex[:8]
        if self.args.idempotency_keys:
            return lambda i: stripe_request(target.credential, f"bench-{run}-{i}")
        fixed = stripe_request(target.credential)
        return lambda i: fixed

    def ctx_for(self, target: Target) -> ssl.SSLContext:
        return self.direct_ctx if target.proxy is None else self.client_ctx

    def check(self, target: Target, result: Result) -> None:
        if set(result.statuses) != {200}:
            raise RuntimeError(f"{target.name}: not every call succeeded: {dict(result.statuses)}")

    async def measure(self, target: Target, warmup: bool = False) -> None:
        up = ("127.0.0.1", self.upstream_port)
        ctx = self.ctx_for(target)
        a = self.args
        if warmup:
            r = await throughput(
                target.proxy, up, ctx, self.request_factory(target), a.warmup, a.concurrency
            )
            self.check(target, r)
            return
        cpu_before = proc_cpu_seconds(target)
        r = await throughput(
            target.proxy, up, ctx, self.request_factory(target), a.requests, a.concurrency
        )
        self.check(target, r)
        target.rps.append(r.rps)
        if target.procs:
            cpu_after = proc_cpu_seconds(target)
            target.cpu_ms.append(1000 * (cpu_after[0] - cpu_before[0]) / a.requests)
            target.loop_cpu_ms.append(1000 * (cpu_after[1] - cpu_before[1]) / a.requests)
        seq_before = proc_cpu_seconds(target) if target.procs else (0.0, 0.0)
        lat = await latency(target.proxy, up, ctx, self.request_factory(target), a.sequential)
        self.check(target, lat)
        if target.procs:
            seq_after = proc_cpu_seconds(target)
            target.seq_cpu_ms.append(1000 * (seq_after[0] - seq_before[0]) / a.sequential)
        target.latencies.append(lat)

    def run(self, targets: list[Target]) -> None:
        for t in targets:
            asyncio.run(self.measure(t, warmup=True))
        for n in range(self.args.rounds):
            for t in targets:
                asyncio.run(self.measure(t))
                print(
                    f"  round {n + 1}/{self.args.rounds} {t.name:<18} {t.rps[-1]:8.0f} req/s"
                    f"  p50 {t.latencies[-1].p50:6.2f} ms  p99 {t.latencies[-1].p99:6.2f} ms"
                    + (
                        f"  CPU {t.cpu_ms[-1]:5.2f} ms/call (loop {t.loop_cpu_ms[-1]:5.2f},"
                        f" one at a time {t.seq_cpu_ms[-1]:5.2f})"
                        if t.cpu_ms
                        else ""
                    ),
                    flush=True,
                )


def summarize(targets: list[Target]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t in targets:
        out[t.name] = {
            "rps": statistics.median(t.rps),
            "p50_ms": statistics.median(r.p50 for r in t.latencies),
            "p99_ms": statistics.median(r.p99 for r in t.latencies),
            "cpu_ms_per_call": statistics.median(t.cpu_ms) if t.cpu_ms else 0.0,
            "loop_cpu_ms_per_call": statistics.median(t.loop_cpu_ms) if t.loop_cpu_ms else 0.0,
            "rps_best": max(t.rps),
            "seq_cpu_ms_per_call": statistics.median(t.seq_cpu_ms) if t.seq_cpu_ms else 0.0,
        }
    return out


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import mitmproxy.version

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "kernel": platform.release(),
    }


def report(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    bare = summary["bare mitmdump"]
    lines = [
        f"{'target':<20}{'req/s':>9}{'÷ bare':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'+p50 ms':>9}{'+p99 ms':>9}{'CPU ms':>9}{'loop ms':>9}{'bare ÷':>9}{'seq CPU':>9}",
    ]
    for name, s in summary.items():
        cpu, loop = s["cpu_ms_per_call"], s["loop_cpu_ms_per_call"]
        lines.append(
            f"{name:<20}{s['rps']:>9.0f}{s['rps'] / bare['rps']:>9.2f}{s['p50_ms']:>9.2f}"
            f"{s['p99_ms']:>9.2f}{s['p50_ms'] - bare['p50_ms']:>+9.2f}"
            f"{s['p99_ms'] - bare['p99_ms']:>+9.2f}"
            + (
                f"{cpu:>9.2f}{loop:>9.2f}{bare['cpu_ms_per_call'] / cpu:>9.2f}"
                f"{s['seq_cpu_ms_per_call']:>9.2f}"
                if cpu
                else f"{'-':>9}{'-':>9}{'-':>9}{'-':>9}"
            )
        )
    lines += [
        "(medians over the rounds. +p50/+p99: added over bare mitmdump. CPU ms: proxy process",
        " CPU per call during the throughput run, all threads; loop ms: the event-loop thread",
        " alone; bare ÷: bare CPU / this CPU, the throughput ratio on a dedicated core;",
        " seq CPU: proxy CPU per call during the latency run, one call at a time)",
    ]
    lines.append("")
    lines.append(
        "targets (Hot path): CPU ratio (bare ÷) >= 0.80, stretch 0.90; added p50 <= 1.00 ms"
    )
    for name, s in summary.items():
        if not name.startswith("keybrake") or not s["cpu_ms_per_call"]:
            continue
        ratio = bare["cpu_ms_per_call"] / s["cpu_ms_per_call"]
        added = s["p50_ms"] - bare["p50_ms"]
        verdict = "stretch met" if ratio >= 0.90 else "OK" if ratio >= 0.80 else "MISSED"
        lines.append(
            f"  {name:<16} CPU ratio {ratio:.2f} {verdict}"
            f"   added p50 {added:+.2f} ms {'OK' if added <= 1.0 else 'MISSED'}"
        )
    return lines


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="keybrake-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"(logs kept in {d})")
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="calls per throughput run")
    ap.add_argument("--concurrency", type=int, default=16, help="keep-alive clients")
    ap.add_argument("--sequential", type=int, default=500, help="calls per latency run")
    ap.add_argument("--warmup", type=int, default=500, help="calls before measuring")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    ap.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="send a fresh Idempotency-Key per call, as the stripe SDK does",
    )
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="ADDON_DIR",
        help="also run another checkout's Keybrake (its addon/ directory, e.g. from "
        "`git archive <commit> addon | tar -x -C /tmp/base`), interleaved in the same rounds",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (proxy logs)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--profile",
        type=Path,
        help="record each proxy with py-spy (must be installed in the venv) into this dir and "
        "print where the time goes; figures taken while profiling are not comparable",
    )
    args = ap.parse_args(argv)

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}; Python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}"
    )
    print(
        f"load: {args.concurrency} keep-alive clients x {args.requests} calls; "
        f"{args.sequential} sequential calls; {args.rounds} rounds"
        + ("; Idempotency-Key on every call" if args.idempotency_keys else "")
    )
    with workdir(args.keep) as work:
        bench = Bench(args, work)
        try:
            targets = bench.setup()
            spies = bench.start_profilers(targets) if args.profile else []
            bench.run(targets)
            bench.stop_profilers(spies)
        finally:
            bench.stop_all()
    summary = summarize(targets)
    print()
    print("\n".join(report(summary, args)))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args),
                    "results": summary,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
