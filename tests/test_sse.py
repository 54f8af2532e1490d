"""`keybrake.pricing.sse`: streamed answers pass through as they come, and their usage is read."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import keybrake.pricing  # noqa: F401  (registers the vendors' stream metering)
from keybrake.pricing import STREAMS
from keybrake.pricing.sse import MAX_EVENT_BYTES, StreamMeter


def sse(*events: Any, event_names: bool = False) -> bytes:
    out = b""
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e)
        name = f"event: {e['type']}\n" if event_names and isinstance(e, dict) else ""
        out += f"{name}data: {data}\n\n".encode()
    return out


def chunk(i: int, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        "usage": None,
    }


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
USAGE_CHUNK = {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [], "usage": USAGE}
CHAT_STREAM = sse(chunk(0, "a"), chunk(1, "b"), USAGE_CHUNK, "[DONE]")


def meter(name: str, strip: bool) -> StreamMeter:
    return StreamMeter(STREAMS[name].usage(strip), strip=strip)


def run(m: StreamMeter, pieces: list[bytes]) -> bytes:
    sent = [piece for p in pieces for piece in m(p)] + m(b"")
    # An empty piece would be written as the empty chunk that ends an HTTP/1.1 body.
    assert all(sent), sent
    return b"".join(sent)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_bytes_pass_through_unchanged_and_usage_is_read(cuts: list[int]) -> None:
    m = meter("openai_chat", strip=False)
    pieces = split(CHAT_STREAM, cuts)
    # Each piece goes on as it arrives, as it came: nothing is held back.
    assert [m(p) for p in pieces] == [[p] for p in pieces]
    assert m(b"") == []
    assert m.final == {"id": "chatcmpl-1", "model": "gpt-4o-mini", "usage": USAGE}


@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_usage_the_client_did_not_ask_for_is_stripped(cuts: list[int]) -> None:
    m = meter("openai_chat", strip=True)
    out = run(m, split(CHAT_STREAM, cuts))
    assert out == sse(chunk(0, "a"), chunk(1, "b"), "[DONE]")
    assert m.final is not None and m.final["usage"] == USAGE


def test_crlf_events_and_comments() -> None:
    m = meter("openai_chat", strip=True)
    raw = b": keep-alive\r\n\r\n" + CHAT_STREAM.replace(b"\n", b"\r\n")
    out = run(m, [raw])
    assert b'"choices": []' not in out and out.startswith(b": keep-alive")
    assert m.final is not None


def test_a_stripped_stream_never_sends_an_empty_piece() -> None:
    m = meter("openai_chat", strip=True)
    # A piece holding only part of an event, then only the usage chunk: nothing to send yet.
    assert m(CHAT_STREAM[:5]) == []
    rest = CHAT_STREAM[5:]
    usage_at = rest.index(b'data: {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": []')
    assert m(rest[:usage_at])
    assert m(rest[usage_at : rest.index(b"data: [DONE]")]) == []
    assert m(b"data: [DONE]\n\n") == [b"data: [DONE]\n\n"]
    assert m(b"") == []


def test_a_stream_without_usage_states_none() -> None:
    m = meter("openai_chat", strip=False)
    run(m, [sse(chunk(0, "a"), "[DONE]")])
    assert m.final is None


def test_an_oversized_event_stops_the_metering_but_not_the_bytes() -> None:
    m = meter("openai_chat", strip=False)
    huge = b"data: " + b"x" * (MAX_EVENT_BYTES + 10)
    assert m(huge) == [huge]
    assert m(sse(USAGE_CHUNK)) == [sse(USAGE_CHUNK)]
    assert m.broken and m.final is None


def test_responses_usage_comes_with_the_completed_response() -> None:
    m = meter("openai_responses", strip=False)
    done = {"type": "response.completed", "response": {"id": "resp_1", "usage": {"x": 1}}}
    run(m, [sse({"type": "response.created", "response": {"id": "resp_1"}}, event_names=True)])
    assert m.final is None
    run(m, [sse(done, event_names=True)])
    assert m.final == {"id": "resp_1", "usage": {"x": 1}}


def test_anthropic_usage_merges_start_and_final_delta_and_needs_the_stop() -> None:
    m = meter("anthropic_messages", strip=False)
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "model": "claude-haiku-4-5",
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 1},
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 9},
    }
    m(sse(start, {"type": "content_block_delta"}, delta, event_names=True))
    assert m.final is None  # no message_stop yet: a cut here is unknown
    m(sse({"type": "message_stop"}, event_names=True))
    assert m.final == {
        "id": "msg_1",
        "model": "claude-haiku-4-5",
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 9},
    }


def test_asking_for_chat_usage() -> None:
    ask = STREAMS["openai_chat"].ask
    request: dict[str, Any] = {"stream": True}
    assert ask(request) is True and request["stream_options"] == {"include_usage": True}
    kept: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask(kept) is False
    other: dict[str, Any] = {"stream": True, "stream_options": {"include_obfuscation": False}}
    assert ask(other) is True
    assert other["stream_options"] == {"include_obfuscation": False, "include_usage": True}
