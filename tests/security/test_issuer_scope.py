"""An attacker holding an issuer token (a pipeline driver's, leaked or abused) against a real
proxy, on SQLite and on the real Redis: it can do what its scope allows and nothing else, and
every refusal is ``403 issuer_scope`` naming the field. The token is never written anywhere."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

PI = "POST /v1/payment_intents"
CONFIRM = "POST /v1/payment_intents/{id}/confirm"


class Driver:
    """The admin API with an issuer token as the bearer."""

    def __init__(self, kb: KeybrakeProcess, token: str, prefix: str) -> None:
        self.kb, self.token, self.prefix = kb, token, prefix

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.kb.admin(method, path, body, token=self.token)

    def issue(self, **fields: Any) -> httpx.Response:
        body = {
            "vendor": "stripe",
            "daily_usd_cap": "10",
            "usd_cap": "20",
            "allowed_endpoints": [PI],
            "expires_in": "1h",
            "agent_run_label": f"{self.prefix}run-1",
        }
        body.update(fields)
        return self.call("POST", "/vault/keys", body)


def scope_fields(r: httpx.Response) -> set[str]:
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "issuer_scope" and r.headers["X-Keybrake-Error"] == "issuer_scope"
    return set(error.get("fields", {}))


def new_driver(kb: KeybrakeProcess, **fields: Any) -> tuple[Driver, dict[str, Any]]:
    prefix = f"beam/billing-{uuid.uuid4().hex[:8]}/"
    body = {
        "vendors": ["stripe"],
        "label_prefix": prefix,
        "allowed_endpoints": [PI, "GET /v1/payment_intents/{id}"],
        "max_daily_usd_cap": "50",
        "max_usd_cap": "100",
        "max_expires_in": "2h",
    }
    body.update(fields)
    r = kb.admin("POST", "/vault/issuers", body)
    assert r.status_code == 201, r.text
    issuer: dict[str, Any] = r.json()
    return Driver(kb, issuer["token"], prefix), issuer


def charge(kb: KeybrakeProcess, vault_key: str) -> httpx.Response:
    return httpx.post(
        f"{kb.admin_url}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {vault_key}"},
        data={"amount": "100", "currency": "usd", "confirm": "true", "payment_method": "pm_x"},
        timeout=15,
    )


def test_issuing_outside_the_limits_names_each_field(
    kb: KeybrakeProcess, stripe_fake: FakeStripe
) -> None:
    driver, _ = new_driver(kb)
    assert driver.issue().status_code == 201
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"vendor": "twilio", "allowed_endpoints": [
            "POST /2010-04-01/Accounts/{AccountSid}/Messages.json"]},
         {"vendor", "allowed_endpoints.0"}),
        ({"agent_run_label": "beam/other/run-1"}, {"agent_run_label"}),
        ({"allowed_endpoints": [PI, "POST /v1/refunds"]}, {"allowed_endpoints.1"}),
        ({"allowed_endpoints": [CONFIRM]}, {"allowed_endpoints.0"}),
        ({"daily_usd_cap": "50.000001"}, {"daily_usd_cap"}),
        ({"usd_cap": None}, {"usd_cap"}),
        ({"usd_cap": "100.01"}, {"usd_cap"}),
        ({"expires_in": "121m"}, {"expires_in"}),
        ({"allowed_accounts": ["acct_1"]}, {"allowed_accounts"}),
    ]  # fmt: skip
    for change, fields in cases:
        assert scope_fields(driver.issue(**change)) == fields, change
    # A narrower pattern than one granted is fine: {id} granted covers a concrete id.
    assert driver.issue(allowed_endpoints=["GET /v1/payment_intents/pi_1"]).status_code == 201
    keys = driver.call("GET", "/vault/keys").json()["data"]
    assert len(keys) == 2 and all(k["agent_run_label"].startswith(driver.prefix) for k in keys)


@pytest.mark.parametrize(
    "label",
    [
        "{prefix}../x",
        "{prefix}./x",
        "{prefix}/x",
        "{prefix}x/..",
        "{base}-evil/x",
        "{base}x",
        "{upper}x",
        "beam/x",
        "!frozen:stripe",
    ],
)
def test_labels_cannot_escape_the_prefix(kb: KeybrakeProcess, label: str) -> None:
    driver, _ = new_driver(kb)
    base = driver.prefix.rstrip("/")
    text = label.format(prefix=driver.prefix, base=base, upper=driver.prefix.upper())
    r = driver.issue(agent_run_label=text)
    assert r.status_code in (403, 422), r.text
    if r.status_code == 403:
        assert scope_fields(r) == {"agent_run_label"}
    else:  # not a label at all
        assert "agent_run_label" in r.json()["error"]["fields"]


def test_other_prefixes_keys_cannot_be_revoked_read_or_stopped(
    kb: KeybrakeProcess, stripe_fake: FakeStripe
) -> None:
    driver, issuer = new_driver(kb)
    other_driver, other_issuer = new_driver(kb)
    base = driver.prefix.rstrip("/")
    victims = [
        kb.issue_key(agent_run_label=f"{base}-evil/run"),
        kb.issue_key(agent_run_label=f"{base.upper()}/run"),
        kb.issue_key(agent_run_label=f"{other_driver.prefix}run"),
    ]
    own = driver.issue().json()
    for key in (*victims, own):
        assert charge(kb, key["vault_key"]).status_code == 200

    for victim in victims:
        path = f"/vault/keys/{victim['key_id']}"
        scope_fields(driver.call("DELETE", path))
        scope_fields(driver.call("GET", path))
        scope_fields(driver.call("POST", f"{path}/suspend", {"reason": "x"}))
        scope_fields(driver.call("POST", "/vault/revoke", {"vault_key": victim["vault_key"]}))
    for selector in (
        {"label_prefix": f"{base}-evil/"},
        {"label_prefix": base.rsplit("/", 1)[0]},
        {"label_prefix": other_driver.prefix},
        {"issuer_id": other_issuer["issuer_id"]},
    ):
        assert scope_fields(driver.call("POST", "/vault/bulk/revoke", selector)), selector
        scope_fields(driver.call("POST", "/vault/bulk/suspend?dry_run=1", selector))
    # Its own bulk revoke stops only its own keys, whatever else the store holds.
    stopped = driver.call("POST", "/vault/bulk/revoke?dry_run=1", {"label_prefix": driver.prefix})
    assert [k["key_id"] for k in stopped.json()["data"]] == [own["key_id"]]
    for victim in victims:
        assert kb.admin("GET", f"/vault/keys/{victim['key_id']}").json()["status"] == "active"
        assert charge(kb, victim["vault_key"]).status_code == 200

    listed = driver.call("GET", "/vault/keys").json()["data"]
    assert [k["key_id"] for k in listed] == [own["key_id"]]
    audit = driver.call("GET", "/vault/audit?limit=1000").json()["data"]
    assert audit and {r["label"] for r in audit} == {own["agent_run_label"]}
    by_key = driver.call("GET", f"/vault/audit?key={victims[0]['key_id']}").json()["data"]
    assert by_key == []
    spend = driver.call("GET", "/vault/spend?group_by=key").json()["data"]
    assert [row["group"] for row in spend] == [own["key_id"]]
    assert scope_fields(driver.call("GET", f"/vault/audit?label={base}-evil/run")) == {"label"}
    assert scope_fields(driver.call("GET", "/vault/spend?vendor=twilio")) == {"vendor"}
    assert scope_fields(driver.call("GET", f"/vault/budgets/{base}-evil/run")) == {"label"}
    assert driver.call("GET", f"/vault/budgets/{driver.prefix}run-1").status_code == 200
    assert issuer["token"] not in kb.log()


def test_an_issuer_token_has_no_operator_powers(kb: KeybrakeProcess) -> None:
    driver, issuer = new_driver(kb)
    own = driver.issue().json()
    refused = [
        ("POST", "/vault/issuers", {"vendors": ["stripe"], "label_prefix": "x/",
                                    "allowed_endpoints": [PI], "max_daily_usd_cap": "1"}),
        ("GET", "/vault/issuers", None),
        ("DELETE", f"/vault/issuers/{issuer['issuer_id']}", None),
        ("PUT", f"/vault/budgets/{driver.prefix}run-1", {"daily_usd_cap": "1000"}),
        ("PUT", "/vault/freezes/stripe", {"reason": "x"}),
        ("DELETE", "/vault/freezes/stripe", None),
        ("GET", "/vault/freezes", None),
        ("PATCH", f"/vault/keys/{own['key_id']}", {"daily_usd_cap": "1000"}),
        ("POST", f"/vault/keys/{own['key_id']}/resume", None),
        ("POST", "/vault/bulk/resume", {"label_prefix": driver.prefix}),
        ("GET", "/vault/nothing", None),
    ]  # fmt: skip
    for method, path, body in refused:
        r = driver.call(method, path, body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "issuer_scope", (path, r.text)
    assert driver.call("GET", f"/vault/issuers/{issuer['issuer_id']}").status_code == 200
    assert kb.admin("GET", f"/vault/keys/{own['key_id']}").json()["daily_usd_cap"] == "10.00"


def test_an_issuer_cannot_unfreeze_a_vendor(kb: KeybrakeProcess) -> None:
    driver, _ = new_driver(kb)
    key = driver.issue().json()
    assert kb.admin("PUT", "/vault/freezes/stripe", {"reason": "drill"}).status_code == 200
    try:
        scope_fields(driver.call("DELETE", "/vault/freezes/stripe"))
        r = charge(kb, key["vault_key"])
        assert r.status_code == 503 and r.json()["error"]["code"] == "vendor_frozen"
        assert r.headers["Stripe-Should-Retry"] == "false"
    finally:
        assert kb.admin("DELETE", "/vault/freezes/stripe").json()["lifted"] is True
    assert charge(kb, key["vault_key"]).status_code == 200


def test_revoked_expired_and_guessed_tokens_are_refused(kb: KeybrakeProcess) -> None:
    driver, issuer = new_driver(kb)
    short, _ = new_driver(kb, expires_in="1s")
    guess = Driver(kb, "kbi_" + "A" * 43, driver.prefix)
    assert guess.call("GET", "/vault/keys").json()["error"]["code"] == "admin_token_invalid"
    kb.admin("DELETE", f"/vault/issuers/{issuer['issuer_id']}")
    r = driver.call("GET", "/vault/keys")
    assert (r.status_code, r.json()["error"]["code"]) == (401, "issuer_token_revoked")
    time.sleep(1.2)
    r = short.call("POST", "/vault/keys", {})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "issuer_token_expired")
    # An issuer token is no vault key: the vendor route refuses it.
    assert charge(kb, short.token).json()["error"]["code"] == "vault_key_unknown"
    for token in (driver.token, short.token):
        assert token not in kb.log()


def test_the_token_is_stored_as_its_hash_only(kb: KeybrakeProcess) -> None:
    driver, issuer = new_driver(kb)
    assert driver.issue().status_code == 201
    token = issuer["token"].encode()
    if kb.store:
        import redis

        prefix = kb.store.split("prefix=", 1)[1]
        client = redis.Redis.from_url(kb.store.split("?", 1)[0])
        try:
            for name in client.scan_iter(f"{prefix}*", count=1000):
                kind = client.type(name)
                values: list[bytes] = [name]
                if kind == b"hash":
                    values += [v for kv in client.hgetall(name).items() for v in kv]
                elif kind == b"string":
                    values.append(client.get(name) or b"")
                assert not any(token in v for v in values), name
        finally:
            client.close()
    else:
        for path in kb.data_dir.rglob("*"):
            if path.is_file():
                assert token not in path.read_bytes(), path


def test_flow_files_never_keep_an_issuer_token() -> None:
    from mitmproxy.test import tflow

    from keybrake.proxy.redaction import redacted_state

    token = "kbi_" + "Q" * 43
    flow = tflow.tflow(resp=True)
    assert flow.response is not None
    flow.response.content = ('{"issuer_id":"iss_1","token":"' + token + '"}').encode()
    state = redacted_state(flow)
    assert token.encode() not in state["response"]["content"]
    assert b"kbi_[redacted]" in state["response"]["content"]


def test_the_new_codes_are_in_the_wire_contract_and_never_retried() -> None:
    import stripe as stripe_sdk

    from keybrake.integrations import is_retryable
    from keybrake.wire import REFUSAL_STATUS, RETRY_SAFE, RETRYABLE_CODES

    expected = {
        "issuer_scope": 403,
        "issuer_token_revoked": 401,
        "issuer_token_expired": 401,
        "vendor_frozen": 503,
    }
    for code, status in expected.items():
        assert REFUSAL_STATUS[code] == status
        assert code not in RETRYABLE_CODES and code not in RETRY_SAFE
    body = {"error": {"type": "keybrake_error", "code": "vendor_frozen", "message": "frozen"}}
    error = stripe_sdk.APIError("frozen", json_body=body, http_status=503)
    assert is_retryable(error) is False
