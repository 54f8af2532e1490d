"""Class 2 of *The cap is a bound*: the proxy must price the body the vendor reads.

Before: ``Content-Type: application/x-www-form-urlencoded; x=json`` with a JSON-looking body
was priced as JSON (its ``"amount": 100``), while Stripe, a form-parsing vendor, read the
``&amount=…&currency=…`` hidden in a string value and charged that. The media type alone now
picks the parser, each endpoint takes only the types its vendor reads, a body must parse
completely, and a paid call's query string (which Stripe merges into its parameters) is
refused. Every refusal here is made before the vendor is contacted.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe, FakeTwilio
from tests.security.conftest import audit_rows, error_code, raw_post

pytestmark = pytest.mark.e2e

FORM = "application/x-www-form-urlencoded"
PI = "/v1/payment_intents"


def issue(kb: KeybrakeProcess, cap: str = "10") -> dict[str, Any]:
    return kb.issue_key(daily_usd_cap=cap, allowed_endpoints=[f"POST {PI}"])


def test_a_json_looking_form_body_is_priced_as_the_form_the_vendor_reads(
    kb: KeybrakeProcess, stripe_fake: FakeStripe
) -> None:
    key = issue(kb)
    smuggled = json.dumps(
        {
            "amount": 100,
            "currency": "usd",
            "x": "&amount=100000&currency=usd&confirm=true&payment_method=pm_card_visa&y=",
        }
    ).encode()
    r = raw_post(kb, key, PI, smuggled, {"Content-Type": f"{FORM}; x=json"})
    # Read as Stripe reads it: a $1,000 charge on a $10 key, carrying a parameter no price
    # knows (the JSON text before the first "&" is a field name to a form parser).
    assert error_code(r) == "unpriced_parameter", r.text
    assert r.json()["error"]["message"].startswith('{"amount"')
    # Without the junk field, the same form body is priced at what Stripe would charge.
    r = raw_post(
        kb, key, PI, b"amount=100000&currency=usd&confirm=true", {"Content-Type": f"{FORM}; x=json"}
    )
    assert r.status_code == 429, r.text
    assert error_code(r) == "cap_exhausted"
    assert r.json()["error"]["needed_usd"] == "1000.00"
    assert stripe_fake.ledger == []
    assert stripe_fake.charged_usd_micros() == 0


@pytest.mark.parametrize(
    ("content_types", "body", "code"),
    [
        # Stripe reads form bodies only: JSON, text or a vendor type is not what it would read.
        (["application/json"], b'{"amount": 100, "currency": "usd"}', "unsupported_media_type"),
        (["text/plain"], b"amount=100&currency=usd", "unsupported_media_type"),
        (["application/vnd.stripe+json"], b"amount=100&currency=usd", "unsupported_media_type"),
        # No type at all, or two: the vendor might guess differently from the proxy.
        ([], b"amount=100&currency=usd", "unsupported_media_type"),
        ([FORM, "application/json"], b"amount=100&currency=usd", "unsupported_media_type"),
        # A charset the vendor could decode differently.
        (
            [f"{FORM}; charset=utf-16"],
            "amount=100&currency=usd".encode("utf-16"),
            "unsupported_media_type",
        ),
        # A body that does not parse completely as the declared type.
        ([FORM], b"amount=100&currency=usd&x=%zz", "invalid_request"),
        ([FORM], b"amount=100;amount=100000&currency=usd", "invalid_request"),
        ([FORM], b"amount=100&amount=100000&currency=usd", "ambiguous_amount"),
    ],
)
def test_bodies_the_vendor_could_read_differently_are_refused(
    kb_sqlite: KeybrakeProcess,
    stripe_fake: FakeStripe,
    content_types: list[str],
    body: bytes,
    code: str,
) -> None:
    kb = kb_sqlite
    key = issue(kb)
    headers = httpx.Headers([("Content-Type", ct) for ct in content_types])
    r = httpx.post(
        f"https://api.stripe.com{PI}",
        content=body,
        headers=[("Authorization", f"Bearer {key['vault_key']}"), *headers.multi_items()],
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )
    assert error_code(r) == code, r.text
    assert r.status_code == (415 if code == "unsupported_media_type" else r.status_code)
    assert r.headers["X-Keybrake-Error"] == code
    assert stripe_fake.ledger == []
    (row,) = audit_rows(kb, key, 1)
    assert (row["outcome"], row["code"]) == ("refused", code)


@pytest.mark.parametrize(
    "target",
    [
        f"{PI}?amount=100000&currency=usd",
        f"{PI}?confirm=true",
        f"{PI}?expand[]=latest_charge",  # harmless here, but a paid call's query is not priced
    ],
)
def test_a_paid_calls_query_string_is_refused(
    kb_sqlite: KeybrakeProcess, stripe_fake: FakeStripe, target: str
) -> None:
    key = issue(kb_sqlite)
    r = raw_post(kb_sqlite, key, target, b"amount=100&currency=usd", {"Content-Type": FORM})
    assert r.status_code == 403
    assert error_code(r) == "unpriced_parameter"
    assert stripe_fake.ledger == []


def test_twilio_reads_form_bodies_only(keybrake_factory: Any, fake_twilio: FakeTwilio) -> None:
    kb: KeybrakeProcess = keybrake_factory({"twilio": fake_twilio})
    path = f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
    key = kb.issue_key(vendor="twilio", daily_usd_cap="1", allowed_endpoints=[f"POST {path}"])
    auth = httpx.BasicAuth(fake_twilio.account_sid, key["vault_key"])

    def send(body: bytes, content_type: str) -> httpx.Response:
        return httpx.post(
            f"https://api.twilio.com{path}",
            content=body,
            headers={"Content-Type": content_type},
            auth=auth,
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
            timeout=30,
        )

    # Before: priced as JSON (one US segment), read by Twilio as a text to an unlisted
    # country. Now read as the form it is: the unlisted destination is refused.
    smuggled = json.dumps(
        {"To": "+15551230000", "x": "&To=%2B999123456&Body=hi&From=%2B15550001111&y="}
    ).encode()
    r = send(smuggled, f"{FORM}; x=json")
    assert r.status_code == 403, r.text
    assert error_code(r) in ("unpriced_endpoint", "ambiguous_amount")
    r = send(b'{"To": "+15551230000", "Body": "hi"}', "application/json")
    assert r.status_code == 415 and error_code(r) == "unsupported_media_type"
    assert fake_twilio.ledger == []
