"""An attacker holding an issuer token (or the vault keys it mints) against the budget tree, on
SQLite and on the real Redis: many keys each within the issuer's limits, look-alike labels,
labels the operator's keys use, a label's rate limit spread over many keys, relabelling a key
or raising its own limits. No way spends past a node of the tree or reads another subtree."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

PI = "POST /v1/payment_intents"


class Driver:
    """The admin API with an issuer token as the bearer."""

    def __init__(self, kb: KeybrakeProcess, issuer: dict[str, Any], prefix: str) -> None:
        self.kb, self.issuer, self.prefix = kb, issuer, prefix
        self.token: str = issuer["token"]

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.kb.admin(method, path, body, token=self.token)

    def mint(self, label: str, **fields: Any) -> httpx.Response:
        body = {
            "vendor": "stripe",
            "daily_usd_cap": "50",
            "allowed_endpoints": [PI],
            "expires_in": "1h",
            "agent_run_label": label,
        }
        body.update(fields)
        return self.call("POST", "/vault/keys", body)

    def key(self, label: str) -> str:
        r = self.mint(label)
        assert r.status_code == 201, r.text
        vault_key: str = r.json()["vault_key"]
        return vault_key


def new_driver(kb: KeybrakeProcess, **fields: Any) -> Driver:
    prefix = f"beam/tree-{uuid.uuid4().hex[:8]}/"
    body = {
        "vendors": ["stripe"],
        "label_prefix": prefix,
        "allowed_endpoints": [PI],
        "max_daily_usd_cap": "50",
        "max_expires_in": "2h",
        "budget_daily_usd_cap": "3",
    }
    body.update(fields)
    r = kb.admin("POST", "/vault/issuers", body)
    assert r.status_code == 201, r.text
    return Driver(kb, r.json(), prefix)


def charge(kb: KeybrakeProcess, vault_key: str, cents: int = 100) -> httpx.Response:
    return httpx.post(
        f"{kb.admin_url}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {vault_key}"},
        data={"amount": str(cents), "currency": "usd", "confirm": "true", "payment_method": "pm_x"},
        timeout=15,
    )


def refused(r: httpx.Response, code: str, node: str) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert (error["code"], error["node"]) == (code, node), error
    assert r.headers["X-Keybrake-Error"] == code


def test_many_keys_each_within_the_limits_cannot_pass_the_issuer_budget(
    kb: KeybrakeProcess, stripe_fake: FakeStripe
) -> None:
    driver = new_driver(kb)
    keys = [driver.key(f"{driver.prefix}run-{i}") for i in range(6)]
    answers = [charge(kb, k) for k in keys]
    assert [r.status_code for r in answers] == [200] * 3 + [429] * 3
    for r in answers[3:]:
        refused(r, "cap_exhausted", "issuer")
        assert r.json()["error"]["budget"] == f"issuer:{driver.issuer['issuer_id']}"
        assert r.headers["X-Keybrake-Cap-Hit"] == "true"
    # A fresh key minted after the budget is spent is refused the same way, before the vendor.
    calls = len(stripe_fake.ledger)
    refused(charge(kb, driver.key(f"{driver.prefix}run-late")), "cap_exhausted", "issuer")
    assert len(stripe_fake.ledger) == calls


def test_look_alike_labels_are_separate_nodes_under_the_same_issuer(
    kb: KeybrakeProcess,
) -> None:
    driver = new_driver(kb, budget_daily_usd_cap="2")
    label = f"{driver.prefix}run-1"
    r = kb.admin("PUT", f"/vault/budgets/{label.replace('/', '%2F')}", {"daily_usd_cap": "1"})
    assert r.status_code == 200, r.text
    first = driver.key(label)
    assert charge(kb, first).status_code == 200
    refused(charge(kb, first), "cap_exhausted", "label")
    # Look-alikes of the capped label: each is a label of its own, but all of them are under
    # the issuer, whose node still holds.
    twins = [driver.key(x) for x in (f"{label} ", f"{driver.prefix}Run-1", f"{label}/x")]
    answers = [charge(kb, k) for k in twins]
    assert [r.status_code for r in answers] == [200, 429, 429]
    refused(answers[1], "cap_exhausted", "issuer")
    # A look-alike of the prefix is outside the issuer's scope altogether.
    outside = driver.mint(driver.prefix.rstrip("/") + "-evil/run-1")
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "issuer_scope"


def test_operator_keys_under_the_prefix_neither_escape_nor_double_count(
    kb: KeybrakeProcess,
) -> None:
    driver = new_driver(kb, budget_daily_usd_cap="2")
    ops_label = f"{driver.prefix}ops"
    operator = kb.issue_key(agent_run_label=ops_label, daily_usd_cap="10")
    # The issuer cannot mint into the operator's label (its keys would spend outside the
    # issuer node, or the label's spend would be split), nor the operator into the issuer's.
    conflict = driver.mint(ops_label)
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["code"] == "label_tree_conflict"
    assert conflict.headers["X-Keybrake-Error"] == "label_tree_conflict"
    mine = driver.key(f"{driver.prefix}run-1")
    r = kb.admin(
        "POST",
        "/vault/keys",
        {
            "vendor": "stripe",
            "daily_usd_cap": "10",
            "allowed_endpoints": [PI],
            "expires_in": "1h",
            "agent_run_label": f"{driver.prefix}run-1",
        },
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "label_tree_conflict"
    # The operator's key spends outside the issuer's node: it neither uses up the issuer's
    # budget nor is counted twice.
    for _ in range(3):
        assert charge(kb, operator["vault_key"]).status_code == 200
    assert charge(kb, mine).status_code == 200
    assert charge(kb, mine).status_code == 200
    refused(charge(kb, mine), "cap_exhausted", "issuer")
    tree = driver.call("GET", "/vault/tree").json()
    assert [root["issuer_id"] for root in tree["data"]] == [driver.issuer["issuer_id"]]
    assert tree["data"][0]["daily"]["spent_usd"] == "2.00"
    labels = [lb["label"] for lb in tree["data"][0]["labels"]]
    assert labels == [f"{driver.prefix}run-1"]  # not the operator's label


def test_a_label_rate_limit_holds_across_every_key_of_the_label(kb: KeybrakeProcess) -> None:
    driver = new_driver(kb, budget_daily_usd_cap="100")
    label = f"{driver.prefix}fleet"
    r = kb.admin(
        "PUT", f"/vault/budgets/{label.replace('/', '%2F')}", {"max_requests_per_minute": 3}
    )
    assert r.status_code == 200 and r.json()["max_requests_per_minute"] == 3
    fleet = [driver.key(label) for _ in range(5)]
    answers = [charge(kb, k) for k in fleet]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    for a in answers[3:]:
        refused(a, "rate_limited", "label")
        assert int(a.headers["Retry-After"]) >= 1
    # The issuer cannot lift the limit of its own label, nor raise its own budget.
    lift = driver.call(
        "PUT", f"/vault/budgets/{label.replace('/', '%2F')}", {"max_requests_per_minute": 1000}
    )
    assert lift.status_code == 403
    raise_own = driver.call(
        "PATCH", f"/vault/issuers/{driver.issuer['issuer_id']}", {"budget_daily_usd_cap": "1000"}
    )
    assert raise_own.status_code == 403


def test_a_key_cannot_be_relabelled_out_of_its_tree(kb: KeybrakeProcess) -> None:
    driver = new_driver(kb, budget_daily_usd_cap="1")
    r = driver.mint(f"{driver.prefix}run-1")
    key = r.json()
    assert charge(kb, key["vault_key"]).status_code == 200
    for who in (driver.token, kb.admin_token):
        moved = kb.admin(
            "PATCH", f"/vault/keys/{key['key_id']}", {"agent_run_label": "elsewhere"}, token=who
        )
        assert moved.status_code in (403, 422), moved.text
    refused(charge(kb, key["vault_key"]), "cap_exhausted", "issuer")
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert detail["agent_run_label"] == f"{driver.prefix}run-1"
