"""Keybrake across real network boundaries: a worker host, a proxy host running two
replicas, and a store host with Redis (AUTH on) and the fake vendors.

Three network namespaces joined by veth pairs, with addresses this test assigns::

    worker 198.18.0.1 ── 198.18.0.2 proxy 192.88.99.1 ── 192.88.99.2 store
                         replicas A and B                 Redis :6379 (AUTH), fake Stripe
                         admin listeners on the proxy host's loopback only

The proxy host does not forward packets, so the worker has no route to the store host. The
test shows: the worker reaches the vendor only through the proxy (a direct connection fails);
it cannot reach the admin listeners, Redis, or the proxy host's other services (directly or
through the proxy); a key issued through an admin listener from the proxy host works from
the worker; a cap is exact across both replicas; killing one replica mid-run loses no money
and no audit row. The namespaces are removed even when the test fails. Needs root.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests._redis import REDIS_ADMIN_PASSWORD
from tests.conftest import KeybrakeProcess, audit_query, free_port
from tests.deploy._deployed import stop_group
from tests.fakes import FakeStripe, make_fake_ca
from tests.netns import Netns, Tripwire, link, namespaces, netns_unusable

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(netns_unusable() is not None, reason=f"needs: {netns_unusable()}"),
]

WORKER, PROXY_W = "198.18.0.1", "198.18.0.2"  # worker link
PROXY_S, STORE = "192.88.99.1", "192.88.99.2"  # store link
REDIS_PASSWORD = REDIS_ADMIN_PASSWORD  # in the whole-suite secrets scan
CHARGE = {"currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"}


@dataclass
class Topology:
    worker: Netns
    proxy: Netns
    store: Netns
    fake: FakeStripe
    replicas: list[KeybrakeProcess] = field(default_factory=list)
    base_ports: list[int] = field(default_factory=list)
    proxy_ports: list[int] = field(default_factory=list)

    def base_url(self, i: int) -> str:
        return f"http://{PROXY_W}:{self.base_ports[i]}"

    def in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker host (threads it starts are there too)."""
        return self.worker.call(fn)

    def admin(self, i: int, method: str, path: str, body: Any = None) -> httpx.Response:
        """The admin API of replica ``i``, asked from the proxy host (its loopback)."""
        kb = self.replicas[i]

        def ask() -> httpx.Response:
            return httpx.request(
                method,
                f"http://127.0.0.1:{kb.admin_port}{path}",
                headers={"Authorization": f"Bearer {kb.admin_token}"},
                json=body,
                timeout=10,
                trust_env=False,
            )

        response: httpx.Response = self.proxy.call(ask)
        return response


def charge(base_url: str, vault_key: str, cents: int, token: str) -> dict[str, Any]:
    """One PaymentIntent through a replica's base URL; what came back (or the error)."""
    try:
        r = httpx.post(
            f"{base_url}/stripe/v1/payment_intents",
            auth=(vault_key, ""),
            data={"amount": str(cents), **CHARGE},
            headers={"Idempotency-Key": token},
            timeout=15,
            trust_env=False,
        )
    except httpx.HTTPError as e:
        return {"status": None, "error": type(e).__name__, "base": base_url}
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return {
        "status": r.status_code,
        "id": body.get("id"),
        "code": r.headers.get("X-Keybrake-Error"),
        "base": base_url,
    }


@contextlib.contextmanager
def redis_on_store_host(store: Netns, directory: Path) -> Iterator[None]:
    """redis-server on the store host, AUTH on, the password on stdin (not in ``ps``)."""
    conf = (
        f"bind {STORE}\\nport 6379\\nrequirepass %s\\nmaxmemory-policy noeviction\\n"
        'save ""\\nappendonly no\\n'
    )
    proc = subprocess.Popen(
        [
            *store.exec_prefix(),
            "sh",
            "-c",
            f"printf '{conf}' \"$REDIS_PASSWORD\" | exec redis-server -",
        ],
        env={"REDIS_PASSWORD": REDIS_PASSWORD, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # redis-server is the shell's child: its group is stopped
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                store.connect((STORE, 6379), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("redis-server did not start on the store host") from None
                time.sleep(0.1)
        yield
    finally:
        stop_group(proc, 10)


@pytest.fixture
def topology(tmp_path: Path, keybrake_certs: Path) -> Iterator[Topology]:
    tls = make_fake_ca(tmp_path / "fake-ca", extra_sans=(STORE,))
    with namespaces(3, "kbtopo") as (worker, proxy, store):
        link(worker, WORKER, proxy, PROXY_W, name="vworker")
        link(proxy, PROXY_S, store, STORE, name="vstore")
        fake = FakeStripe(tls, host=STORE, port=0)
        store.call(fake.start)
        topo = Topology(worker, proxy, store, fake)
        try:
            with redis_on_store_host(store, tmp_path):
                for i in range(2):
                    workdir = tmp_path / f"replica{i}"
                    workdir.mkdir()
                    base, fwd = free_port(), free_port()
                    kb = KeybrakeProcess(
                        workdir,
                        keybrake_certs,
                        {"stripe": fake},
                        tls,
                        store=f"redis://{STORE}:6379/0?prefix=kbtopo:",
                        env={"KEYBRAKE_STORE_PASSWORD": REDIS_PASSWORD},
                        netns=proxy,
                        run_args=[
                            "--proxy-listen",
                            f"{PROXY_W}:{fwd}",
                            "--base-url-listen",
                            f"{PROXY_W}:{base}",
                        ],
                    )
                    topo.replicas.append(kb)
                    topo.base_ports.append(base)
                    topo.proxy_ports.append(fwd)
                    kb.start()
                yield topo
        finally:
            for kb in topo.replicas:
                kb.stop()
            fake.stop()


def test_the_worker_reaches_vendors_only_through_the_proxy(topology: Topology) -> None:
    t = topology
    a, b = t.replicas
    issued = t.admin(0, "POST", "/vault/keys", key_body(cap=5, label="topology/reach"))
    assert issued.status_code == 201, issued.text
    vault_key = issued.json()["vault_key"]

    # A key issued on replica A's admin listener (from the proxy host) works from the worker,
    # through either replica.
    for i in range(2):
        done = t.in_worker(lambda i=i: charge(t.base_url(i), vault_key, 100, f"reach-{i}"))
        assert done["status"] == 200, done
    assert t.fake.charged_usd_micros() == 2_000_000

    def no_connection(address: tuple[str, int]) -> str:
        try:
            socket.create_connection(address, timeout=2).close()
        except OSError as e:
            return type(e).__name__
        return "connected"

    with Tripwire("127.0.0.1", 0, ns=t.proxy) as other_service:
        # The vendor, Redis: no route from the worker host. The admin listeners and the
        # proxy host's other services: not on any address the worker can reach.
        targets = [
            (STORE, t.fake.port),
            (STORE, 6379),
            (PROXY_W, a.admin_port),
            (PROXY_W, b.admin_port),
            (PROXY_W, other_service.port),
            ("127.0.0.1", a.admin_port),
        ]
        results = t.in_worker(lambda: [no_connection(x) for x in targets])
        assert "connected" not in results, list(zip(targets, results, strict=True))

        # Through the forward proxy: Redis, the proxy host's loopback services and its admin
        # listener are refused (egress_denied) before anything is connected.
        def through_proxy(authority: str) -> int:
            with socket.create_connection((PROXY_W, t.proxy_ports[0]), timeout=5) as s:
                s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
                answer = s.recv(4096)
            return int(answer.split(b" ", 2)[1])

        for authority in (
            f"{STORE}:6379",
            f"127.0.0.1:{other_service.port}",
            f"127.0.0.1:{a.admin_port}",
            f"{PROXY_S}:{a.admin_port}",
        ):
            assert t.in_worker(lambda x=authority: through_proxy(x)) == 403, authority
        assert other_service.accepted == 0

    # The base-URL listener the worker reaches serves no admin route.
    def admin_on_base(path: str) -> tuple[int, str]:
        r = httpx.get(f"{t.base_url(0)}{path}", timeout=5, trust_env=False)
        return r.status_code, r.headers.get("X-Keybrake-Error", "")

    for path in ("/vault/keys", "/metrics", "/"):
        assert t.in_worker(lambda p=path: admin_on_base(p)) == (404, "not_found")
    assert t.in_worker(lambda: admin_on_base("/readyz"))[0] == 200
    assert vault_key not in a.log() + b.log()
    # No secret in any process listing on this machine (replicas, Redis, the fakes).
    listing = process_listing()
    assert "keybrake" in listing and "redis-server" in listing
    for secret in (vault_key, a.admin_token, b.admin_token, REDIS_PASSWORD, t.fake.secret):
        assert secret not in listing


def process_listing() -> str:
    """Every process's command line, as ``ps`` shows them."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return "\n".join(lines)


def key_body(cap: int, label: str) -> dict[str, Any]:
    return {
        "vendor": "stripe",
        "daily_usd_cap": cap,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "1h",
        "agent_run_label": label,
    }


def spent_micros(t: Topology, key_id: str) -> int:
    from keybrake.core.money import parse_usd

    return parse_usd(t.admin(1, "GET", f"/vault/keys/{key_id}").json()["spent_today_usd"])


def test_a_cap_is_exact_across_both_replicas(topology: Topology) -> None:
    t = topology
    issued = t.admin(1, "POST", "/vault/keys", key_body(cap=10, label="topology/cap")).json()

    def run() -> list[dict[str, Any]]:
        with ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(charge, t.base_url(n % 2), issued["vault_key"], 100, f"cap-{n}")
                for n in range(30)
            ]
            return [c.result() for c in calls]

    results = t.in_worker(run)
    ok = [r for r in results if r["status"] == 200]
    capped = [r for r in results if r["code"] == "cap_exhausted"]
    assert len(ok) == 10 and len(capped) == 20, results
    assert {r["base"] for r in ok} == {t.base_url(0), t.base_url(1)}  # both replicas charged
    assert t.fake.charged_usd_micros() == 10_000_000 == spent_micros(t, issued["key_id"])


def test_killing_a_replica_mid_run_loses_no_money_and_no_audit_row(topology: Topology) -> None:
    t = topology
    a = t.replicas[0]
    issued = t.admin(1, "POST", "/vault/keys", key_body(cap=500, label="topology/kill")).json()
    t.fake.delay_seconds = 0.05  # calls in flight when the replica dies
    results: list[dict[str, Any]] = []

    def run() -> None:
        with ThreadPoolExecutor(6) as pool:
            calls = [
                pool.submit(charge, t.base_url(n % 2), issued["vault_key"], 100, f"kill-{n}")
                for n in range(120)
            ]
            for c in calls:
                results.append(c.result())

    worker = threading.Thread(target=lambda: t.in_worker(run))
    worker.start()
    deadline = time.monotonic() + 30
    while len(t.fake.ledger) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.proc is not None
    a.proc.kill()  # kill -9, calls in flight
    worker.join(120)
    assert not worker.is_alive()
    t.fake.delay_seconds = 0.0
    a.stop()
    a.start()  # the orchestrator restarts it: it moves what it left behind

    answered = [r for r in results if r["status"] == 200]
    lost = [r for r in results if r["status"] is None]
    assert answered and lost, "the kill must have hit calls on replica A"
    charged = t.fake.charged_usd_micros()
    spent = spent_micros(t, issued["key_id"])
    # No money lost: what the store counts is never below what the vendor charged; the
    # excess is at most the calls that never got an answer.
    assert charged <= spent <= charged + len(lost) * 1_000_000, (charged, spent, len(lost))
    assert charged >= len(answered) * 1_000_000

    # No audit row lost: every answered call has its row, in one replica's audit log or the
    # other's (each moves rows from the shared outbox into its own log).
    for i in range(2):
        assert t.admin(i, "GET", f"/vault/audit?key={issued['key_id']}&limit=1").status_code == 200
    rows: list[dict[str, Any]] = []
    for kb in t.replicas:
        rows += audit_query(kb.data_dir / "audit.db")
    mine = {r["event_id"]: r for r in rows if r["key_id"] == issued["key_id"]}
    ok_objects = {r["vendor_object_id"] for r in mine.values() if r["outcome"] == "ok"}
    assert {r["id"] for r in answered} <= ok_objects
    audited_spend = sum(r["actual_micros"] or 0 for r in mine.values())
    assert audited_spend >= len(answered) * 1_000_000
