"""End to end: the unmodified ``openai`` and ``anthropic`` SDKs through a real proxy.

Forward-proxy mode: the worker's environment has ``HTTPS_PROXY`` and ``SSL_CERT_FILE`` (the
Keybrake CA bundle) and the SDKs keep their default base URLs. Base-URL mode: the SDKs'
``base_url`` points at ``<admin listener>/openai/v1`` or ``/anthropic``, nothing else. The
fakes bill every call at list price from the usage they state; the proxy must book exactly
that, per call, with the vendor's request id in the audit row, and never let the vault key
reach the vendor nor the real key reach the worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from tests.conftest import KeybrakeProcess, wait_for_rows
from tests.fakes import FakeAnthropic, FakeOpenAI, FakeTLS

from keybrake.core.money import format_usd
from keybrake.integrations import is_cap_hit, keybrake_error_code

pytestmark = pytest.mark.e2e

CHAT = "POST /v1/chat/completions"
RESPONSES = "POST /v1/responses"
EMBEDDINGS = "POST /v1/embeddings"
MESSAGES = "POST /v1/messages"
HI = [{"role": "user", "content": "Say hello to the budget."}]


@pytest.fixture(scope="module")
def _proxy(
    tmp_path_factory: pytest.TempPathFactory, keybrake_certs: Path, fake_tls: FakeTLS
) -> Iterator[tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]]:
    with FakeOpenAI(fake_tls) as ofake, FakeAnthropic(fake_tls) as afake:
        work = tmp_path_factory.mktemp("kb-ai")
        kb = KeybrakeProcess(
            work, keybrake_certs, {"openai": ofake, "anthropic": afake}, fake_tls
        ).start()
        try:
            yield kb, ofake, afake
        finally:
            kb.stop()


@pytest.fixture
def kb(_proxy: tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]) -> KeybrakeProcess:
    return _proxy[0]


@pytest.fixture
def ofake(_proxy: tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]) -> FakeOpenAI:
    _proxy[1].reset()
    return _proxy[1]


@pytest.fixture
def afake(_proxy: tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]) -> FakeAnthropic:
    _proxy[2].reset()
    return _proxy[2]


@pytest.fixture
def worker_env(kb: KeybrakeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a forward-proxy worker's environment says: the proxy and the CA bundle."""
    for name in ("NO_PROXY", "no_proxy", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", kb.proxy_url)
    monkeypatch.setenv("SSL_CERT_FILE", str(kb.bundle))


@pytest.fixture
def base_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base-URL worker has no proxy settings and no CA bundle."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def issue(kb: KeybrakeProcess, vendor: str, cap: str, *endpoints: str) -> dict[str, Any]:
    return kb.issue_key(
        vendor=vendor,
        daily_usd_cap=cap,
        allowed_endpoints=list(endpoints),
        agent_run_label=f"agents/{vendor}",
    )


def spent_micros(kb: KeybrakeProcess, key: dict[str, Any]) -> int:
    from keybrake.core.money import parse_usd

    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return parse_usd(str(detail["spent_today_usd"]))


def audit(
    kb: KeybrakeProcess,
    key: dict[str, Any],
    expected: int,
    request_ids: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The key's audit rows once there are ``expected`` of them and every one of
    ``request_ids`` is among them (a streamed call's row lands when its stream has ended,
    which may be after the client read its last chunk); fails after 15 s."""

    def read() -> list[dict[str, Any]]:
        url = f"/vault/audit?key={key['key_id']}&limit=1000"
        rows: list[dict[str, Any]] = kb.admin("GET", url).json()["data"]
        return rows

    return wait_for_rows(
        read, expected, done=lambda rows: request_ids <= {r["vendor_request_id"] for r in rows}
    )


def assert_swapped(entries: list[Any], header: str, secret: str, vault_key: str) -> None:
    assert entries
    for entry in entries:
        assert entry.header(header) == secret
        assert vault_key not in str(entry.headers) and vault_key.encode() not in entry.body
        assert not any(h.lower().startswith("x-keybrake") for h in entry.headers)


def assert_booked_exactly(
    kb: KeybrakeProcess, key: dict[str, Any], fake: FakeOpenAI | FakeAnthropic
) -> list[dict[str, Any]]:
    """Every call the fake billed is one audit row with its request id and exact cost."""
    billed = [e for e in fake.ledger if e.status == 200]
    # Waited for by request id, not by count: a refusal the SDK retried past is a row too.
    rows = audit(kb, key, len(billed), frozenset(e.request_id for e in billed if e.request_id))
    by_request = {r["vendor_request_id"]: r for r in rows}
    for entry in billed:
        assert entry.request_id in by_request, (entry.request_id, rows)
        row = by_request[entry.request_id]
        assert row["outcome"] == "ok", row
        assert row["actual_micros"] == entry.charged_usd_micros, row
        assert row["actual_micros"] <= row["estimate_micros"]
    assert spent_micros(kb, key) == fake.charged_usd_micros()
    return rows


def openai_client(vault_key: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=vault_key, **kw)


# -- forward proxy -------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker_env")
def test_openai_chat_responses_embeddings_through_the_forward_proxy(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    key = issue(kb, "openai", "5", CHAT, RESPONSES, EMBEDDINGS)
    client = openai_client(key["vault_key"])
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=200)
    assert reply.choices[0].message.content and reply.usage is not None
    # A follow-up reads the history from the prompt cache: cached tokens are priced lower.
    history = [*HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "More."}]
    again = client.chat.completions.create(
        model="o4-mini", messages=history, max_completion_tokens=500
    )
    assert again.usage is not None and again.usage.completion_tokens_details is not None
    assert again.usage.completion_tokens_details.reasoning_tokens == 8
    response = client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=64)
    assert response.output_text
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert len(vectors.data) == 3
    assert_swapped(ofake.ledger, "Authorization", f"Bearer {ofake.api_key}", key["vault_key"])
    rows = assert_booked_exactly(kb, key, ofake)
    assert len(rows) == 4 and all(r["vendor_request_id"].startswith("req_") for r in rows)


@pytest.mark.usefixtures("worker_env")
def test_anthropic_messages_through_the_forward_proxy(
    kb: KeybrakeProcess, afake: FakeAnthropic
) -> None:
    key = issue(kb, "anthropic", "5", MESSAGES)
    client = anthropic.Anthropic(api_key=key["vault_key"])
    system = [
        {"type": "text", "text": "You count money. " * 40, "cache_control": {"type": "ephemeral"}}
    ]
    first = client.messages.create(
        model="claude-haiku-4-5", max_tokens=300, system=system, messages=HI
    )
    second = client.messages.create(
        model="claude-haiku-4-5", max_tokens=300, system=system, messages=HI
    )
    assert first.usage.cache_creation_input_tokens and second.usage.cache_read_input_tokens
    # The key header works as well as the SDK's Bearer form; the real key goes back in it.
    by_header = anthropic.Anthropic(
        api_key="unused", default_headers={"Authorization": anthropic.omit}
    ).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=50,
        messages=HI,
        extra_headers={"x-api-key": key["vault_key"]},
    )
    assert by_header.content
    bearer, header = afake.ledger[:2], afake.ledger[2:]
    assert_swapped(bearer, "Authorization", f"Bearer {afake.api_key}", key["vault_key"])
    assert_swapped(header, "x-api-key", afake.api_key, key["vault_key"])
    assert header[0].header("Authorization") is None
    assert_booked_exactly(kb, key, afake)


# -- base-URL mode -------------------------------------------------------------------------------


@pytest.mark.usefixtures("base_url_env")
def test_both_sdks_in_base_url_mode(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic
) -> None:
    okey = issue(kb, "openai", "5", CHAT)
    akey = issue(kb, "anthropic", "5", MESSAGES)
    oai = openai_client(okey["vault_key"], base_url=f"{kb.admin_url}/openai/v1")
    claude = anthropic.Anthropic(api_key=akey["vault_key"], base_url=f"{kb.admin_url}/anthropic")
    assert oai.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20).choices
    assert claude.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=HI).content
    assert_swapped(ofake.ledger, "Authorization", f"Bearer {ofake.api_key}", okey["vault_key"])
    assert_swapped(afake.ledger, "Authorization", f"Bearer {afake.api_key}", akey["vault_key"])
    assert_booked_exactly(kb, okey, ofake)
    assert_booked_exactly(kb, akey, afake)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker_env")
def test_allowlist_unknown_model_and_output_limit_are_refused_before_the_vendor(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic
) -> None:
    key = issue(kb, "openai", "5", CHAT)
    client = openai_client(key["vault_key"])
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=10)
    assert keybrake_error_code(denied.value) == "endpoint_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as unpriced:
        client.chat.completions.create(model="gpt-4o-unlisted", messages=HI, max_tokens=10)
    assert keybrake_error_code(unpriced.value) == "unpriced_endpoint"
    with pytest.raises(openai.UnprocessableEntityError) as no_limit:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert keybrake_error_code(no_limit.value) == "output_limit_required"
    body = no_limit.value.body
    assert isinstance(body, dict) and "max_completion_tokens" in str(body["message"])
    # The real key is refused too: workers hold vault keys only.
    with pytest.raises(openai.PermissionDeniedError) as raw:
        openai_client(ofake.api_key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=10
        )
    assert keybrake_error_code(raw.value) == "raw_secret_refused"
    assert ofake.ledger == []
    akey = issue(kb, "anthropic", "5", MESSAGES)
    with pytest.raises(anthropic.PermissionDeniedError) as unlisted:
        anthropic.Anthropic(api_key=akey["vault_key"]).messages.create(
            model="claude-unlisted", max_tokens=10, messages=HI
        )
    assert keybrake_error_code(unlisted.value) == "unpriced_endpoint"
    assert afake.ledger == []
    assert spent_micros(kb, key) == spent_micros(kb, akey) == 0


@pytest.mark.usefixtures("worker_env")
def test_the_cap_hit_is_surfaced_without_a_retry(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic
) -> None:
    # Both SDKs retry a 429 twice by default, unless told not to (x-should-retry: false).
    key = issue(kb, "openai", "0.01", CHAT)
    client = openai_client(key["vault_key"])
    assert client.max_retries == 2
    client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1000)
    before = len(audit(kb, key, 1))
    with pytest.raises(openai.RateLimitError) as hit:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=100_000)
    error = hit.value
    assert error.status_code == 429 and error.response.headers["x-keybrake-cap-hit"] == "true"
    assert isinstance(error.body, dict) and error.body["code"] == "cap_exhausted"
    assert is_cap_hit(error) and keybrake_error_code(error) == "cap_exhausted"
    assert len(audit(kb, key, before + 1)) == before + 1  # one refusal: no retries
    assert len(ofake.ledger) == 1

    akey = issue(kb, "anthropic", "0.01", MESSAGES)
    claude = anthropic.Anthropic(api_key=akey["vault_key"])
    assert claude.max_retries == 2
    with pytest.raises(anthropic.RateLimitError) as ahit:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=20_000, messages=HI)
    assert ahit.value.response.headers["X-Keybrake-Cap-Hit"] == "true"
    assert is_cap_hit(ahit.value)
    assert len(audit(kb, akey, 1)) == 1 and afake.ledger == []


# -- streaming -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker_env")
def test_openai_streams_settle_from_their_usage_and_show_what_was_asked(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    key = issue(kb, "openai", "5", CHAT, RESPONSES)
    client = openai_client(key["vault_key"])
    # Not asked for usage: the proxy asks, reads it, and the client never sees that chunk.
    plain = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=100, stream=True
        )
    )
    assert plain and all(c.choices for c in plain) and all(c.usage is None for c in plain)
    assert ofake.ledger[-1].extra["stream"] is True
    sent = ofake.ledger[-1].body
    assert b'"include_usage":true' in sent.replace(b" ", b"")
    # Asked for: the client gets its usage chunk, as OpenAI sends it.
    asked = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].choices == [] and asked[-1].usage is not None
    with client.responses.stream(model="gpt-4o-mini", input="hi", max_output_tokens=64) as s:
        final = s.get_final_response()
    assert final.usage is not None
    rows = assert_booked_exactly(kb, key, ofake)
    assert len(rows) == 3


@pytest.mark.usefixtures("worker_env")
def test_anthropic_stream_settles_from_its_usage(kb: KeybrakeProcess, afake: FakeAnthropic) -> None:
    key = issue(kb, "anthropic", "5", MESSAGES)
    client = anthropic.Anthropic(api_key=key["vault_key"])
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=300, messages=HI) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.usage.output_tokens == 12
    assert_booked_exactly(kb, key, afake)


@pytest.mark.usefixtures("worker_env")
def test_chunks_reach_the_client_as_they_are_generated(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    key = issue(kb, "openai", "5", CHAT)
    ofake.event_delay = 0.25  # ~2 s for the whole answer
    client = openai_client(key["vault_key"])
    started = time.monotonic()
    seen: list[float] = []
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_tokens=100, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(time.monotonic() - started)
    total = time.monotonic() - started
    assert len(seen) >= 4
    # The first words arrived long before the last: nothing waited for the whole answer.
    assert seen[0] < 1.0 < total - 0.5, (seen, total)
    assert_booked_exactly(kb, key, ofake)


@pytest.mark.usefixtures("worker_env")
@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
def test_a_stream_cut_before_its_usage_keeps_the_estimate(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic, vendor: str
) -> None:
    key = issue(kb, vendor, "5", CHAT if vendor == "openai" else MESSAGES)
    fake: FakeOpenAI | FakeAnthropic = ofake if vendor == "openai" else afake
    fake.cut_next_stream(3)
    with pytest.raises(Exception) as cut:  # which one: checked below
        if vendor == "openai":
            for _ in openai_client(key["vault_key"]).chat.completions.create(
                model="gpt-4o-mini", messages=HI, max_tokens=2000, stream=True
            ):
                pass
        else:
            with anthropic.Anthropic(api_key=key["vault_key"]).messages.stream(
                model="claude-haiku-4-5", max_tokens=2000, messages=HI
            ) as s:
                "".join(s.text_stream)
    # What each SDK raises for a body cut mid-stream: openai wraps it; anthropic 2.17 does
    # too, older releases let httpx's error through.
    assert isinstance(
        cut.value,
        openai.APIConnectionError | anthropic.APIConnectionError | httpx2.RemoteProtocolError,
    )
    assert len(fake.ledger) == 1  # never retried: the vendor was asked once
    [row] = audit(kb, key, 1)
    assert row["outcome"] == "unknown", row
    assert row["actual_micros"] == row["estimate_micros"] > 0
    # The vendor billed what it generated; the proxy kept at least that counted.
    assert spent_micros(kb, key) == row["estimate_micros"] >= fake.charged_usd_micros() > 0
    assert format_usd(spent_micros(kb, key)) != "0.00"


@pytest.mark.usefixtures("base_url_env")
def test_streams_on_one_keep_alive_connection_are_each_sent_once(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    """The async SDK reads each stream to its end and reuses the connection: a stream whose
    body ended early (an empty chunk where the proxy dropped the usage-only event) would make
    the next answer unreadable, and the SDK would send that call again: billed twice."""
    import asyncio

    key = issue(kb, "openai", "5", CHAT)

    async def four_streams() -> None:
        client = openai.AsyncOpenAI(
            api_key=key["vault_key"], base_url=f"{kb.admin_url}/openai/v1", max_retries=2
        )
        for _ in range(4):
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=HI, max_tokens=100, stream=True
            )
            chunks = [chunk async for chunk in stream]
            assert chunks and all(c.choices for c in chunks)
        await client.close()

    asyncio.run(four_streams())
    assert len(ofake.ledger) == 4
    assert len(audit(kb, key, 4)) == 4
    assert_booked_exactly(kb, key, ofake)


@pytest.mark.usefixtures("base_url_env")
def test_an_agent_loop_stops_cleanly_on_cap_exhausted(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's agent loop: `openai_client` + `translate_cap_hits`, stopped by the cap."""
    from keybrake.integrations import (
        BudgetExhausted,
        anthropic_client,
        call_context,
        openai_client,
        translate_cap_hits,
    )

    key = issue(kb, "openai", "0.05", CHAT)
    monkeypatch.setenv("KEYBRAKE_VAULT_KEY", key["vault_key"])
    monkeypatch.setenv("KEYBRAKE_BASE_URL", kb.admin_url)
    with call_context(actor="research-agent", message_id="task-42"):
        client = openai_client()
    messages: list[dict[str, str]] = [{"role": "user", "content": "Research the market."}]
    turns = 0
    with pytest.raises(BudgetExhausted) as stopped, translate_cap_hits():
        while True:
            reply = client.chat.completions.create(
                model="gpt-4o", messages=messages, max_completion_tokens=1_000
            )
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content or ""},
                {"role": "user", "content": "Go on."},
            ]
            turns += 1
    assert stopped.value.details["cap_usd"] == "0.05" and turns >= 4
    rows = audit(kb, key, turns + 1)
    assert {(r["actor"], r["message_id"]) for r in rows} == {("research-agent", "task-42")}
    assert [r["code"] for r in rows].count("cap_exhausted") == 1
    assert_booked_exactly(kb, key, ofake)

    akey = issue(kb, "anthropic", "1", MESSAGES)
    claude = anthropic_client(akey["vault_key"], kb.admin_url)
    assert claude.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=HI).content
    assert_booked_exactly(kb, akey, afake)
