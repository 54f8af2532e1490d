"""An attacker's eye on the AI vendors: every way to make a call cost more than its estimate.

Hand-made requests through the forward proxy (what a worker that does not use the SDKs
sends). Each refusal is checked where it matters: nothing reached the fake vendor, nothing
stays counted. What does reach the vendor is settled from the usage it states, and a usage
that is absent or above the bound keeps the cap a bound (estimate kept; overrun suspends).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeAnthropic, FakeOpenAI, FakeTLS
from tests.security.conftest import audit_rows, error_code, key_detail

pytestmark = pytest.mark.e2e

CHAT = "POST /v1/chat/completions"
RESPONSES = "POST /v1/responses"
MESSAGES = "POST /v1/messages"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def _proxy(
    tmp_path_factory: pytest.TempPathFactory, keybrake_certs: Path, fake_tls: FakeTLS
) -> Iterator[tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]]:
    with FakeOpenAI(fake_tls) as ofake, FakeAnthropic(fake_tls) as afake:
        work = tmp_path_factory.mktemp("kb-ai-security")
        kb = KeybrakeProcess(
            work, keybrake_certs, {"openai": ofake, "anthropic": afake}, fake_tls
        ).start()
        try:
            yield kb, ofake, afake
        finally:
            kb.stop()


@pytest.fixture
def kb(_proxy: tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]) -> KeybrakeProcess:
    _proxy[1].reset()
    _proxy[2].reset()
    return _proxy[0]


@pytest.fixture
def ofake(_proxy: tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]) -> FakeOpenAI:
    return _proxy[1]


@pytest.fixture
def afake(_proxy: tuple[KeybrakeProcess, FakeOpenAI, FakeAnthropic]) -> FakeAnthropic:
    return _proxy[2]


def issue(kb: KeybrakeProcess, vendor: str, cap: str = "1", *endpoints: str) -> dict[str, Any]:
    default = (CHAT, RESPONSES) if vendor == "openai" else (MESSAGES,)
    return kb.issue_key(
        vendor=vendor, daily_usd_cap=cap, allowed_endpoints=list(endpoints or default)
    )


def post(
    kb: KeybrakeProcess,
    key: dict[str, Any],
    vendor: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    host = "api.openai.com" if vendor == "openai" else "api.anthropic.com"
    base = {"Authorization": f"Bearer {key['vault_key']}", "Content-Type": "application/json"}
    if vendor == "anthropic":
        base["anthropic-version"] = "2023-06-01"
    return httpx.post(
        f"https://{host}{path}",
        content=json.dumps(body).encode(),
        headers={**base, **(headers or {})},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": HI, "max_completion_tokens": 50, **fields}


def claude(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "messages": HI, "max_tokens": 50, **fields}


def spent(kb: KeybrakeProcess, key: dict[str, Any]) -> int:
    from keybrake.core.money import parse_usd

    return parse_usd(str(key_detail(kb, key)["spent_today_usd"]))


REFUSED = [
    pytest.param("openai", "/v1/chat/completions", chat(max_completion_tokens=None), 422,
                 "output_limit_required", id="chat-without-output-limit"),
    pytest.param("openai", "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, 422,
                 "output_limit_required", id="responses-without-output-limit"),
    pytest.param("anthropic", "/v1/messages", claude(max_tokens=None), 422,
                 "output_limit_required", id="messages-without-max-tokens"),
    pytest.param("openai", "/v1/chat/completions", chat(model="gpt-4o-unlisted"), 403,
                 "unpriced_endpoint", id="model-swapped-to-an-unpriced-one"),
    pytest.param("anthropic", "/v1/messages", claude(model="claude-unlisted"), 403,
                 "unpriced_endpoint", id="claude-swapped-to-an-unpriced-one"),
    pytest.param("openai", "/v1/chat/completions", chat(max_completion_tokens=10**9), 422,
                 "invalid_request", id="absurd-output-limit"),
    pytest.param("openai", "/v1/chat/completions", chat(n=1000), 422, "invalid_request",
                 id="more-choices-than-openai-allows"),
    pytest.param("openai", "/v1/chat/completions",
                 chat(messages=[{"role": "user", "content": [
                     {"type": "image_url", "image_url": {"url": "https://x.test/huge.png"}}]}]),
                 403, "unpriced_parameter", id="image-by-url"),
    pytest.param("openai", "/v1/responses",
                 {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 10,
                  "previous_response_id": "resp_123"},
                 403, "unpriced_parameter", id="previous-response-as-hidden-input"),
    pytest.param("openai", "/v1/responses",
                 {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 10,
                  "tools": [{"type": "web_search"}]},
                 403, "unpriced_parameter", id="built-in-web-search"),
    pytest.param("openai", "/v1/chat/completions", chat(service_tier="priority"), 403,
                 "unpriced_parameter", id="priority-tier"),
    pytest.param("anthropic", "/v1/messages",
                 claude(tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}]),
                 403, "unpriced_parameter", id="server-tool"),
    pytest.param("anthropic", "/v1/messages",
                 claude(messages=[{"role": "user", "content": [
                     {"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}}]}]),
                 403, "unpriced_parameter", id="document-by-url"),
    pytest.param("anthropic", "/v1/messages", claude(inference_geo="us"), 403,
                 "unpriced_parameter", id="dearer-region"),
    pytest.param("anthropic", "/v1/messages", claude(max_tokens="50"), 422, "invalid_request",
                 id="output-limit-as-text"),
]  # fmt: skip


@pytest.mark.parametrize(("vendor", "path", "body", "status", "code"), REFUSED)
def test_unbounded_calls_are_refused_before_the_vendor(
    kb: KeybrakeProcess,
    ofake: FakeOpenAI,
    afake: FakeAnthropic,
    vendor: str,
    path: str,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    key = issue(kb, vendor)
    r = post(kb, key, vendor, path, {k: v for k, v in body.items() if v is not None})
    assert (r.status_code, error_code(r)) == (status, code), r.text
    assert r.headers["X-Keybrake-Error"] == code and r.headers["x-should-retry"] == "false"
    assert ofake.ledger == [] and afake.ledger == []
    assert spent(kb, key) == 0


def test_a_huge_output_limit_is_a_cap_hit_not_a_gamble(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    key = issue(kb, "openai", "1")
    # 200,000 output tokens of gpt-4o at $10 per million: $2 > the $1 cap.
    r = post(kb, key, "openai", "/v1/chat/completions", chat(model="gpt-4o", max_tokens=200_000))
    assert r.status_code == 429 and error_code(r) == "cap_exhausted"
    assert r.headers["X-Keybrake-Cap-Hit"] == "true"
    assert r.json()["error"]["needed_usd"].startswith("2.00")
    assert ofake.ledger == [] and spent(kb, key) == 0


def test_n_choices_multiply_the_bound(kb: KeybrakeProcess, ofake: FakeOpenAI) -> None:
    key = issue(kb, "openai", "0.10")
    one = chat(model="gpt-4o", max_completion_tokens=5_000)  # $0.05
    assert post(kb, key, "openai", "/v1/chat/completions", one).status_code == 200
    r = post(kb, key, "openai", "/v1/chat/completions", {**one, "n": 2})  # $0.10 > what is left
    assert r.status_code == 429 and error_code(r) == "cap_exhausted"
    assert len(ofake.ledger) == 1
    assert spent(kb, key) == ofake.charged_usd_micros()


def test_the_proxy_asks_for_usage_even_when_told_not_to(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    key = issue(kb, "openai")
    body = chat(stream=True, stream_options={"include_usage": False})
    r = post(kb, key, "openai", "/v1/chat/completions", body)
    assert r.status_code == 200
    assert b'"choices": []' not in r.content  # the usage chunk was not shown
    assert b"[DONE]" in r.content
    sent = json.loads(ofake.ledger[0].body)
    assert sent["stream_options"]["include_usage"] is True
    # The worker sees the vendor's answer, never the real key that bought it.
    assert ofake.api_key not in r.text and ofake.api_key not in str(r.headers)
    assert key["vault_key"] not in str(ofake.ledger[0].headers)
    [row] = audit_rows(kb, key, 1)
    assert row["outcome"] == "ok" and row["actual_micros"] == ofake.charged_usd_micros()


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
def test_a_stream_without_its_usage_keeps_the_estimate(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic, vendor: str
) -> None:
    fake: FakeOpenAI | FakeAnthropic = ofake if vendor == "openai" else afake
    fake.omit_usage = True
    key = issue(kb, vendor)
    if vendor == "openai":
        r = post(
            kb, key, vendor, "/v1/chat/completions", chat(stream=True, max_completion_tokens=5000)
        )
    else:
        r = post(kb, key, vendor, "/v1/messages", claude(stream=True, max_tokens=5000))
    assert r.status_code == 200 and r.content
    [row] = audit_rows(kb, key, 1)
    assert row["outcome"] == "unknown" and "usage" in row["note"], row
    assert spent(kb, key) == row["estimate_micros"] >= fake.charged_usd_micros() > 0


def test_usage_above_the_bound_is_booked_and_suspends_the_key(
    kb: KeybrakeProcess, ofake: FakeOpenAI
) -> None:
    ofake.usage_factor = 1000  # the vendor states (and bills) far more than the request bounds
    key = issue(kb, "openai", "100")
    r = post(kb, key, "openai", "/v1/chat/completions", chat(max_completion_tokens=20))
    assert r.status_code == 200
    [row] = audit_rows(kb, key, 1)
    assert row["outcome"] == "overrun" and row["actual_micros"] == ofake.charged_usd_micros()
    assert row["actual_micros"] > row["estimate_micros"]
    again = post(kb, key, "openai", "/v1/chat/completions", chat())
    assert again.status_code == 403 and error_code(again) == "key_suspended"
    assert len(ofake.ledger) == 1


def test_unreadable_usage_keeps_the_estimate(kb: KeybrakeProcess, ofake: FakeOpenAI) -> None:
    ofake.garbage_next(
        processed=True, body=b'{"id": "chatcmpl-1", "usage": {"prompt_tokens": "many"}}'
    )
    key = issue(kb, "openai")
    r = post(kb, key, "openai", "/v1/chat/completions", chat(max_completion_tokens=1000))
    assert r.status_code == 200
    [row] = audit_rows(kb, key, 1)
    assert row["outcome"] == "unknown" and row["actual_micros"] == row["estimate_micros"]
    assert spent(kb, key) == row["estimate_micros"] >= ofake.charged_usd_micros()


def test_anthropic_beta_header_and_two_credentials_are_refused(
    kb: KeybrakeProcess, afake: FakeAnthropic
) -> None:
    key = issue(kb, "anthropic")
    beta = post(kb, key, "anthropic", "/v1/messages", claude(),
                {"anthropic-beta": "context-1m-2025-08-07"})  # fmt: skip
    assert beta.status_code == 403 and error_code(beta) == "unpriced_parameter"
    both = post(kb, key, "anthropic", "/v1/messages", claude(), {"x-api-key": key["vault_key"]})
    assert both.status_code == 403 and error_code(both) == "credential_ambiguous"
    raw = post(kb, key, "anthropic", "/v1/messages", claude(),
               {"Authorization": f"Bearer {afake.api_key}"})  # fmt: skip
    assert raw.status_code == 403 and error_code(raw) == "raw_secret_refused"
    assert afake.ledger == [] and spent(kb, key) == 0


def test_workspace_and_project_switching_is_refused(
    kb: KeybrakeProcess, ofake: FakeOpenAI, afake: FakeAnthropic
) -> None:
    key = issue(kb, "openai")
    r = post(kb, key, "openai", "/v1/chat/completions", chat(), {"OpenAI-Project": "proj_other"})
    assert r.status_code == 403 and error_code(r) == "account_mismatch"
    akey = issue(kb, "anthropic")
    a = post(kb, akey, "anthropic", "/v1/messages", claude(workspace_id="wrkspc_other"))
    assert a.status_code == 403 and error_code(a) == "unpriced_parameter"
    assert ofake.ledger == [] and afake.ledger == []
