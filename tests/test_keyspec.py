"""Tests for keybrake.vault.keyspec: validation of ``POST /vault/keys`` and label budget bodies."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from tests.conftest import ROOT

from keybrake.core.keys import generate_vault_key, hash_vault_key
from keybrake.core.policy import PolicySet, load_policies
from keybrake.store import BudgetState, KeyRecord, LabelBudget
from keybrake.vault.keyspec import IssueKeyRequest, KeySpecError, key_to_json, parse_label_budget

ALLOW = [
    "POST /v1/payment_intents",
    "POST /v1/payment_intents/{id}/confirm",
    "GET /v1/payment_intents/{id}",
]


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies(ROOT / "policies")


def body(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "vendor": "stripe",
        "daily_usd_cap": 300,
        "allowed_endpoints": list(ALLOW),
        "expires_in": "2h",
        "agent_run_label": "dramatiq/nightly-billing",
    }
    for k, v in changes.items():
        if v is _DROP:
            data.pop(k, None)
        else:
            data[k] = v
    return data


_DROP = object()


def errors_for(data: Any, policies: PolicySet) -> dict[str, str]:
    with pytest.raises(KeySpecError) as e:
        IssueKeyRequest.from_json(data, policies)
    # The message names every bad field too (it becomes the 422 error message).
    for field in e.value.fields:
        assert field in str(e.value)
    return e.value.fields


def test_the_issue_example_is_valid(policies: PolicySet) -> None:
    spec = IssueKeyRequest.from_json(
        {
            "vendor": "stripe",
            "daily_usd_cap": 300,
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "expires_in": "2h",
            "agent_run_label": "dramatiq/nightly-billing",
        },
        policies,
    )
    assert spec.vendor == "stripe"
    assert spec.daily_cap_micros == 300_000_000
    assert spec.usd_cap_micros is None
    assert spec.allowed_endpoints == ("POST /v1/payment_intents",)
    assert spec.expires_in == dt.timedelta(hours=2)
    assert spec.agent_run_label == "dramatiq/nightly-billing"


def test_admin_api_shaped_numbers_are_strings(policies: PolicySet) -> None:
    # The admin API parses JSON numbers as strings so no float ever touches money.
    data = json.loads(
        json.dumps(body(daily_usd_cap=12.5, usd_cap=100)), parse_float=str, parse_int=str
    )
    spec = IssueKeyRequest.from_json(data, policies)
    assert spec.daily_cap_micros == 12_500_000
    assert spec.usd_cap_micros == 100_000_000


def test_endpoints_are_canonicalised(policies: PolicySet) -> None:
    spec = IssueKeyRequest.from_json(
        body(
            allowed_endpoints=[
                "post  /v1//payment_intents/",
                "POST /v1/payment_intents/{pi}/confirm",
                "GET /v1/payment_intents/*",
            ]
        ),
        policies,
    )
    assert spec.allowed_endpoints == (
        "POST /v1/payment_intents",
        "POST /v1/payment_intents/{pi}/confirm",
        "GET /v1/payment_intents/*",
    )


def test_expires_in_defaults_to_one_hour(policies: PolicySet) -> None:
    spec = IssueKeyRequest.from_json(body(expires_in=_DROP), policies)
    assert spec.expires_in == dt.timedelta(hours=1)


@pytest.mark.parametrize("expires", ["30m", "2h", "7d", "PT2H", "P1D", "90d"])
def test_expires_in_forms(policies: PolicySet, expires: str) -> None:
    IssueKeyRequest.from_json(body(expires_in=expires), policies)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("daily_usd_cap", -1, "negative"),
        ("daily_usd_cap", "-5", "dollar amount"),
        ("daily_usd_cap", 0, "greater than 0"),
        ("daily_usd_cap", "0.00", "greater than 0"),
        ("daily_usd_cap", "NaN", "dollar amount"),
        ("daily_usd_cap", "nan", "dollar amount"),
        ("daily_usd_cap", "Infinity", "dollar amount"),
        ("daily_usd_cap", "1e3", "dollar amount"),
        ("daily_usd_cap", "0x10", "dollar amount"),
        ("daily_usd_cap", " 300", "dollar amount"),
        ("daily_usd_cap", "300.0000001", "6 decimal places"),
        ("daily_usd_cap", 10**13, "exceeds the limit"),
        ("daily_usd_cap", "1" * 70, "dollar amount"),
        ("daily_usd_cap", 10**100, "dollar amount"),
        ("daily_usd_cap", 12.5, "dollar amount"),  # a float never reaches money code
        ("daily_usd_cap", float("nan"), "dollar amount"),
        ("daily_usd_cap", True, "dollar amount"),
        ("daily_usd_cap", None, "dollar amount"),
        ("daily_usd_cap", [300], "dollar amount"),
        ("daily_usd_cap", _DROP, "dollar amount"),
        ("usd_cap", -3, "negative"),
        ("usd_cap", "0", "greater than 0"),
        ("usd_cap", "lots", "dollar amount"),
        ("vendor", "paypal", "must be one of: "),
        ("vendor", "Stripe", "must be one of"),
        ("vendor", None, "must be one of"),
        ("vendor", ["stripe"], "must be one of"),
        ("vendor", _DROP, "must be one of"),
        ("expires_in", "0m", "positive"),
        ("expires_in", "91d", "at most 90 days"),
        ("expires_in", "soon", "not a duration"),
        ("expires_in", 7200, "duration string"),
        ("expires_in", None, "duration string"),
        ("agent_run_label", "", "1-128 characters"),
        ("agent_run_label", "x" * 129, "1-128 characters"),
        ("agent_run_label", "/leading-slash", "1-128 characters"),
        ("agent_run_label", "new\nline", "1-128 characters"),
        ("agent_run_label", "trailing-newline\n", "1-128 characters"),
        ("agent_run_label", "tab\there", "1-128 characters"),
        ("agent_run_label", "ünïcode", "1-128 characters"),
        ("agent_run_label", "quote\"'", "1-128 characters"),
        ("agent_run_label", 42, "1-128 characters"),
        ("agent_run_label", _DROP, "1-128 characters"),
        ("allowed_endpoints", [], "list of 1-100"),
        ("allowed_endpoints", "POST /v1/payment_intents", "list of 1-100"),
        ("allowed_endpoints", ["POST /v1/payment_intents"] * 101, "list of 1-100"),
        ("allowed_endpoints", None, "list of 1-100"),
        ("allowed_endpoints", _DROP, "list of 1-100"),
        ("max_requests_per_minute", 0, "whole number of requests from 1"),
        ("max_requests_per_minute", -5, "whole number"),
        ("max_requests_per_minute", 1_000_001, "to 1,000,000"),
        ("max_requests_per_minute", 10**100, "whole number"),
        ("max_requests_per_minute", 60.0, "whole number"),
        ("max_requests_per_minute", float("nan"), "whole number"),
        ("max_requests_per_minute", "60.0", "whole number"),
        ("max_requests_per_minute", "1e3", "whole number"),
        ("max_requests_per_minute", " 60", "whole number"),
        ("max_requests_per_minute", "0", "whole number"),
        ("max_requests_per_minute", "٦٠", "whole number"),  # Arabic-Indic digits
        ("max_requests_per_minute", "9" * 5000, "whole number"),
        ("max_requests_per_minute", "", "whole number"),
        ("max_requests_per_minute", True, "whole number"),
        ("max_requests_per_minute", [60], "whole number"),
    ],
)
def test_bad_field_is_named(policies: PolicySet, field: str, value: Any, message: str) -> None:
    errors = errors_for(body(**{field: value}), policies)
    assert set(errors) == {field}, errors
    assert message in errors[field]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (42, "must be a string"),
        ("POST", "expected '<METHOD> <path>'"),
        ("POST /v1/payment_intents extra", "expected '<METHOD> <path>'"),
        ("/v1/payment_intents", "expected '<METHOD> <path>'"),
        ("POST v1/payment_intents", "starting with '/'"),
        ("POST /v1/pay*", "whole path segment"),
        ("* /v1/payment_intents", "not a method"),
        ("P@ST /v1/payment_intents", "not an HTTP method token"),
        ("POST /v1/payment_intents?x=1", "no query string"),
        ("POST /v1/payment_intents#x", "no query string"),
        ("POST /v1/a%2Fb", "encoded '/'"),
        ("POST /../v1/payment_intents", "climbs above the root"),
        ("POST /v1/payment_intents/{id}/{id}", "appears twice"),
        ("POST /v1/payment_intents/{i d}", "expected '<METHOD> <path>'"),
        ("POST /v1/payment_intents/{1d}", "placeholder names"),
        ("POST /v1/payment_intents/x{id}", "whole path segment"),
        ("POST /v1/payment_\u0456ntents", "non-ASCII"),
        ("POST /v1/payment_intents\x00", "NUL"),
        # Well-formed but not priced by the Stripe policy:
        ("POST /v1/unpriced_things", "no cost rule"),
        ("DELETE /v1/payment_intents/{id}", "no cost rule"),
        ("PUT /v1/payment_intents", "no cost rule"),
        ("POST /v1/payment_intents/{id}/unpriced_action", "no cost rule"),
        ("POST /v1/*", "no cost rule"),
    ],
)
def test_bad_endpoint_is_named_by_index(policies: PolicySet, spec: Any, message: str) -> None:
    errors = errors_for(body(allowed_endpoints=["POST /v1/payment_intents", spec]), policies)
    assert set(errors) == {"allowed_endpoints.1"}, errors
    assert message in errors["allowed_endpoints.1"]


def test_every_bad_field_is_reported_at_once(policies: PolicySet) -> None:
    errors = errors_for(
        {
            "vendor": "paypal",
            "daily_usd_cap": -1,
            "usd_cap": "x",
            "allowed_endpoints": ["POST /v1/pay*", 7],
            "expires_in": "forever",
            "agent_run_label": "",
            "colour": "blue",
            "vault_key": "kbv_stripe_chosen_by_caller",
        },
        policies,
    )
    assert set(errors) == {
        "vendor",
        "daily_usd_cap",
        "usd_cap",
        "allowed_endpoints.0",
        "allowed_endpoints.1",
        "expires_in",
        "agent_run_label",
        "colour",
        "vault_key",
    }
    assert errors["colour"] == "unknown field"
    assert errors["vault_key"] == "unknown field"


def test_unknown_field_name_is_truncated(policies: PolicySet) -> None:
    errors = errors_for(body(**{"x" * 5000: 1}), policies)
    assert set(errors) == {"x" * 64}


@pytest.mark.parametrize("data", [None, [], "vendor=stripe", 3, True])
def test_body_must_be_an_object(policies: PolicySet, data: Any) -> None:
    assert errors_for(data, policies) == {"(body)": "must be a JSON object"}


def test_unpriced_endpoint_is_not_checked_for_unknown_vendor(policies: PolicySet) -> None:
    errors = errors_for(
        body(vendor="nope", allowed_endpoints=["POST /v1/unpriced_things"]), policies
    )
    assert set(errors) == {"vendor"}


# -- label budgets -----------------------------------------------------------------------------
def test_parse_label_budget() -> None:
    label = "dramatiq/nightly"
    assert parse_label_budget(label, {"daily_usd_cap": "500"}) == LabelBudget(label, 500_000_000)
    assert parse_label_budget(label, {"daily_usd_cap": None}) == LabelBudget(label)
    assert parse_label_budget(label, {}) == LabelBudget(label)
    both = {"daily_usd_cap": "5", "usd_cap": "50", "max_requests_per_minute": "600"}
    assert parse_label_budget(label, both) == LabelBudget(label, 5_000_000, 50_000_000, 600)


@pytest.mark.parametrize(
    ("label", "data", "field"),
    [
        ("ok", {"daily_usd_cap": "-1"}, "daily_usd_cap"),
        ("ok", {"daily_usd_cap": "0"}, "daily_usd_cap"),
        ("ok", {"daily_usd_cap": "NaN"}, "daily_usd_cap"),
        ("ok", {"daily_usd_cap": 5, "other": 1}, "(body)"),
        ("ok", {"usd_cap": "0"}, "usd_cap"),
        ("ok", {"max_requests_per_minute": "1.5"}, "max_requests_per_minute"),
        ("ok", {"max_requests_per_minute": 0}, "max_requests_per_minute"),
        ("ok", [], "(body)"),
        ("", {"daily_usd_cap": "5"}, "label"),
        ("bad\nlabel", {"daily_usd_cap": "5"}, "label"),
    ],
)
def test_parse_label_budget_refuses(label: str, data: Any, field: str) -> None:
    with pytest.raises(KeySpecError) as e:
        parse_label_budget(label, data)
    assert field in e.value.fields


# -- public JSON -------------------------------------------------------------------------------
def test_key_to_json_never_shows_secrets() -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    vault_key = generate_vault_key("stripe")
    record = KeyRecord(
        key_id="key_0123456789abcdef",
        secret_sha256=hash_vault_key(vault_key),
        vendor="stripe",
        agent_run_label="dramatiq/nightly-billing",
        daily_cap_micros=300_000_000,
        allowed_endpoints=("POST /v1/payment_intents",),
        created_at=now,
        expires_at=now + dt.timedelta(hours=2),
    )
    budgets = (
        BudgetState("key:key_0123456789abcdef", "2026-01-02", 300_000_000, 12_500_000, 500_000),
    )
    out = key_to_json(record, now, budgets)
    text = json.dumps(out)
    assert vault_key not in text
    assert record.secret_sha256 not in text
    assert "secret" not in text
    assert out["key_id"] == "key_0123456789abcdef"
    assert out["daily_usd_cap"] == "300.00"
    assert out["expires_at"] == "2026-01-02T05:04:05Z"
    assert out["status"] == "active"
    assert out["spent_today_usd"] == "13.00"
    assert out["remaining_usd"] == "287.00"
    assert key_to_json(record, now + dt.timedelta(hours=3))["status"] == "expired"


def test_request_rate_limit_defaults_to_the_vendor_policy(policies: PolicySet) -> None:
    stripe_default = policies.vendors["stripe"].max_requests_per_minute
    assert stripe_default is not None  # the shipped policy sets one
    spec = IssueKeyRequest.from_json(body(), policies)
    assert spec.max_requests_per_minute == stripe_default
    # null means "the default" too, and a key may set its own, lower or higher.
    assert IssueKeyRequest.from_json(body(max_requests_per_minute=None), policies) == spec
    for own in (1, 10_000, 1_000_000, "60"):  # the admin API reads JSON numbers as strings
        record, _ = IssueKeyRequest.from_json(body(max_requests_per_minute=own), policies).new_key(
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        )
        assert record.max_requests_per_minute == int(own)
        assert key_to_json(record, record.created_at)["max_requests_per_minute"] == int(own)
