"""The cap under concurrency, end to end: many clients, real proxies, the fake Stripe's ledger.

Every case sends PaymentIntent creates that charge at once (``confirm=true`` with
``pm_card_visa``) through real ``keybrake run`` processes from many concurrent keep-alive
clients, then checks three ledgers against each other: what the fake vendor charged, what the
clients were told (successes and ``429 cap_exhausted`` refusals) and what the proxy's store
says was spent. The cap must hold exactly (never above it) and be fully usable (never below).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e

STRIPE_PI = "https://api.stripe.com/v1/payment_intents"
ONE_DOLLAR_CHARGE = {
    "amount": "100",
    "currency": "usd",
    "confirm": "true",
    "payment_method": "pm_card_visa",
}
USD = 1_000_000
# These tests are about dollars: a request-rate limit the hammer never reaches.
MANY = 1_000_000


@dataclass(frozen=True)
class Outcome:
    """What one client saw for one call."""

    status: int
    proxy: int  # index of the proxy the call went through
    vault_key: str
    cap_hit: str | None
    error: dict[str, Any] | None
    pi_status: str | None


async def hammer(
    targets: list[tuple[KeybrakeProcess, str]],
    total: int,
    concurrency: int,
    data: dict[str, str] | None = None,
) -> list[Outcome]:
    """Send ``total`` charges from ``concurrency`` concurrent clients.

    Client ``i`` is one keep-alive connection through proxy ``targets[i % n][0]`` using vault
    key ``targets[i % n][1]``; clients pull calls from one shared counter until ``total``.
    """
    body = data or ONE_DOLLAR_CHARGE
    counter = itertools.count()
    contexts: dict[int, ssl.SSLContext] = {}
    outcomes: list[Outcome] = []

    async def client(i: int) -> None:
        index = i % len(targets)
        kb, vault_key = targets[index]
        ctx = contexts.setdefault(index, kb.ssl_context())
        async with httpx.AsyncClient(
            proxy=kb.proxy_url,
            verify=ctx,
            timeout=60,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers={"Authorization": f"Bearer {vault_key}"},
        ) as http:
            while next(counter) < total:
                r = await http.post(STRIPE_PI, data=body)
                payload = r.json()
                outcomes.append(
                    Outcome(
                        status=r.status_code,
                        proxy=index,
                        vault_key=vault_key,
                        cap_hit=r.headers.get("X-Keybrake-Cap-Hit"),
                        error=payload.get("error"),
                        pi_status=payload.get("status"),
                    )
                )

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return outcomes


def run_hammer(
    targets: list[tuple[KeybrakeProcess, str]],
    total: int,
    concurrency: int,
    data: dict[str, str] | None = None,
) -> tuple[list[Outcome], float]:
    started = time.monotonic()
    outcomes = asyncio.run(hammer(targets, total, concurrency, data))
    return outcomes, time.monotonic() - started


def assert_cap_held(
    outcomes: list[Outcome],
    fake: FakeStripe,
    *,
    total: int,
    cap_usd: int,
    cap_label: str,
) -> None:
    """Exactly ``cap_usd`` one-dollar charges succeeded, every other call was a cap refusal,
    and the vendor charged exactly the cap."""
    assert len(outcomes) == total
    by_status = Counter(o.status for o in outcomes)
    assert by_status == {200: cap_usd, 429: total - cap_usd}, by_status
    for o in outcomes:
        if o.status == 200:
            assert o.pi_status == "succeeded"
            assert o.cap_hit is None
            continue
        assert o.cap_hit == "true"
        assert o.error is not None
        assert o.error["type"] == "keybrake_error"
        assert o.error["code"] == "cap_exhausted"
        assert o.error["cap_usd"] == cap_label
        # Every reservation is exactly $1, so a $1 call is refused only when the whole cap is
        # spent or reserved: the body must say so in dollars.
        assert o.error["spent_usd"] == cap_label
        assert o.error["remaining_usd"] == "0.00"
        assert o.error["needed_usd"] == "1.00"
    charges = [e for e in fake.ledger if e.method == "POST" and e.route == "/v1/payment_intents"]
    # The vendor was contacted only for the calls that were let through.
    assert len(charges) == cap_usd
    assert fake.charged_usd_micros() == cap_usd * USD
    assert fake.errors == []


def assert_key_spent(kb: KeybrakeProcess, key_id: str, spent: str) -> dict[str, Any]:
    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key_id}").json()
    assert detail["spent_today_usd"] == spent, detail
    key_budget = detail["budgets"][0]
    assert key_budget["scope"] == f"key:{key_id}"
    assert key_budget["spent_usd"] == spent
    assert key_budget["reserved_usd"] == "0.00"  # every reservation was settled
    return detail


def test_sqlite_one_proxy_4000_calls_64_clients_300_dollar_cap(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=300, max_requests_per_minute=MANY)
    outcomes, elapsed = run_hammer([(kb, key["vault_key"])], total=4000, concurrency=64)
    print(f"sqlite, 1 proxy: 4000 calls from 64 clients in {elapsed:.1f}s")
    assert_cap_held(outcomes, fake_stripe, total=4000, cap_usd=300, cap_label="300.00")
    detail = assert_key_spent(kb, key["key_id"], "300.00")
    assert detail["remaining_usd"] == "0.00"
    # The key's spend equals what the vendor actually charged.
    assert detail["budgets"][0]["spent_usd"] == f"{fake_stripe.charged_usd_micros() // USD}.00"


@pytest.mark.redis
def test_redis_two_proxies_4000_calls_64_clients_300_dollar_cap(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    a: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    b: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    key = a.issue_key(daily_usd_cap=300, max_requests_per_minute=MANY)
    # Keys live in Redis: the key issued through proxy A is known to proxy B.
    assert b.admin("GET", f"/vault/keys/{key['key_id']}").status_code == 200
    vk = key["vault_key"]
    outcomes, elapsed = run_hammer([(a, vk), (b, vk)], total=4000, concurrency=64)
    print(f"redis, 2 proxies: 4000 calls from 64 clients in {elapsed:.1f}s")
    assert_cap_held(outcomes, fake_stripe, total=4000, cap_usd=300, cap_label="300.00")
    # Both replicas took part in spending the cap, and both see the same spend.
    per_proxy = Counter(o.proxy for o in outcomes if o.status == 200)
    assert per_proxy[0] > 0 and per_proxy[1] > 0, per_proxy
    calls_per_proxy = Counter(o.proxy for o in outcomes)
    assert min(calls_per_proxy.values()) > 400, calls_per_proxy
    for kb in (a, b):
        assert_key_spent(kb, key["key_id"], "300.00")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_label_budget_caps_the_keys_of_a_label_together(
    backend: str, keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}" if backend == "redis" else ""
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    label = "dramatiq/caps-label"
    # Labels contain "/": the admin route takes the label as one percent-encoded segment.
    put = kb.admin("PUT", f"/vault/budgets/{quote(label, safe='')}", {"daily_usd_cap": 5})
    assert put.status_code == 200, put.text
    assert put.json()["daily_usd_cap"] == "5.00"
    k1 = kb.issue_key(daily_usd_cap=10, agent_run_label=label)
    k2 = kb.issue_key(daily_usd_cap=10, agent_run_label=label)
    other = kb.issue_key(daily_usd_cap=10, agent_run_label="dramatiq/another-run")

    outcomes, _ = run_hammer(
        [(kb, k1["vault_key"]), (kb, k2["vault_key"])], total=40, concurrency=16
    )
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    assert len(ok) == 5 and len(refused) == 35, Counter(o.status for o in outcomes)
    for o in refused:
        assert o.status == 429 and o.cap_hit == "true"
        assert o.error is not None and o.error["code"] == "cap_exhausted"
        # The label budget, not the key's own $10, is what ran out.
        assert o.error["budget"] == f"label:{label}"
        assert o.error["cap_usd"] == "5.00"
        assert o.error["remaining_usd"] == "0.00"
    assert fake_stripe.charged_usd_micros() == 5 * USD

    spent = {}
    for k in (k1, k2):
        detail = kb.admin("GET", f"/vault/keys/{k['key_id']}").json()
        scopes = {b["scope"]: b for b in detail["budgets"]}
        assert scopes[f"label:{label}"]["spent_usd"] == "5.00"
        assert scopes[f"label:{label}"]["remaining_usd"] == "0.00"
        assert detail["remaining_usd"] == "0.00"
        spent[k["key_id"]] = int(scopes[f"key:{k['key_id']}"]["spent_usd"].split(".")[0])
    # The two keys' own spend adds up to the label's (and to what the vendor charged).
    assert sum(spent.values()) == 5
    assert {o.vault_key for o in ok} <= {k1["vault_key"], k2["vault_key"]}

    # A key with another label is not affected by this label's budget.
    r = httpx.post(
        STRIPE_PI,
        data=ONE_DOLLAR_CHARGE,
        headers={"Authorization": f"Bearer {other['vault_key']}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Keybrake-Remaining-Usd"] == "9.00"
