"""No real secret, admin token or vault key is ever written to disk by the proxy.

One real proxy process with all three fake vendors and a flow file (``-w``) runs successes,
refusals, a vendor error and a connection reset; after SIGTERM every byte it left behind is
scanned: the data dir (SQLite files including ``-wal``/``-shm``, ``audit.db``, anything
else), the proxy log and the flow file.
"""

from __future__ import annotations

import base64
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeResend, FakeStripe, FakeTwilio

from .conftest import STRIPE, charge, code_of, wait_audit

pytestmark = pytest.mark.e2e

TWILIO = "https://api.twilio.com"
RESEND = "https://api.resend.com"
TWILIO_SEND = "POST /2010-04-01/Accounts/{AccountSid}/Messages.json"


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def _client(kb: KeybrakeProcess) -> httpx.Client:
    return httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context(), timeout=30)


def _twilio_send(c: httpx.Client, sid: str, password: str) -> httpx.Response:
    return c.post(
        f"{TWILIO}/2010-04-01/Accounts/{sid}/Messages.json",
        data={"To": "+14155550100", "From": "+15005550006", "Body": "hello"},
        auth=(sid, password),
    )


def _resend_send(c: httpx.Client, key: str) -> httpx.Response:
    return c.post(
        f"{RESEND}/emails",
        json={"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "html": "<p>x"},
        headers={"Authorization": f"Bearer {key}"},
    )


def _hits(files: list[Path], needles: dict[str, bytes]) -> list[str]:
    found = []
    for f in files:
        data = f.read_bytes()
        for name, needle in needles.items():
            if needle and needle in data:
                found.append(f"{name} in {f}")
    return found


@pytest.mark.parametrize("what", ["real_secrets", "vault_keys"])
def test_no_secret_reaches_disk(
    what: str,
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    fake_twilio: FakeTwilio,
    fake_resend: FakeResend,
    tmp_path: Path,
) -> None:
    flowfile = tmp_path / "flows.mitm"
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe, "twilio": fake_twilio, "resend": fake_resend},
        extra_args=["-w", str(flowfile)],
    )
    stripe_key = kb.issue_key(daily_usd_cap=300)["vault_key"]
    small_key = kb.issue_key(daily_usd_cap=1)["vault_key"]
    twilio_key = kb.issue_key(vendor="twilio", allowed_endpoints=[TWILIO_SEND])["vault_key"]
    resend_key = kb.issue_key(vendor="resend", allowed_endpoints=["POST /emails"])["vault_key"]
    sid = fake_twilio.account_sid
    codes: list[str] = []
    with _client(kb) as c:
        # Successes, one per vendor.
        assert charge(kb, stripe_key, 500).status_code == 200
        r = _twilio_send(c, sid, twilio_key)
        assert r.status_code == 201, r.text
        r = _resend_send(c, resend_key)
        assert r.status_code == 200, r.text
        # Refusals.
        codes.append(code_of(charge(kb, "kbv_stripe_" + "A" * 43, 500)))
        codes.append(code_of(charge(kb, fake_stripe.secret, 500)))
        codes.append(code_of(_twilio_send(c, sid, fake_twilio.auth_token)))
        codes.append(code_of(_resend_send(c, fake_resend.api_key)))
        r = c.post(
            f"{STRIPE}/v1/refunds",
            data={"amount": "100", "currency": "usd", "charge": "ch_1"},
            headers={"Authorization": f"Bearer {stripe_key}"},
        )
        codes.append(code_of(r))
        codes.append(code_of(charge(kb, small_key, 50_000)))
    assert codes == [
        "vault_key_unknown",
        "raw_secret_refused",
        "raw_secret_refused",
        "raw_secret_refused",
        "endpoint_not_allowed",
        "cap_exhausted",
    ]
    # A vendor error and a connection reset after the request reached the vendor.
    fake_stripe.fail_next()
    assert charge(kb, stripe_key, 700).status_code == 500
    fake_stripe.reset_connection_next(processed=True)
    try:
        reset = charge(kb, stripe_key, 900).status_code
    except httpx.HTTPError:
        reset = 0
    assert reset != 200
    # Admin reads with the admin token (it travels in a header, never to disk).
    assert kb.admin("GET", "/vault/keys").status_code == 200
    wait_audit(kb, 11)
    assert kb.stop(signal.SIGTERM) == 0

    files = [p for p in kb.data_dir.rglob("*") if p.is_file()]
    assert kb.data_dir / "audit.db" in files
    files += [kb.log_path, flowfile]
    assert flowfile.stat().st_size > 0
    real = {
        "stripe secret": fake_stripe.secret.encode(),
        "stripe Basic": _b64(f"{fake_stripe.secret}:"),
        "twilio auth token": fake_twilio.auth_token.encode(),
        "twilio Basic": _b64(f"{sid}:{fake_twilio.auth_token}"),
        "resend api key": fake_resend.api_key.encode(),
        "admin token": kb.admin_token.encode(),
    }
    vault = {
        "stripe vault key": stripe_key.encode(),
        "small vault key": small_key.encode(),
        "twilio vault key": twilio_key.encode(),
        "twilio vault Basic": _b64(f"{sid}:{twilio_key}"),
        "resend vault key": resend_key.encode(),
    }
    # Vault keys are shown once, in the issue response; no file documents keeping them.
    assert _hits(files, real if what == "real_secrets" else vault) == []
