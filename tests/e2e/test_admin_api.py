"""The admin API of a real ``keybrake run``: token, key issue/list/get/revoke, budgets."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e

VALID: dict[str, Any] = {
    "vendor": "stripe",
    "daily_usd_cap": 300,
    "allowed_endpoints": ["POST /v1/payment_intents"],
    "expires_in": "2h",
    "agent_run_label": "dramatiq/nightly-billing",
}


def raw_admin(
    kb: KeybrakeProcess,
    method: str,
    path: str,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.request(
        method, f"{kb.admin_url}{path}", content=content, headers=headers or {}, timeout=10
    )


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["type"] == "keybrake_error"
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert r.headers["X-Keybrake-Error"] == code
    assert r.headers["Content-Type"] == "application/json"
    error: dict[str, Any] = body["error"]
    return error


def no_secrets_logged(kb: KeybrakeProcess, fake: FakeStripe, *vault_keys: str) -> None:
    log = kb.log()
    assert fake.secret not in log
    assert kb.admin_token not in log
    for vk in vault_keys:
        assert vk not in log


def test_admin_token_required(keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe) -> None:
    kb = keybrake_stripe
    token = kb.admin_token
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"X-Admin-Token": token},
    ):
        for method, path in (("GET", "/vault/keys"), ("POST", "/vault/keys"), ("GET", "/vault")):
            r = raw_admin(kb, method, path, json.dumps(VALID).encode(), headers)
            error_of(r, 401, "admin_token_invalid")
    # Nothing was issued by the refused POSTs.
    assert kb.admin("GET", "/vault/keys").json()["data"] == []
    # The scheme is case-insensitive, like every HTTP auth scheme.
    r = raw_admin(kb, "GET", "/vault/keys", headers={"Authorization": f"bearer {token}"})
    assert r.status_code == 200
    # /healthz needs no token and says nothing secret.
    health = httpx.get(f"{kb.admin_url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert token not in health.text
    # Unknown routes: 404 in the error contract.
    error_of(kb.admin("GET", "/nope"), 404, "not_found")
    error_of(kb.admin("GET", "/vault/nope"), 404, "not_found")
    error_of(kb.admin("PATCH", "/vault/keys"), 405, "method_not_allowed")
    no_secrets_logged(kb, fake_stripe)


def test_issue_validation_names_each_field(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    r = kb.admin(
        "POST",
        "/vault/keys",
        {
            "vendor": "paypal",
            "daily_usd_cap": -5,
            "allowed_endpoints": ["POST /v1/pay*", "GET", 3],
            "expires_in": "91d",
            "agent_run_label": "",
            "surprise": True,
        },
    )
    error = error_of(r, 422, "invalid_request")
    assert set(error["fields"]) == {
        "vendor",
        "daily_usd_cap",
        "allowed_endpoints.0",
        "allowed_endpoints.1",
        "allowed_endpoints.2",
        "expires_in",
        "agent_run_label",
        "surprise",
    }
    assert "90 days" in error["fields"]["expires_in"]
    assert error["fields"]["surprise"] == "unknown field"
    for field in error["fields"]:
        assert field in error["message"]

    for bad, field in (
        ({"daily_usd_cap": 10**13}, "daily_usd_cap"),
        ({"daily_usd_cap": "1e3"}, "daily_usd_cap"),
        ({"daily_usd_cap": 0}, "daily_usd_cap"),
        ({"usd_cap": -1}, "usd_cap"),
        ({"expires_in": "0m"}, "expires_in"),
        ({"expires_in": 7200}, "expires_in"),
        ({"allowed_endpoints": []}, "allowed_endpoints"),
        ({"allowed_endpoints": ["POST /v1/unpriced_things"]}, "allowed_endpoints.0"),
        ({"agent_run_label": "x\ny"}, "agent_run_label"),
        ({"vendor": "STRIPE"}, "vendor"),
    ):
        r = kb.admin("POST", "/vault/keys", {**VALID, **bad})
        assert set(error_of(r, 422, "invalid_request")["fields"]) == {field}, bad

    # Not JSON, JSON that is not an object, NaN/Infinity: refused before validation.
    for raw in (
        b"vendor=stripe",
        b"[1, 2]",
        b'"stripe"',
        b'{"vendor": "stripe", "daily_usd_cap": NaN}',
        b'{"vendor": "stripe", "daily_usd_cap": Infinity}',
        b'{"vendor": "stripe", "daily_usd_cap": -Infinity}',
        b"\xff\xfe{}",
        b"[" * 10_000 + b"]" * 10_000,
    ):
        r = raw_admin(kb, "POST", "/vault/keys", raw, {"Authorization": f"Bearer {kb.admin_token}"})
        error_of(r, 422, "invalid_request")

    too_big = json.dumps({**VALID, "agent_run_label": "x" * 70_000}).encode()
    r = raw_admin(kb, "POST", "/vault/keys", too_big, {"Authorization": f"Bearer {kb.admin_token}"})
    error_of(r, 413, "body_too_large")

    # Exact decimal dollars survive the round trip (no floats anywhere).
    r = raw_admin(
        kb,
        "POST",
        "/vault/keys",
        json.dumps({**VALID, "daily_usd_cap": 0.1, "usd_cap": 1000.000001}).encode(),
        {"Authorization": f"Bearer {kb.admin_token}"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["daily_usd_cap"] == "0.10"
    assert r.json()["usd_cap"] == "1000.000001"
    assert len(kb.admin("GET", "/vault/keys").json()["data"]) == 1
    no_secrets_logged(kb, fake_stripe, r.json()["vault_key"])


def test_issue_list_get_revoke(keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe) -> None:
    kb = keybrake_stripe
    r = kb.admin("POST", "/vault/keys", VALID)
    assert r.status_code == 201, r.text
    assert r.headers["Cache-Control"] == "no-store"
    issued = r.json()
    for field in (
        "key_id",
        "vault_key",
        "vendor",
        "expires_at",
        "daily_usd_cap",
        "allowed_endpoints",
        "agent_run_label",
    ):
        assert field in issued
    assert issued["vendor"] == "stripe"
    assert issued["daily_usd_cap"] == "300.00"
    assert issued["allowed_endpoints"] == ["POST /v1/payment_intents"]
    assert issued["agent_run_label"] == "dramatiq/nightly-billing"
    assert issued["vault_key"].startswith("kbv_stripe_")
    assert issued["status"] == "active"
    other = kb.issue_key(agent_run_label="other/label", expires_in="P1D")

    secrets_ = [issued["vault_key"], other["vault_key"]]
    hashes = [hashlib.sha256(v.encode()).hexdigest() for v in secrets_]

    listing = kb.admin("GET", "/vault/keys")
    assert listing.status_code == 200
    data = listing.json()["data"]
    assert {k["key_id"] for k in data} == {issued["key_id"], other["key_id"]}
    for k in data:
        assert "vault_key" not in k
    for needle in secrets_ + hashes + ["secret_sha256", "kbv_"]:
        assert needle not in listing.text

    one = kb.admin("GET", f"/vault/keys/{issued['key_id']}")
    assert one.status_code == 200
    got = one.json()
    assert got["key_id"] == issued["key_id"]
    assert got["expires_at"] == issued["expires_at"]
    assert got["status"] == "active"
    assert got["spent_today_usd"] == "0.00"
    assert got["remaining_usd"] == "300.00"
    for needle in secrets_ + hashes:
        assert needle not in one.text

    error_of(kb.admin("GET", "/vault/keys/key_0000000000000000"), 404, "not_found")
    error_of(kb.admin("DELETE", "/vault/keys/key_0000000000000000"), 404, "not_found")
    error_of(kb.admin("GET", f"/vault/keys/{issued['vault_key']}"), 404, "not_found")

    first = kb.admin("DELETE", f"/vault/keys/{issued['key_id']}")
    assert first.status_code == 200 and first.json()["status"] == "revoked"
    again = kb.admin("DELETE", f"/vault/keys/{issued['key_id']}")
    assert again.status_code == 200 and again.json()["status"] == "revoked"
    assert again.json()["revoked_at"] == first.json()["revoked_at"]
    assert kb.admin("GET", f"/vault/keys/{issued['key_id']}").json()["status"] == "revoked"
    assert kb.admin("GET", f"/vault/keys/{other['key_id']}").json()["status"] == "active"

    # The revoked key is refused at once; the other one still works.
    for vault_key, status in ((issued["vault_key"], 401), (other["vault_key"], 200)):
        r = httpx.post(
            "https://api.stripe.com/v1/payment_intents",
            data={"amount": "100", "currency": "usd"},
            headers={"Authorization": f"Bearer {vault_key}"},
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
        )
        assert r.status_code == status, r.text
    assert len(fake_stripe.ledger) == 1
    no_secrets_logged(kb, fake_stripe, *secrets_)


def test_label_budgets(keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe) -> None:
    kb = keybrake_stripe
    label = "dramatiq%2Fnightly-billing"  # the label contains a '/', sent encoded
    r = kb.admin("PUT", f"/vault/budgets/{label}", {"daily_usd_cap": 500})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "dramatiq/nightly-billing"
    assert r.json()["daily_usd_cap"] == "500.00"
    got = kb.admin("GET", f"/vault/budgets/{label}").json()
    assert got["daily_usd_cap"] == "500.00"
    assert (
        kb.admin("PUT", f"/vault/budgets/{label}", {"daily_usd_cap": "12.5"}).json()[
            "daily_usd_cap"
        ]
        == "12.50"
    )
    cleared = kb.admin("PUT", f"/vault/budgets/{label}", {"daily_usd_cap": None})
    assert cleared.status_code == 200 and cleared.json()["daily_usd_cap"] is None
    assert kb.admin("GET", "/vault/budgets/unknown-label").json()["daily_usd_cap"] is None

    for body, field in (
        ({"daily_usd_cap": -1}, "daily_usd_cap"),
        ({"daily_usd_cap": "lots"}, "daily_usd_cap"),
        ({"daily_usd_cap": 5, "extra": 1}, "(body)"),
        ([5], "(body)"),
    ):
        r = kb.admin("PUT", f"/vault/budgets/{label}", body)
        assert field in error_of(r, 422, "invalid_request")["fields"]
    error_of(kb.admin("PUT", "/vault/budgets/%0Abad", {"daily_usd_cap": 5}), 422, "invalid_request")
    error_of(kb.admin("DELETE", f"/vault/budgets/{label}"), 405, "method_not_allowed")
    error_of(
        kb.admin("PUT", f"/vault/budgets/{label}", {"daily_usd_cap": 5}, token="wrong"),
        401,
        "admin_token_invalid",
    )
    no_secrets_logged(kb, fake_stripe)


def test_admin_token_file_is_created_0600_when_env_unset(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, start=False)
    kb.env.pop("KEYBRAKE_ADMIN_TOKEN")
    kb.start()
    token_file = kb.data_dir / "admin-token"
    assert token_file.is_file()
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token.startswith("kba_") and len(token) >= 40
    # The start banner says where the token is, never the token itself.
    log = kb.log()
    assert f"admin token: {token_file.resolve()}" in log
    assert token not in log

    error_of(kb.admin("GET", "/vault/keys"), 401, "admin_token_invalid")  # the env token
    listing = kb.admin("GET", "/vault/keys", token=token)
    assert listing.status_code == 200 and listing.json()["data"] == []
    # A restart keeps the same token.
    kb.stop()
    kb.start()
    assert token_file.read_text().strip() == token
    assert kb.admin("GET", "/vault/keys", token=token).status_code == 200
    assert fake_stripe.secret not in kb.log()
