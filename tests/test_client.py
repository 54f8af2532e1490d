"""`keybrake.client` against a real ``keybrake run`` process and a fake Stripe."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

import httpx
import pytest
from tests.conftest import KeybrakeProcess, free_port
from tests.fakes import FakeStripe

from keybrake.client import (
    AsyncKeybrakeClient,
    InvalidRequest,
    IssuedKey,
    KeybrakeClient,
    KeybrakeError,
    NotFound,
    TransportError,
    Unauthorized,
)

pytestmark = pytest.mark.e2e
LABEL = "client-test/nightly"


def eventually[T](fn: Callable[[], T], ok: Callable[[T], bool], timeout: float = 5) -> T:
    """Audit rows are written in batches off the proxy's event loop: poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def issue(kb: KeybrakeClient, cap: int | str = 10, label: str = LABEL) -> IssuedKey:
    return kb.issue_key(
        vendor="stripe",
        daily_usd_cap=cap,
        allowed_endpoints=["POST /v1/payment_intents"],
        expires_in="2h",
        agent_run_label=label,
    )


def charge(proc: KeybrakeProcess, vault_key: str, cents: int, message_id: str) -> httpx.Response:
    return httpx.post(
        f"{proc.admin_url}/stripe/v1/payment_intents",
        data={
            "amount": str(cents),
            "currency": "usd",
            "confirm": "true",
            "payment_method": "pm_card_visa",
        },
        headers={
            "Authorization": f"Bearer {vault_key}",
            "X-Keybrake-Actor": "client_test",
            "X-Keybrake-Message-Id": message_id,
        },
        timeout=10,
    )


@pytest.fixture
def kb(keybrake_stripe: KeybrakeProcess) -> KeybrakeClient:
    return KeybrakeClient(keybrake_stripe.admin_url, keybrake_stripe.admin_token)


def test_issue_get_list_revoke_round_trip(kb: KeybrakeClient) -> None:
    key = issue(kb, "12.5")
    assert key.vault_key.startswith("kbv_stripe_")
    assert key.vault_key not in repr(key)  # shown once, never logged by accident
    assert key.daily_usd_cap == Decimal("12.50")
    assert key.allowed_endpoints == ("POST /v1/payment_intents",)
    assert key.status == "active" and key.agent_run_label == LABEL
    assert key.expires_at is not None and key.created_at is not None
    assert 7000 < (key.expires_at - key.created_at).total_seconds() <= 7200

    got = kb.get_key(key.key_id)
    assert got.key_id == key.key_id and got.spent_today_usd == Decimal(0)
    assert got.remaining_usd == Decimal("12.50")
    assert got.budgets and got.budgets[0].cap_usd == Decimal("12.50")
    assert key.key_id in [k.key_id for k in kb.list_keys()]

    revoked = kb.revoke_key(key.key_id)
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    assert kb.revoke_key(key.key_id).status == "revoked"  # repeating it is harmless
    assert kb.get_key(key.key_id).status == "revoked"


def test_errors_carry_the_api_code(kb: KeybrakeClient, keybrake_stripe: KeybrakeProcess) -> None:
    with pytest.raises(NotFound) as missing:
        kb.get_key("key_does_not_exist")
    assert (missing.value.code, missing.value.status) == ("not_found", 404)
    with pytest.raises(NotFound):
        kb.revoke_key("key_does_not_exist")

    with pytest.raises(InvalidRequest) as bad:
        kb.issue_key(
            vendor="nope",
            daily_usd_cap=0,
            allowed_endpoints=["POST /v1/payment_intents"],
            agent_run_label=LABEL,
        )
    assert bad.value.code == "invalid_request" and bad.value.status == 422
    assert set(bad.value.fields) >= {"vendor", "daily_usd_cap"}

    with pytest.raises(TypeError):
        kb.issue_key(
            vendor="stripe",
            daily_usd_cap=0.1,  # type: ignore[arg-type]
            allowed_endpoints=["POST /v1/payment_intents"],
            agent_run_label=LABEL,
        )

    wrong = KeybrakeClient(keybrake_stripe.admin_url, "kba_wrong")
    with pytest.raises(Unauthorized) as denied:
        wrong.list_keys()
    assert denied.value.code == "admin_token_invalid" and denied.value.status == 401
    assert isinstance(denied.value, KeybrakeError)

    with (
        KeybrakeClient(f"http://127.0.0.1:{free_port()}", "x", timeout=2) as down,
        pytest.raises(TransportError) as unreachable,
    ):
        down.list_keys()
    assert unreachable.value.code == "connection_error" and unreachable.value.status is None


def test_label_budget_set_read_and_remove(kb: KeybrakeClient) -> None:
    assert kb.get_label_budget(LABEL).daily_usd_cap is None
    assert kb.set_label_budget(LABEL, 500).daily_usd_cap == Decimal("500.00")
    assert kb.get_label_budget(LABEL).daily_usd_cap == Decimal("500.00")
    key = issue(kb, 10)
    scopes = [b.scope for b in kb.get_key(key.key_id).budgets]
    assert len(scopes) == 2  # the key's own budget and the label's
    assert kb.set_label_budget(LABEL, None).daily_usd_cap is None
    with pytest.raises(InvalidRequest):
        kb.set_label_budget(LABEL, "-3")
    # The label node's lifetime cap and request-rate limit, set together with the daily cap.
    both = kb.set_label_budget(LABEL, "5", usd_cap="50", max_requests_per_minute=120)
    assert (both.daily_usd_cap, both.usd_cap, both.max_requests_per_minute) == (
        Decimal("5.00"),
        Decimal("50.00"),
        120,
    )
    assert kb.get_label_budget(LABEL) == both
    scopes = [b.scope for b in kb.get_key(key.key_id).budgets]
    assert scopes == [f"key:{key.key_id}", f"label:{LABEL}", f"label-lifetime:{LABEL}"]


def test_spend_and_audit_after_real_calls(
    kb: KeybrakeClient, keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    key = issue(kb, "2.50")
    assert charge(keybrake_stripe, key.vault_key, 100, "m-1").status_code == 200
    assert charge(keybrake_stripe, key.vault_key, 100, "m-2").status_code == 200
    capped = charge(keybrake_stripe, key.vault_key, 100, "m-3")
    assert capped.status_code == 429 and capped.headers["X-Keybrake-Cap-Hit"] == "true"

    rows = eventually(
        lambda: kb.spend(label=LABEL, group_by="key"), lambda r: bool(r) and r[0].calls == 3
    )
    assert len(rows) == 1
    row = rows[0]
    assert (row.group, row.label, row.vendor) == (key.key_id, LABEL, "stripe")
    assert (row.calls, row.refusals, row.cap_hits) == (3, 1, 1)
    assert row.spent_usd == Decimal("2.00") and row.spent_micros == fake_stripe.charged_usd_micros()
    assert row.daily_cap_usd == Decimal("2.50") and row.remaining_usd == Decimal("0.50")

    entries = kb.audit(key_id=key.key_id)
    assert [e.message_id for e in entries] == ["m-3", "m-2", "m-1"]  # newest first
    assert {e.actor for e in entries} == {"client_test"}
    assert [e.outcome for e in entries] == ["refused", "ok", "ok"]
    assert entries[0].code == "cap_exhausted"
    assert entries[1].actual_micros == 1_000_000 and entries[1].vendor_request_id
    assert entries[1].raw["message_id"] == "m-2"
    assert kb.audit(key_id=key.key_id, outcome="refused")[0].message_id == "m-3"
    assert [e.message_id for e in kb.iter_audit(key_id=key.key_id, page_size=2)] == [
        "m-3",
        "m-2",
        "m-1",
    ]
    with pytest.raises(InvalidRequest):
        kb.spend(group_by="planet")  # type: ignore[arg-type]


async def test_async_client_round_trip(keybrake_stripe: KeybrakeProcess) -> None:
    async with AsyncKeybrakeClient(keybrake_stripe.admin_url, keybrake_stripe.admin_token) as kb:
        assert (await kb.health())["status"] == "ok"
        key = await kb.issue_key(
            vendor="stripe",
            daily_usd_cap=3,
            allowed_endpoints=["POST /v1/payment_intents"],
            agent_run_label="client-test/async",
        )
        assert (await kb.get_key(key.key_id)).remaining_usd == Decimal("3.00")
        assert key.key_id in [k.key_id for k in await kb.list_keys()]
        assert (await kb.set_label_budget("client-test/async", "7.25")).daily_usd_cap == Decimal(
            "7.25"
        )
        assert (await kb.get_label_budget("client-test/async")).daily_usd_cap == Decimal("7.25")
        assert (await kb.revoke_key(key.key_id)).status == "revoked"
        with pytest.raises(NotFound) as e:
            await kb.get_key("key_nope")
        assert e.value.code == "not_found"
        assert await kb.spend(label="client-test/async") == []
        assert [x async for x in kb.iter_audit(label="client-test/async")] == []
