"""``GET /metrics``: Prometheus text from a real proxy, scraped before and after real calls."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import stripe
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import REDIS_URL, KeybrakeProcess
from tests.fakes import FakeStripe

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


def test_metrics_need_the_admin_token(kb: KeybrakeProcess) -> None:
    assert httpx.get(f"{kb.admin_url}/metrics").status_code == 401
    wrong = {"Authorization": "Bearer kba_wrong"}
    assert httpx.get(f"{kb.admin_url}/metrics", headers=wrong).status_code == 401


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
