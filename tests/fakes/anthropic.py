"""A fake ``api.anthropic.com`` for the ``anthropic`` SDK: the Messages API.

* Auth: ``x-api-key: <api_key>`` or ``Authorization: Bearer <api_key>`` (what the anthropic
  SDK 2.x sends), and an ``anthropic-version`` header; a missing or wrong key (or both forms
  at once) → 401 ``authentication_error``, no version → 400 ``invalid_request_error``.
* ``POST /v1/messages``: ``model``, ``max_tokens`` (required, as Anthropic requires it),
  ``messages``, ``system``, ``tools``, ``thinking`` (``budget_tokens`` of thinking, billed as
  output within ``max_tokens``), ``stream``. The reply is ``reply_tokens`` toy tokens long,
  cut at ``max_tokens`` (``stop_reason: "max_tokens"``). Blocks marked ``cache_control`` are
  written to the prompt cache the first time (5 minutes, or 1 hour with ``ttl: "1h"``) and
  read from it afterwards, reported in ``usage`` as Anthropic does.
* Streams: ``message_start`` (input usage), ``content_block_start``, ``ping``,
  ``content_block_delta``…, ``content_block_stop``, ``message_delta`` (final output usage),
  ``message_stop``; ``event_delay``, ``cut_next_stream(k)``, ``omit_usage`` (no
  ``message_delta``) and ``usage_factor`` as in the fake OpenAI.
* Every answer has a ``request-id`` header (the ledger's ``request_id``).

Ledger: ``charged_usd_micros`` (list price, rounded up per call), ``extra["usage"]``,
``extra["model"]``, ``extra["stream"]``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from tests.fakes._llm import PRICES, cost_micros, prompt_tokens, rand_id, reply_pieces, reply_text
from tests.fakes.base import FakeRequest, FakeResponse, FakeVendor, json_response
from tests.fakes.tls import FakeTLS

DEFAULT_API_KEY = "sk-ant-api03-" + "fakeAnthropic0123456789abcdefghijklmnopqrstuvwxyzAB"


class _Error(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _cached_blocks(node: Any, found: list[tuple[Any, str]]) -> None:
    """(block, ttl) of every block carrying cache_control."""
    if isinstance(node, list):
        for item in node:
            _cached_blocks(item, found)
    elif isinstance(node, dict):
        control = node.get("cache_control")
        if isinstance(control, dict):
            found.append((node, str(control.get("ttl") or "5m")))
        for value in node.values():
            if isinstance(value, dict | list):
                _cached_blocks(value, found)


class FakeAnthropic(FakeVendor):
    name = "anthropic"
    request_id_header = "request-id"
    server_header = "cloudflare"

    def __init__(
        self,
        tls: FakeTLS | None,
        api_key: str = DEFAULT_API_KEY,
        *,
        reply_tokens: int = 12,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls, host=host, port=port)
        self.api_key = api_key
        self.reply_tokens = reply_tokens
        self.event_delay = 0.0
        self.omit_usage = False
        self.usage_factor = 1
        self._cut_next: int | None = None
        self._cache: set[str] = set()

    def env(self) -> dict[str, str]:
        return {"ANTHROPIC_API_KEY": self.api_key}

    def reset_state(self) -> None:
        self._cache.clear()
        self._cut_next = None
        self.event_delay = 0.0
        self.omit_usage = False
        self.usage_factor = 1

    def cut_next_stream(self, after_events: int) -> None:
        with self._lock:
            self._cut_next = after_events

    def new_request_id(self) -> str:
        return "req_011C" + rand_id(20)

    def _error(self, e: _Error) -> FakeResponse:
        body = {"type": "error", "error": {"type": e.kind, "message": e.message}}
        return json_response(e.status, body)

    def error_response(self, req: FakeRequest, status: int) -> FakeResponse:
        return self._error(_Error(status, "api_error", "Internal server error"))

    def rate_limit_response(self, req: FakeRequest) -> FakeResponse:
        resp = self._error(
            _Error(429, "rate_limit_error", "Number of requests has exceeded your rate limit")
        )
        resp.headers.append(("retry-after", "1"))
        return resp

    def handle(self, req: FakeRequest) -> FakeResponse:
        key = (req.header("x-api-key") or "").strip()
        scheme, _, bearer = (req.header("Authorization") or "").partition(" ")
        if key and bearer:
            return self._error(_Error(401, "authentication_error", "send one credential"))
        if not key and scheme.lower() == "bearer":
            key = bearer.strip()
        if not key or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return self._error(_Error(401, "authentication_error", "invalid x-api-key"))
        if not req.header("anthropic-version"):
            return self._error(
                _Error(400, "invalid_request_error", "anthropic-version: header is required")
            )
        try:
            if req.method == "GET" and req.path == "/v1/models":
                data = [
                    {"type": "model", "id": m, "display_name": m}
                    for m in PRICES
                    if m.startswith("claude")
                ]
                return json_response(
                    200, {"data": data, "has_more": False, "first_id": None, "last_id": None}
                )
            if req.method == "POST" and req.path == "/v1/messages":
                try:
                    payload = req.json()
                except ValueError:
                    raise _Error(400, "invalid_request_error", "invalid JSON body") from None
                return self._messages(payload)
            raise _Error(404, "not_found_error", f"Not found: {req.method} {req.path}")
        except _Error as e:
            return self._error(e)

    def _messages(self, payload: dict[str, Any]) -> FakeResponse:
        model = payload.get("model")
        if not isinstance(model, str) or not model.startswith("claude") or model not in PRICES:
            raise _Error(404, "not_found_error", f"model: {model}")
        limit = payload.get("max_tokens")
        if not isinstance(limit, int) or limit < 1:
            raise _Error(400, "invalid_request_error", "max_tokens: Field required")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Error(400, "invalid_request_error", "messages: Field required")
        total = prompt_tokens(
            payload.get("system"), messages, payload.get("tools"), messages=len(messages)
        )
        marked: list[tuple[Any, str]] = []
        _cached_blocks([payload.get("system"), messages], marked)
        cache_5m = cache_1h = cache_read = 0
        with self._lock:
            for block, ttl in marked:
                tokens = prompt_tokens(block) - 3
                fingerprint = json.dumps(block, sort_keys=True)
                if fingerprint in self._cache:
                    cache_read += tokens
                elif ttl == "1h":
                    cache_1h += tokens
                else:
                    cache_5m += tokens
                self._cache.add(fingerprint)
        uncached = max(0, total - cache_5m - cache_1h - cache_read)
        thinking = payload.get("thinking") or {}
        budget = int(thinking.get("budget_tokens", 0)) if thinking.get("type") == "enabled" else 0
        thought = min(budget // 4, limit // 2)
        visible = min(self.reply_tokens, limit - thought)
        stop = "max_tokens" if visible < self.reply_tokens else "end_turn"
        text = reply_text(visible)
        f = self.usage_factor
        tokens = {
            "input": uncached * f,
            "cached": cache_read * f,
            "cache_write": cache_5m * f,
            "cache_write_1h": cache_1h * f,
            "output": (visible + thought) * f,
        }
        usage = {
            "input_tokens": tokens["input"],
            "cache_creation_input_tokens": tokens["cache_write"] + tokens["cache_write_1h"],
            "cache_read_input_tokens": tokens["cached"],
            "cache_creation": {
                "ephemeral_5m_input_tokens": tokens["cache_write"],
                "ephemeral_1h_input_tokens": tokens["cache_write_1h"],
            },
            "output_tokens": tokens["output"],
            "service_tier": "standard",
        }
        stream = payload.get("stream") is True
        annotations: dict[str, Any] = {
            "charged_usd_micros": cost_micros(PRICES[model], tokens),
            "extra": {"model": model, "stream": stream, "tokens": tokens, "usage": usage},
        }
        mid = "msg_01" + rand_id(22)
        content: list[dict[str, Any]] = []
        if thought:
            content.append(
                {
                    "type": "thinking",
                    "thinking": reply_text(min(thought, 8)),
                    "signature": "sig_" + rand_id(40),
                }
            )
        content.append({"type": "text", "text": text})
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        if not stream:
            return json_response(200, message, object_id=mid, **annotations)

        def event(kind: str, **data: Any) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        start_usage = {**usage, "output_tokens": 1}
        events = [
            event(
                "message_start",
                message={**message, "content": [], "stop_reason": None, "usage": start_usage},
            ),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            event("ping"),
        ]
        for piece in reply_pieces(text):
            events.append(
                event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
            )
        events.append(event("content_block_stop", index=0))
        if not self.omit_usage:
            events.append(
                event(
                    "message_delta",
                    delta={"stop_reason": stop, "stop_sequence": None},
                    usage={"output_tokens": usage["output_tokens"]},
                )
            )
        events.append(event("message_stop"))
        with self._lock:
            cut, self._cut_next = self._cut_next, None
        headers = [("Content-Type", "text/event-stream; charset=utf-8")]
        return FakeResponse(
            200,
            b"",
            headers,
            events=events,
            event_delay=self.event_delay,
            cut_after=cut,
            object_id=mid,
            **annotations,
        )


__all__ = ["DEFAULT_API_KEY", "FakeAnthropic"]
