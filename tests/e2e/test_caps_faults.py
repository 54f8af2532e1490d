"""The spend ledger when things go wrong, end to end through real ``keybrake run`` processes.

- the proxy is killed (``kill -9``) while a charge is at the vendor: after a restart the
  budget counts that charge (conservative), exactly once (consistent);
- the Redis store goes away: calls fail closed with ``503 store_unavailable`` and reach no
  vendor; when Redis is back the same proxy process works again;
- vendor refusals (Stripe's own 429, a declined card) release the reservation and pass
  through unchanged, without the cap header;
- pricing: confirm/capture without an amount use the amount remembered from an earlier
  response; unknown objects and currencies are refused; zero- and three-decimal currencies
  are converted exactly with the policy's FX table.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests._redis import PrivateRedis
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS

pytestmark = pytest.mark.e2e

STRIPE = "https://api.stripe.com"
USD = 1_000_000


def charge(
    kb: KeybrakeProcess,
    vault_key: str,
    amount: int | str,
    currency: str = "usd",
    path: str = "/v1/payment_intents",
    timeout: float = 30,
    **extra: str | None,
) -> httpx.Response:
    """One form-encoded Stripe call through the forward proxy (a charge by default)."""
    data: dict[str, str] = {}
    if path == "/v1/payment_intents":
        data = {
            "amount": str(amount),
            "currency": currency,
            "confirm": "true",
            "payment_method": "pm_card_visa",
        }
    for name, value in extra.items():  # None removes a default field
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return httpx.post(
        STRIPE + path,
        data=data,
        headers={"Authorization": f"Bearer {vault_key}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=timeout,
    )


def key_budget(kb: KeybrakeProcess, key_id: str) -> dict[str, Any]:
    """The key's own daily budget row from ``GET /vault/keys/{id}``, plus spent_today_usd."""
    r = kb.admin("GET", f"/vault/keys/{key_id}")
    assert r.status_code == 200, r.text
    detail = r.json()
    row: dict[str, Any] = dict(detail["budgets"][0])
    assert row["scope"] == f"key:{key_id}"
    row["spent_today_usd"] = detail["spent_today_usd"]
    return row


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def refusal_code(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


# ------------------------------------------------------------------------------------ crash


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_kill_9_mid_request_keeps_the_budget_conservative_and_consistent(
    backend: str,
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}" if backend == "redis" else ""
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    key = kb.issue_key(daily_usd_cap=50)
    vk = key["vault_key"]
    assert charge(kb, vk, 200).status_code == 200  # $2 settled before the crash

    # A $5 charge goes out; the fake executes it (the money moves) and then holds its answer.
    fake_stripe.delay_seconds = 2.0
    charged = threading.Event()
    vendor_wait = fake_stripe.wait_delay

    def note_charge_then_wait(req: Any) -> None:
        charged.set()  # wait_delay runs right after the vendor logic
        vendor_wait(req)

    monkeypatch.setattr(fake_stripe, "wait_delay", note_charge_then_wait)
    errors: list[BaseException] = []

    def in_flight() -> None:
        try:
            charge(kb, vk, 500)
        except httpx.HTTPError as e:  # the proxy dies under this request
            errors.append(e)

    client = threading.Thread(target=in_flight)
    client.start()
    assert charged.wait(15), "the charge never reached the vendor"
    assert key_budget(kb, key["key_id"])["reserved_usd"] == "5.00"
    assert kb.stop(signal.SIGKILL) == -signal.SIGKILL
    client.join(15)
    assert not client.is_alive()
    assert errors, "the client must not get an answer from a killed proxy"
    # The vendor charged the in-flight call after the proxy died.
    wait_for(lambda: len(fake_stripe.ledger) == 2, 10, "the vendor to finish the charge")
    fake_stripe.delay_seconds = 0
    assert fake_stripe.charged_usd_micros() == 7 * USD

    # Restart on the same data dir (and store): the crashed call's $5 is counted, once.
    kb2: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=store, data_dir=kb.data_dir
    )
    after = key_budget(kb2, key["key_id"])
    # >= the vendor's $7.00, and not $12 (counted twice).
    assert after["spent_today_usd"] == "7.00"
    assert after["remaining_usd"] == "43.00"
    if backend == "sqlite":
        # One process owns the file: everything left open at start was the crashed process's
        # and is turned into spent at once.
        assert "left open by a crash are now counted as spent" in kb2.log()
        assert (after["spent_usd"], after["reserved_usd"]) == ("7.00", "0.00")
    else:
        # Other replicas may still have calls in flight, so a replica only recovers
        # reservations older than its grace period; until then the $5 stays reserved, which
        # counts against the cap just the same.
        assert (after["spent_usd"], after["reserved_usd"]) == ("2.00", "5.00")

    # New calls work and add to the same ledger.
    r = charge(kb2, vk, 100)
    assert r.status_code == 200, r.text
    assert r.headers["X-Keybrake-Spent-Usd"] == "8.00"
    assert r.headers["X-Keybrake-Remaining-Usd"] == "42.00"

    # A second (clean) restart changes nothing: the crashed call stays counted once.
    kb2.stop()
    kb3: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=store, data_dir=kb.data_dir
    )
    assert "left open by a crash" not in kb3.log()
    again = key_budget(kb3, key["key_id"])
    assert again["spent_today_usd"] == "8.00"
    assert again["reserved_usd"] == ("0.00" if backend == "sqlite" else "5.00")
    assert fake_stripe.charged_usd_micros() == 8 * USD


# ------------------------------------------------------------------------------- redis outage


@pytest.mark.redis
def test_redis_outage_fails_closed_and_recovers_without_restart(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    private_redis: PrivateRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = private_redis.port
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=f"redis://127.0.0.1:{port}/0"
    )
    key = kb.issue_key(daily_usd_cap=20)
    ok = charge(kb, key["vault_key"], 100)
    assert ok.status_code == 200, ok.text
    assert len(fake_stripe.ledger) == 1

    private_redis.stop()

    # Raw HTTP: fail closed, quickly, the vendor is not contacted.
    started = time.monotonic()
    r = charge(kb, key["vault_key"], 100)
    assert time.monotonic() - started < 5
    assert r.status_code == 503
    assert refusal_code(r) == "store_unavailable"
    assert r.headers["X-Keybrake-Error"] == "store_unavailable"
    assert "X-Keybrake-Cap-Hit" not in r.headers
    # The stripe SDK sees the refusal and does not retry it.
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=2)
    before = kb.count_requests("POST", "/v1/payment_intents")
    with pytest.raises(stripe.StripeError) as e:
        sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert e.value.http_status == 503
    body: Any = e.value.json_body
    assert body["error"]["code"] == "store_unavailable"
    assert kb.count_requests("POST", "/v1/payment_intents") == before + 1
    assert len(fake_stripe.ledger) == 1
    # The admin side fails closed too.
    assert httpx.get(f"{kb.admin_url}/readyz", timeout=10).status_code == 503
    issue = kb.admin("POST", "/vault/keys", {**_key_body(), "daily_usd_cap": 5})
    assert issue.status_code == 503
    assert refusal_code(issue) == "store_unavailable"

    # Redis comes back (empty: nothing was persisted); the same proxy process recovers.
    private_redis.start()
    wait_for(
        lambda: httpx.get(f"{kb.admin_url}/readyz", timeout=10).status_code == 200,
        10,
        "the proxy to see Redis again",
    )
    gone = charge(kb, key["vault_key"], 100)
    assert gone.status_code == 401
    assert refusal_code(gone) == "vault_key_unknown"
    fresh = kb.issue_key(daily_usd_cap=5)
    r2 = charge(kb, fresh["vault_key"], 100)
    assert r2.status_code == 200, r2.text
    assert r2.headers["X-Keybrake-Spent-Usd"] == "1.00"
    assert r2.headers["X-Keybrake-Remaining-Usd"] == "4.00"
    assert len(fake_stripe.ledger) == 2
    assert kb.proc is not None and kb.proc.poll() is None  # never restarted


def _key_body() -> dict[str, Any]:
    return {
        "vendor": "stripe",
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "1h",
        "agent_run_label": "test/faults",
    }


# --------------------------------------------------------------------------- vendor refusals


def test_stripe_rate_limit_passes_through_without_cap_header_and_releases(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=5)
    fake_stripe.rate_limit_next(1)
    r = charge(kb, key["vault_key"], 500)
    assert r.status_code == 429
    # Stripe's own 429: its body and headers, not a Keybrake refusal.
    assert "X-Keybrake-Cap-Hit" not in r.headers
    assert "X-Keybrake-Error" not in r.headers
    assert r.headers["Request-Id"].startswith("req_")
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "rate_limit"
    assert fake_stripe.ledger[0].fault == "rate_limit"
    # The $5 reservation was released: the whole $5 cap is still there.
    b = key_budget(kb, key["key_id"])
    assert (b["spent_usd"], b["reserved_usd"], b["remaining_usd"]) == ("0.00", "0.00", "5.00")
    r2 = charge(kb, key["vault_key"], 500)
    assert r2.status_code == 200, r2.text
    assert r2.headers["X-Keybrake-Remaining-Usd"] == "0.00"
    assert fake_stripe.charged_usd_micros() == 5 * USD


def test_card_declined_releases_the_reservation(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=5)
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    with pytest.raises(stripe.CardError) as e:
        sc.v1.payment_intents.create(
            params={
                "amount": 500,
                "currency": "usd",
                "confirm": True,
                "payment_method": "pm_card_chargeDeclined",
            }
        )
    assert e.value.http_status == 402
    assert e.value.code == "card_declined"
    assert e.value.headers is not None
    assert e.value.headers.get("X-Keybrake-Cap-Hit") is None
    assert fake_stripe.charged_usd_micros() == 0
    b = key_budget(kb, key["key_id"])
    assert (b["spent_usd"], b["reserved_usd"]) == ("0.00", "0.00")
    # Released, so the full $5 can still be charged.
    pi = sc.v1.payment_intents.create(
        params={"amount": 500, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}
    )
    assert pi.status == "succeeded"
    assert key_budget(kb, key["key_id"])["spent_usd"] == "5.00"


# ---------------------------------------------------------------------------------- pricing


def test_confirm_and_capture_without_amount_use_the_remembered_amount(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(
        daily_usd_cap=25,
        allowed_endpoints=[
            "POST /v1/payment_intents",
            "POST /v1/payment_intents/{id}/confirm",
            "POST /v1/payment_intents/{id}/capture",
        ],
    )
    vk = key["vault_key"]
    # Create without confirming: nothing moves yet, but a browser could confirm it with its
    # client_secret: the $20 is held (counted) and remembered.
    created = charge(kb, vk, 2000, confirm=None, payment_method=None)
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "requires_payment_method"
    assert created.headers["X-Keybrake-Spent-Usd"] == "20.00"
    assert key_budget(kb, key["key_id"])["spent_usd"] == "0.00"
    confirm = charge(
        kb, vk, "", path=f"/v1/payment_intents/{created.json()['id']}/confirm",
        payment_method="pm_card_visa",
    )  # fmt: skip
    assert confirm.status_code == 200, confirm.text
    assert confirm.json()["status"] == "succeeded"
    # The confirm used the intent's hold: counted once.
    assert confirm.headers["X-Keybrake-Spent-Usd"] == "20.00"
    assert confirm.headers["X-Keybrake-Remaining-Usd"] == "5.00"
    assert key_budget(kb, key["key_id"])["spent_usd"] == "20.00"

    # Authorise $4 (manual capture): held until captured.
    auth = charge(kb, vk, 400, capture_method="manual")
    assert auth.status_code == 200, auth.text
    assert auth.json()["status"] == "requires_capture"
    assert auth.headers["X-Keybrake-Spent-Usd"] == "24.00"
    # Capture without an amount: priced at the remembered $4 (its hold), settled at what was
    # received.
    captured = charge(kb, vk, "", path=f"/v1/payment_intents/{auth.json()['id']}/capture")
    assert captured.status_code == 200, captured.text
    assert captured.json()["status"] == "succeeded"
    assert captured.headers["X-Keybrake-Spent-Usd"] == "24.00"
    assert fake_stripe.charged_usd_micros() == 24 * USD
    assert key_budget(kb, key["key_id"])["spent_usd"] == "24.00"
    # Another $4 authorisation needs $4 of the $1 left: refused before Stripe sees it.
    before = len(fake_stripe.ledger)
    refused = charge(kb, vk, 400, capture_method="manual")
    assert refused.status_code == 429
    assert refused.headers["X-Keybrake-Cap-Hit"] == "true"
    assert refusal_code(refused) == "cap_exhausted"
    assert refused.json()["error"]["needed_usd"] == "4.00"
    assert len(fake_stripe.ledger) == before


def test_confirm_of_an_unseen_intent_is_refused(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, fake_tls: FakeTLS
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(
        daily_usd_cap=25, allowed_endpoints=["POST /v1/payment_intents/{id}/confirm"]
    )
    # An intent created behind the proxy's back (directly at the vendor).
    direct = httpx.post(
        f"{fake_stripe.url}/v1/payment_intents",
        data={"amount": "1000", "currency": "usd"},
        headers={"Authorization": f"Bearer {fake_stripe.secret}"},
        verify=fake_tls.client_context(),
    )
    assert direct.status_code == 200, direct.text
    pid = direct.json()["id"]
    before = len(fake_stripe.ledger)
    r = charge(kb, key["vault_key"], "", path=f"/v1/payment_intents/{pid}/confirm",
               payment_method="pm_card_visa")  # fmt: skip
    # It is no object of this key's: refused before it could even be priced.
    assert r.status_code == 403
    assert refusal_code(r) == "object_not_owned"
    assert len(fake_stripe.ledger) == before  # not forwarded
    # A key that may confirm any intent ("*") still cannot: the proxy never saw its amount.
    shared = kb.issue_key(
        daily_usd_cap=25, allowed_endpoints=["POST /v1/payment_intents/*/confirm"]
    )
    r = charge(kb, shared["vault_key"], "", path=f"/v1/payment_intents/{pid}/confirm",
               payment_method="pm_card_visa")  # fmt: skip
    assert r.status_code == 403
    assert refusal_code(r) == "unpriced_endpoint"
    assert len(fake_stripe.ledger) == before
    assert key_budget(kb, key["key_id"])["spent_usd"] == "0.00"


@pytest.mark.parametrize("currency", ["xyz", "thb"])
def test_unknown_currency_is_refused(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, currency: str
) -> None:
    """``xyz`` is no currency at all; ``thb`` is real but has no rate in the policy."""
    key = keybrake_stripe.issue_key(daily_usd_cap=25)
    r = charge(keybrake_stripe, key["vault_key"], 1000, currency=currency)
    assert r.status_code == 403
    assert refusal_code(r) == "unknown_currency"
    assert r.headers["X-Keybrake-Error"] == "unknown_currency"
    assert fake_stripe.ledger == []


def test_zero_and_three_decimal_currencies_use_the_policy_fx_table(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    """policies/stripe.yaml: jpy 0.0075, kwd 3.40 USD per unit."""
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=25)
    vk = key["vault_key"]
    # 1,333 yen (zero-decimal: the amount is whole yen) x 0.0075 = $9.9975.
    jpy = charge(kb, vk, 1333, currency="jpy")
    assert jpy.status_code == 200, jpy.text
    assert jpy.headers["X-Keybrake-Spent-Usd"] == "9.9975"
    assert jpy.headers["X-Keybrake-Remaining-Usd"] == "15.0025"
    # 2,340 fils = 2.340 KWD (three-decimal) x 3.40 = $7.956.
    kwd = charge(kb, vk, 2340, currency="kwd")
    assert kwd.status_code == 200, kwd.text
    assert kwd.headers["X-Keybrake-Spent-Usd"] == "17.9535"
    assert kwd.headers["X-Keybrake-Remaining-Usd"] == "7.0465"
    assert [(e.amount_charged_minor, e.currency) for e in fake_stripe.ledger] == [
        (1333, "jpy"),
        (2340, "kwd"),
    ]
    # $7.0465 remains: 940 yen ($7.05) is just over it, 939 yen ($7.0425) just fits.
    over = charge(kb, vk, 940, currency="jpy")
    assert over.status_code == 429
    assert over.json()["error"]["needed_usd"] == "7.05"
    assert over.json()["error"]["remaining_usd"] == "7.0465"
    fits = charge(kb, vk, 939, currency="jpy")
    assert fits.status_code == 200, fits.text
    assert fits.headers["X-Keybrake-Remaining-Usd"] == "0.004"
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert detail["spent_today_usd"] == "24.996"
