"""The budget tree end to end: two ``keybrake run`` replicas on the real Redis, the real stripe
SDK in base-URL mode, keys minted by an issuer token under two run labels. Concurrent charges
through both replicas end a label node, then the issuer node, exactly at their caps; the
refusals name the node; ``GET /vault/tree`` and ``keybrake spend --tree`` show the tree."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from typing import Any

import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from typer.testing import CliRunner

from keybrake.cli import app
from keybrake.client import KeybrakeClient

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

PI = "POST /v1/payment_intents"


def charge(kb: KeybrakeProcess, vault_key: str, cents: int = 100) -> Any:
    client = stripe.StripeClient(
        vault_key, base_addresses={"api": f"{kb.admin_url}/stripe"}, max_network_retries=2
    )
    return client.v1.payment_intents.create(
        params={"amount": cents, "currency": "usd", "confirm": True, "payment_method": "pm_x"}
    )


def hammer(
    replicas: list[KeybrakeProcess], vault_keys: list[str], attempts: int
) -> tuple[int, list[dict[str, Any]]]:
    """``attempts`` $1 charges per key, all at once over both replicas: (succeeded, refusals)."""
    ok = 0
    refusals: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        nonlocal ok
        kb = replicas[n % len(replicas)]
        vault_key = vault_keys[n % len(vault_keys)]
        try:
            assert charge(kb, vault_key).status == "succeeded"
            with lock:
                ok += 1
        except stripe.StripeError as e:
            assert e.http_status == 429, e
            assert e.headers is not None and e.headers["X-Keybrake-Cap-Hit"] == "true"
            assert e.headers["Stripe-Should-Retry"] == "false"
            with lock:
                refusals.append(e.json_body["error"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(attempts * len(vault_keys))))
    return ok, refusals


def node(tree: dict[str, Any], issuer_id: str, label: str | None = None) -> dict[str, Any]:
    root = next(r for r in tree["data"] if r.get("issuer_id") == issuer_id)
    if label is None:
        return root
    found: dict[str, Any] = next(lb for lb in root["labels"] if lb["label"] == label)
    return found


@pytest.mark.parametrize("setup", ["sqlite", "redis-two-replicas"])
def test_a_label_then_the_issuer_end_exactly_at_their_caps(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str, setup: str
) -> None:
    if setup == "sqlite":  # one proxy on its embedded store, the same concurrency
        a: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
        b = a
    else:
        store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
        a = keybrake_factory({"stripe": fake_stripe}, store=store)
        b = keybrake_factory({"stripe": fake_stripe}, store=store)
    r = a.admin(
        "POST",
        "/vault/issuers",
        {
            "name": "beam billing driver",
            "vendors": ["stripe"],
            "label_prefix": "beam/billing/",
            "allowed_endpoints": [PI],
            "max_daily_usd_cap": "50",
            "max_expires_in": "2h",
            "budget_daily_usd_cap": "10",
        },
    )
    assert r.status_code == 201, r.text
    issuer = r.json()
    assert issuer["budget_enforced"] is True
    budget = b.admin("PUT", "/vault/budgets/beam%2Fbilling%2Frun-1", {"daily_usd_cap": "4"})
    assert budget.status_code == 200, budget.text
    with KeybrakeClient(b.admin_url, issuer["token"]) as driver:
        keys = {
            label: [
                driver.issue_key(
                    vendor="stripe",
                    daily_usd_cap="50",
                    allowed_endpoints=[PI],
                    expires_in="1h",
                    agent_run_label=label,
                ).vault_key
                for _ in range(2)
            ]
            for label in ("beam/billing/run-1", "beam/billing/run-2")
        }

    # Run 1's keys, through both replicas at once: the label node ends at exactly $4.
    ok, refusals = hammer([a, b], keys["beam/billing/run-1"], attempts=6)
    assert ok == 4 and len(refusals) == 8
    assert {(e["code"], e["node"], e["budget"]) for e in refusals} == {
        ("cap_exhausted", "label", "label:beam/billing/run-1")
    }
    # Every key of both runs: the issuer node ends at exactly $10.
    ok, refusals = hammer([a, b], keys["beam/billing/run-1"] + keys["beam/billing/run-2"], 5)
    assert ok == 6
    assert {e["node"] for e in refusals} <= {"label", "issuer"}
    assert any(e["budget"] == f"issuer:{issuer['issuer_id']}" for e in refusals)
    assert len([e for e in fake_stripe.ledger if e.status == 200]) == 10  # $1 each

    tree = a.admin("GET", "/vault/tree").json()
    top = node(tree, issuer["issuer_id"])
    assert top["daily"] == {
        "cap_usd": "10.00",
        "spent_usd": "10.00",
        "reserved_usd": "0.00",
        "remaining_usd": "0.00",
    }
    run1 = node(tree, issuer["issuer_id"], "beam/billing/run-1")
    run2 = node(tree, issuer["issuer_id"], "beam/billing/run-2")
    assert (run1["daily"]["spent_usd"], run1["daily"]["remaining_usd"]) == ("4.00", "0.00")
    assert run2["daily"]["spent_usd"] == "6.00" and run2["daily"]["cap_usd"] is None
    assert sum(float(k["daily"]["spent_usd"]) for k in run1["keys"] + run2["keys"]) == 10
    assert [len(run1["keys"]), len(run2["keys"])] == [2, 2]

    # An issuer token sees its own subtree only; the operator's keys are not in it.
    a.issue_key(agent_run_label="elsewhere/run")
    mine = b.admin("GET", "/vault/tree", token=issuer["token"]).json()
    assert [r["issuer_id"] for r in mine["data"]] == [issuer["issuer_id"]]
    everything = b.admin("GET", "/vault/tree").json()
    assert {r["node"] for r in everything["data"]} == {"issuer", "operator"}

    # The command line shows the same tree through the admin API.
    shown = CliRunner().invoke(
        app,
        ["spend", "--tree", "--admin-url", a.admin_url],
        env={"KEYBRAKE_ADMIN_TOKEN": a.admin_token},
    )
    assert shown.exit_code == 0, shown.output
    assert f"issuer {issuer['issuer_id']}" in shown.output
    assert "label beam/billing/run-1" in shown.output and "of $10.00, $0.00 left" in shown.output
    as_json = CliRunner().invoke(
        app,
        ["spend", "--tree", "--json", "--admin-url", a.admin_url],
        env={"KEYBRAKE_ADMIN_TOKEN": issuer["token"]},
    )
    assert json.loads(as_json.stdout)["data"][0]["daily"]["spent_usd"] == "10.00"
