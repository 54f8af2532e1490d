"""Delegated issuing and kill switches end to end: a real ``keybrake run`` (SQLite, and two
replicas on the real Redis), the real stripe SDK in base-URL mode, and `keybrake.client`
holding an issuer token where pipeline code used to hold the admin token."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

from keybrake.client import Forbidden, KeybrakeClient, Unauthorized

pytestmark = pytest.mark.e2e

PI = "POST /v1/payment_intents"


def charge(kb: KeybrakeProcess, vault_key: str, cents: int = 100) -> Any:
    client = stripe.StripeClient(
        vault_key, base_addresses={"api": f"{kb.admin_url}/stripe"}, max_network_retries=2
    )
    return client.v1.payment_intents.create(
        params={"amount": cents, "currency": "usd", "confirm": True, "payment_method": "pm_x"}
    )


def create_issuer(kb: KeybrakeProcess, **fields: Any) -> dict[str, Any]:
    body = {
        "name": "beam billing driver",
        "vendors": ["stripe"],
        "label_prefix": "beam/billing/",
        "allowed_endpoints": [PI],
        "max_daily_usd_cap": "50",
        "max_usd_cap": "100",
        "max_expires_in": "2h",
        "budget_daily_usd_cap": "500",
    }
    body.update(fields)
    r = kb.admin("POST", "/vault/issuers", body)
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


def test_a_driver_with_an_issuer_token_issues_and_revokes_keys_under_its_prefix_only(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    issuer = create_issuer(kb)
    token = issuer["token"]
    assert token.startswith("kbi_") and issuer["budget_enforced"] is True
    listed = kb.admin("GET", "/vault/issuers").json()["data"]
    assert [i["issuer_id"] for i in listed] == [issuer["issuer_id"]]
    assert token not in kb.admin("GET", "/vault/issuers").text
    other = kb.issue_key(agent_run_label="other/run")  # the operator's key elsewhere

    with KeybrakeClient(kb.admin_url, token) as driver:
        key = driver.issue_key(
            vendor="stripe",
            daily_usd_cap="20",
            usd_cap="40",
            allowed_endpoints=[PI],
            expires_in="1h",
            agent_run_label="beam/billing/run-7",
        )
        assert charge(kb, key.vault_key, 250).status == "succeeded"
        assert [k.key_id for k in driver.list_keys()] == [key.key_id]
        assert key.issuer_id == issuer["issuer_id"]
        assert str(driver.get_key(key.key_id).spent_today_usd) == "2.50"
        with pytest.raises(Forbidden) as refused:
            driver.issue_key(
                vendor="stripe",
                daily_usd_cap="60",
                usd_cap="40",
                allowed_endpoints=["POST /v1/refunds"],
                expires_in="3h",
                agent_run_label="beam/other/run-7",
            )
        assert refused.value.code == "issuer_scope" and refused.value.status == 403
        assert set(refused.value.details["fields"]) == {
            "daily_usd_cap",
            "allowed_endpoints.0",
            "expires_in",
            "agent_run_label",
        }
        with pytest.raises(Forbidden):
            driver.revoke_key(other["key_id"])
        rows = driver.audit()
        assert rows and {r.label for r in rows} == {"beam/billing/run-7"}
        assert [s.group for s in driver.spend()] == ["beam/billing/run-7"]
        assert driver.revoke_key(key.key_id).status == "revoked"

    with pytest.raises(stripe.AuthenticationError):
        charge(kb, key.vault_key)
    assert len(fake_stripe.ledger) == 1
    # The key records the issuer that minted it; the operator's key is untouched.
    minted = kb.admin("GET", f"/vault/keys/{key.key_id}").json()
    assert minted["issuer_id"] == issuer["issuer_id"]
    detail = kb.admin("GET", f"/vault/keys/{other['key_id']}").json()
    assert detail["status"] == "active" and detail["issuer_id"] is None
    # Secrets: the token is in no log line.
    assert token not in kb.log()


def test_revoking_an_issuer_can_revoke_every_key_it_minted(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    issuer = create_issuer(kb)
    # An operator's key under the prefix, with a label of its own (a label's keys are all the
    # operator's or all one issuer's: label_tree_conflict otherwise).
    keys = [
        kb.issue_key(agent_run_label=f"beam/billing/ops-{i}", daily_usd_cap="10", usd_cap="10")
        for i in range(1)
    ]
    with KeybrakeClient(kb.admin_url, issuer["token"]) as driver:
        minted = [
            driver.issue_key(
                vendor="stripe",
                daily_usd_cap="10",
                usd_cap="10",
                allowed_endpoints=[PI],
                expires_in="1h",
                agent_run_label=f"beam/billing/run-{i}",
            )
            for i in range(2)
        ]
    r = kb.admin("DELETE", f"/vault/issuers/{issuer['issuer_id']}?revoke_keys=1")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    assert sorted(r.json()["revoked_keys"]) == sorted(k.key_id for k in minted)
    for k in minted:
        with pytest.raises(stripe.AuthenticationError) as refused:
            charge(kb, k.vault_key)
        assert refused.value.json_body["error"]["code"] == "vault_key_revoked"
    # A key under the same prefix the operator issued is not the issuer's: it still works.
    assert charge(kb, keys[0]["vault_key"]).status == "succeeded"
    with KeybrakeClient(kb.admin_url, issuer["token"]) as driver, pytest.raises(Unauthorized) as e:
        driver.list_keys()
    assert e.value.code == "issuer_token_revoked"


def test_kill_switch_by_label_prefix_dry_run_then_revoke(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    runaway = [kb.issue_key(agent_run_label=f"beam/billing/run-{i}") for i in range(3)]
    lookalike = kb.issue_key(agent_run_label="beam/billing-evil/run-1")
    for key in runaway:
        assert charge(kb, key["vault_key"]).status == "succeeded"

    dry = kb.admin("POST", "/vault/bulk/revoke?dry_run=1", {"label_prefix": "beam/billing/"})
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and dry.json()["count"] == 3
    assert sorted(k["key_id"] for k in dry.json()["data"]) == sorted(k["key_id"] for k in runaway)
    assert charge(kb, runaway[0]["vault_key"]).status == "succeeded"  # nothing changed

    done = kb.admin("POST", "/vault/bulk/revoke", {"label_prefix": "beam/billing"})
    assert done.json()["count"] == 3 and done.json()["dry_run"] is False
    calls = len(fake_stripe.ledger)
    for key in runaway:
        with pytest.raises(stripe.AuthenticationError) as refused:
            charge(kb, key["vault_key"])
        assert refused.value.json_body["error"]["code"] == "vault_key_revoked"
    assert len(fake_stripe.ledger) == calls
    assert charge(kb, lookalike["vault_key"]).status == "succeeded"
    again = kb.admin("POST", "/vault/bulk/revoke?dry_run=1", {"label_prefix": "beam/billing/"})
    assert again.json()["count"] == 0


def test_kill_switch_suspends_then_resumes(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(agent_run_label="beam/billing/run-1")
    r = kb.admin("POST", "/vault/bulk/suspend", {"label_prefix": "beam/", "reason": "refund loop"})
    assert r.json()["count"] == 1
    with pytest.raises(stripe.PermissionError) as refused:
        charge(kb, key["vault_key"])
    assert refused.value.json_body["error"]["code"] == "key_suspended"
    assert "refund loop" in refused.value.json_body["error"]["message"]
    assert kb.admin("POST", "/vault/bulk/resume", {"label_prefix": "beam/"}).json()["count"] == 1
    assert charge(kb, key["vault_key"]).status == "succeeded"


def test_freeze_vendor_refuses_every_call_without_retries_until_lifted(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key()
    assert charge(kb, key["vault_key"]).status == "succeeded"
    r = kb.admin("PUT", "/vault/freezes/stripe", {"reason": "account compromised"})
    assert r.status_code == 200 and r.json()["vendor"] == "stripe"
    assert [f["vendor"] for f in kb.admin("GET", "/vault/freezes").json()["data"]] == ["stripe"]
    before = kb.count_requests("POST", "/stripe/v1/payment_intents")

    with pytest.raises(stripe.APIError) as refused:
        charge(kb, key["vault_key"])  # the SDK may retry twice: the answer says not to
    assert refused.value.http_status == 503
    assert refused.value.json_body["error"]["code"] == "vendor_frozen"
    assert "account compromised" in refused.value.json_body["error"]["message"]
    assert refused.value.headers["Stripe-Should-Retry"] == "false"
    assert kb.count_requests("POST", "/stripe/v1/payment_intents") == before + 1
    assert len(fake_stripe.ledger) == 1
    # Forward-proxy callers and new keys are refused the same way.
    fresh = kb.issue_key()
    raw = httpx.post(
        f"{kb.admin_url}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {fresh['vault_key']}"},
        data={"amount": "100", "currency": "usd"},
    )
    assert raw.status_code == 503 and raw.headers["X-Keybrake-Error"] == "vendor_frozen"

    lifted = kb.admin("DELETE", "/vault/freezes/stripe")
    assert lifted.json()["lifted"] is True
    assert charge(kb, key["vault_key"]).status == "succeeded"
    assert kb.admin("PUT", "/vault/freezes/nope", {}).status_code == 404


@pytest.mark.redis
def test_on_two_replicas_freeze_and_label_revoke_act_on_the_next_request(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    a: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    b: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    issuer = create_issuer(a)
    with KeybrakeClient(b.admin_url, issuer["token"]) as driver:  # the token works on B too
        key = driver.issue_key(
            vendor="stripe",
            daily_usd_cap="20",
            usd_cap="20",
            allowed_endpoints=[PI],
            expires_in="1h",
            agent_run_label="beam/billing/run-1",
        )
    spare = a.issue_key(agent_run_label="elsewhere/run")
    assert charge(b, key.vault_key).status == "succeeded"  # B knows the key now

    a.admin("PUT", "/vault/freezes/stripe", {"reason": "mis-billing"})
    for kb, vault_key in ((b, key.vault_key), (b, spare["vault_key"]), (a, key.vault_key)):
        with pytest.raises(stripe.APIError) as refused:
            charge(kb, vault_key)
        assert refused.value.json_body["error"]["code"] == "vendor_frozen"
    b.admin("DELETE", "/vault/freezes/stripe")
    assert charge(a, key.vault_key).status == "succeeded"

    r = a.admin("POST", "/vault/bulk/revoke", {"issuer_id": issuer["issuer_id"]})
    assert [k["key_id"] for k in r.json()["data"]] == [key.key_id]
    with pytest.raises(stripe.AuthenticationError) as revoked:
        charge(b, key.vault_key)
    assert revoked.value.json_body["error"]["code"] == "vault_key_revoked"
    assert charge(b, spare["vault_key"]).status == "succeeded"

    # A label-wide revoke through B stops the key A just served, on A's next request.
    runs = [a.issue_key(agent_run_label=f"beam/nightly/run-{i}") for i in range(2)]
    for run in runs:
        assert charge(a, run["vault_key"]).status == "succeeded"
    r = b.admin("POST", "/vault/bulk/revoke", {"label_prefix": "beam/nightly/"})
    assert r.json()["count"] == 2
    for run in runs:
        with pytest.raises(stripe.AuthenticationError) as gone:
            charge(a, run["vault_key"])
        assert gone.value.json_body["error"]["code"] == "vault_key_revoked"
    assert charge(a, spare["vault_key"]).status == "succeeded"
