"""The fake OpenAI and Anthropic called directly (no proxy) with the real SDKs."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import anthropic
import openai
import pytest
from tests.fakes import FakeAnthropic, FakeOpenAI, FakeTLS, make_fake_ca
from tests.fakes._llm import PRICES, cost_micros


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> FakeTLS:
    return make_fake_ca(tmp_path_factory.mktemp("llm-fake-ca"))


@pytest.fixture(scope="module")
def ofake(tls: FakeTLS) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(tls) as fake:
        yield fake


@pytest.fixture(scope="module")
def afake(tls: FakeTLS) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(tls) as fake:
        yield fake


def oclient(fake: FakeOpenAI, tls: FakeTLS, key: str | None = None) -> openai.OpenAI:
    verify = ssl.create_default_context(cafile=str(tls.ca_pem))
    return openai.OpenAI(
        api_key=key or fake.api_key,
        base_url=f"{fake.url}/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=verify, trust_env=False),
    )


def aclient(fake: FakeAnthropic, tls: FakeTLS, key: str | None = None) -> anthropic.Anthropic:
    verify = ssl.create_default_context(cafile=str(tls.ca_pem))
    return anthropic.Anthropic(
        api_key=key or fake.api_key,
        base_url=fake.url,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(verify=verify, trust_env=False),
    )


def test_openai_chat_bills_its_usage(ofake: FakeOpenAI, tls: FakeTLS) -> None:
    ofake.reset()
    client = oclient(ofake, tls)
    messages = [{"role": "user", "content": "a question of some length"}]
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, max_completion_tokens=5
    )
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.completion_tokens == 5
    more = [*messages, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    again = client.chat.completions.create(model="gpt-4o-mini", messages=more, max_tokens=50)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the history came from cache
    entry = ofake.ledger[-1]
    assert entry.request_id and entry.header("Authorization") == f"Bearer {ofake.api_key}"
    assert entry.charged_usd_micros == cost_micros(PRICES["gpt-4o-mini"], entry.extra["tokens"])


def test_openai_streams_responses_and_embeddings(ofake: FakeOpenAI, tls: FakeTLS) -> None:
    ofake.reset()
    client = oclient(ofake, tls)
    chunks = list(
        client.chat.completions.create(
            model="o4-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    with client.responses.stream(model="gpt-4o-mini", input="hi", max_output_tokens=50) as s:
        final = s.get_final_response()
    assert final.usage is not None and final.output_text
    embedded = client.embeddings.create(model="text-embedding-3-small", input=["a", "bb"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 8
    with pytest.raises(openai.AuthenticationError):
        oclient(ofake, tls, key="sk-wrong").models.list()


def test_anthropic_messages_cache_and_stream(afake: FakeAnthropic, tls: FakeTLS) -> None:
    afake.reset()
    client = aclient(afake, tls)
    system = [
        {"type": "text", "text": "long instructions " * 50, "cache_control": {"type": "ephemeral"}}
    ]
    messages = [{"role": "user", "content": "hello"}]
    first = client.messages.create(
        model="claude-haiku-4-5", max_tokens=100, system=system, messages=messages
    )
    assert first.usage.cache_creation_input_tokens and not first.usage.cache_read_input_tokens
    second = client.messages.create(
        model="claude-haiku-4-5", max_tokens=3, system=system, messages=messages
    )
    assert second.usage.cache_read_input_tokens and second.stop_reason == "max_tokens"
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=messages
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens == 12
    entry = afake.ledger[-1]
    # The anthropic SDK 2.x sends api_key as a Bearer token; x-api-key works as well.
    assert entry.header("Authorization") == f"Bearer {afake.api_key}"
    assert entry.extra["stream"] is True
    assert entry.charged_usd_micros == cost_micros(
        PRICES["claude-haiku-4-5"], entry.extra["tokens"]
    )
    with pytest.raises(anthropic.AuthenticationError):
        aclient(afake, tls, key="sk-ant-wrong").messages.create(
            model="claude-haiku-4-5", max_tokens=1, messages=messages
        )
    by_header = aclient(afake, tls, key="unused").messages.create(
        model="claude-haiku-4-5",
        max_tokens=1,
        messages=messages,
        extra_headers={"Authorization": anthropic.omit, "x-api-key": afake.api_key},
    )
    assert by_header.usage.output_tokens == 1
    assert afake.ledger[-1].header("Authorization") is None
