"""A fleet of Keybrake replicas on one Redis: what each vendor call costs the shared Redis.

    make fleet                      # = .venv/bin/python bench/fleet.py
    .venv/bin/python bench/fleet.py --replicas 3 --keys 8 --concurrency 96 --rounds 5
    .venv/bin/python bench/fleet.py --addon /tmp/main/addon   # another checkout's Keybrake
    .venv/bin/python bench/fleet.py --cluster 3 --keys 16 --labels 16   # a 3-master cluster

Every replica shares one Redis, so Redis, not the replicas, sets how many vendor calls per
second a whole fleet can make. This starts a private ``redis-server`` on a free loopback port
(or uses ``--redis-url`` under a throw-away prefix), the fast stand-in for
``api.stripe.com`` (``bench/upstream.py``) and ``--replicas`` ``keybrake run`` processes on
that Redis, issues ``--keys`` vault keys spread over ``--labels`` labels, and sends
``POST /v1/payment_intents`` (a paid call that creates an object, with a fresh
``Idempotency-Key`` as the stripe SDK sends) from ``--concurrency`` keep-alive clients spread
over the replicas and the keys. Per vendor call, medians of ``--rounds`` rounds:

- Redis CPU (``INFO cpu``: user + sys), and the fleet ceiling it implies: 1 / that CPU,
  vendor calls per second per Redis core, however many replicas run;
- Redis commands (``INFO commandstats``: the scripts and every command they run);
- bytes to and from Redis (``INFO stats``: ``total_net_input_bytes``/``…output…``);
- socket reads that brought commands in (``INFO stats``: ``total_reads_processed``): round
  trips, however many calls each batch carried;
- replica CPU (``/proc``: every replica process, all threads).

With ``--cluster N`` the store is a private Redis Cluster of ``N`` masters on loopback
(``redis+cluster://``, `tests._redis.PrivateRedisCluster`): the figures are summed over the
masters, and the fleet ceiling is set by the busiest master (its CPU per call over all calls).

Then the cap check: fresh keys with small daily caps and a label cap, more calls than fit,
from the same clients: no key and no label spends a micro-dollar over its cap, every call
that was answered 200 is booked, and the audit rows (moved by the replicas from the Redis
outbox to their audit logs) equal the calls answered. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import itertools
import os
import signal
import sqlite3
import ssl
import statistics
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
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.load import Connection, stripe_request  # noqa: E402
from bench.run import STRIPE_SECRET, _ticks, free_port, machine, wait_port  # noqa: E402

BIN = Path(sys.executable).parent
USD = 1_000_000
CALL_USD = 1  # every call is a $1.00 PaymentIntent (amount=100 cents)


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    port: int
    admin: str
    data_dir: Path


@dataclass
class Figures:
    """One round's deltas, divided by the vendor calls it made."""

    calls: int
    seconds: float
    redis_cpu_ms: float
    busiest_master_cpu_ms: float
    redis_cmds: dict[str, float]
    # Time Redis measured inside the scripts (``commandstats`` usec of EVALSHA, the commands
    # they run included); the rest of its CPU is the sockets, the event loop, expiry, cron
    # and the audit pumps' own commands.
    script_ms: float
    bytes_in: float
    bytes_out: float
    reads: float
    replica_cpu_ms: float
    statuses: Counter[int] = field(default_factory=Counter)


class Fleet:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.prefix = f"kbfleet:{uuid.uuid4().hex[:10]}:"
        self.token = f"kba_fleet_{uuid.uuid4().hex}"
        self.redis_pidfile: Path | None = None
        self.calls_made = 0
        self.cluster: Any = None

    # -- processes ---------------------------------------------------------------------------
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

    def start_redis(self) -> str:
        if self.args.redis_url:
            return str(self.args.redis_url)
        if self.args.cluster:
            from tests._redis import PrivateRedisCluster

            # Kept before it starts: `stop` kills whatever nodes did.
            self.cluster = PrivateRedisCluster(
                self.work / "cluster", masters=self.args.cluster, replicas=0
            )
            self.cluster.start()
            return str(self.cluster.url)
        port = free_port()
        self.redis_pidfile = self.work / "redis.pid"
        subprocess.run(
            ["redis-server", "-"],
            input="\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    'save ""',
                    "appendonly no",
                    "daemonize yes",
                    f"pidfile {self.redis_pidfile}",
                    f"logfile {self.work / 'redis.log'}",
                    f"dir {self.work}",
                    "",
                ]
            ),
            text=True,
            check=True,
            capture_output=True,
            timeout=10,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(url).ping()
                return url
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")

    def start(self) -> None:
        from tests.fakes.tls import load_or_make_fake_ca

        from keybrake.proxy.ca import ensure_ca

        self.redis_url = self.start_redis()
        if self.cluster is not None:
            self.nodes = [redis.Redis(port=n.port) for n in self.cluster.nodes]
        else:
            self.nodes = [redis.Redis.from_url(self.redis_url)]
        self.fake_tls = load_or_make_fake_ca(self.work / "fake-tls")
        self.certs = self.work / "certs"
        self.client_ctx = ssl.create_default_context(cafile=str(ensure_ca(self.certs)))
        _up, uplog = self.spawn(
            "upstream",
            [sys.executable, str(ROOT / "bench" / "upstream.py"), "--cert-dir",
             str(self.fake_tls.directory)],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not uplog.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.upstream_url = f"https://127.0.0.1:{int(uplog.read_text().split()[0])}"
        policies = self.work / "policies"
        policies.mkdir()
        for f in sorted((ROOT / "policies").glob("*.yaml")):
            data = yaml.safe_load(f.read_text())
            if data["vendor"] == "stripe":
                data["upstream"] = {"url": self.upstream_url, "ca_file": str(self.fake_tls.ca_pem)}
            (policies / f.name).write_text(yaml.safe_dump(data, sort_keys=False))
        self.replicas = [self.start_replica(i, policies) for i in range(self.args.replicas)]

    def start_replica(self, index: int, policies: Path) -> Replica:
        port, admin_port = free_port(), free_port()
        data_dir = self.work / f"replica-{index}"
        keybrake = [str(BIN / "keybrake")]
        env = {"KEYBRAKE_ADMIN_TOKEN": self.token, "STRIPE_SECRET_KEY": STRIPE_SECRET}
        if self.args.addon:
            # Another checkout's Keybrake, on this venv's packages.
            keybrake = [sys.executable, "-c", "from keybrake._entry import main; main()"]
            env["PYTHONPATH"] = str(Path(self.args.addon).resolve())
        cmd = [
            *keybrake, "run",
            "--proxy-port", str(port),
            "--admin-port", str(admin_port),
            "--data-dir", str(data_dir),
            "--policies", str(policies),
            "--certs-dir", str(self.certs),
            "--store", f"{self.redis_url}?prefix={self.prefix}",
        ]  # fmt: skip
        for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY"):
            os.environ.pop(var, None)
        proc, log = self.spawn(f"replica-{index}", cmd, env)
        wait_port(admin_port, proc, log, timeout=60)
        admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{admin}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        wait_port(port, proc, log)
        return Replica(proc, port, admin, data_dir)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.cluster is not None:
            self.cluster.kill()
        elif self.redis_pidfile is not None:
            try:
                pid = int(self.redis_pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                    time.sleep(0.05)  # gone before its work dir is removed
            except (OSError, ValueError) as e:
                print(f"(could not stop the private redis-server: {e})")
        if self.args.redis_url:
            client = redis.Redis.from_url(self.args.redis_url)
            for name in client.scan_iter(f"{self.prefix}*", count=1000):
                client.delete(name)

    # -- keys --------------------------------------------------------------------------------
    def issue(self, label: str, daily_usd: int) -> str:
        r = httpx.post(
            f"{self.replicas[0].admin}/vault/keys",
            headers={"Authorization": f"Bearer {self.token}"},
            json={
                "vendor": "stripe",
                "daily_usd_cap": str(daily_usd),
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "6h",
                "agent_run_label": label,
                "max_requests_per_minute": 1_000_000,  # counted (measured), never refused
            },
            timeout=10,
        )
        if r.status_code != 201:
            raise RuntimeError(f"issuing a key failed: {r.status_code} {r.text}")
        return str(r.json()["vault_key"])

    def set_label_cap(self, label: str, daily_usd: int) -> None:
        r = httpx.put(
            f"{self.replicas[0].admin}/vault/budgets/{label}",
            headers={"Authorization": f"Bearer {self.token}"},
            json={"daily_usd_cap": str(daily_usd)},
            timeout=10,
        )
        if r.status_code >= 300:
            raise RuntimeError(f"setting the label cap failed: {r.status_code} {r.text}")

    # -- load --------------------------------------------------------------------------------
    async def load(self, vault_keys: list[str], total: int) -> Counter[int]:
        """``total`` calls from ``--concurrency`` keep-alive clients, spread round-robin over
        the replicas; call ``i`` uses key ``i mod len(vault_keys)``, a fresh idempotency key."""
        run = uuid.uuid4().hex[:8]
        upstream = ("127.0.0.1", 443)  # unused: every client goes through a replica
        conns = await asyncio.gather(
            *(
                Connection.open(
                    ("127.0.0.1", self.replicas[i % len(self.replicas)].port),
                    upstream,
                    self.client_ctx,
                )
                for i in range(self.args.concurrency)
            )
        )
        counter = itertools.count()
        statuses: Counter[int] = Counter()
        idem = not self.args.no_idempotency_keys

        async def worker(conn: Connection) -> None:
            while (i := next(counter)) < total:
                key = vault_keys[i % len(vault_keys)]
                status, _ = await conn.send(stripe_request(key, f"fl-{run}-{i}" if idem else None))
                statuses[status] += 1

        await asyncio.gather(*(worker(c) for c in conns))
        await asyncio.gather(*(c.close() for c in conns))
        self.calls_made += total
        return statuses

    # -- measuring ---------------------------------------------------------------------------
    def redis_now(self) -> tuple[float, dict[str, int], int, int, int, dict[str, int]]:
        """CPU seconds, command counts, bytes in and out, the socket reads that brought
        commands in (``total_reads_processed``) and µs spent in each command, summed over
        the servers."""
        cpu_s, cmds, bytes_in, bytes_out, reads = 0.0, Counter[str](), 0, 0, 0
        usec = Counter[str]()
        for cpu_node, node_cmds, node_in, node_out, node_reads, node_usec in self.nodes_now():
            cpu_s += cpu_node
            cmds.update(node_cmds)
            bytes_in += node_in
            bytes_out += node_out
            reads += node_reads
            usec.update(node_usec)
        return cpu_s, dict(cmds), bytes_in, bytes_out, reads, dict(usec)

    def nodes_now(self) -> list[tuple[float, dict[str, int], int, int, int, dict[str, int]]]:
        out = []
        for node in self.nodes:
            cpu = node.info("cpu")
            stats = node.info("stats")
            cmds = node.info("commandstats")
            out.append(
                (
                    float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                    {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmds.items()},
                    int(stats["total_net_input_bytes"]),
                    int(stats["total_net_output_bytes"]),
                    int(stats["total_reads_processed"]),
                    {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in cmds.items()},
                )
            )
        return out

    def idle_cpu(self, seconds: float = 3.0) -> float:
        """Redis CPU (ms per second) while the replicas are up and nothing calls."""
        before = self.redis_now()[0]
        time.sleep(seconds)
        return 1000 * (self.redis_now()[0] - before) / seconds

    def replica_cpu(self) -> float:
        hz = os.sysconf("SC_CLK_TCK")
        return sum(_ticks(Path(f"/proc/{r.proc.pid}/stat")) for r in self.replicas) / hz

    def round(self, vault_keys: list[str]) -> Figures:
        n = self.args.requests
        per_node0 = [c for c, *_ in self.nodes_now()]
        cpu0, cmds0, in0, out0, reads0, usec0 = self.redis_now()
        rcpu0 = self.replica_cpu()
        started = time.perf_counter()
        statuses = asyncio.run(self.load(vault_keys, n))
        seconds = time.perf_counter() - started
        rcpu1 = self.replica_cpu()
        cpu1, cmds1, in1, out1, reads1, usec1 = self.redis_now()
        per_node1 = [c for c, *_ in self.nodes_now()]
        if set(statuses) != {200}:
            raise RuntimeError(f"not every call succeeded: {dict(statuses)}")
        # The INFO calls themselves are not the fleet's: leave them out.
        cmds = {k: (v - cmds0.get(k, 0)) / n for k, v in cmds1.items() if k != "info"}
        scripts = sum(usec1.get(k, 0) - usec0.get(k, 0) for k in ("evalsha", "eval"))
        return Figures(
            calls=n,
            seconds=seconds,
            redis_cpu_ms=1000 * (cpu1 - cpu0) / n,
            busiest_master_cpu_ms=1000
            * max(b - a for a, b in zip(per_node0, per_node1, strict=True))
            / n,
            redis_cmds={k: v for k, v in cmds.items() if v > 0},
            script_ms=scripts / 1000 / n,
            bytes_in=(in1 - in0) / n,
            bytes_out=(out1 - out0) / n,
            reads=(reads1 - reads0) / n,
            replica_cpu_ms=1000 * (rcpu1 - rcpu0) / n,
            statuses=statuses,
        )

    # -- the cap check -------------------------------------------------------------------------
    def cap_check(self) -> list[str]:
        """Small caps, more calls than fit: nothing over any cap, every 200 booked, one audit
        row per answered call."""
        label_caps = {"cap-a": 10**6, "cap-b": 30}  # cap-b's label cap binds before its keys'
        key_caps = [40, 25, 40, 25]
        keys: list[tuple[str, str, int]] = []
        for i, cap in enumerate(key_caps):
            label = "cap-a" if i % 2 == 0 else "cap-b"
            keys.append((self.issue(label, cap), label, cap))
        for label, cap in label_caps.items():
            self.set_label_cap(label, cap)
        total = 4 * sum(key_caps)
        statuses = asyncio.run(self.load([k for k, _, _ in keys], total))
        lines = [f"cap check: {total} calls on {len(keys)} keys, answers {dict(statuses)}"]
        spent = self.spent_by_key_and_label([k for k, _, _ in keys])
        ok = True
        for (vault_key, label, cap), (key_spent, _) in zip(keys, spent, strict=True):
            over = key_spent - cap * USD
            ok &= over <= 0
            lines.append(
                f"  key …{vault_key[-6:]} ({label}) cap ${cap}: spent ${key_spent / USD:.2f}, "
                f"over the cap ${max(0, over) / USD:.2f}"
            )
        for label, cap in label_caps.items():
            label_spent = next(
                ls for (_k, lb, _c), (_s, ls) in zip(keys, spent, strict=True) if lb == label
            )
            ok &= label_spent <= cap * USD
            lines.append(
                f"  label {label} cap ${cap}: spent ${label_spent / USD:.2f}, over the cap "
                f"${max(0, label_spent - cap * USD) / USD:.2f}"
            )
        booked = sum(s for s, _ in spent)
        ok &= booked == statuses[200] * CALL_USD * USD
        lines.append(
            f"  answered 200: {statuses[200]} x ${CALL_USD} = ${statuses[200] * CALL_USD}; "
            f"booked ${booked / USD:.2f}"
        )
        rows = self.audit_rows()
        ok &= rows == self.calls_made
        lines.append(
            f"  audit rows {rows} == calls answered {self.calls_made}: {rows == self.calls_made}"
        )
        lines.append("cap check: " + ("OK ($0 over every cap)" if ok else "FAILED"))
        return lines

    def spent_by_key_and_label(self, vault_keys: list[str]) -> list[tuple[int, int]]:
        """Per vault key: what it spent today, and what its label spent today (the store)."""
        from keybrake.store import open_store

        async def read() -> list[tuple[int, int]]:
            store = open_store(f"{self.redis_url}?prefix={self.prefix}")
            await store.open()
            try:
                out = []
                for vault_key in vault_keys:
                    key = await store.get_key_by_secret_hash(
                        hashlib.sha256(vault_key.encode()).hexdigest()
                    )
                    assert key is not None
                    now = dt.datetime.now(dt.UTC)
                    budgets = {b.scope.split(":")[0]: b for b in await store.budgets(key, now)}
                    out.append((budgets["key"].spent_micros, budgets["label"].spent_micros))
                return out
            finally:
                await store.close()

        return asyncio.run(read())

    def outbox_backlog(self) -> int:
        """Rows in the store's audit outbox (every bucket's stream on a cluster)."""
        from keybrake.store import open_store

        async def read() -> int:
            store = open_store(f"{self.redis_url}?prefix={self.prefix}")
            await store.open()
            try:
                return await store.audit_backlog()
            finally:
                await store.close()

        return asyncio.run(read())

    def audit_rows(self) -> int:
        """Rows in the replicas' audit logs once the Redis outbox is drained."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.outbox_backlog():
            time.sleep(0.2)
        time.sleep(1)
        rows = 0
        for r in self.replicas:
            with sqlite3.connect(r.data_dir / "audit.db") as db:
                rows += db.execute(
                    "SELECT count(*) FROM audit WHERE path = '/v1/payment_intents'"
                ).fetchone()[0]
        return rows


def report(rounds: list[Figures], args: argparse.Namespace, idle_ms_per_s: float) -> list[str]:
    med = statistics.median
    cpu = med(f.redis_cpu_ms for f in rounds)
    busiest = med(f.busiest_master_cpu_ms for f in rounds)
    # The idle fleet's background (audit pumps polling, cron) does not grow with the calls.
    net = med(f.redis_cpu_ms - idle_ms_per_s * f.seconds / f.calls for f in rounds)
    cmds: dict[str, float] = {}
    for name in {k for f in rounds for k in f.redis_cmds}:
        cmds[name] = med(f.redis_cmds.get(name, 0.0) for f in rounds)
    scripts = cmds.get("evalsha", 0) + cmds.get("eval", 0)
    inside = sum(v for k, v in cmds.items() if k not in {"evalsha", "eval"})
    lines = [
        f"per vendor call (medians of {len(rounds)} rounds of {args.requests} calls, "
        f"{args.replicas} replicas, {args.keys} keys, {args.concurrency} clients"
        + (f", a {args.cluster}-master cluster" if args.cluster else "")
        + "):",
        f"  Redis CPU            {cpu:.3f} ms   -> fleet ceiling {1000 / cpu:,.0f} calls/s "
        "per Redis core",
        f"    net of the idle fleet ({idle_ms_per_s:.1f} ms/s): {net:.3f} ms -> "
        f"{1000 / net:,.0f} calls/s per Redis core",
        f"    inside the scripts {med(f.script_ms for f in rounds):.3f} ms (commandstats usec: "
        "what they run; the rest is sockets, event loop, expiry, cron, the pumps)",
        f"  Redis commands       {scripts + inside:.1f} ({scripts:.1f} scripts running "
        f"{inside:.1f} commands)",
        "    " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])),
        *(
            [
                f"  busiest master CPU   {busiest:.3f} ms   -> fleet ceiling "
                f"{1000 / busiest:,.0f} calls/s with {args.cluster} masters (one core each)"
            ]
            if args.cluster
            else []
        ),
        f"  bytes to Redis       {med(f.bytes_in for f in rounds):.0f}",
        f"  bytes from Redis     {med(f.bytes_out for f in rounds):.0f}",
        f"  socket reads         {med(f.reads for f in rounds):.2f} (Redis reads that brought "
        "commands in: round trips, batches included)",
        f"  replica CPU          {med(f.replica_cpu_ms for f in rounds):.2f} ms (all replicas)",
        f"  throughput           {med(f.calls / f.seconds for f in rounds):.0f} calls/s "
        "(this machine, load generator included)",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--keys", type=int, default=4, help="vault keys the load is spread over")
    ap.add_argument("--labels", type=int, default=2, help="labels the keys are spread over")
    ap.add_argument("--concurrency", type=int, default=64, help="keep-alive clients")
    ap.add_argument("--requests", type=int, default=2000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--no-idempotency-keys", action="store_true")
    ap.add_argument("--skip-cap-check", action="store_true")
    ap.add_argument(
        "--redis-url", help="use this Redis (throw-away prefix) instead of a private one"
    )
    ap.add_argument(
        "--addon", help="run the replicas from this addon/ directory (another checkout)"
    )
    ap.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="MASTERS",
        help="a private Redis Cluster of this many masters (redis+cluster://), not one server",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args(argv)

    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; Python {info['python']}")
    work = Path(tempfile.mkdtemp(prefix="keybrake-fleet-"))
    fleet = Fleet(args, work)
    lines: list[str] = []
    try:
        fleet.start()
        print(f"redis {fleet.redis_url} prefix {fleet.prefix}; {args.replicas} replicas up")
        keys = [fleet.issue(f"fleet-{i % args.labels}", 10**7) for i in range(args.keys)]
        asyncio.run(fleet.load(keys, args.warmup))
        idle = fleet.idle_cpu()
        print(f"  idle fleet: Redis {idle:.2f} ms CPU per second (audit pumps, cron)")
        rounds: list[Figures] = []
        for n in range(args.rounds):
            f = fleet.round(keys)
            rounds.append(f)
            print(
                f"  round {n + 1}/{args.rounds}: Redis {f.redis_cpu_ms:.3f} ms/call "
                f"({f.script_ms:.3f} in scripts), "
                f"{sum(f.redis_cmds.values()):.1f} commands/call, "
                f"replicas {f.replica_cpu_ms:.2f} ms/call, {f.calls / f.seconds:.0f} calls/s",
                flush=True,
            )
        lines = report(rounds, args, idle)
        if not args.skip_cap_check:
            lines += fleet.cap_check()
    finally:
        fleet.stop()
        if args.keep:
            print(f"(logs kept in {work})")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0 if not lines or "FAILED" not in lines[-1] else 1


if __name__ == "__main__":
    sys.exit(main())
