"""Seed 1 end to end: real Dramatiq worker processes charging through Keybrake's base URL.

``dramatiq tests.e2e.dramatiq_app --processes 2 --threads 4`` on a `RedisBroker` (the local
Redis, a namespace of its own), the stripe SDK through ``KEYBRAKE_BASE_URL/stripe`` with a
vault key, a real ``keybrake run`` and the fake Stripe. The workers' environment holds the
vault key and the base URL, never the Stripe secret.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import dramatiq
import pytest
import redis
import stripe
from tests.conftest import KEYBRAKE, REDIS_URL, ROOT, KeybrakeProcess
from tests.fakes import FakeStripe

from keybrake.integrations import BudgetExhausted as SharedBudgetExhausted
from keybrake.integrations import call_context, is_cap_hit, is_retryable
from keybrake.integrations.dramatiq import BudgetExhausted, retry_when
from keybrake.proxy._idempotency import vendor_idempotency_key

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
DRAMATIQ = Path(sys.executable).with_name("dramatiq")
APP = "tests.e2e.dramatiq_app"


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"kbtest-dq-{uuid.uuid4().hex[:10]}"
    yield ns
    r = redis.Redis.from_url(REDIS_URL)
    for k in r.scan_iter(f"{ns}*", count=1000):
        r.delete(k)
    r.close()


def load_app(namespace: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The worker module as the sending side imports it: same broker and namespace."""
    monkeypatch.setenv("KB_DRAMATIQ_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("KB_DRAMATIQ_NAMESPACE", namespace)
    sys.modules.pop(APP, None)
    return importlib.import_module(APP)


def worker_env(kb: KeybrakeProcess, vault_key: str, namespace: str) -> dict[str, str]:
    """Everything a worker gets: no Stripe secret, no proxy variables, no CA bundle."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONUNBUFFERED": "1",
        "KEYBRAKE_VAULT_KEY": vault_key,
        "KEYBRAKE_BASE_URL": kb.admin_url,
        "KB_DRAMATIQ_REDIS_URL": REDIS_URL,
        "KB_DRAMATIQ_NAMESPACE": namespace,
    }


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@contextmanager
def workers(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dramatiq tests.e2e.dramatiq_app --processes 2 --threads 4``, stopped with SIGTERM."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(DRAMATIQ), APP, "--processes", "2", "--threads", "4"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def outcomes(namespace: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        raw = r.lrange(f"{namespace}:test:outcomes", 0, -1)
    finally:
        r.close()
    return [json.loads(x) for x in raw]


def eventually[T](fn: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def finished(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Message id -> final outcome (ok, or the exception that failed it for good)."""
    final: dict[str, str] = {}
    attempts = Counter(e["id"] for e in entries)
    for e in entries:
        if e["outcome"] in ("ok", "BudgetExhausted") or attempts[e["id"]] > 3:
            final[e["id"]] = e["outcome"]
    return final


def audit_rows(kb: KeybrakeProcess, key_id: str, expected: int) -> list[dict[str, Any]]:
    def fetch() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = kb.admin(
            "GET", f"/vault/audit?key={key_id}&limit=1000"
        ).json()["data"]
        return rows

    return eventually(fetch, lambda rows: len(rows) >= expected, 15, "the audit rows")


def cli_spend(kb: KeybrakeProcess, label: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(KEYBRAKE), "spend", "--label", label, "--json", "--data-dir", str(kb.data_dir)],
        cwd=kb.workdir,
        env=kb.env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def redis_values(namespace: str) -> Iterator[tuple[str, str]]:
    """Every key and value of the namespace, as text (queues, message hashes, dead letters)."""
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        for key in r.scan_iter(f"{namespace}*", count=1000):
            kind = r.type(key)
            if kind == "string":
                values: Any = [r.get(key)]
            elif kind == "hash":
                values = [*r.hkeys(key), *r.hvals(key)]
            elif kind == "list":
                values = r.lrange(key, 0, -1)
            elif kind == "set":
                values = list(r.smembers(key))
            elif kind == "zset":
                values = r.zrange(key, 0, -1)
            else:
                values = []
            yield key, key
            for v in values:
                yield key, str(v)
    finally:
        r.close()


def assert_no_secret_in_workers(proc: subprocess.Popen[bytes], secret: str, vault_key: str) -> None:
    pids = [proc.pid, *children(proc.pid)]
    assert len(pids) >= 3  # the main process and its two worker processes
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert secret.encode() not in environ
        assert f"KEYBRAKE_VAULT_KEY={vault_key}".encode() in environ


# -- the recipe, without workers ------------------------------------------------------------------


def test_cap_hits_are_not_retried_and_vendor_429s_are() -> None:
    cap_hit = stripe.RateLimitError(
        "spend cap reached",
        http_status=429,
        json_body={"error": {"type": "keybrake_error", "code": "cap_exhausted", "message": "x"}},
        headers={"X-Keybrake-Cap-Hit": "true", "X-Keybrake-Error": "cap_exhausted"},
    )
    vendor = stripe.RateLimitError(
        "Too many requests",
        http_status=429,
        json_body={"error": {"type": "invalid_request_error", "code": "rate_limit"}},
        headers={"Request-Id": "req_1"},
    )
    revoked = stripe.AuthenticationError(
        "revoked", http_status=401, headers={"X-Keybrake-Error": "vault_key_revoked"}
    )
    store_down = stripe.APIError(
        "store", http_status=503, headers={"X-Keybrake-Error": "store_unavailable"}
    )
    should_retry = retry_when(max_retries=3)
    assert is_cap_hit(cap_hit) and not should_retry(0, cap_hit)
    assert not is_cap_hit(vendor) and should_retry(0, vendor) and not should_retry(3, vendor)
    assert not should_retry(0, revoked) and not is_retryable(revoked)
    assert should_retry(1, store_down)
    assert BudgetExhausted is SharedBudgetExhausted
    wrapped = BudgetExhausted.from_error(cap_hit)
    assert wrapped.code == "cap_exhausted" and is_cap_hit(wrapped)
    with call_context(actor="a", message_id="m"):
        try:
            raise RuntimeError("while charging") from cap_hit
        except RuntimeError as chained:
            assert is_cap_hit(chained)


# -- real workers --------------------------------------------------------------------------------


def test_group_of_400_charges_stops_at_the_300_dollar_cap(
    keybrake_stripe: KeybrakeProcess,
    fake_stripe: FakeStripe,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    kb = keybrake_stripe
    label = f"dramatiq/nightly-billing-{namespace[-6:]}"
    key = kb.issue_key(daily_usd_cap="300", agent_run_label=label)
    app = load_app(namespace, monkeypatch)
    fake_stripe.rate_limit_next(3)  # Stripe's own 429s: retried, unlike cap hits
    messages = [app.charge_customer.message(f"cus_{i:03d}", 100) for i in range(400)]
    ids = {m.message_id for m in messages}
    with workers(worker_env(kb, key["vault_key"], namespace), tmp_path / "workers.log") as proc:
        dramatiq.group(messages).run()
        entries = eventually(
            lambda: outcomes(namespace),
            lambda es: len(finished(es)) == 400,
            90,
            "400 finished messages",
        )
        assert_no_secret_in_workers(proc, fake_stripe.secret, key["vault_key"])
        time.sleep(1)  # nothing is retried after the last message finished
        entries = outcomes(namespace)

    final = finished(entries)
    assert set(final) == ids
    attempts = Counter(e["id"] for e in entries)
    by_outcome = Counter(final.values())
    charged = fake_stripe.charged_usd_micros()
    assert 299_000_000 <= charged <= 300_000_000
    assert by_outcome["ok"] * 1_000_000 == charged
    assert by_outcome["ok"] + by_outcome["BudgetExhausted"] == 400
    # Stripe's own 429s were retried (attempt 1 failed with RateLimitError, a later one ended).
    vendor_429 = {e["id"] for e in entries if e["outcome"] == "RateLimitError"}
    assert len(vendor_429) == 3
    assert all(attempts[m] >= 2 for m in vendor_429)
    # A cap hit fails the message at once: it is always the message's last attempt, and the
    # only one unless Stripe rate-limited an earlier attempt.
    for m, outcome in final.items():
        history = [e["outcome"] for e in entries if e["id"] == m]
        if outcome == "BudgetExhausted":
            assert history.count("BudgetExhausted") == 1 and history[-1] == "BudgetExhausted"
            assert len(history) == 1 or m in vendor_429

    # No duplicate charges: one charged request per successful message, keyed by its id.
    charges = [e for e in fake_stripe.ledger if e.amount_charged_minor > 0]
    assert len(charges) == by_outcome["ok"]
    assert len({c.idempotency_key for c in charges}) == len(charges)
    # Forwarded namespaced by vault key (vendors scope idempotency keys account-wide).
    assert {c.idempotency_key for c in charges} == {
        vendor_idempotency_key(key["key_id"], m) for m, o in final.items() if o == "ok"
    }

    # Every attempt that reached the proxy is in the audit log with its actor and message id.
    rows = audit_rows(kb, key["key_id"], len(entries))
    assert len(rows) == len(entries)
    assert {r["actor"] for r in rows} == {"charge_customer"}
    assert {r["message_id"] for r in rows} == ids
    assert Counter(r["message_id"] for r in rows) == attempts
    assert sum(1 for r in rows if r["code"] == "cap_exhausted") == by_outcome["BudgetExhausted"]

    spend = cli_spend(kb, label)
    assert sum(r["spent_micros"] for r in spend) == charged
    assert sum(r["cap_hits"] for r in spend) == by_outcome["BudgetExhausted"]

    leaked = [k for k, v in redis_values(namespace) if fake_stripe.secret in v]
    assert leaked == []
    assert not [k for k, v in redis_values(namespace) if key["vault_key"] in v]


def test_pipelines_share_one_key_and_stop_at_the_cap(
    keybrake_stripe: KeybrakeProcess,
    fake_stripe: FakeStripe,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="25", agent_run_label="dramatiq/pipelines")
    app = load_app(namespace, monkeypatch)
    chains = [[app.charge_customer.message(f"cus_{c}", 100) for _ in range(3)] for c in range(10)]
    with workers(worker_env(kb, key["vault_key"], namespace), tmp_path / "workers.log"):
        for steps in chains:
            dramatiq.pipeline(steps).run()

        def settled(es: list[dict[str, Any]]) -> bool:
            # Every chain ended: all three steps charged, or one of them hit the cap.
            ok = Counter(e["args"][0] for e in es if e["outcome"] == "ok")
            capped = {e["args"][0] for e in es if e["outcome"] == "BudgetExhausted"}
            return all(ok[f"cus_{c}"] == 3 or f"cus_{c}" in capped for c in range(10))

        eventually(lambda: outcomes(namespace), settled, 60, "10 finished pipelines")
        time.sleep(1)
        entries = outcomes(namespace)

    charged = fake_stripe.charged_usd_micros()
    assert 24_000_000 <= charged <= 25_000_000
    ok = [e for e in entries if e["outcome"] == "ok"]
    capped = [e for e in entries if e["outcome"] == "BudgetExhausted"]
    assert len(ok) * 1_000_000 == charged
    results = {e["result"] for e in ok}
    for c in range(10):
        steps = [e for e in entries if e["args"][0] == f"cus_{c}"]
        chain_ok = [e for e in steps if e["outcome"] == "ok"]
        chain_capped = [e for e in steps if e["outcome"] == "BudgetExhausted"]
        # A chain runs in order and stops at its first cap hit: nothing after it runs.
        assert len(chain_capped) <= 1
        assert len(steps) == len(chain_ok) + len(chain_capped)
        assert len(chain_ok) == 3 or len(chain_capped) == 1
        for e in steps[1:]:  # each later step received the charge id of the one before
            assert e["args"][2] in results
    assert len({e["id"] for e in capped}) == len(capped)
    rows = audit_rows(kb, key["key_id"], len(entries))
    assert {r["actor"] for r in rows} == {"charge_customer"}
    assert {r["message_id"] for r in rows} == {e["id"] for e in entries}
