"""End to end: the unmodified resend SDK through ``HTTPS_PROXY`` and a fake Resend.

The worker sets ``resend.api_key`` to its vault key and the usual proxy environment
(``HTTPS_PROXY``, ``REQUESTS_CA_BUNDLE``); nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import resend
from resend.exceptions import ResendError, ValidationError
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeResend, FakeTLS

from keybrake.core.money import format_usd

pytestmark = pytest.mark.e2e

PER_RECIPIENT = 900  # policies/resend.yaml: $0.0009
SEND = "POST /emails"
BATCH = "POST /emails/batch"
GET = "GET /emails/{id}"


@pytest.fixture(scope="module")
def _proxy(
    tmp_path_factory: pytest.TempPathFactory, keybrake_certs: Path, fake_tls: FakeTLS
) -> Iterator[tuple[KeybrakeProcess, FakeResend]]:
    """One fake Resend and one proxy for the module: every test issues its own key."""
    with FakeResend(fake_tls, price_per_recipient_usd_micros=PER_RECIPIENT) as fake:
        workdir = tmp_path_factory.mktemp("kb-resend")
        proc = KeybrakeProcess(workdir, keybrake_certs, {"resend": fake}, fake_tls).start()
        try:
            yield proc, fake
        finally:
            proc.stop()


@pytest.fixture
def fake(_proxy: tuple[KeybrakeProcess, FakeResend]) -> FakeResend:
    _proxy[1].reset()
    return _proxy[1]


@pytest.fixture
def kb(
    _proxy: tuple[KeybrakeProcess, FakeResend], fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> KeybrakeProcess:
    proc = _proxy[0]
    # What a worker's environment says: the proxy, and the CA bundle that trusts it.
    monkeypatch.setenv("HTTPS_PROXY", proc.proxy_url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(proc.bundle))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(resend, "api_url", "https://api.resend.com")
    return proc


def issue(
    kb: KeybrakeProcess, monkeypatch: pytest.MonkeyPatch, cap: str = "1", *endpoints: str
) -> dict[str, Any]:
    key = kb.issue_key(
        vendor="resend",
        daily_usd_cap=cap,
        allowed_endpoints=list(endpoints or (SEND, BATCH, GET)),
        agent_run_label="mailer/run-1",
    )
    monkeypatch.setattr(resend, "api_key", key["vault_key"])
    return key


def spent(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return str(detail["spent_today_usd"])


def email(**fields: Any) -> Any:
    return {"from": "Acme <onboarding@acme.dev>", "subject": "hi", "text": "hello", **fields}


def test_send_swaps_in_the_real_key_and_costs_per_recipient(
    kb: KeybrakeProcess, fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue(kb, monkeypatch)
    sent = resend.Emails.send(
        email(to=["a@example.com", "b@example.com"], cc="c@example.com", bcc=["d@example.com"])
    )
    got = resend.Emails.get(sent["id"])
    assert got["to"] == ["a@example.com", "b@example.com"]
    send, fetch = fake.ledger
    for entry in (send, fetch):
        assert entry.header("Authorization") == f"Bearer {fake.api_key}"
        assert key["vault_key"] not in str(entry.headers)
        assert not any(h.lower().startswith("x-keybrake") for h in entry.headers)
    assert send.recipients == 4
    assert spent(kb, key) == format_usd(fake.charged_usd_micros()) == "0.0036"


def test_batch_costs_the_sum_of_its_emails(
    kb: KeybrakeProcess, fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue(kb, monkeypatch)
    batch = resend.Batch.send(
        [
            email(to="a@example.com"),
            email(to=["b@example.com", "c@example.com"], cc="d@example.com"),
            email(to="e@example.com", bcc=["f@example.com"]),
        ]
    )
    assert len(batch["data"]) == 3
    assert fake.ledger[0].recipients == 6
    assert spent(kb, key) == format_usd(fake.charged_usd_micros()) == "0.0054"
    # 101 e-mails: refused by the proxy, Resend never sees them.
    with pytest.raises(ResendError) as e:
        resend.Batch.send([email(to="a@example.com")] * 101)
    assert str(e.value.code) == "422"
    assert e.value.headers.get("X-Keybrake-Error") == "invalid_request"
    assert len(fake.ledger) == 1


def test_allowlist_and_raw_key_are_refused(
    kb: KeybrakeProcess, fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue(kb, monkeypatch, "1", SEND)
    with pytest.raises(ResendError) as e:
        resend.Batch.send([email(to="a@example.com")])
    assert str(e.value.code) == "403"
    assert e.value.headers.get("X-Keybrake-Error") == "endpoint_not_allowed"
    with pytest.raises(ResendError) as e2:
        resend.Emails.get("4ef9a417-02e9-4d39-ad75-9611e0fcc33c")
    assert e2.value.headers.get("X-Keybrake-Error") == "endpoint_not_allowed"
    monkeypatch.setattr(resend, "api_key", fake.api_key)
    with pytest.raises(ResendError) as e3:
        resend.Emails.send(email(to="a@example.com"))
    assert str(e3.value.code) == "403"
    assert e3.value.headers.get("X-Keybrake-Error") == "raw_secret_refused"
    assert fake.ledger == []
    assert spent(kb, key) == "0.00"


def test_vendor_errors_pass_through_and_release(
    kb: KeybrakeProcess, fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue(kb, monkeypatch)
    with pytest.raises(ValidationError) as e:
        resend.Emails.send(email(to="not-an-address"))
    assert str(e.value.code) == "422" and "Invalid `to` field" in e.value.message
    assert fake.ledger[0].status == 422
    assert spent(kb, key) == "0.00"  # Resend refused it: nothing charged, nothing counted


def test_idempotency_key_replays_without_charging_twice(
    kb: KeybrakeProcess, fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue(kb, monkeypatch)
    params = email(to=["a@example.com", "b@example.com"])
    first = resend.Emails.send(params, {"idempotency_key": "welcome/user-42"})
    again = resend.Emails.send(params, {"idempotency_key": "welcome/user-42"})
    assert again["id"] == first["id"]
    assert len(fake.ledger) == 1  # the replay never reached Resend
    assert spent(kb, key) == format_usd(fake.charged_usd_micros()) == "0.0018"


def test_cap_is_enforced_without_contacting_resend(
    kb: KeybrakeProcess, fake: FakeResend, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = issue(kb, monkeypatch, "0.003")
    resend.Emails.send(email(to=["a@example.com", "b@example.com", "c@example.com"]))
    assert spent(kb, key) == "0.0027"
    with pytest.raises(ResendError) as e:
        resend.Emails.send(email(to="d@example.com"))  # $0.0009 more than the $0.0003 left
    assert str(e.value.code) == "429"
    assert e.value.headers.get("X-Keybrake-Cap-Hit") == "true"
    assert e.value.headers.get("X-Keybrake-Error") == "cap_exhausted"
    assert len(fake.ledger) == 1
    assert spent(kb, key) == format_usd(fake.charged_usd_micros()) == "0.0027"
