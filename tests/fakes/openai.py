"""A fake ``api.openai.com`` for the ``openai`` SDK: Chat Completions, Responses, Embeddings.

* Auth: ``Authorization: Bearer <api_key>``; anything else → 401 ``invalid_api_key``.
* ``POST /v1/chat/completions``: ``model``, ``messages``, ``max_completion_tokens`` /
  ``max_tokens``, ``n``, ``stream`` (+ ``stream_options.include_usage``). The reply is
  ``reply_tokens`` toy tokens long, cut at the output limit (``finish_reason: "length"``);
  reasoning models (``o…``, ``gpt-5…``) also think ``reasoning_tokens``, counted in
  ``completion_tokens`` as OpenAI does. A conversation whose earlier messages were sent before
  reads them from the prompt cache (``prompt_tokens_details.cached_tokens``).
* ``POST /v1/responses``: ``input`` (text or message items), ``instructions``,
  ``max_output_tokens``, ``stream`` (``response.*`` events, usage in ``response.completed``).
* ``POST /v1/embeddings``: ``input`` (text, texts, token arrays), ``encoding_format``
  ``float`` or ``base64`` (the SDK's default).
* ``GET /v1/models``.
* Streams are chunked server-sent events, ``event_delay`` seconds apart; ``cut_next_stream(k)``
  aborts the next one after ``k`` events (billed in full: the model ran); ``omit_usage`` sends
  streams without their usage even when asked; ``usage_factor`` multiplies the tokens reported
  and billed (a vendor charging more than the request could cost).
* Every answer has an ``x-request-id`` (the ledger's ``request_id``).

Ledger: ``charged_usd_micros`` (list price, rounded up per call), ``extra["usage"]`` (the usage
the answer stated, or would have), ``extra["model"]``, ``extra["stream"]``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

from tests.fakes._llm import (
    PRICES,
    cost_micros,
    prompt_tokens,
    rand_id,
    reply_pieces,
    reply_text,
    texts,
)
from tests.fakes.base import FakeRequest, FakeResponse, FakeVendor, json_response
from tests.fakes.tls import FakeTLS

DEFAULT_API_KEY = "sk-proj-" + "fakeOpenAI0123456789abcdefghijklmnopqrstuv"


class _Error(Exception):
    def __init__(
        self, status: int, message: str, kind: str, code: str | None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )


def _reasoning(model: str) -> bool:
    return model.startswith(("o1", "o3", "o4", "gpt-5"))


class FakeOpenAI(FakeVendor):
    name = "openai"
    request_id_header = "x-request-id"
    server_header = "cloudflare"

    def __init__(
        self,
        tls: FakeTLS | None,
        api_key: str = DEFAULT_API_KEY,
        *,
        reply_tokens: int = 12,
        reasoning_tokens: int = 8,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls, host=host, port=port)
        self.api_key = api_key
        self.reply_tokens = reply_tokens
        self.reasoning_tokens = reasoning_tokens
        self.event_delay = 0.0
        self.omit_usage = False
        self.usage_factor = 1
        self._cut_next: int | None = None
        self._cache: set[str] = set()

    def env(self) -> dict[str, str]:
        return {"OPENAI_API_KEY": self.api_key}

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
        return "req_" + rand_id(32).lower()

    # -- plumbing

    def _error(self, e: _Error) -> FakeResponse:
        body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
        return json_response(e.status, body, self._headers())

    def error_response(self, req: FakeRequest, status: int) -> FakeResponse:
        return self._error(
            _Error(status, "The server had an error processing your request.", "server_error", None)
        )

    def rate_limit_response(self, req: FakeRequest) -> FakeResponse:
        return self._error(
            _Error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded")
        )

    @staticmethod
    def _headers() -> list[tuple[str, str]]:
        return [
            ("openai-organization", "org-fake"),
            ("openai-processing-ms", "42"),
            ("openai-version", "2020-10-01"),
        ]

    def handle(self, req: FakeRequest) -> FakeResponse:
        auth = req.header("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets_equal(token.strip(), self.api_key):
            shown = token.strip()[:3] + "..." + token.strip()[-4:] if token.strip() else ""
            return self._error(
                _Error(
                    401,
                    f"Incorrect API key provided: {shown}.",
                    "invalid_request_error",
                    "invalid_api_key",
                )
            )
        try:
            if req.method == "GET" and req.path == "/v1/models":
                data = [{"id": m, "object": "model", "owned_by": "openai"} for m in PRICES]
                return json_response(200, {"object": "list", "data": data}, self._headers())
            if req.method != "POST":
                raise _Error(
                    404, f"Invalid URL ({req.method} {req.path})", "invalid_request_error", None
                )
            try:
                payload = req.json()
            except ValueError:
                raise _Error(
                    400,
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    None,
                ) from None
            if not isinstance(payload, dict):
                raise _Error(400, "Invalid body", "invalid_request_error", None)
            if req.path == "/v1/chat/completions":
                return self._chat(payload)
            if req.path == "/v1/responses":
                return self._responses(payload)
            if req.path == "/v1/embeddings":
                return self._embeddings(payload)
            raise _Error(
                404, f"Invalid URL ({req.method} {req.path})", "invalid_request_error", None
            )
        except _Error as e:
            return self._error(e)

    def _model(self, payload: dict[str, Any]) -> str:
        model = payload.get("model")
        if not isinstance(model, str) or model not in PRICES:
            raise _Error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )
        return model

    def _bill(
        self, model: str, prompt: int, cached: int, output: int, stream: bool, **extra: Any
    ) -> tuple[dict[str, int], dict[str, Any]]:
        f = self.usage_factor
        tokens = {"input": (prompt - cached) * f, "cached": cached * f, "output": output * f}
        annotations = {
            "charged_usd_micros": cost_micros(PRICES[model], tokens),
            "extra": {"model": model, "stream": stream, "tokens": tokens, **extra},
        }
        return tokens, annotations

    def _stream(self, events: list[bytes], annotations: dict[str, Any]) -> FakeResponse:
        with self._lock:
            cut, self._cut_next = self._cut_next, None
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), *self._headers()]
        return FakeResponse(
            200,
            b"",
            headers,
            events=events,
            event_delay=self.event_delay,
            cut_after=cut,
            **annotations,
        )

    # -- chat completions

    def _chat(self, payload: dict[str, Any]) -> FakeResponse:
        model = self._model(payload)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Error(
                400,
                "'messages' must contain at least one message.",
                "invalid_request_error",
                None,
                "messages",
            )
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        n = int(payload.get("n") or 1)
        prompt = prompt_tokens(
            messages, payload.get("tools"), payload.get("functions"), messages=len(messages)
        )
        prefixes = [json.dumps(messages[:k], sort_keys=True) for k in range(1, len(messages) + 1)]
        with self._lock:
            # The longest earlier-seen prefix (not the new last message) is read from cache.
            seen = max(
                (k for k in range(1, len(messages)) if prefixes[k - 1] in self._cache), default=0
            )
            self._cache.update(prefixes)
        cached = prompt_tokens(messages[:seen], messages=seen) - 3 if seen else 0
        reasoning = min(self.reasoning_tokens, (limit or 10**9) // 2) if _reasoning(model) else 0
        visible = min(self.reply_tokens, (limit or 10**9) - reasoning)
        finish = "length" if visible < self.reply_tokens else "stop"
        text = reply_text(visible)
        output = (visible + reasoning) * n
        stream = payload.get("stream") is True
        tokens, annotations = self._bill(model, prompt, cached, output, stream)
        usage = {
            "prompt_tokens": tokens["input"] + tokens["cached"],
            "completion_tokens": tokens["output"],
            "total_tokens": sum(tokens.values()),
            "prompt_tokens_details": {"cached_tokens": tokens["cached"], "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning * n * self.usage_factor,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        annotations["extra"]["usage"] = usage
        cid, created = "chatcmpl-" + rand_id(29), int(time.time())
        served = f"{model}-2024-07-18"
        if not stream:
            choices = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i in range(n)
            ]
            body = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": served,
                "choices": choices,
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_" + rand_id(10).lower(),
            }
            return json_response(200, body, self._headers(), object_id=cid, **annotations)
        options = payload.get("stream_options") or {}
        with_usage = options.get("include_usage") is True and not self.omit_usage

        def chunk(choices: list[dict[str, Any]], **more: Any) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if with_usage:
                data["usage"] = None
            data.update(more)
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        events = []
        for i in range(n):
            events.append(
                chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
            for piece in reply_pieces(text):
                events.append(
                    chunk(
                        [
                            {
                                "index": i,
                                "delta": {"content": piece},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
            events.append(
                chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
            )
        if with_usage:
            events.append(chunk([], usage=usage))
        events.append(b"data: [DONE]\n\n")
        return self._stream(events, annotations)

    # -- responses

    def _responses(self, payload: dict[str, Any]) -> FakeResponse:
        model = self._model(payload)
        given = payload.get("input")
        items = given if isinstance(given, list) else [{"role": "user", "content": given}]
        if given is None or not items:
            raise _Error(
                400,
                "Missing required parameter: 'input'.",
                "invalid_request_error",
                "missing_required_parameter",
                "input",
            )
        prompt = prompt_tokens(
            items, payload.get("instructions"), payload.get("tools"), messages=len(items)
        )
        limit = payload.get("max_output_tokens")
        reasoning = min(self.reasoning_tokens, (limit or 10**9) // 2) if _reasoning(model) else 0
        visible = min(self.reply_tokens, (limit or 10**9) - reasoning)
        text = reply_text(visible)
        stream = payload.get("stream") is True
        tokens, annotations = self._bill(model, prompt, 0, visible + reasoning, stream)
        usage = {
            "input_tokens": tokens["input"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens["output"],
            "output_tokens_details": {"reasoning_tokens": reasoning * self.usage_factor},
            "total_tokens": tokens["input"] + tokens["output"],
        }
        annotations["extra"]["usage"] = usage
        rid, mid = "resp_" + rand_id(40).lower(), "msg_" + rand_id(40).lower()
        status = "incomplete" if visible < self.reply_tokens else "completed"
        message = {
            "id": mid,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

        def response(state: str, done: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "status": state,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if state == "incomplete"
                else None,
                "instructions": payload.get("instructions"),
                "max_output_tokens": limit,
                "model": f"{model}-2024-07-18",
                "output": [message] if done else [],
                "parallel_tool_calls": True,
                "temperature": 1.0,
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "text": {"format": {"type": "text"}},
                "truncation": "disabled",
                "usage": usage if done else None,
                "metadata": {},
            }

        if not stream:
            return json_response(
                200, response(status, True), self._headers(), object_id=rid, **annotations
            )
        seq = iter(range(10**6))

        def event(kind: str, **data: Any) -> bytes:
            body = {"type": kind, "sequence_number": next(seq), **data}
            return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

        part = {"type": "output_text", "text": "", "annotations": []}
        events = [
            event("response.created", response=response("in_progress", False)),
            event("response.in_progress", response=response("in_progress", False)),
            event(
                "response.output_item.added",
                output_index=0,
                item={**message, "status": "in_progress", "content": []},
            ),
            event(
                "response.content_part.added",
                item_id=mid,
                output_index=0,
                content_index=0,
                part=part,
            ),
        ]
        for piece in reply_pieces(text):
            events.append(
                event(
                    "response.output_text.delta",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                )
            )
        events += [
            event(
                "response.output_text.done",
                item_id=mid,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            event(
                "response.content_part.done",
                item_id=mid,
                output_index=0,
                content_index=0,
                part={**part, "text": text},
            ),
            event("response.output_item.done", output_index=0, item=message),
        ]
        final = response(status, True)
        if self.omit_usage:
            final["usage"] = None
        events.append(event(f"response.{status}", response=final))
        return self._stream(events, annotations)

    # -- embeddings

    def _embeddings(self, payload: dict[str, Any]) -> FakeResponse:
        model = self._model(payload)
        given = payload.get("input")
        inputs = (
            given
            if isinstance(given, list) and given and not isinstance(given[0], int)
            else [given]
        )
        tokens_each = [len(i) if isinstance(i, list) else prompt_tokens(i) - 3 for i in inputs]
        prompt = sum(tokens_each)
        _, annotations = self._bill(model, prompt, 0, 0, False)
        usage = {
            "prompt_tokens": prompt * self.usage_factor,
            "total_tokens": prompt * self.usage_factor,
        }
        annotations["extra"]["usage"] = usage
        dims = int(payload.get("dimensions") or 8)
        data = []
        for index, _ in enumerate(inputs):
            vector = [round(0.01 * (index + 1) * (k + 1), 4) for k in range(dims)]
            if payload.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        body = {"object": "list", "data": data, "model": model, "usage": usage}
        return json_response(200, body, self._headers(), **annotations)


def secrets_equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


__all__ = ["DEFAULT_API_KEY", "FakeOpenAI", "texts"]
