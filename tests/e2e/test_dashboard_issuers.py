"""The dashboard's issuer tokens and vendor freezes page, through a real proxy (plain HTTP
forms, as a browser posts them): create a token (shown once), refuse a bad one naming the
fields, revoke one with its keys, freeze and unfreeze a vendor. An issuer token cannot sign in."""

from __future__ import annotations

import re

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e


def signed_in(kb: KeybrakeProcess) -> tuple[dict[str, str], str]:
    r = httpx.post(f"{kb.admin_url}/login", data={"token": kb.admin_token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    jar = {"keybrake_session": r.headers["set-cookie"].split(";")[0].split("=", 1)[1]}
    page = httpx.get(f"{kb.admin_url}/dashboard/issuers", cookies=jar)
    assert page.status_code == 200 and "No issuer tokens yet." in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return jar, csrf.group(1)


def test_issuers_and_freezes_in_the_dashboard(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    base = kb.admin_url
    jar, csrf = signed_in(kb)
    form = {
        "csrf": csrf,
        "name": "beam billing driver",
        "vendor": "stripe",
        "label_prefix": "beam/billing/",
        "max_daily_usd_cap": "300",
        "max_expires_in": "2h",
        "allowed_endpoints": "POST /v1/payment_intents\n",
    }
    bad = httpx.post(
        f"{base}/dashboard/issuers", cookies=jar, data=form | {"label_prefix": "beam/../x"}
    )
    assert bad.status_code == 422 and "label_prefix" in bad.text
    created = httpx.post(f"{base}/dashboard/issuers", cookies=jar, data=form)
    assert created.status_code == 303
    shown = httpx.get(f"{base}/dashboard/issuers", cookies=jar).text
    token = re.search(r'id="new-issuer-token">(kbi_[A-Za-z0-9_-]{43})<', shown)
    assert token is not None and "beam billing driver" in shown
    assert token.group(1) not in httpx.get(f"{base}/dashboard/issuers", cookies=jar).text
    issuer_id = re.search(r'id="issuer-(iss_[0-9a-f]+)"', shown)
    assert issuer_id is not None

    # The token works on the admin API, not for the dashboard.
    r = kb.admin(
        "POST",
        "/vault/keys",
        {
            "vendor": "stripe",
            "daily_usd_cap": "10",
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "expires_in": "1h",
            "agent_run_label": "beam/billing/run-1",
        },
        token=token.group(1),
    )
    assert r.status_code == 201, r.text
    minted = r.json()
    login = httpx.post(f"{base}/login", data={"token": token.group(1)}, follow_redirects=False)
    assert login.status_code == 401

    revoke = f"{base}/dashboard/issuers/{issuer_id.group(1)}/revoke"
    assert httpx.post(revoke, cookies=jar, data={"csrf": "nope"}).status_code == 403
    r = httpx.post(revoke, cookies=jar, data={"csrf": csrf, "revoke_keys": "1"})
    assert r.status_code == 303
    page = httpx.get(f"{base}/dashboard/issuers", cookies=jar).text
    assert "and 1 keys it minted" in page
    assert kb.admin("GET", f"/vault/keys/{minted['key_id']}").json()["status"] == "revoked"

    r = httpx.post(
        f"{base}/dashboard/freezes",
        cookies=jar,
        data={"csrf": csrf, "vendor": "stripe", "reason": "drill <b>"},
    )
    assert r.status_code == 303
    page = httpx.get(f"{base}/dashboard/issuers", cookies=jar).text
    assert 'id="freeze-stripe"' in page and "drill &lt;b&gt;" in page
    key = kb.issue_key()
    refused = httpx.post(
        f"{base}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        data={"amount": "100", "currency": "usd"},
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "vendor_frozen"
    r = httpx.post(f"{base}/dashboard/freezes/stripe/unfreeze", cookies=jar, data={"csrf": csrf})
    assert r.status_code == 303
    assert kb.admin("GET", "/vault/freezes").json()["data"] == []
