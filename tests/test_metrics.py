"""``GET /metrics``: Prometheus text from a real proxy, scraped before and after real calls,
and who may scrape it (the metrics token, loopback, never an admin route with it)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import REDIS_URL, ROOT, KeybrakeProcess
from tests.fakes import FakeStripe

from keybrake.proxy.core import Core, Runtime
from keybrake.proxy.metrics import Metrics
from keybrake.web.admin import AdminApi

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(kb: KeybrakeProcess) -> Samples:
    r = httpx.get(
        f"{kb.admin_url}/metrics",
        headers={"Authorization": f"Bearer {kb.admin_token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(params=["sqlite", "redis"])
def kb(request: pytest.FixtureRequest, keybrake_factory: Any, fake_stripe: FakeStripe) -> Any:
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        return keybrake_factory({"stripe": fake_stripe}, store=f"{REDIS_URL}?prefix={prefix}")
    return keybrake_factory({"stripe": fake_stripe})


def test_without_a_metrics_token_a_loopback_listener_serves_metrics_to_anyone(
    keybrake_stripe: KeybrakeProcess,
) -> None:
    kb = keybrake_stripe
    r = httpx.get(f"{kb.admin_url}/metrics")
    assert r.status_code == 200 and "keybrake_store_up" in r.text
    # Only the metrics: every admin route still needs the admin token.
    assert httpx.get(f"{kb.admin_url}/vault/keys").status_code == 401


def _error(r: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = r.json()["error"]
    return error


def test_a_metrics_token_is_required_once_set_and_opens_nothing_else(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    token = f"kbm_{uuid.uuid4().hex}"
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, env={"KEYBRAKE_METRICS_TOKEN": token}
    )
    url = f"{kb.admin_url}/metrics"
    r = httpx.get(url)
    assert r.status_code == 401 and _error(r)["code"] == "metrics_token_invalid"
    assert "metrics token" in _error(r)["message"]
    for wrong in (f"Bearer {token}x", f"Basic {token}", token):
        r = httpx.get(url, headers={"Authorization": wrong})
        assert r.status_code == 401, wrong
    for good in (token, kb.admin_token):  # the admin token still reads metrics
        r = httpx.get(url, headers={"Authorization": f"Bearer {good}"})
        assert r.status_code == 200 and "keybrake_requests_total" in r.text

    # The metrics token is read-only: no admin route, no dashboard sign-in.
    key = kb.issue_key()
    scraper = {"Authorization": f"Bearer {token}"}
    for method, path in (
        ("GET", "/vault/keys"),
        ("GET", f"/vault/keys/{key['key_id']}"),
        ("DELETE", f"/vault/keys/{key['key_id']}"),
        ("POST", f"/vault/keys/{key['key_id']}/suspend"),
        ("GET", "/vault/spend"),
        ("GET", "/vault/audit"),
        ("PUT", "/vault/budgets/test%2Frun"),
    ):
        r = httpx.request(method, f"{kb.admin_url}{path}", headers=scraper, content=b"{}")
        assert r.status_code == 401 and _error(r)["code"] == "admin_token_invalid", path
    assert kb.admin("GET", f"/vault/keys/{key['key_id']}").json()["status"] == "active"
    r = httpx.post(f"{kb.admin_url}/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = httpx.get(f"{kb.admin_url}/dashboard/summary.json", headers=scraper)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert token not in kb.log()


def test_the_metrics_token_from_a_file(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """What Prometheus reads with ``credentials_file`` may be the very file Keybrake reads."""
    token = f"kbm_{uuid.uuid4().hex}"
    path = tmp_path / "metrics-token"
    path.write_text(token + "\n")
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        extra_args=["--set", f"keybrake_metrics_token_file={path}"],
    )
    url = f"{kb.admin_url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"KEYBRAKE_METRICS_TOKEN": "same"}, [], "must differ from the admin token"),
        ({}, ["--set", "keybrake_metrics_token_file=/nonexistent/metrics-token"], "cannot read"),
        (
            {"KEYBRAKE_METRICS_TOKEN": "kbm_one"},
            ["--set", "keybrake_metrics_token_file=FILE"],
            "not both",
        ),
    ],
)
def test_a_bad_metrics_token_setting_stops_the_proxy_at_start(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    tmp_path: Path,
    env: dict[str, str],
    args: list[str],
    message: str,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("kbm_two\n")
    args = [a.replace("FILE", str(token_file)) for a in args]
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, start=False, env=env, extra_args=args
    )
    if env.get("KEYBRAKE_METRICS_TOKEN") == "same":
        kb.env["KEYBRAKE_METRICS_TOKEN"] = kb.admin_token
    with pytest.raises(RuntimeError, match=message):
        kb.start(timeout=20)


def test_counters_and_histograms_move_with_calls(
    kb: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    backend = "redis" if kb.store else "sqlite"
    before = scrape(kb)
    assert value(before, "keybrake_store_up") == 1
    assert value(before, "keybrake_requests_total") == 0

    key = kb.issue_key(
        daily_usd_cap="100",
        agent_run_label="metrics/run",
        allowed_endpoints=["POST /v1/payment_intents", "POST /v1/payment_intents/{id}/confirm"],
    )
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    pi = sc.v1.payment_intents.create(params={"amount": 2000, "currency": "usd"})
    sc.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    with pytest.raises(stripe.PermissionError):
        sc.v1.refunds.create(params={"payment_intent": pi.id})
    fake_stripe.reset_connection_next(1)  # the vendor never answers: outcome unknown
    with pytest.raises(stripe.APIError):  # mitmproxy answers 502
        sc.v1.payment_intents.create(params={"amount": 300, "currency": "usd"})

    after = scrape(kb)
    req = "keybrake_requests_total"
    # The create is held (a browser could confirm it); the confirm uses that hold.
    assert value(after, req, vendor="stripe", outcome="held", code="") == 1
    assert value(after, req, vendor="stripe", outcome="ok", code="") == 1
    assert value(after, req, outcome="refused", code="endpoint_not_allowed") == 1
    assert value(after, req, outcome="unknown") == 1
    assert value(after, "keybrake_refusals_total", code="endpoint_not_allowed") == 1

    # Spend per label matches what the store counts against the key's cap.
    spent = value(after, "keybrake_spend_micro_usd_total", label="metrics/run")
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert spent == 20_000_000 + 3_000_000
    assert f"{spent / 1_000_000:.2f}" == detail["spent_today_usd"]
    reservations = value(after, "keybrake_reservations_micro_usd_total", label="metrics/run")
    assert reservations >= 20_000_000 + 3_000_000  # create (the confirm used it), lost call
    assert value(after, "keybrake_reserved_micro_usd", label="metrics/run") == 0

    # Histograms: store operations by backend and op, vendor latency by outcome.
    hist = "keybrake_store_latency_seconds_count"
    # One admission per admitted call (create, confirm, the lost call), one settlement per
    # answered or lost call (the create's hold is made in it); the confirm raises the hold.
    assert value(after, hist, backend=backend, op="admit") >= 3
    assert value(after, hist, backend=backend, op="settle_call") >= 3
    assert value(after, hist, backend=backend, op="raise_hold") >= 1
    assert value(after, hist, backend=backend, op="reserve") == 0
    # The key is read once, then kept by the process (its state is read by each admission).
    assert value(after, hist, backend=backend, op="get_key_by_secret_hash") == 1
    assert value(after, "keybrake_store_latency_seconds_bucket", op="admit", le="+Inf") >= 3
    assert value(after, "keybrake_vendor_latency_seconds_count", outcome="held") == 1
    assert value(after, "keybrake_vendor_latency_seconds_count", outcome="ok") == 1
    assert value(after, "keybrake_estimate_overruns_total") == 0
    assert value(after, "keybrake_vendor_latency_seconds_count", outcome="unknown") == 1
    assert value(after, "keybrake_store_errors_total") == 0

    # The audit writer's queue drains; its written total follows the calls.
    assert ("keybrake_audit_queue_depth", frozenset()) in after
    deadline = time.monotonic() + 10
    while value(scrape(kb), "keybrake_audit_rows_written_total") < 4:
        assert time.monotonic() < deadline, "audit rows were not written"
        time.sleep(0.2)
    assert value(scrape(kb), "process_resident_memory_bytes") > 0


# -- who may scrape, per listener address (the addons in taddons, no process) -----------------
UNIT_ADMIN_TOKEN = "kba_metrics_unit_test_token_0123456789"


@dataclass
class Listener:
    """Core, AdminApi and Metrics in one taddons context; `scrape` is ``GET /metrics``."""

    tctx: taddons.context
    admin: AdminApi
    metrics: Metrics

    async def scrape(self, listen: str, auth: str | None = None) -> http.Response:
        req = tutils.treq(method=b"GET", scheme=b"http", host="127.0.0.1", port=1, path=b"/metrics")
        req.headers = http.Headers([(b"Host", b"127.0.0.1:8081")])
        if auth is not None:
            req.headers["Authorization"] = auth
        f = tflow.tflow(req=req)
        f.client_conn.proxy_mode = ProxyMode.parse(f"reverse:http://127.0.0.1:1@{listen}")
        await self.admin.request(f)
        assert f.response is not None
        return f.response


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", UNIT_ADMIN_TOKEN)
    for name in ("KEYBRAKE_METRICS_TOKEN", "KEYBRAKE_METRICS_TOKEN_FILE", "KEYBRAKE_STORE"):
        monkeypatch.delenv(name, raising=False)
    runtime = Runtime()
    core, metrics = Core(runtime), Metrics(runtime)
    admin = AdminApi(runtime, metrics=metrics)
    with taddons.context(core, admin, metrics) as tctx:
        tctx.configure(
            core,
            keybrake_data_dir=str(tmp_path / "data"),
            keybrake_policies=str(ROOT / "policies"),
            keybrake_store=f"sqlite:///{tmp_path / 'data' / 'keybrake.db'}",
            keybrake_shutdown_grace=0.0,
        )
        yield Listener(tctx, admin, metrics)


@pytest.mark.parametrize(
    ("listen", "listen_host", "open_"),
    [
        ("127.0.0.1:8081", "", True),
        ("127.0.0.2:8081", "", True),
        ("[::1]:8081", "", True),
        ("localhost:8081", "", True),
        ("8081", "127.0.0.1", True),  # the listen_host option, when the mode names none
        ("8081", "", False),  # every interface
        ("0.0.0.0:8081", "", False),
        ("[::]:8081", "", False),
        ("10.1.2.3:8081", "127.0.0.1", False),
        ("proxy.internal:8081", "", False),
    ],
)
async def test_without_a_metrics_token_metrics_are_open_only_on_a_loopback_listener(
    listener: Listener, listen: str, listen_host: str, open_: bool
) -> None:
    listener.tctx.options.update(listen_host=listen_host)
    r = await listener.scrape(listen)
    if open_:
        assert r.status_code == 200
        return
    body = json.loads(r.content or b"")
    assert (r.status_code, body["error"]["code"]) == (401, "metrics_token_invalid")
    assert "KEYBRAKE_METRICS_TOKEN" in body["error"]["message"]
    assert "loopback" in body["error"]["message"]
    # The admin token is accepted wherever the listener is.
    assert (await listener.scrape(listen, f"Bearer {UNIT_ADMIN_TOKEN}")).status_code == 200


async def test_with_a_metrics_token_even_loopback_needs_it(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYBRAKE_METRICS_TOKEN", "kbm_unit")
    listener.metrics.configure({"keybrake_metrics_token_file"})
    assert (await listener.scrape("127.0.0.1:8081")).status_code == 401
    assert (await listener.scrape("127.0.0.1:8081", "Bearer kbm_unit")).status_code == 200
    # Wrong guesses count towards the admin listener's per-address limit.
    for _ in range(30):
        await listener.scrape("127.0.0.1:8081", "Bearer kbm_guess")
    assert (await listener.scrape("127.0.0.1:8081", "Bearer kbm_unit")).status_code == 429
