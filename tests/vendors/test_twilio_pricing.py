"""The shipped Twilio policy and the ``sms_segments`` counter, priced without a proxy."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from tests.vendors.conftest import price_call, refusal_of

from keybrake.core.policy import PolicySet
from keybrake.pricing import Estimate, actual_cost

SID = "AC" + "0" * 32
MESSAGES = f"/2010-04-01/Accounts/{SID}/Messages.json"
US = 8_300  # policies/twilio.yaml, per segment


def msg(*pairs: tuple[str, str]) -> bytes:
    """A Twilio form body the way the SDK encodes it ('+' as %2B)."""
    return urlencode(list(pairs)).encode()


def to(number: str, body: str | None = None, *more: tuple[str, str]) -> bytes:
    pairs = [("To", number), ("From", "+15017122661")]
    if body is not None:
        pairs.append(("Body", body))
    return msg(*pairs, *more)


@pytest.mark.parametrize(
    ("raw", "micros"),
    [
        (to("+14155550123", "hello"), US),
        (to("+14155550123", "a" * 160), US),
        (to("+14155550123", "a" * 161), 2 * US),
        (to("+14155550123", "a" * 306), 2 * US),
        (to("+14155550123", "a" * 307), 3 * US),
        (to("+14155550123", "a" * 159 + "€"), 2 * US),  # € takes two septets
        (to("+14155550123", "ж" * 70), US),  # UCS-2: 70 per single segment
        (to("+14155550123", "ж" * 71), 2 * US),
        (to("+14155550123", "ok 👍" * 20), 2 * US),  # 100 UTF-16 units
        (to("+14155550123", "Crêpe"), US),
        (to("+14155550123", ""), US),  # an empty body is one segment
        (to("+16475550123", "hi"), US),  # Canada shares +1
        (to("+18765550123", "hi"), 150_000),  # Jamaica: +1 876, priced internationally
        (to("+447700900123", "hi"), 60_000),
        (to("+447700900123", "a" * 161), 120_000),
        (to("+33612345678", "hi"), 100_000),
        (to("+353871234567", "hi"), 100_000),
        (to("+919812345678", "ж" * 71), 200_000),
        # Messaging Service sends are priced the same way
        (
            msg(
                ("To", "+14155550123"),
                ("MessagingServiceSid", "MG" + "1" * 32),
                ("Body", "a" * 161),
            ),
            2 * US,
        ),
        # MMS: at least the MMS price; a long body on it can cost more
        (to("+14155550123", "look", ("MediaUrl", "https://example.com/a.png")), 20_000),
        (to("+14155550123", None, ("MediaUrl", "https://example.com/a.png")), 20_000),
        (
            to(
                "+14155550123",
                "x",
                ("MediaUrl", "https://e.x/a.png"),
                ("MediaUrl", "https://e.x/b.png"),
            ),
            20_000,
        ),
        (to("+14155550123", "a" * 400, ("MediaUrl", "https://e.x/a.png")), 3 * US),
        (to("+447700900123", "hi", ("MediaUrl", "https://e.x/a.png")), 60_000),
        (to("+14155550123", "hi", ("MediaUrl", "")), US),  # an empty MediaUrl is no media
    ],
)
async def test_message_estimates(shipped: PolicySet, raw: bytes, micros: int) -> None:
    e = await price_call(shipped, "twilio", "POST", MESSAGES, raw)
    assert e.micros == micros


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (to("+8613812345678", "hi"), "unpriced_endpoint", "by_prefix"),  # China: not listed
        (to("whatsapp:+14155550123", "hi"), "unpriced_endpoint", "'whatsapp' channel"),
        (to("messenger:123456", "hi"), "unpriced_endpoint", "channel"),
        (to("+14155550123", None, ("ContentSid", "HX" + "0" * 32)), "unpriced_endpoint", "Content"),
        (to("4155550123", "hi"), "invalid_request", "must start with '+'"),
        (b"To=+14155550123&Body=hi", "invalid_request", "starts with a space"),  # unescaped '+'
        (msg(("From", "+15017122661"), ("Body", "hi")), "invalid_request", "To is missing"),
        (to("+14155550123", "hi", ("To", "+447700900123")), "ambiguous_amount", "'To'"),
        (to("+14155550123", "hi", ("Body", "a" * 1000)), "ambiguous_amount", "'Body'"),
        (to("+14155550123", "hi") + b"&Body%5Bx%5D=1", "ambiguous_amount", "'Body'"),
    ],
)
async def test_message_refusals(shipped: PolicySet, raw: bytes, code: str, message: str) -> None:
    r = await refusal_of(shipped, "twilio", "POST", MESSAGES, raw)
    assert r.code == code
    assert message in r.message


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", MESSAGES),
        ("GET", f"/2010-04-01/Accounts/{SID}/Messages/SM{'a' * 32}.json"),
        ("POST", f"/2010-04-01/Accounts/{SID}/Messages/SM{'a' * 32}.json"),
        ("DELETE", f"/2010-04-01/Accounts/{SID}/Messages/SM{'a' * 32}.json"),
    ],
)
async def test_reads_and_updates_are_free(shipped: PolicySet, method: str, target: str) -> None:
    assert (await price_call(shipped, "twilio", method, target)).micros == 0


@pytest.mark.parametrize(
    ("response", "micros", "note"),
    [
        ({"sid": "SM1", "status": "queued", "price": None, "price_unit": "USD"}, None, "null"),
        (
            {"sid": "SM1", "status": "sent", "price": "-0.01660", "price_unit": "USD"},
            16_600,
            "read",
        ),
    ],
)
def test_actual_cost_keeps_the_estimate_while_price_is_null(
    shipped: PolicySet, response: dict[str, object], micros: int | None, note: str
) -> None:
    policy = shipped.vendors["twilio"]
    endpoint = next(
        ep for ep in policy.endpoints if ep.match == f"POST {MESSAGES}".replace(SID, "{AccountSid}")
    )
    assert endpoint.object_id == "sid"
    actual = actual_cost(policy, endpoint.actual, json.dumps(response).encode(), Estimate(US))
    assert actual.micros == micros
    assert note in actual.note


def test_policy_auth_and_account_rewrite_settings(shipped: PolicySet) -> None:
    twilio = shipped.vendors["twilio"]
    assert twilio.hosts == ("api.twilio.com",)
    assert twilio.auth.schemes == ("basic_password",)
    assert twilio.auth.secret_env == "TWILIO_AUTH_TOKEN"
    assert twilio.auth.account_env == "TWILIO_ACCOUNT_SID"
    assert twilio.auth.account_path_after == "Accounts"
    assert twilio.request_id_header == "Twilio-Request-Id"
