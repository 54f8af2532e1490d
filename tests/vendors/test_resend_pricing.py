"""The shipped Resend policy and its recipient counters, priced without a proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.vendors.conftest import price_call, refusal_of

from keybrake.core.policy import PolicySet

PER = 900  # policies/resend.yaml: $0.0009 per recipient


def email(**fields: Any) -> dict[str, Any]:
    return {"from": "Acme <onboarding@acme.dev>", "subject": "hi", "text": "t", **fields}


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("fields", "recipients"),
    [
        ({"to": "a@example.com"}, 1),
        ({"to": ["a@example.com"]}, 1),
        ({"to": ["a@example.com", "b@example.com", "c@example.com"]}, 3),
        (
            {
                "to": "a@example.com",
                "cc": "b@example.com",
                "bcc": ["c@example.com", "d@example.com"],
            },
            4,
        ),
        ({"to": ["a@example.com"], "cc": [], "bcc": None}, 1),
        ({"to": "Ann Lee <ann@example.com>"}, 1),
        ({"to": "a@example.com, b@example.com"}, 2),  # never fewer than the vendor might count
        ({"to": ["a@example.com"], "reply_to": ["r@example.com", "s@example.com"]}, 1),
        ({"to": []}, 0),
        ({"to": ""}, 0),
        ({}, 0),
    ],
)
async def test_single_email_costs_per_recipient(
    shipped: PolicySet, fields: dict[str, Any], recipients: int
) -> None:
    e = await price_call(shipped, "resend", "POST", "/emails", raw(email(**fields)))
    assert e.micros == recipients * PER
    assert e.basis == f"counter:email_recipients={recipients}"


@pytest.mark.parametrize(
    ("emails", "recipients"),
    [
        ([email(to="a@example.com")], 1),
        ([email(to="a@example.com"), email(to=["b@example.com", "c@example.com"], cc="d@e.io")], 4),
        ([email(to="a@example.com")] * 100, 100),
        ([], 0),
    ],
)
async def test_batch_sums_its_emails(
    shipped: PolicySet, emails: list[dict[str, Any]], recipients: int
) -> None:
    e = await price_call(shipped, "resend", "POST", "/emails/batch", raw(emails))
    assert e.micros == recipients * PER


@pytest.mark.parametrize(
    ("target", "body", "code", "message"),
    [
        ("/emails/batch", raw([email(to="a@example.com")] * 101), "invalid_request", "at most 100"),
        ("/emails/batch", raw(email(to="a@example.com")), "invalid_request", "JSON list"),
        ("/emails/batch", raw(["a@example.com"]), "invalid_request", "JSON object"),
        ("/emails/batch", raw([email(to=7)]), "invalid_request", "0.to"),
        ("/emails", raw(email(to=42)), "invalid_request", "to must be"),
        ("/emails", raw(email(to=["a@example.com", 3])), "invalid_request", "as strings"),
        ("/emails", raw(email(cc={"a": "b"})), "invalid_request", "cc must be"),
        ("/emails", raw(["not", "an", "object"]), "invalid_request", "JSON object"),
        (
            "/emails",
            b'{"to": "a@example.com", "to": ["b@x.io", "c@x.io"]}',
            "ambiguous_amount",
            "'to'",
        ),
        ("/emails", b"{", "invalid_request", "cannot be parsed"),
    ],
)
async def test_refusals(
    shipped: PolicySet, target: str, body: bytes, code: str, message: str
) -> None:
    r = await refusal_of(shipped, "resend", "POST", target, body)
    assert r.code == code
    assert message in r.message


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/emails"), ("GET", "/emails/4ef9a417"), ("POST", "/emails/4ef9a417/cancel")],
)
async def test_reads_are_free(shipped: PolicySet, method: str, target: str) -> None:
    assert (await price_call(shipped, "resend", method, target)).micros == 0


def test_policy_settings(shipped: PolicySet) -> None:
    resend = shipped.vendors["resend"]
    assert resend.auth.schemes == ("bearer",)
    assert resend.auth.secret_env == "RESEND_API_KEY"
    assert resend.idempotency_header == "Idempotency-Key"
    assert resend.body == ("json",)
