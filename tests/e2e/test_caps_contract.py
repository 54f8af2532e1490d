"""The cap contract at the proxy level (the store's own contract is in ``tests/store``).

- a call larger than what remains is refused, a smaller one still goes through;
- the daily window is the UTC day: spend written into the proxy's store (directly, with an
  injected clock) yesterday does not count today, spend at 00:00:00 UTC today does;
- a lifetime ``usd_cap`` is checked in the same step as the daily cap.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

from keybrake.store import open_store

pytestmark = pytest.mark.e2e

USD = 1_000_000


def charge(
    kb: KeybrakeProcess, vault_key: str, amount: int, currency: str = "usd"
) -> httpx.Response:
    return httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={
            "amount": str(amount),
            "currency": currency,
            "confirm": "true",
            "payment_method": "pm_card_visa",
        },
        headers={"Authorization": f"Bearer {vault_key}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )


def test_a_call_above_the_remaining_budget_is_refused_a_smaller_one_passes(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="10")
    vk = key["vault_key"]
    assert charge(kb, vk, 950).headers["X-Keybrake-Remaining-Usd"] == "0.50"

    refused = charge(kb, vk, 100)
    assert refused.status_code == 429
    assert refused.headers["X-Keybrake-Cap-Hit"] == "true"
    err = refused.json()["error"]
    assert (err["code"], err["cap_usd"], err["spent_usd"], err["remaining_usd"]) == (
        "cap_exhausted",
        "10.00",
        "9.50",
        "0.50",
    )
    assert err["needed_usd"] == "1.00"

    # A $0.40 call fits. (Stripe, and the fake, refuse USD charges under $0.50, so the
    # $0.40 is R$2.00 at the policy's 0.20 USD/BRL.)
    small = charge(kb, vk, 200, currency="brl")
    assert small.status_code == 200, small.text
    assert small.headers["X-Keybrake-Spent-Usd"] == "9.90"
    assert small.headers["X-Keybrake-Remaining-Usd"] == "0.10"
    assert charge(kb, vk, 50).status_code == 429
    assert len(fake_stripe.ledger) == 2  # refusals never reached the vendor


def _store_url(kb: KeybrakeProcess) -> str:
    return kb.store or f"sqlite:///{(kb.data_dir / 'keybrake.db').resolve()}"


async def _spend_directly(url: str, key_id: str, spends: list[tuple[dt.datetime, int]]) -> None:
    """Reserve and settle ``micros`` at ``moment`` in the proxy's own store."""
    store = open_store(url)
    await store.open()
    try:
        key = await store.get_key(key_id)
        assert key is not None
        for i, (moment, micros) in enumerate(spends):
            rid = f"res_direct_{key_id}_{i}"
            result = await store.reserve(key, rid, micros, moment)
            assert result.ok
            assert await store.settle(rid, micros)
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_the_daily_cap_window_is_the_utc_day(
    backend: str, keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}" if backend == "redis" else ""
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    key = kb.issue_key(daily_usd_cap="10")
    now = dt.datetime.now(dt.UTC)
    if (now + dt.timedelta(seconds=20)).date() != now.date():
        time.sleep(21)  # do not straddle midnight UTC while the test runs
        now = dt.datetime.now(dt.UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # The whole cap spent in the last microsecond of yesterday (UTC), and $8.50 at 00:00:00.
    asyncio.run(
        _spend_directly(
            _store_url(kb),
            key["key_id"],
            [(midnight - dt.timedelta(microseconds=1), 10 * USD), (midnight, 8_500_000)],
        )
    )
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert detail["budgets"][0]["window"] == now.strftime("%Y-%m-%d")
    assert detail["spent_today_usd"] == "8.50"

    ok = charge(kb, key["vault_key"], 100)
    assert ok.status_code == 200, ok.text
    assert ok.headers["X-Keybrake-Spent-Usd"] == "9.50"
    refused = charge(kb, key["vault_key"], 100)
    assert refused.status_code == 429
    assert refused.json()["error"]["window"] == now.strftime("%Y-%m-%d")
    assert refused.json()["error"]["spent_usd"] == "9.50"
    assert fake_stripe.charged_usd_micros() == 1 * USD


def test_lifetime_cap_is_checked_with_the_daily_cap(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="10", usd_cap="2.50")
    assert charge(kb, key["vault_key"], 100).headers["X-Keybrake-Remaining-Usd"] == "1.50"
    assert charge(kb, key["vault_key"], 100).headers["X-Keybrake-Remaining-Usd"] == "0.50"
    refused = charge(kb, key["vault_key"], 100)
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["budget"] == f"key-lifetime:{key['key_id']}"
    assert (err["window"], err["cap_usd"], err["remaining_usd"]) == ("lifetime", "2.50", "0.50")
    assert fake_stripe.charged_usd_micros() == 2 * USD
