"""A vault key's request-rate limit, end to end: real proxies, the stripe SDK, the fake's ledger.

A pipeline with a bug may send 100,000 requests. The dollar cap stops paid calls; the
request-rate limit stops the rest (reads, refused calls the vendor would still count) before
they use up the vendor account's own rate limit, which every other worker shares.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.e2e.test_audit import wait_rows
from tests.e2e.test_caps_concurrency import run_hammer
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e


def test_stripe_sdk_over_the_request_rate_is_refused_before_the_vendor(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = keybrake_stripe
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    key = kb.issue_key(
        daily_usd_cap=100,
        allowed_endpoints=["POST /v1/payment_intents", "GET /v1/payment_intents/{id}"],
        max_requests_per_minute=5,
    )
    assert key["max_requests_per_minute"] == 5
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    pi = sc.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})
    for _ in range(4):  # reads are free, but they count
        assert sc.v1.payment_intents.retrieve(pi.id).id == pi.id
    refusals: list[stripe.RateLimitError] = []
    for call in (
        lambda: sc.v1.payment_intents.retrieve(pi.id),
        lambda: sc.v1.payment_intents.create(params={"amount": 500, "currency": "usd"}),
    ):
        with pytest.raises(stripe.RateLimitError) as e:
            call()
        refusals.append(e.value)

    # Exactly the five counted calls reached Stripe; the refused ones never did.
    assert len(fake_stripe.ledger) == 5
    assert [x.method for x in fake_stripe.ledger] == ["POST"] + ["GET"] * 4
    for err in refusals:
        assert err.http_status == 429
        assert err.headers is not None
        assert err.headers.get("X-Keybrake-Error") == "rate_limited"
        assert err.headers.get("X-Keybrake-Cap-Hit") is None  # not a budget: retry later
        retry_after = int(err.headers["Retry-After"])
        assert 1 <= retry_after <= 65  # a minute and up to one 5-second bucket
        assert err.json_body is not None
        body: dict[str, Any] = err.json_body["error"]
        assert body["code"] == "rate_limited"
        assert body["max_requests_per_minute"] == 5
        assert body["retry_after_s"] == retry_after
        assert f"limited to 5 requests per minute; retry in {retry_after}s" in body["message"]

    # Nothing was reserved for the refused create: only the first intent counts, held since
    # it was not confirmed (a browser could still confirm it).
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert detail["spent_today_usd"] == "5.00"
    assert detail["budgets"][0]["spent_usd"] == "0.00"
    assert detail["budgets"][0]["reserved_usd"] == "5.00"
    # Every answer is audited: five forwarded, two refused with the key and the code.
    rows = wait_rows(
        kb.data_dir / "audit.db",
        f"SELECT * FROM audit WHERE key_id = '{key['key_id']}' ORDER BY id",
        want=7,
    )
    assert [(r["outcome"], r["code"], r["status"]) for r in rows[5:]] == [
        ("refused", "rate_limited", 429),
        ("refused", "rate_limited", 429),
    ]
    # The unconfirmed intent is held by its create; the reads are ok.
    assert [r["outcome"] for r in rows[:5]] == ["held"] + ["ok"] * 4
    # Another key of the same vendor is not slowed down by this one.
    other = kb.issue_key(max_requests_per_minute=5)
    sc2 = stripe.StripeClient(other["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    assert sc2.v1.payment_intents.create(params={"amount": 100, "currency": "usd"}).id


def test_a_key_issued_without_a_rate_gets_the_vendor_policy_default(
    keybrake_stripe: KeybrakeProcess,
) -> None:
    key = keybrake_stripe.issue_key()
    shipped = (keybrake_stripe.policies / "stripe.yaml").read_text()
    assert f"\nmax_requests_per_minute: {key['max_requests_per_minute']}\n" in shipped
    listed = keybrake_stripe.admin("GET", "/vault/keys").json()
    assert [k["max_requests_per_minute"] for k in listed["data"]] == [
        key["max_requests_per_minute"]
    ]


@pytest.mark.redis
def test_two_replicas_on_redis_share_one_request_rate(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    a: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    b: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    key = a.issue_key(daily_usd_cap=1000, max_requests_per_minute=25)
    vk = key["vault_key"]

    outcomes, _ = run_hammer([(a, vk), (b, vk)], total=120, concurrency=16)

    codes = Counter(o.error["code"] if o.error else o.status for o in outcomes)
    assert codes == {200: 25, "rate_limited": 95}, codes
    # Both replicas let calls through, and together exactly the limit reached Stripe.
    assert {o.proxy for o in outcomes if o.status == 200} == {0, 1}
    charges = [e for e in fake_stripe.ledger if e.method == "POST"]
    assert len(charges) == 25
    assert fake_stripe.charged_usd_micros() == 25 * 1_000_000
