"""Base-URL mode end to end: the official SDKs pointed at ``<admin listener>/<vendor>``.

No proxy variables and no CA configuration in the SDKs: the worker talks plain HTTP to the
proxy on loopback, and the proxy talks TLS to the (fake) vendor, trusting only the fake's CA
through the policy's ``upstream``. Each vendor shows the three things base-URL mode must
keep from the forward proxy: the real secret is swapped in, the allowlist refuses, and the
spend is recorded. HTTPS base URLs work too (the admin listener detects TLS from clients).
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import resend
import stripe
import trustme
from resend.exceptions import ResendError
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeResend, FakeStripe, FakeTLS, FakeTwilio
from tests.fakes.base import FakeRequest, FakeResponse
from twilio.base.exceptions import TwilioRestException  # type: ignore[import-untyped]
from twilio.http.http_client import TwilioHttpClient  # type: ignore[import-untyped]
from twilio.rest import Client as TwilioClient  # type: ignore[import-untyped]

from keybrake.core.money import format_usd
from keybrake.integrations import (
    call_context,
    is_cap_hit,
    keybrake_error_code,
    requests_session,
    stripe_client,
)

pytestmark = pytest.mark.e2e

PI = "POST /v1/payment_intents"
TWILIO_SEND = "POST /2010-04-01/Accounts/{AccountSid}/Messages.json"
TWILIO_LIST = "GET /2010-04-01/Accounts/{AccountSid}/Messages.json"
ANY_SID = "AC" + "0" * 32  # the proxy puts the real Account SID into the path
US_SEGMENT = 8_300  # policies/twilio.yaml: one US segment


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base-URL worker has no proxy settings and no CA bundle: remove any from the env."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def stripe_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave the stripe module as a fresh worker would have it after the test."""
    for name in ("api_key", "api_base", "default_http_client", "proxy", "max_network_retries"):
        monkeypatch.setattr(stripe, name, getattr(stripe, name))
    monkeypatch.setattr(stripe, "default_http_client", None)
    monkeypatch.setattr(stripe, "proxy", None)


def spent(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return str(detail["spent_today_usd"])


def charge_params(cents: int = 100) -> dict[str, Any]:
    return {
        "amount": cents,
        "currency": "usd",
        "confirm": True,
        "payment_method": "pm_card_visa",
    }


def assert_swapped(fake_entries: list[Any], secret_header: str, vault_key: str) -> None:
    assert fake_entries
    for entry in fake_entries:
        assert entry.header("Authorization") == secret_header
        assert vault_key not in json.dumps(entry.headers)
        assert not any(h.lower().startswith("x-keybrake") for h in entry.headers)


# -- Stripe ------------------------------------------------------------------------------------


def test_stripe_module_style_api_base(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, stripe_module: None
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="10")
    stripe.api_key = key["vault_key"]
    stripe.api_base = f"{kb.admin_url}/stripe"
    pi = stripe.PaymentIntent.create(**charge_params(250))
    assert pi.status == "succeeded"
    assert_swapped(fake_stripe.ledger, f"Bearer {fake_stripe.secret}", key["vault_key"])

    with pytest.raises(stripe.PermissionError) as refused:
        stripe.Refund.create(payment_intent=pi.id, amount=100)
    assert refused.value.json_body["error"]["code"] == "endpoint_not_allowed"
    assert len(fake_stripe.ledger) == 1
    assert spent(kb, key) == format_usd(fake_stripe.charged_usd_micros()) == "2.50"


def test_stripe_client_base_addresses_cap_hit_and_vendor_429(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="2")
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": f"{kb.admin_url}/stripe"}, max_network_retries=0
    )
    for _ in range(2):
        client.v1.payment_intents.create(params=charge_params(100))
    with pytest.raises(stripe.RateLimitError) as capped:
        client.v1.payment_intents.create(params=charge_params(100))
    assert capped.value.headers is not None
    assert capped.value.headers.get("X-Keybrake-Cap-Hit") == "true"
    assert is_cap_hit(capped.value) and keybrake_error_code(capped.value) == "cap_exhausted"

    # Stripe's own 429 is not a cap hit: it stays retryable.
    roomy = kb.issue_key(daily_usd_cap="5")
    other = stripe.StripeClient(
        roomy["vault_key"], base_addresses={"api": f"{kb.admin_url}/stripe"}, max_network_retries=0
    )
    fake_stripe.rate_limit_next(1)
    with pytest.raises(stripe.RateLimitError) as vendor_429:
        other.v1.payment_intents.create(params=charge_params(100))
    assert not is_cap_hit(vendor_429.value) and keybrake_error_code(vendor_429.value) is None
    assert spent(kb, key) == "2.00" and spent(kb, roomy) == "0.00"
    assert fake_stripe.charged_usd_micros() == 2_000_000
    assert_swapped(fake_stripe.ledger, f"Bearer {fake_stripe.secret}", key["vault_key"])


def test_stripe_client_helper_sends_the_call_context(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="5", agent_run_label="base-url/context")
    client = stripe_client(key["vault_key"], kb.admin_url)
    with call_context(actor="nightly_billing", message_id="msg-42"):
        client.v1.payment_intents.create(
            params=charge_params(100), options={"idempotency_key": "msg-42"}
        )
    rows = kb.admin("GET", "/vault/audit?label=base-url/context").json()["data"]
    for _ in range(50):
        if rows:
            break
        time.sleep(0.1)
        rows = kb.admin("GET", "/vault/audit?label=base-url/context").json()["data"]
    assert [(r["actor"], r["message_id"], r["idempotency_key"]) for r in rows] == [
        ("nightly_billing", "msg-42", "msg-42")
    ]
    assert_swapped(fake_stripe.ledger, f"Bearer {fake_stripe.secret}", key["vault_key"])


# -- Resend -------------------------------------------------------------------------------------


@pytest.fixture
def fake_resend_priced(fake_tls: FakeTLS) -> Iterator[FakeResend]:
    with FakeResend(fake_tls, price_per_recipient_usd_micros=900) as f:
        yield f


def test_resend_api_url(
    keybrake_factory: Any, fake_resend_priced: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_resend_priced
    kb: KeybrakeProcess = keybrake_factory({"resend": fake})
    key = kb.issue_key(
        vendor="resend",
        daily_usd_cap="1",
        allowed_endpoints=["POST /emails"],
        agent_run_label="mailer/base-url",
    )
    monkeypatch.setattr(resend, "api_key", key["vault_key"])
    monkeypatch.setattr(resend, "api_url", f"{kb.admin_url}/resend")
    sent = resend.Emails.send(
        {
            "from": "Acme <onboarding@acme.dev>",
            "to": ["a@example.com", "b@example.com"],
            "subject": "hi",
            "text": "hello",
        }
    )
    assert sent["id"]
    assert_swapped(fake.ledger, f"Bearer {fake.api_key}", key["vault_key"])
    with pytest.raises(ResendError) as refused:
        resend.Emails.get(sent["id"])
    assert str(refused.value.code) == "403"
    assert refused.value.headers.get("X-Keybrake-Error") == "endpoint_not_allowed"
    assert keybrake_error_code(refused.value) == "endpoint_not_allowed"
    assert len(fake.ledger) == 1
    assert spent(kb, key) == format_usd(fake.charged_usd_micros()) == "0.0018"


# -- Twilio -------------------------------------------------------------------------------------


@pytest.fixture
def fake_twilio_priced(fake_tls: FakeTLS) -> Iterator[FakeTwilio]:
    with FakeTwilio(fake_tls, price_per_segment_usd_micros=US_SEGMENT) as f:
        yield f


def twilio_client(kb: KeybrakeProcess, vault_key: str) -> TwilioClient:
    """The supported way for twilio 9: the API domain's ``base_url`` points at the proxy.

    The session comes from `requests_session` so that cap hits can be told apart from
    Twilio's own 429s (TwilioRestException keeps no response headers).
    """
    http = TwilioHttpClient()
    http.session = requests_session()
    client = TwilioClient(ANY_SID, vault_key, http_client=http, environment={})
    client.api.base_url = f"{kb.admin_url}/twilio"
    return client


def test_twilio_base_url_paging_stays_on_the_proxy(
    keybrake_factory: Any, fake_twilio_priced: FakeTwilio
) -> None:
    fake = fake_twilio_priced
    kb: KeybrakeProcess = keybrake_factory({"twilio": fake})
    key = kb.issue_key(
        vendor="twilio",
        daily_usd_cap="0.05",
        allowed_endpoints=[TWILIO_SEND, TWILIO_LIST],
        agent_run_label="notify/base-url",
    )
    client = twilio_client(kb, key["vault_key"])
    for i in range(5):
        client.messages.create(to="+14155550123", from_="+15017122661", body=f"hello {i}")
    listed = client.messages.list(page_size=2)
    assert len(listed) == 5
    lists = [e for e in fake.ledger if e.method == "GET"]
    assert len(lists) == 3  # every page came through the proxy, with the real credentials
    real = base64.b64encode(f"{fake.account_sid}:{fake.auth_token}".encode()).decode()
    assert_swapped(fake.ledger, f"Basic {real}", key["vault_key"])
    assert all(e.path.startswith(f"/2010-04-01/Accounts/{fake.account_sid}/") for e in lists)

    with pytest.raises(TwilioRestException) as refused:
        client.messages(fake.ledger[0].object_id).delete()
    assert refused.value.status == 403
    assert keybrake_error_code(refused.value) == "endpoint_not_allowed"

    # $0.05 - 5 x $0.0083 leaves $0.0085: one more fits, the next one is a cap hit.
    client.messages.create(to="+14155550123", from_="+15017122661", body="six")
    with pytest.raises(TwilioRestException) as capped:
        client.messages.create(to="+14155550123", from_="+15017122661", body="seven")
    assert capped.value.status == 429 and is_cap_hit(capped.value)
    fake.rate_limit_next(1)
    roomy = kb.issue_key(
        vendor="twilio",
        daily_usd_cap="1",
        allowed_endpoints=[TWILIO_SEND],
        agent_run_label="notify/base-url",
    )
    with pytest.raises(TwilioRestException) as vendor_429:
        twilio_client(kb, roomy["vault_key"]).messages.create(
            to="+14155550123", from_="+15017122661", body="eight"
        )
    assert vendor_429.value.status == 429 and not is_cap_hit(vendor_429.value)
    assert spent(kb, key) == format_usd(fake.charged_usd_micros()) == format_usd(6 * US_SEGMENT)


class AbsoluteLinksTwilio(FakeTwilio):
    """Answers list pages with absolute ``https://api.twilio.com/...`` page links."""

    def handle(self, req: FakeRequest) -> FakeResponse:
        resp = super().handle(req)
        if req.method != "GET" or resp.status != 200:
            return resp
        body = json.loads(resp.body)
        for name in ("uri", "first_page_uri", "next_page_uri", "previous_page_uri"):
            if isinstance(body.get(name), str) and body[name].startswith("/"):
                body[name] = "https://api.twilio.com" + body[name]
        resp.body = json.dumps(body).encode()
        return resp


def test_twilio_absolute_page_links_are_rewritten_to_stay_on_the_proxy(
    keybrake_factory: Any, fake_tls: FakeTLS
) -> None:
    with AbsoluteLinksTwilio(fake_tls, price_per_segment_usd_micros=US_SEGMENT) as fake:
        kb: KeybrakeProcess = keybrake_factory({"twilio": fake})
        key = kb.issue_key(
            vendor="twilio",
            daily_usd_cap="1",
            allowed_endpoints=[TWILIO_SEND, TWILIO_LIST],
            agent_run_label="notify/links",
        )
        client = twilio_client(kb, key["vault_key"])
        for i in range(3):
            client.messages.create(to="+14155550123", from_="+15017122661", body=f"hi {i}")
        page = httpx.get(
            f"{kb.admin_url}/twilio/2010-04-01/Accounts/{ANY_SID}/Messages.json?PageSize=2",
            auth=(ANY_SID, key["vault_key"]),
            timeout=10,
        )
        assert page.status_code == 200, page.text
        next_uri = page.json()["next_page_uri"]
        # The SDK joins next_page_uri to its base URL: it must come back relative (or the
        # SDK would leave the proxy). Checked before following, so nothing leaves loopback.
        assert next_uri.startswith("/2010-04-01/"), next_uri
        assert len(client.messages.list(page_size=2)) == 3
        assert len([e for e in fake.ledger if e.method == "GET"]) == 3


# -- HTTPS base URLs ------------------------------------------------------------------------------


def test_https_base_url_with_a_certificate_from_the_keybrake_ca(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, stripe_module: None
) -> None:
    """The admin listener answers TLS with a Keybrake-CA certificate for the name asked for.

    The worker trusts the Keybrake CA bundle (a private CA: this is the one CA setting).
    """
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="3")
    stripe.ca_bundle_path = str(kb.bundle)
    client = stripe.StripeClient(
        key["vault_key"], base_addresses={"api": f"https://localhost:{kb.admin_port}/stripe"}
    )
    assert client.v1.payment_intents.create(params=charge_params(300)).status == "succeeded"
    with pytest.raises(stripe.RateLimitError) as capped:
        client.v1.payment_intents.create(params=charge_params(100))
    assert is_cap_hit(capped.value)
    assert spent(kb, key) == format_usd(fake_stripe.charged_usd_micros()) == "3.00"
    https = f"https://localhost:{kb.admin_port}"
    with pytest.raises(httpx.ConnectError):  # nobody else's CA vouches for it
        httpx.get(f"{https}/healthz", verify=fake_stripe.tls.client_context())


def test_https_base_url_with_a_given_certificate_and_key(
    tmp_path: Path,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    fake_stripe: FakeStripe,
    stripe_module: None,
) -> None:
    """An operator's own certificate for the proxy's name, through mitmproxy's ``certs`` option
    (here in ``<certs dir>/config.yaml``; ``keybrake run -- --set certs=NAME=PEM`` is the same).
    """
    own_ca = trustme.CA(organization_name="Operator CA")
    pem = tmp_path / "proxy.pem"
    own_ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    own_ca_pem = tmp_path / "operator-ca.pem"
    own_ca.cert_pem.write_to_path(str(own_ca_pem))
    certs = tmp_path / "certs"
    shutil.copytree(keybrake_certs, certs)
    (certs / "config.yaml").write_text(json.dumps({"certs": [f"localhost={pem}"]}))
    workdir = tmp_path / "kb"
    workdir.mkdir()
    kb = KeybrakeProcess(workdir, certs, {"stripe": fake_stripe}, fake_tls).start()
    try:
        key = kb.issue_key(daily_usd_cap="3")
        stripe.ca_bundle_path = str(own_ca_pem)
        client = stripe.StripeClient(
            key["vault_key"], base_addresses={"api": f"https://localhost:{kb.admin_port}/stripe"}
        )
        assert client.v1.payment_intents.create(params=charge_params(100)).status == "succeeded"
        assert spent(kb, key) == format_usd(fake_stripe.charged_usd_micros()) == "1.00"
        assert_swapped(fake_stripe.ledger, f"Bearer {fake_stripe.secret}", key["vault_key"])
    finally:
        kb.stop()
