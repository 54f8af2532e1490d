"""The dashboard's budget tree page through a real proxy: from the issuers to an issuer's run
labels, to a label's keys, to a key's audit rows; spent, reserved and remaining per node."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e

PI = "POST /v1/payment_intents"


def signed_in(kb: KeybrakeProcess) -> dict[str, str]:
    r = httpx.post(f"{kb.admin_url}/login", data={"token": kb.admin_token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return {"keybrake_session": r.headers["set-cookie"].split(";")[0].split("=", 1)[1]}


def charge(kb: KeybrakeProcess, vault_key: str, cents: int) -> httpx.Response:
    return httpx.post(
        f"{kb.admin_url}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {vault_key}"},
        data={"amount": str(cents), "currency": "usd", "confirm": "true", "payment_method": "pm_x"},
        timeout=15,
    )


def test_drill_down_from_issuer_to_label_to_key_to_audit_rows(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    r = kb.admin(
        "POST",
        "/vault/issuers",
        {
            "name": "nightly driver",
            "vendors": ["stripe"],
            "label_prefix": "beam/nightly/",
            "allowed_endpoints": [PI],
            "max_daily_usd_cap": "50",
            "max_expires_in": "2h",
            "budget_daily_usd_cap": "20",
        },
    )
    issuer: dict[str, Any] = r.json()
    minted = kb.admin(
        "POST",
        "/vault/keys",
        {
            "vendor": "stripe",
            "daily_usd_cap": "10",
            "allowed_endpoints": [PI],
            "expires_in": "1h",
            "agent_run_label": "beam/nightly/run-9",
        },
        token=issuer["token"],
    ).json()
    operator = kb.issue_key(agent_run_label="ops/run")
    assert charge(kb, minted["vault_key"], 350).status_code == 200
    assert charge(kb, operator["vault_key"], 100).status_code == 200
    jar = signed_in(kb)
    base = f"{kb.admin_url}/dashboard/tree"

    top = httpx.get(base, cookies=jar)
    assert top.status_code == 200, top.text
    assert f'id="node-{issuer["issuer_id"]}"' in top.text and 'id="node-operator"' in top.text
    assert "$3.50" in top.text and "$16.50" in top.text  # spent and remaining of $20

    labels = httpx.get(base, params={"issuer": issuer["issuer_id"]}, cookies=jar)
    assert labels.status_code == 200 and "beam/nightly/run-9" in labels.text
    assert "ops/run" not in labels.text

    keys = httpx.get(
        base, params={"issuer": issuer["issuer_id"], "label": "beam/nightly/run-9"}, cookies=jar
    )
    assert keys.status_code == 200 and f'id="key-{minted["key_id"]}"' in keys.text
    assert f'href="/dashboard/audit?key={minted["key_id"]}"' in keys.text
    assert "$6.50" in keys.text  # the key's $10 daily cap, less $3.50

    audit = httpx.get(f"{kb.admin_url}/dashboard/audit?key={minted['key_id']}", cookies=jar)
    assert audit.status_code == 200 and minted["key_id"] in audit.text

    # The issuers page shows the budget and leads to the issuer's tree.
    issuers = httpx.get(f"{kb.admin_url}/dashboard/issuers", cookies=jar).text
    assert f'href="/dashboard/tree?issuer={issuer["issuer_id"]}"' in issuers
    assert "$20.00 / \u2013" in issuers  # no lifetime budget

    ops = httpx.get(base, params={"issuer": "operator"}, cookies=jar)
    assert ops.status_code == 200 and "ops/run" in ops.text
    assert httpx.get(base, params={"issuer": "iss_nope"}, cookies=jar).status_code == 404
    # Issuing a key into the issuer's label from the dashboard: refused, naming the tree.
    page = httpx.get(f"{kb.admin_url}/dashboard/keys", cookies=jar)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    form = {
        "csrf": csrf.group(1),
        "vendor": "stripe",
        "label": "beam/nightly/run-9",
        "daily_usd_cap": "5",
        "expires_in": "1h",
        "allowed_endpoints": PI,
    }
    conflict = httpx.post(f"{kb.admin_url}/dashboard/keys", cookies=jar, data=form)
    assert conflict.status_code == 409 and "budget tree" in conflict.text
    # Signed out: the sign-in page, not the tree.
    assert "beam/nightly" not in httpx.get(base, follow_redirects=True).text
