"""A vendor that cannot be reached, and one that does not answer (DESIGN §2, "How it fails").

Never sent: the vendor host does not resolve (a stub name server on a loopback port says
NXDOMAIN; no query leaves the machine), the upstream port refuses the connection (a loopback
port the test binds and never listens on), or the upstream's TLS certificate is not one the
proxy trusts. Each is released and answered ``502 upstream_unreachable`` in the JSON error
contract with the headers that tell SDKs a retry is safe: the real stripe SDK retries twice,
every attempt is audited, and nothing is counted.

Sent, answer lost: the fake charges, then resets the connection. The estimate stays spent,
the answer is ``502 upstream_failed`` and says not to retry: the SDK makes one attempt.

No mitmproxy HTML page reaches the worker in either case, through the forward proxy
(HTTP/1.1 and HTTP/2) or the base-URL listener.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.dns_stub import StubDNS
from tests.fakes import FakeStripe, FakeTLS, make_fake_ca
from tests.fakes.stripe import DEFAULT_SECRET
from tests.reliability.conftest import USD, usd_micros, wait_for
from tests.reliability.test_http2 import H2Tunnel
from tests.reliability.test_http2 import create as h2_create

pytestmark = pytest.mark.e2e

CHARGE = {"amount": 100, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}
FORM = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in CHARGE.items()}


class ClosedStripe(FakeStripe):
    """A Stripe upstream nobody answers: ``url`` names a port that refuses connections."""

    def __init__(self, tls: FakeTLS, port: int) -> None:
        super().__init__(tls)
        self.closed_port = port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.closed_port}"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound and never listened on: connecting to it is refused, and no one
    else can take it while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def stripe_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stripe module as a worker configures it; restored after the test."""
    for name in ("api_key", "api_base", "proxy", "ca_bundle_path", "max_network_retries"):
        monkeypatch.setattr(stripe, name, getattr(stripe, name))
    monkeypatch.setattr(stripe, "default_http_client", None)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def forward_client(kb: KeybrakeProcess, vault_key: str) -> stripe.StripeClient:
    """Through the forward proxy, retrying as production workers are told to."""
    stripe.ca_bundle_path = str(kb.bundle)
    return stripe.StripeClient(vault_key, proxy=kb.proxy_url, max_network_retries=2)


def base_url_client(kb: KeybrakeProcess, vault_key: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        vault_key, base_addresses={"api": f"{kb.admin_url}/stripe"}, max_network_retries=2
    )


def audit(kb: KeybrakeProcess, key_id: str, n: int) -> list[dict[str, Any]]:
    """The key's audit rows, oldest first, once there are ``n`` (the admin API flushes)."""
    rows: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal rows
        r = kb.admin("GET", f"/vault/audit?key={key_id}&limit=100")
        assert r.status_code == 200, r.text
        rows = list(reversed(r.json()["data"]))
        return len(rows) >= n

    wait_for(enough, 10, f"{n} audit rows of {key_id}")
    assert len(rows) == n, rows
    return rows


def spent(kb: KeybrakeProcess, key_id: str) -> int:
    """Spent plus reserved today, in micro-USD."""
    detail = kb.admin("GET", f"/vault/keys/{key_id}").json()
    return usd_micros(detail["spent_today_usd"])


def assert_unreachable(err: stripe.StripeError) -> None:
    """The error contract of a call that never left the proxy, as the stripe SDK shows it."""
    assert isinstance(err, stripe.APIError), repr(err)
    assert err.http_status == 502
    assert err.json_body is not None, err.http_body
    assert err.json_body["error"]["code"] == "upstream_unreachable"
    assert err.json_body["error"]["type"] == "keybrake_error"
    assert "retrying is safe" in err.json_body["error"]["message"]
    assert err.headers is not None
    assert err.headers.get("X-Keybrake-Error") == "upstream_unreachable"
    assert err.headers.get("Stripe-Should-Retry") == "true"
    assert err.headers.get("X-Should-Retry") == "true"
    assert err.headers.get("Content-Type") == "application/json"


def assert_released_attempts(
    kb: KeybrakeProcess, key_id: str, attempts: int, http1: int | None = None
) -> None:
    """Every attempt audited as never sent, released; nothing spent or reserved. ``http1``:
    how many of them were HTTP/1.1 requests (the ones the proxy log line ends in the path)."""
    rows = audit(kb, key_id, attempts)
    for row in rows:
        assert (row["outcome"], row["code"], row["status"]) == (
            "refused",
            "upstream_unreachable",
            502,
        ), row
        assert row["estimate_micros"] == USD and row["actual_micros"] == 0, row
        assert row["note"].startswith("never sent ("), row
    assert spent(kb, key_id) == 0
    assert kb.count_requests("POST", "/v1/payment_intents") == (
        attempts if http1 is None else http1
    )


# -- never sent ---------------------------------------------------------------------------------
def test_refused_port_is_released_and_retried_by_the_sdk(
    keybrake_factory: Any, fake_tls: FakeTLS, closed_port: int, stripe_sdk: None
) -> None:
    """The incident: an upstream that refuses the connection. Three attempts (the SDK's two
    retries), all released: $0 spent instead of three $1 calls counted as ``unknown``."""
    fake = ClosedStripe(fake_tls, closed_port)
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake})
    key = kb.issue_key(daily_usd_cap=10)
    with pytest.raises(stripe.StripeError) as e:
        forward_client(kb, key["vault_key"]).v1.payment_intents.create(params=CHARGE)
    assert_unreachable(e.value)
    assert_released_attempts(kb, key["key_id"], 3)
    assert fake.ledger == []
    # The budget is whole: a $10 charge still fits under the $10 cap.
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert detail["remaining_usd"] == "10.00"


def test_untrusted_upstream_certificate_is_never_sent(
    keybrake_factory: Any, tmp_path: Path, stripe_sdk: None
) -> None:
    """The TLS handshake to the vendor fails (a certificate from a CA the policy does not
    trust): no HTTP byte was written, so the call is released."""
    with FakeStripe(make_fake_ca(tmp_path / "other-ca")) as impostor:
        kb: KeybrakeProcess = keybrake_factory({"stripe": impostor})
        key = kb.issue_key(daily_usd_cap=10)
        with pytest.raises(stripe.StripeError) as e:
            forward_client(kb, key["vault_key"]).v1.payment_intents.create(params=CHARGE)
        assert_unreachable(e.value)
        assert_released_attempts(kb, key["key_id"], 3)
        assert impostor.ledger == []


def test_vendor_host_that_does_not_resolve_is_never_sent(
    keybrake_factory: Any, stripe_sdk: None
) -> None:
    """No upstream override: ``api.stripe.com`` itself, resolved by a stub name server that
    knows no name. The connection is refused before any packet leaves."""
    with StubDNS({}) as dns:
        kb: KeybrakeProcess = keybrake_factory(
            {},
            env={"STRIPE_SECRET_KEY": DEFAULT_SECRET},
            extra_args=["--set", f"keybrake_dns_servers={dns.address}"],
        )
        key = kb.issue_key(daily_usd_cap=10)
        with pytest.raises(stripe.StripeError) as e:
            forward_client(kb, key["vault_key"]).v1.payment_intents.create(params=CHARGE)
        assert_unreachable(e.value)
        assert_released_attempts(kb, key["key_id"], 3)
        assert dns.asked("api.stripe.com")
    assert "server connect " not in kb.log()  # mitmproxy logs each connection it opened


def test_base_url_mode_answers_in_the_contract_too(
    keybrake_factory: Any, fake_tls: FakeTLS, closed_port: int, stripe_sdk: None
) -> None:
    fake = ClosedStripe(fake_tls, closed_port)
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake})
    key = kb.issue_key(daily_usd_cap=10)
    with pytest.raises(stripe.StripeError) as e:
        base_url_client(kb, key["vault_key"]).v1.payment_intents.create(params=CHARGE)
    assert_unreachable(e.value)
    assert_released_attempts(kb, key["key_id"], 3)


def test_raw_answer_is_json_never_mitmproxy_html(
    keybrake_factory: Any, fake_tls: FakeTLS, closed_port: int
) -> None:
    """What any HTTP client gets: the JSON body and headers, on a connection that keeps
    working (the next request on it is answered the same way); HTTP/2 streams too."""
    fake = ClosedStripe(fake_tls, closed_port)
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake})
    key = kb.issue_key(daily_usd_cap=10)
    with httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context()) as client:
        for _ in range(2):
            r = client.post(
                "https://api.stripe.com/v1/payment_intents",
                data=FORM,
                headers={"Authorization": f"Bearer {key['vault_key']}"},
                timeout=20,
            )
            assert r.status_code == 502
            assert r.headers["content-type"] == "application/json"
            assert "html" not in r.text.lower()
            body = json.loads(r.content)
            assert body["error"]["code"] == body["code"] == "upstream_unreachable"
            assert body["statusCode"] == 502
            assert r.headers["x-keybrake-error"] == "upstream_unreachable"
    tunnel = H2Tunnel(kb)
    try:
        assert tunnel.alpn == "h2"
        body = urlencode(FORM).encode()
        sids = [tunnel.send(h2_create(key["vault_key"], body=body), body) for _ in range(2)]
        for answer in tunnel.wait(*sids):
            assert answer.status == 502, answer
            assert answer.headers["x-keybrake-error"] == "upstream_unreachable"
            assert answer.code() == "upstream_unreachable"
    finally:
        tunnel.close()
    assert_released_attempts(kb, key["key_id"], 4, http1=2)


# -- sent, answer lost --------------------------------------------------------------------------
def test_answer_lost_after_the_charge_stays_spent_and_is_not_retried(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, stripe_sdk: None
) -> None:
    """The fake charges, then resets the connection mid-answer: one attempt (the answer says
    not to retry), ``502 upstream_failed``, the $1 estimate stays counted as ``unknown``."""
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=10)
    fake_stripe.reset_connection_next(1, processed=True)
    with pytest.raises(stripe.StripeError) as e:
        forward_client(kb, key["vault_key"]).v1.payment_intents.create(params=CHARGE)
    err = e.value
    assert isinstance(err, stripe.APIError) and err.http_status == 502, repr(err)
    assert err.json_body is not None and err.json_body["error"]["code"] == "upstream_failed"
    assert err.headers is not None
    assert err.headers.get("X-Keybrake-Error") == "upstream_failed"
    assert err.headers.get("Stripe-Should-Retry") == "false"
    assert err.headers.get("X-Should-Retry") == "false"
    [row] = audit(kb, key["key_id"], 1)
    assert (row["outcome"], row["code"], row["status"]) == ("unknown", "upstream_failed", 502)
    assert row["actual_micros"] == USD
    assert spent(kb, key["key_id"]) == USD
    assert len(fake_stripe.ledger) == 1 and fake_stripe.charged_usd_micros() == USD
    assert kb.count_requests("POST", "/v1/payment_intents") == 1


def test_truncated_answer_is_upstream_failed(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=10)
    fake_stripe.truncate_next(1, processed=True)
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data=FORM,
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=20,
    )
    assert (r.status_code, r.headers["x-keybrake-error"]) == (502, "upstream_failed")
    assert r.json()["error"]["code"] == "upstream_failed"
    [row] = audit(kb, key["key_id"], 1)
    assert (row["outcome"], row["code"]) == ("unknown", "upstream_failed")
    assert spent(kb, key["key_id"]) == USD == fake_stripe.charged_usd_micros()
