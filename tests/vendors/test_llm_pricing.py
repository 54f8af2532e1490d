"""Token pricing of the shipped OpenAI and Anthropic policies: bounds before, usage after."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.vendors.conftest import price_call, refusal_of

from keybrake.core.policy import ModelPrice, PolicySet
from keybrake.pricing import Estimate, actual_cost
from keybrake.pricing.vendors.llm import input_bound, token_cost

CHAT = "/v1/chat/completions"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "max_completion_tokens": 100,
    }
    return body(**(base | fields))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


async def test_chat_estimate_is_body_bytes_plus_overhead_plus_output(shipped: PolicySet) -> None:
    raw = chat()
    estimate = await price_call(shipped, "openai", "POST", CHAT, raw)
    compact = len(json.dumps(json.loads(raw), separators=(",", ":")).encode())
    # gpt-4o-mini: $0.15 input, $0.60 output per million; 64 tokens of request overhead.
    assert estimate.micros == ceil_div((compact + 64) * 150_000 + 100 * 600_000, 10**6)
    assert estimate.model == "gpt-4o-mini"


async def test_n_choices_multiply_the_output_bound(shipped: PolicySet) -> None:
    one = await price_call(shipped, "openai", "POST", CHAT, chat(max_completion_tokens=10_000))
    four = await price_call(
        shipped, "openai", "POST", CHAT, chat(max_completion_tokens=10_000, n=4)
    )
    assert four.micros - one.micros >= 3 * 10_000 * 600_000 // 10**6
    refused = await refusal_of(shipped, "openai", "POST", CHAT, chat(n=129))
    assert refused.code == "invalid_request"


async def test_the_larger_of_two_output_limits_counts(shipped: PolicySet) -> None:
    both = await price_call(
        shipped, "openai", "POST", CHAT, chat(max_tokens=50_000, max_completion_tokens=10)
    )
    assert both.micros >= 50_000 * 600_000 // 10**6


@pytest.mark.parametrize(
    ("vendor", "path", "raw"),
    [
        ("openai", CHAT, body(model="gpt-4o", messages=[{"role": "user", "content": "x"}])),
        ("openai", "/v1/responses", body(model="gpt-4o", input="x")),
        ("anthropic", "/v1/messages", body(model="claude-haiku-4-5", messages=[])),
    ],
)
async def test_no_output_limit_is_refused(
    shipped: PolicySet, vendor: str, path: str, raw: bytes
) -> None:
    refused = await refusal_of(shipped, vendor, "POST", path, raw)
    assert refused.code == "output_limit_required"
    assert refused.status == 422


@pytest.mark.parametrize(
    ("vendor", "path", "raw", "code", "named"),
    [
        ("openai", CHAT, chat(model="gpt-unknown"), "unpriced_endpoint", "gpt-unknown"),
        ("openai", CHAT, chat(model=None), "invalid_request", "model"),
        (
            "openai",
            CHAT,
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "unpriced_parameter",
            "messages.0.content.0",
        ),
        (
            "openai",
            CHAT,
            chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
            "unpriced_parameter",
            "messages.0",
        ),
        ("openai", CHAT, chat(service_tier="priority"), "unpriced_parameter", "service_tier"),
        ("openai", CHAT, chat(web_search_options={}), "unpriced_parameter", "web_search_options"),
        ("openai", CHAT, chat(prediction={"type": "content"}), "unpriced_parameter", "prediction"),
        ("openai", CHAT, chat(brand_new=1), "unpriced_parameter", "brand_new"),
        (
            "openai",
            CHAT,
            chat(tools=[{"type": "web_search"}]),
            "unpriced_parameter",
            "tools.0",
        ),
        (
            "openai",
            "/v1/responses",
            body(model="gpt-4o", input="x", max_output_tokens=5, previous_response_id="r"),
            "unpriced_parameter",
            "previous_response_id",
        ),
        (
            "openai",
            "/v1/responses",
            body(
                model="gpt-4o",
                input=[{"type": "reasoning", "encrypted_content": "x"}],
                max_output_tokens=5,
            ),
            "unpriced_parameter",
            "input.0",
        ),
        (
            "openai",
            "/v1/responses",
            body(model="gpt-4o", input="x", max_output_tokens=5, background=True),
            "unpriced_parameter",
            "background",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(
                model="claude-haiku-4-5",
                max_tokens=5,
                messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}],
            ),
            "unpriced_parameter",
            "messages.0.content.0",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(
                model="claude-haiku-4-5",
                max_tokens=5,
                messages=[],
                tools=[{"type": "web_search_20250305", "name": "web_search"}],
            ),
            "unpriced_parameter",
            "tools.0",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(model="claude-haiku-4-5", max_tokens=5, messages=[], speed="fast"),
            "unpriced_parameter",
            "speed",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(model="claude-haiku-4-5", max_tokens=0, messages=[]),
            "invalid_request",
            "max_tokens",
        ),
    ],
)
async def test_what_the_request_does_not_bound_is_refused(
    shipped: PolicySet, vendor: str, path: str, raw: bytes, code: str, named: str
) -> None:
    refused = await refusal_of(shipped, vendor, "POST", path, raw)
    assert (refused.code, named in refused.message) == (code, True), refused.message


async def test_function_tools_add_the_tool_prompt_overhead(shipped: PolicySet) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    plain = await price_call(shipped, "openai", "POST", CHAT, chat(tool_choice="auto"))
    tools = await price_call(shipped, "openai", "POST", CHAT, chat(tools=[tool]))
    assert tools.micros - plain.micros >= 1024 * 150_000 // 10**6


async def test_anthropic_input_is_priced_at_the_dearest_cache_write(shipped: PolicySet) -> None:
    raw = body(model="claude-haiku-4-5", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    estimate = await price_call(shipped, "anthropic", "POST", "/v1/messages", raw)
    tokens_in = len(json.dumps(json.loads(raw), separators=(",", ":"))) + 64
    # $2.00 per million (the 1-hour cache write), not the $1.00 input price.
    assert estimate.micros == ceil_div(tokens_in * 2_000_000 + 5_000_000, 10**6)


async def test_embeddings_need_no_output_limit(shipped: PolicySet) -> None:
    raw = body(model="text-embedding-3-small", input=["a" * 1000, "b"])
    estimate = await price_call(shipped, "openai", "POST", "/v1/embeddings", raw)
    assert estimate.micros == ceil_div(
        len(json.dumps(json.loads(raw), separators=(",", ":"))) * 20_000, 10**6
    )


@given(st.text(max_size=200), st.text(max_size=200))
def test_the_input_bound_covers_every_utf8_byte_of_the_text(system: str, user: str) -> None:
    from keybrake.pricing import Body

    data = {"system": system, "messages": [{"role": "user", "content": user}]}
    assert input_bound(Body("json", data)) >= len(system.encode()) + len(user.encode())


# -- actual cost from usage ----------------------------------------------------------------------

PRICE = ModelPrice.model_validate(
    {"input": "3", "cached_input": "0.30", "cache_write": "3.75", "cache_write_1h": 6, "output": 15}
)


def test_token_cost_rounds_up_once_over_all_tokens() -> None:
    assert token_cost({"input": 1}, PRICE) == 3
    assert token_cost({"cached": 1}, PRICE) == 1  # 0.3 micro-USD, rounded up
    assert token_cost({"cached": 10}, PRICE) == 3
    assert token_cost({"input": 1000, "output": 2000}, PRICE) == 3000 + 30000


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_token_cost_is_exact_to_the_micro_dollar(i: int, c: int, w: int, o: int) -> None:
    from fractions import Fraction

    exact = Fraction(i * 3_000_000 + c * 300_000 + w * 3_750_000 + o * 15_000_000, 10**6)
    got = token_cost({"input": i, "cached": c, "cache_write": w, "output": o}, PRICE)
    assert got - 1 < exact <= got


def settle(shipped: PolicySet, vendor: str, rule: str, model: str, data: Any) -> int | None:
    policy = shipped.vendors[vendor]
    endpoint = next(ep for ep in policy.endpoints if ep.actual and ep.actual.usage == rule)
    return actual_cost(policy, endpoint.actual, data, Estimate(10**9, model=model)).micros


def test_openai_chat_usage_prices_cached_and_reasoning_tokens(shipped: PolicySet) -> None:
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 700,
        "total_tokens": 2700,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 500, "audio_tokens": 0},
    }
    # o4-mini: $1.10 in, $0.275 cached, $4.40 out (reasoning is part of completion_tokens).
    expected = ceil_div(976 * 1_100_000 + 1024 * 275_000 + 700 * 4_400_000, 10**6)
    assert settle(shipped, "openai", "openai_chat", "o4-mini", {"usage": usage}) == expected


def test_responses_and_embeddings_usage(shipped: PolicySet) -> None:
    usage = {
        "input_tokens": 100,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 20},
    }
    assert settle(shipped, "openai", "openai_responses", "gpt-4.1", {"usage": usage}) == 600
    embedded = {"usage": {"prompt_tokens": 1_000_000, "total_tokens": 1_000_000}}
    assert settle(shipped, "openai", "openai_embeddings", "text-embedding-3-large", embedded) == (
        130_000
    )


def test_anthropic_usage_prices_cache_reads_and_both_cache_writes(shipped: PolicySet) -> None:
    usage = {
        "input_tokens": 10,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 200,
    }
    # claude-sonnet-4-5: $3 in, $0.30 read, $3.75 5m write, $6 1h write, $15 out.
    expected = ceil_div(
        10 * 3_000_000 + 1000 * 300_000 + 1000 * 3_750_000 + 2000 * 6_000_000 + 200 * 15_000_000,
        10**6,
    )
    got = settle(shipped, "anthropic", "anthropic_messages", "claude-sonnet-4-5", {"usage": usage})
    assert got == expected


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"usage": None},
        {"usage": {"prompt_tokens": "12", "completion_tokens": 1}},
        {"usage": {"prompt_tokens": -1, "completion_tokens": 1}},
        {"usage": {"prompt_tokens": 1}},
        {"usage": {"prompt_tokens": True, "completion_tokens": 1}},
        {
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 2},
            }
        },
        {
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "completion_tokens_details": {"audio_tokens": 5},
            }
        },
    ],
)
def test_unreadable_usage_keeps_the_estimate(shipped: PolicySet, data: Any) -> None:
    assert settle(shipped, "openai", "openai_chat", "gpt-4o", data) is None


def test_anthropic_server_tool_use_is_not_priced_as_tokens(shipped: PolicySet) -> None:
    usage = {"input_tokens": 1, "output_tokens": 1, "server_tool_use": {"web_search_requests": 2}}
    got = settle(shipped, "anthropic", "anthropic_messages", "claude-haiku-4-5", {"usage": usage})
    assert got is None


@pytest.mark.parametrize(
    ("vendor", "path", "raw", "named"),
    [
        (
            "openai",
            CHAT,
            chat(messages=[{"role": "assistant", "audio": {"id": "a1"}}]),
            "messages.0.audio",
        ),
        (
            "openai",
            "/v1/responses",
            body(
                model="gpt-4o",
                max_output_tokens=5,
                input=[{"type": "web_search_call", "id": "ws_1"}],
            ),
            "input.0",
        ),
        (
            "openai",
            "/v1/responses",
            body(
                model="gpt-4o",
                max_output_tokens=5,
                input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}],
            ),
            "input.0.content.0",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(
                model="claude-haiku-4-5",
                max_tokens=5,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ],
                    }
                ],
            ),
            "messages.0.content.0.content.0",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(
                model="claude-haiku-4-5",
                max_tokens=5,
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "web_search_tool_result", "tool_use_id": "s1"}],
                    }
                ],
            ),
            "messages.0.content.0",
        ),
        (
            "anthropic",
            "/v1/messages",
            body(
                model="claude-haiku-4-5",
                max_tokens=5,
                messages=[],
                system=[{"type": "document", "source": {}}],
            ),
            "system.0",
        ),
    ],
)
async def test_only_text_and_the_clients_own_tool_calls_are_priced(
    shipped: PolicySet, vendor: str, path: str, raw: bytes, named: str
) -> None:
    refused = await refusal_of(shipped, vendor, "POST", path, raw)
    assert refused.code == "unpriced_parameter" and refused.message.startswith(named)


async def test_tool_loops_are_priced(shipped: PolicySet) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "go"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    assert (await price_call(shipped, "openai", "POST", CHAT, chat(messages=messages))).micros
    items = [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
    ]
    raw = body(model="gpt-4o", max_output_tokens=5, input=items)
    assert (await price_call(shipped, "openai", "POST", "/v1/responses", raw)).micros
    turns = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"type": "car"}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "text", "text": "ok"}],
                }
            ],
        },
    ]
    raw = body(model="claude-haiku-4-5", max_tokens=5, messages=turns, system="be brief")
    assert (await price_call(shipped, "anthropic", "POST", "/v1/messages", raw)).micros
