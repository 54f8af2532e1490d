"""End to end: the audit log, one row per vendor call that reached the addon.

The row semantics run against both sinks (embedded SQLite ``<data dir>/audit.db`` and a shared
PostgreSQL table). Shutdown tests put the proxy under load from several threads and compare
the rows written with the responses the clients actually received; the replica test runs two
proxies sharing Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KEYBRAKE, KeybrakeProcess, audit_query, postgres_schema
from tests.fakes import FakeStripe, FakeTLS

from keybrake.auditlog.pump import drain_outbox
from keybrake.auditlog.sinks import SQLiteAuditSink
from keybrake.proxy._idempotency import vendor_idempotency_key
from keybrake.store import SQLiteStore

pytestmark = pytest.mark.e2e

PI = "https://api.stripe.com/v1/payment_intents"
REFUNDS = "https://api.stripe.com/v1/refunds"


def charge(amount: int, pm: str = "pm_card_visa", **extra: str) -> dict[str, Any]:
    return {"amount": amount, "currency": "usd", "confirm": "true", "payment_method": pm, **extra}


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def wait_rows(
    source: Path | str, sql: str, want: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Poll the sink until ``sql`` returns ``want`` rows (the writer flushes every 0.2 s),
    then once more a little later to make sure no extra row shows up."""
    deadline = time.monotonic() + timeout
    rows = audit_query(source, sql)
    while len(rows) < want and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = audit_query(source, sql)
    time.sleep(0.5)
    return audit_query(source, sql)


# -- one proxy per sink, shared by the row-semantics tests ------------------------------------
@pytest.fixture(scope="module")
def stripe_fake(fake_tls: FakeTLS) -> Iterator[FakeStripe]:
    with FakeStripe(fake_tls) as fake:
        yield fake


class Audited:
    """A running proxy and where its audit rows can be read."""

    def __init__(self, kb: KeybrakeProcess, source: Path | str, kind: str) -> None:
        self.kb = kb
        self.source = source
        self.kind = kind
        self.vault_keys: list[str] = []

    def issue(self, **fields: Any) -> dict[str, Any]:
        key = self.kb.issue_key(**fields)
        self.vault_keys.append(key["vault_key"])
        return key

    def rows(self, where: str) -> list[dict[str, Any]]:
        return audit_query(self.source, f"SELECT * FROM audit WHERE {where} ORDER BY id")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def audited(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    stripe_fake: FakeStripe,
) -> Iterator[Audited]:
    work = tmp_path_factory.mktemp(f"kb-audit-{request.param}")
    with postgres_schema() as pg_url:
        extra = ["--set", f"keybrake_audit={pg_url}"] if request.param == "postgresql" else []
        kb = KeybrakeProcess(
            work, keybrake_certs, {"stripe": stripe_fake}, fake_tls, extra_args=extra
        )
        kb.start()
        source: Path | str = pg_url if request.param == "postgresql" else kb.data_dir / "audit.db"
        try:
            yield Audited(kb, source, request.param)
        finally:
            kb.stop()


@pytest.fixture(autouse=True)
def _clean_fake(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "stripe_fake" in request.fixturenames:
        fake: FakeStripe = request.getfixturevalue("stripe_fake")
        fake.delay_seconds = 0.0
        fake.clear_faults()


def test_every_call_gets_exactly_one_row(
    audited: Audited, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = audited.kb
    actor = f"billing-{uuid.uuid4().hex[:8]}"
    label = f"audit/{uuid.uuid4().hex[:8]}"
    key = audited.issue(
        daily_usd_cap="100",
        agent_run_label=label,
        allowed_endpoints=["POST /v1/payment_intents"],
    )
    ik = f"ik_{uuid.uuid4().hex}"
    ledger_before = len(stripe_fake.ledger)
    got: dict[str, httpx.Response] = {}

    def call(msg: str, data: dict[str, Any], url: str = PI, **headers: str) -> httpx.Response:
        vault_key = headers.pop("vault_key", key["vault_key"])
        r = httpx.post(
            url,
            data=data,
            headers={
                "Authorization": f"Bearer {vault_key}",
                "X-Keybrake-Actor": actor,
                "X-Keybrake-Message-Id": msg,
                **headers,
            },
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
            timeout=30,
        )
        got[msg] = r
        return r

    # The worker's own SDK, setting the headers the Dramatiq/Beam helpers set.
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    pi = sc.v1.payment_intents.create(
        params=charge(1234),
        options={
            "idempotency_key": ik,
            "headers": {"X-Keybrake-Actor": actor, "X-Keybrake-Message-Id": "m-sdk"},
        },
    )
    assert call("m-auth", {"amount": 2500, "currency": "usd"}).status_code == 200
    assert call("m-replay", charge(1234), **{"Idempotency-Key": ik}).status_code == 200
    assert call("m-mismatch", charge(999), **{"Idempotency-Key": ik}).status_code == 422
    assert call("m-refund", {"payment_intent": pi.id, "amount": 100}, REFUNDS).status_code == 403
    unknown_key = "kbv_stripe_" + "A" * 43
    assert call("m-unknown-key", charge(100), vault_key=unknown_key).status_code == 401
    assert call("m-cap", charge(20_000)).status_code == 429
    assert call("m-decline", charge(700, "pm_card_chargeDeclined")).status_code == 402
    assert call("m-400", charge(10)).status_code == 400
    stripe_fake.fail_next(1, 500)
    assert call("m-500", charge(300)).status_code == 500
    stripe_fake.reset_connection_next(1)
    assert call("m-reset", charge(200)).status_code >= 500
    n_calls = len(got) + 1

    rows = wait_rows(audited.source, f"SELECT * FROM audit WHERE actor = '{actor}'", n_calls)
    assert len(rows) == n_calls, [r["message_id"] for r in rows]
    by_msg = {r["message_id"]: r for r in rows}
    assert len(by_msg) == n_calls  # one row per call, no duplicates

    expect = {
        "m-sdk": ("ok", None, 200),
        "m-auth": ("held", None, 200),  # not confirmed: a browser may still confirm it
        "m-replay": ("replayed", None, 200),
        "m-mismatch": ("refused", "idempotency_mismatch", 422),
        "m-refund": ("refused", "endpoint_not_allowed", 403),
        "m-unknown-key": ("refused", "vault_key_unknown", 401),
        "m-cap": ("refused", "cap_exhausted", 429),
        "m-decline": ("vendor_error", None, 402),
        "m-400": ("vendor_error", None, 400),
        "m-500": ("vendor_error", None, 500),
        "m-reset": ("unknown", "upstream_failed", 502),  # sent, the answer lost
    }
    for msg, (outcome, code, status) in expect.items():
        row = by_msg[msg]
        assert (row["outcome"], row["code"], row["status"]) == (outcome, code, status), msg
        if msg in got and status is not None:
            assert got[msg].status_code == row["status"], msg
        assert row["vendor"] == "stripe" and row["method"] == "POST"
        assert row["instance"]
        assert row["request_body"] is None and row["response_body"] is None
        if msg == "m-unknown-key":
            assert row["key_id"] is None and row["label"] is None
        else:
            assert (row["key_id"], row["label"]) == (key["key_id"], label), msg
    assert by_msg["m-refund"]["path"] == "/v1/refunds"
    assert by_msg["m-sdk"]["path"] == "/v1/payment_intents"

    # Costs: what moved, what was kept as spent, what was never charged.
    sdk_row = by_msg["m-sdk"]
    assert sdk_row["estimate_micros"] == sdk_row["actual_micros"] == 12_340_000
    assert (sdk_row["amount_minor"], sdk_row["currency"]) == (1234, "usd")
    assert sdk_row["vendor_object_id"] == pi.id
    assert sdk_row["idempotency_key"] == ik == by_msg["m-replay"]["idempotency_key"]
    # Stripe saw the key namespaced by vault key; the row keeps both.
    assert sdk_row["vendor_idempotency_key"] == vendor_idempotency_key(key["key_id"], ik)
    assert stripe_fake.ledger[ledger_before].idempotency_key == (sdk_row["vendor_idempotency_key"])
    assert pi.last_response is not None
    assert sdk_row["vendor_request_id"] == pi.last_response.headers["Request-Id"]
    assert sdk_row["latency_ms"] > 0
    assert by_msg["m-auth"]["actual_micros"] == 0  # not charged (yet): held
    assert by_msg["m-auth"]["estimate_micros"] == 25_000_000
    assert by_msg["m-replay"]["actual_micros"] == 0
    assert by_msg["m-replay"]["vendor_object_id"] in (None, pi.id)
    assert by_msg["m-decline"]["actual_micros"] == 0
    assert by_msg["m-400"]["actual_micros"] == 0
    assert by_msg["m-500"]["actual_micros"] == 3_000_000  # no answer about money: counted
    assert by_msg["m-reset"]["actual_micros"] == 2_000_000
    for msg in ("m-cap", "m-refund", "m-unknown-key", "m-mismatch"):
        assert by_msg[msg]["actual_micros"] in (None, 0), msg

    # Every vendor request id the fake issued for a call it answered is in exactly one ok (or
    # held) row.
    new_entries = stripe_fake.ledger[ledger_before:]
    ok_ids = [r["vendor_request_id"] for r in rows if r["outcome"] in ("ok", "held")]
    answered = [e.request_id for e in new_entries if 200 <= e.status < 300 and e.fault is None]
    assert sorted(answered) == sorted(ok_ids)
    assert len(set(ok_ids)) == len(ok_ids)
    # And the ones it refused are on vendor_error rows, never on ok rows.
    for e in new_entries:
        if e.status in (400, 402):
            assert [r["outcome"] for r in rows if r["vendor_request_id"] == e.request_id] == [
                "vendor_error"
            ]

    # The key's ledger equals the audit's sum; and it holds what the vendor charged.
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    key_rows = [r for r in rows if r["key_id"] == key["key_id"]]
    assert sum(r["actual_micros"] or 0 for r in key_rows) == micros(
        detail["budgets"][0]["spent_usd"]
    )
    # What is counted today adds the hold of the intent that was not confirmed.
    held = by_msg["m-auth"]["estimate_micros"]
    assert micros(detail["spent_today_usd"]) == micros(detail["budgets"][0]["spent_usd"]) + held
    charged = sum(e.charged_usd_micros or 0 for e in new_entries)
    assert micros(detail["budgets"][0]["spent_usd"]) >= charged == 12_340_000

    # Actor and message id are for the log only: the vendor never sees them.
    for e in new_entries:
        assert not any(h.lower().startswith("x-keybrake") for h in e.headers)


def test_no_secret_in_the_audit_log_or_the_proxy_log(
    audited: Audited, stripe_fake: FakeStripe
) -> None:
    kb = audited.kb
    key = audited.issue(daily_usd_cap="100")
    for data in (charge(150), charge(150, "pm_card_chargeDeclined"), {"amount": "1"}):
        httpx.post(
            PI,
            data=data,
            headers={"Authorization": f"Bearer {key['vault_key']}"},
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
            timeout=30,
        )
    # A raw secret sent by mistake is refused, and must not be recorded either.
    httpx.post(
        PI,
        data=charge(150),
        headers={"Authorization": f"Bearer {stripe_fake.secret}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )
    wait_rows(audited.source, f"SELECT * FROM audit WHERE key_id = '{key['key_id']}'", 3)
    secrets = [stripe_fake.secret, kb.admin_token, *audited.vault_keys]
    if audited.kind == "sqlite":
        db = Path(audited.source)
        blobs = [p.read_bytes() for p in db.parent.glob("audit.db*")]
        assert blobs and sum(len(b) for b in blobs) > 0
    else:
        blobs = [json.dumps(audit_query(audited.source), default=str).encode()]
    assert len(audited.vault_keys) >= 2
    for secret in secrets:
        for blob in blobs:
            assert secret.encode() not in blob
        assert secret not in kb.log()
    raw = audit_query(audited.source, "SELECT * FROM audit WHERE code = 'raw_secret_refused'")
    assert raw and all(r["key_id"] is None for r in raw)


def test_debug_bodies_are_recorded_with_credentials_redacted(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, extra_args=["--set", "keybrake_audit_bodies=true"]
    )
    key = kb.issue_key(daily_usd_cap="10")
    # A worker that pastes the real secret into a field: the fake echoes metadata back.
    r = httpx.post(
        PI,
        data=charge(150, **{"metadata[note]": f"oops {fake_stripe.secret}"}),
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    (row,) = wait_rows(kb.data_dir / "audit.db", "SELECT * FROM audit", 1)
    assert row["outcome"] == "ok"
    assert "amount=150" in row["request_body"]
    assert r.json()["id"] in row["response_body"]
    assert "[redacted]" in row["request_body"] and "[redacted]" in row["response_body"]
    for p in kb.data_dir.glob("audit.db*"):
        data = p.read_bytes()
        assert fake_stripe.secret.encode() not in data
        assert key["vault_key"].encode() not in data


# -- shutdown under load -------------------------------------------------------------------------
class Hammer:
    """Threads posting charges through proxies until stopped; counts answers received."""

    def __init__(self, targets: list[tuple[KeybrakeProcess, str]], threads_each: int) -> None:
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.received: dict[int, int] = {}
        self.statuses: dict[int, int] = {}
        self.threads = [
            threading.Thread(target=self._run, args=(i, kb, vault_key), daemon=True)
            for i, (kb, vault_key) in enumerate(targets)
            for _ in range(threads_each)
        ]
        for i in range(len(targets)):
            self.received[i] = 0

    def _run(self, i: int, kb: KeybrakeProcess, vault_key: str) -> None:
        with httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context(), timeout=15) as client:
            while not self.stop_flag.is_set():
                try:
                    r = client.post(
                        PI, data=charge(100), headers={"Authorization": f"Bearer {vault_key}"}
                    )
                except httpx.HTTPError:
                    time.sleep(0.02)
                    continue
                with self.lock:
                    self.received[i] += 1
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

    def start(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.received.values()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(self.received.values()) >= n, "the proxy answered too few requests"

    def join(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(20)
            assert not t.is_alive()


async def drain_outbox_of(kb: KeybrakeProcess) -> int:
    """Move the rows left in a stopped proxy's SQLite store outbox to its ``audit.db``."""
    store = SQLiteStore(kb.data_dir / "keybrake.db")
    sink = SQLiteAuditSink(kb.data_dir / "audit.db")
    await store.open()
    try:
        return await drain_outbox(store, sink)
    finally:
        sink.close()
        await store.close()


def test_sigterm_under_load_writes_a_row_for_every_answer(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    key = kb.issue_key(daily_usd_cap="100000")
    hammer = Hammer([(kb, key["vault_key"])], threads_each=8).start()
    hammer.wait_for(150)
    assert kb.stop(signal.SIGTERM) == 0
    hammer.join()
    received = hammer.received[0]
    # Calls answered after shutdown's last move to the audit log wait in the store's outbox
    # (durably) until the next start; a reader moves them first, as `keybrake audit` does.
    asyncio.run(drain_outbox_of(kb))
    rows = audit_query(kb.data_dir / "audit.db")
    assert hammer.statuses.get(200, 0) > 100
    # Every answer a client received has its row. A request whose answer the proxy wrote
    # while shutting down may not reach its client (8 threads: at most 8 such rows).
    assert received <= len(rows) <= received + 8, (
        f"{len(rows)} rows for {received} answers {hammer.statuses}"
    )
    assert "audit flushed" in kb.log()
    assert "Traceback" not in kb.log()  # connections still open at the stop are no error
    # Every charge the vendor made is on a row; rows for requests that never got their
    # answer (if any) are `unknown`, never `ok`.
    ok_ids = {r["vendor_request_id"] for r in rows if r["outcome"] == "ok"}
    charged = {e.request_id for e in fake_stripe.ledger if e.status == 200}
    assert ok_ids <= charged


def cli_keys(data_dir: Path, store: str = "") -> list[dict[str, Any]]:
    args = [str(KEYBRAKE), "keys", "list", "--data-dir", str(data_dir), "--json"]
    if store:
        args += ["--store", store]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)
    data: list[dict[str, Any]] = json.loads(out.stdout)
    return data


def test_kill_9_loses_at_most_one_batch_and_the_ledger_holds(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    key = kb.issue_key(daily_usd_cap="100000")
    hammer = Hammer([(kb, key["vault_key"])], threads_each=8).start()
    hammer.wait_for(150)
    kb.stop(signal.SIGKILL)
    hammer.join()
    received = hammer.received[0]
    rows = audit_query(kb.data_dir / "audit.db")
    # Lost: at most one batch. Extra: a row may be written for a call whose answer was still
    # on its way when the process died (at most one per client thread); the vendor did it.
    assert received - 200 <= len(rows) <= received + 8, (len(rows), received)
    (listed,) = [k for k in cli_keys(kb.data_dir) if k["key_id"] == key["key_id"]]
    assert micros(listed["spent_today_usd"]) >= fake_stripe.charged_usd_micros() > 0
    # Rows that were written are exact: every ok row is a charge the vendor made.
    charged = {e.request_id for e in fake_stripe.ledger if e.status == 200}
    assert {r["vendor_request_id"] for r in rows if r["outcome"] == "ok"} <= charged


@pytest.mark.redis
def test_two_replicas_share_redis_and_postgresql(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    postgres_audit_url: str,
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    extra = ["--set", f"keybrake_audit={postgres_audit_url}"]
    a: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store, extra_args=extra)
    b: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store, extra_args=extra)
    key = a.issue_key(daily_usd_cap="100000", agent_run_label="replicas/run")
    hammer = Hammer([(a, key["vault_key"]), (b, key["vault_key"])], threads_each=4).start()
    hammer.wait_for(150)
    hammer.join()
    # Both replicas flush their batches to the one table on shutdown.
    stops: list[Callable[[], Any]] = [a.stop, b.stop]
    threads = [threading.Thread(target=s) for s in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rows = audit_query(postgres_audit_url)
    assert len(rows) == sum(hammer.received.values()), (len(rows), hammer.received)
    per_instance: dict[str, int] = {}
    for r in rows:
        per_instance[r["instance"]] = per_instance.get(r["instance"], 0) + 1
    assert sorted(per_instance.values()) == sorted(hammer.received.values())
    assert all(v > 0 for v in hammer.received.values())
    # One log for both: ok rows are exactly the vendor's answered charges, and their sum is
    # the key's spend in the shared store.
    ok_ids = [r["vendor_request_id"] for r in rows if r["outcome"] == "ok"]
    answered = [e.request_id for e in fake_stripe.ledger if e.status == 200]
    assert len(ok_ids) == len(set(ok_ids))
    assert set(ok_ids) <= set(answered)
    (listed,) = [k for k in cli_keys(a.data_dir, store) if k["key_id"] == key["key_id"]]
    assert sum(r["actual_micros"] or 0 for r in rows) == micros(listed["spent_today_usd"])
    assert micros(listed["spent_today_usd"]) >= fake_stripe.charged_usd_micros()


def test_keybrake_audit_env_is_honoured_by_the_proxy_like_by_the_reports(
    keybrake_factory: Any, fake_stripe: FakeStripe, postgres_audit_url: str
) -> None:
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, env={"KEYBRAKE_AUDIT": postgres_audit_url}
    )
    key = kb.issue_key(daily_usd_cap="10")
    r = httpx.post(
        PI,
        data=charge(150),
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )
    assert r.status_code == 200
    kb.stop()
    out = subprocess.run(
        [str(KEYBRAKE), "audit", "--data-dir", str(kb.data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**kb.env, "KEYBRAKE_AUDIT": postgres_audit_url},
        check=True,
    )
    assert [row["key_id"] for row in json.loads(out.stdout)] == [key["key_id"]]
