"""64 concurrent AI agents against one $1 vault key: the fake vendor bills at most $1.00.

Each agent is an asyncio task with its own ``AsyncOpenAI`` / ``AsyncAnthropic`` client (the
SDKs' own retries left on) that calls the model until the proxy answers ``cap_exhausted``,
then stops (`keybrake.integrations.is_cap_hit`). Every call would cost about $0.02, so the
dollar runs out after some fifty calls while dozens are in flight. Three ledgers must agree:
the fake's (what the vendor billed, computed from the usage it stated), the proxy's store
(what it booked), and the audit log (one row per call, refusals included).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from tests.conftest import KeybrakeProcess, wait_for_rows
from tests.fakes import FakeAnthropic, FakeOpenAI, FakeTLS

from keybrake.core.money import parse_usd
from keybrake.integrations import is_cap_hit

pytestmark = pytest.mark.e2e

AGENTS = 64
CAP_MICROS = 1_000_000
HI = [{"role": "user", "content": "Plan the next step."}]

Call = Callable[[int], Awaitable[None]]


async def run_agents(call: Call, clients: list[Any]) -> Counter[str]:
    """``AGENTS`` agents calling until the cap stops them; what each call ended as."""
    outcomes: Counter[str] = Counter()

    async def agent(i: int) -> None:
        while True:
            try:
                await call(i)
            except (openai.RateLimitError, anthropic.RateLimitError) as e:
                assert is_cap_hit(e), e
                outcomes["cap_exhausted"] += 1
                return
            outcomes["ok"] += 1

    try:
        await asyncio.gather(*(agent(i) for i in range(AGENTS)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    return outcomes


def audit_rows(
    replicas: list[KeybrakeProcess], key: dict[str, Any], expected: int
) -> list[dict[str, Any]]:
    """The key's audit rows over every replica (each writes its own audit log here)."""

    def read() -> list[dict[str, Any]]:
        url = f"/vault/audit?key={key['key_id']}&limit=1000"
        rows = [row for kb in replicas for row in kb.admin("GET", url).json()["data"]]
        # A replica moves rows from the shared outbox into its own audit log here (the
        # README's setup shares one PostgreSQL audit log); a row moved twice is one call.
        return list({row["event_id"]: row for row in rows}.values())

    return wait_for_rows(read, expected, seconds=30)


def assert_cap_held(
    replicas: list[KeybrakeProcess],
    key: dict[str, Any],
    fake: FakeOpenAI | FakeAnthropic,
    outcomes: Counter[str],
    per_call_bound: int,
) -> None:
    billed = fake.charged_usd_micros()
    print(f"{dict(outcomes)}: billed ${billed / 1e6:.6f} of $1.00")
    rows = audit_rows(replicas, key, sum(outcomes.values()))
    assert outcomes["cap_exhausted"] == AGENTS  # every agent stopped cleanly, once
    assert billed <= CAP_MICROS  # $0 over the cap
    assert billed > CAP_MICROS - per_call_bound  # and the cap was usable
    assert len(fake.ledger) == outcomes["ok"]  # refusals never reached the vendor
    assert len(rows) == sum(outcomes.values())  # one audit row per call
    assert Counter(r["outcome"] for r in rows) == {
        "ok": outcomes["ok"],
        "refused": outcomes["cap_exhausted"],
    }
    assert sum(r["actual_micros"] or 0 for r in rows) == billed
    detail = replicas[0].admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert parse_usd(str(detail["spent_today_usd"])) == billed


def issue(kb: KeybrakeProcess, vendor: str, endpoint: str) -> dict[str, Any]:
    return kb.issue_key(
        vendor=vendor,
        daily_usd_cap="1",
        allowed_endpoints=[endpoint],
        agent_run_label=f"agents/{vendor}-swarm",
        max_requests_per_minute=1_000_000,
    )


def test_64_openai_agents_one_dollar_sqlite(
    keybrake_factory: Any, fake_tls: FakeTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    with FakeOpenAI(fake_tls, reply_tokens=5_000) as fake:
        kb: KeybrakeProcess = keybrake_factory({"openai": fake})
        key = issue(kb, "openai", "POST /v1/chat/completions")
        clients = [
            openai.AsyncOpenAI(api_key=key["vault_key"], base_url=f"{kb.admin_url}/openai/v1")
            for _ in range(AGENTS)
        ]

        async def call(i: int) -> None:
            # gpt-4o: 2,000 output tokens at $10 per million is $0.02 a call.
            await clients[i].chat.completions.create(
                model="gpt-4o", messages=HI, max_completion_tokens=2_000
            )

        outcomes = asyncio.run(run_agents(call, clients))
        assert_cap_held([kb], key, fake, outcomes, per_call_bound=21_000)


def test_64_anthropic_streaming_agents_one_dollar_sqlite(
    keybrake_factory: Any, fake_tls: FakeTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    with FakeAnthropic(fake_tls, reply_tokens=5_000) as fake:
        kb: KeybrakeProcess = keybrake_factory({"anthropic": fake})
        key = issue(kb, "anthropic", "POST /v1/messages")
        clients = [
            anthropic.AsyncAnthropic(api_key=key["vault_key"], base_url=f"{kb.admin_url}/anthropic")
            for _ in range(AGENTS)
        ]

        async def call(i: int) -> None:
            # claude-haiku-4-5: 4,000 output tokens at $5 per million is $0.02 a call.
            async with clients[i].messages.stream(
                model="claude-haiku-4-5", max_tokens=4_000, messages=HI
            ) as stream:
                async for _ in stream.text_stream:
                    pass

        outcomes = asyncio.run(run_agents(call, clients))
        assert_cap_held([kb], key, fake, outcomes, per_call_bound=21_000)


@pytest.mark.redis
def test_64_openai_streaming_agents_two_replicas_on_redis(
    keybrake_factory: Any, fake_tls: FakeTLS, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    with FakeOpenAI(fake_tls, reply_tokens=5_000) as fake:
        first: KeybrakeProcess = keybrake_factory({"openai": fake}, store=store)
        second: KeybrakeProcess = keybrake_factory({"openai": fake}, store=store)
        key = issue(first, "openai", "POST /v1/chat/completions")
        clients = [
            openai.AsyncOpenAI(
                api_key=key["vault_key"], base_url=f"{(first, second)[i % 2].admin_url}/openai/v1"
            )
            for i in range(AGENTS)
        ]

        async def call(i: int) -> None:
            stream = await clients[i].chat.completions.create(
                model="gpt-4o", messages=HI, max_completion_tokens=2_000, stream=True
            )
            async for _ in stream:
                pass

        outcomes = asyncio.run(run_agents(call, clients))
        assert_cap_held([first, second], key, fake, outcomes, per_call_bound=21_000)
