"""AI vendors (OpenAI, Anthropic): calls priced in tokens, with an upper bound before sending.

Named from ``policies/openai.yaml`` and ``policies/anthropic.yaml``:

- cost functions ``openai_chat`` (``POST /v1/chat/completions``), ``openai_responses``
  (``POST /v1/responses``), ``openai_embeddings`` (``POST /v1/embeddings``) and
  ``anthropic_messages`` (``POST /v1/messages``);
- usage readers (``actual: {usage: …}``) of the same names, for plain and streamed answers.

**The estimate is the most the call can cost.** The request's ``model`` must be in the
policy's ``models`` table (else ``unpriced_endpoint``). Input tokens are bounded by the UTF-8
byte length of the whole JSON body (every token a vendor's tokenizer makes covers at least one
byte of text, and the body holds all the text: messages, system prompt, tools, schemas), plus
the policy's ``request_overhead_tokens`` and, with tools, ``tools_overhead_tokens`` (the
vendor's own tool prompt), each priced at the dearest input price (cache writes included).
Output tokens are bounded by the output limit the request sets (``max_completion_tokens`` /
``max_tokens``, ``max_output_tokens``, ``max_tokens``), reasoning and thinking included, times
``n`` choices; a request without one is refused (``output_limit_required``).

What has no bound in the request is refused (``unpriced_parameter``): a conversation may hold
text and the client's own tool calls and results, nothing else; so images, audio, files and
documents (their token count depends on content the proxy would have to fetch or decode),
reasoning/thinking blocks sent back (billed at their full, hidden length), stored prompts,
previous responses and conversations, built-in and server tools (web search, code execution,
MCP: charged per use and feeding tool output back in), background responses, priority tiers.

**The actual is the answer's ``usage``**: uncached, cached and cache-written input tokens and
output tokens (reasoning included) at the model's prices, rounded up to the micro-USD once per
call. An answer whose usage cannot be read settles as unknown (the estimate stays counted).

>>> from keybrake.core.policy import ModelPrice
>>> gpt_4o = ModelPrice.model_validate({"input": "2.50", "output": 10})
>>> token_cost({"input": 1000, "output": 500}, gpt_4o)
7500
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from keybrake.core.errors import Refusal
from keybrake.core.policy import FunctionCost, ModelPrice, VendorPolicy
from keybrake.pricing.model import Actual, Body, Estimate, Registry
from keybrake.pricing.sse import StreamMetering, StreamUsage

__all__ = [
    "MAX_OUTPUT_TOKENS",
    "anthropic_messages_cost",
    "input_bound",
    "openai_chat_cost",
    "openai_embeddings_cost",
    "openai_responses_cost",
    "token_cost",
]

MAX_OUTPUT_TOKENS: Final = 10_000_000
"""Largest output limit accepted (no model comes near it; a bigger one is a mistake)."""
MAX_CHOICES: Final = 128
"""OpenAI's largest ``n``."""
_MICROS_PER_MTOK: Final = 1_000_000

# What a conversation may hold, by API: text, and the tool calls and results the client ran
# itself. Anything else (images, audio, files, documents, reasoning or thinking sent back,
# references to stored items, results of server tools) is billed at a size the request does
# not show, and is refused.
_CHAT_PARTS: Final = frozenset({"text", "refusal"})
_RESPONSES_ITEMS: Final = frozenset(
    {
        "message",
        "function_call",
        "function_call_output",
        "custom_tool_call",
        "custom_tool_call_output",
    }
)
_RESPONSES_PARTS: Final = frozenset({"input_text", "output_text", "refusal", "text"})
_ANTHROPIC_BLOCKS: Final = frozenset({"text", "tool_use", "tool_result"})
_HIDDEN: Final = frozenset({"thinking", "redacted_thinking", "reasoning", "item_reference"})
_CLIENT_TOOLS: Final = frozenset({"function", "custom"})


# -- money ---------------------------------------------------------------------------------------


def token_cost(tokens: Mapping[str, int], price: ModelPrice) -> int:
    """Micro-USD of token counts by kind (``input``, ``cached``, ``cache_write``,
    ``cache_write_1h``, ``output``), rounded up once: exact integer arithmetic."""
    per_mtok = (
        tokens.get("input", 0) * price.input
        + tokens.get("cached", 0) * price.cached_input_price
        + tokens.get("cache_write", 0) * price.cache_write_price
        + tokens.get("cache_write_1h", 0) * price.cache_write_1h_price
        + tokens.get("output", 0) * price.output
    )
    return -(-per_mtok // _MICROS_PER_MTOK)


def _model_price(policy: VendorPolicy, body: Body) -> tuple[str, ModelPrice]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refusal("invalid_request", "the request names no model")
    price = policy.models.get(model)
    if price is None:
        raise Refusal(
            "unpriced_endpoint",
            f"model {model[:64]!r} has no price in the {policy.vendor} policy (models:); "
            "an operator can add it there",
        )
    return model, price


# -- the bound on input --------------------------------------------------------------------------


def input_bound(body: Body) -> int:
    """The UTF-8 byte length of the body's JSON, compactly re-encoded: at least as many
    bytes as the text the vendor tokenizes, so at least as many as its input tokens.

    >>> input_bound(Body("json", {"messages": [{"role": "user", "content": "héllo"}]}))
    49
    """
    text = json.dumps(body.root, ensure_ascii=False, separators=(",", ":"), default=str)
    # A lone surrogate (JSON allows "\ud800") counts the three bytes it would take.
    return len(text.encode("utf-8", "surrogatepass"))


def _unbounded(where: str, kind: object) -> Refusal:
    if kind in _HIDDEN:
        why = (
            "reasoning sent back (or stored items referenced) is billed at a length the "
            "request does not show"
        )
    else:
        why = (
            "only text and the client's own tool calls are priced: images, audio, files, "
            "documents and server tool results are billed at a size the request does not show"
        )
    return Refusal("unpriced_parameter", f"{where} is {str(kind)[:40]!r} content: {why}")


def _parts(content: Any, allowed: frozenset[str], where: str) -> None:
    """A message's content: text, or a list of parts whose types are ``allowed``."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{where} must be text or a list of content parts")
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise _unbounded(f"{where}.{i}", kind)


def _chat_messages(body: Body) -> None:
    for i, message in enumerate(body.get_list("messages")):
        if not isinstance(message, dict):
            raise ValueError(f"messages.{i} must be an object")
        if message.get("audio") is not None:
            raise _unbounded(f"messages.{i}.audio", "audio")
        _parts(message.get("content"), _CHAT_PARTS, f"messages.{i}.content")


def _responses_input(body: Body) -> None:
    given = body.get("input")
    if given is None or isinstance(given, str):
        return
    for i, item in enumerate(body.get_list("input")):
        if not isinstance(item, dict):
            raise ValueError(f"input.{i} must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind not in _RESPONSES_ITEMS:
            raise _unbounded(f"input.{i}", kind)
        _parts(item.get("content"), _RESPONSES_PARTS, f"input.{i}.content")
        output = item.get("output")
        if kind.endswith("_output") and not isinstance(output, str | None):
            _parts(output, _RESPONSES_PARTS, f"input.{i}.output")


def _anthropic_messages(body: Body) -> None:
    _parts(body.get("system"), frozenset({"text"}), "system")
    for i, message in enumerate(body.get_list("messages")):
        if not isinstance(message, dict):
            raise ValueError(f"messages.{i} must be an object")
        content = message.get("content")
        _parts(content, _ANTHROPIC_BLOCKS, f"messages.{i}.content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            if block.get("type") == "tool_result":
                where = f"messages.{i}.content.{j}.content"
                _parts(block.get("content"), frozenset({"text"}), where)


def _check_tools(body: Body, *, anthropic: bool) -> bool:
    """Only tools the client runs itself; True when there are any."""
    tools = body.get_list("tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools.{i} must be an object")
        kind = tool.get("type")
        client_tool = kind in _CLIENT_TOOLS or (anthropic and kind is None)
        if not client_tool:
            raise Refusal(
                "unpriced_parameter",
                f"tools.{i} is a {str(kind)[:40]!r} tool: built-in and server tools (web "
                "search, code execution, MCP, …) are charged per use and are refused; "
                "use function tools",
            )
    return bool(tools)


def _whole_number(body: Body, name: str) -> int | None:
    """A JSON integer field (not text, not a fraction: the vendors refuse those too)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refusal("invalid_request", f"{name} must be a JSON integer")
    return value


def _output_limit(body: Body, *names: str) -> int:
    limits = [v for name in names if (v := _whole_number(body, name)) is not None]
    if not limits:
        raise Refusal(
            "output_limit_required",
            f"set {' or '.join(names)}: the output limit bounds what the call can cost "
            "(a call without one is refused)",
        )
    limit = max(limits)
    if not 0 < limit <= MAX_OUTPUT_TOKENS:
        raise Refusal("invalid_request", f"{names[0]} must be between 1 and {MAX_OUTPUT_TOKENS:,}")
    return limit


def _option(rule: FunctionCost, name: str) -> int:
    value = rule.options.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Refusal("unpriced_endpoint", f"cost option {name} must be a non-negative integer")
    return value


def _estimate(
    body: Body, rule: FunctionCost, price: ModelPrice, output: int, *, tools: bool
) -> int:
    tokens_in = input_bound(body) + _option(rule, "request_overhead_tokens")
    if tools:
        tokens_in += _option(rule, "tools_overhead_tokens")
    per_mtok = tokens_in * price.dearest_input + output * price.output
    return -(-per_mtok // _MICROS_PER_MTOK)


def _refuse_values(body: Body, allowed: Mapping[str, tuple[Any, ...]]) -> None:
    for name, values in allowed.items():
        value = body.get(name)
        if value is not None and value not in values:
            raise Refusal(
                "unpriced_parameter",
                f"{name}={str(value)[:40]!r} is refused: only {', '.join(map(str, values))} "
                "is priced",
            )


# -- cost functions ------------------------------------------------------------------------------


def openai_chat_cost(
    body: Body, params: Mapping[str, str], rule: FunctionCost, policy: VendorPolicy
) -> int:
    """``POST /v1/chat/completions``: input bound + ``n`` x the output limit."""
    _, price = _model_price(policy, body)
    _chat_messages(body)
    _refuse_values(body, {"service_tier": ("auto", "default", "flex")})
    tools = _check_tools(body, anthropic=False) or bool(body.get_list("functions"))
    output = _output_limit(body, "max_completion_tokens", "max_tokens")
    choices = _whole_number(body, "n")
    choices = 1 if choices is None else choices
    if not 0 < choices <= MAX_CHOICES:
        raise Refusal("invalid_request", f"n must be between 1 and {MAX_CHOICES}")
    return _estimate(body, rule, price, output * choices, tools=tools)


def openai_responses_cost(
    body: Body, params: Mapping[str, str], rule: FunctionCost, policy: VendorPolicy
) -> int:
    """``POST /v1/responses``: input bound + ``max_output_tokens``."""
    _, price = _model_price(policy, body)
    _responses_input(body)
    _refuse_values(body, {"service_tier": ("auto", "default", "flex")})
    tools = _check_tools(body, anthropic=False)
    output = _output_limit(body, "max_output_tokens")
    return _estimate(body, rule, price, output, tools=tools)


def openai_embeddings_cost(
    body: Body, params: Mapping[str, str], rule: FunctionCost, policy: VendorPolicy
) -> int:
    """``POST /v1/embeddings``: input only (token arrays count one token per number)."""
    _, price = _model_price(policy, body)
    return _estimate(body, rule, price, 0, tools=False)


def anthropic_messages_cost(
    body: Body, params: Mapping[str, str], rule: FunctionCost, policy: VendorPolicy
) -> int:
    """``POST /v1/messages``: input bound + ``max_tokens`` (thinking included)."""
    _, price = _model_price(policy, body)
    _anthropic_messages(body)
    _refuse_values(body, {"service_tier": ("auto", "standard_only"), "speed": ("standard",)})
    tools = _check_tools(body, anthropic=True)
    output = _output_limit(body, "max_tokens")
    return _estimate(body, rule, price, output, tools=tools)


# -- reading usage -------------------------------------------------------------------------------


class _Unreadable(ValueError):
    """The usage is missing or not what the vendor documents."""


def _count(usage: Mapping[str, Any], *path: str, required: bool = True) -> int:
    node: Any = usage
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None and not required:
        return 0
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        raise _Unreadable(f"usage.{'.'.join(path)} is {str(node)[:20]}")
    return node


def _usage(data: Mapping[str, Any]) -> Mapping[str, Any]:
    usage = data.get("usage")
    if not isinstance(usage, Mapping):
        raise _Unreadable("the answer has no usage")
    return usage


def _settle(policy: VendorPolicy, estimate: Estimate, data: Mapping[str, Any], read: Any) -> Actual:
    price = policy.models.get(estimate.model or "")
    if price is None:
        return Actual(None, note="the call's model has no price any more: estimate kept")
    try:
        tokens: dict[str, int] = read(_usage(data))
    except _Unreadable as e:
        return Actual(None, note=f"usage unreadable ({e}): estimate kept")
    micros = token_cost(tokens, price)
    shown = ", ".join(f"{v} {k}" for k, v in tokens.items() if v)
    return Actual(micros, note=f"{estimate.model}: {shown or 'no'} tokens")


def _openai_split(prompt: int, cached: int, output: int) -> dict[str, int]:
    if cached > prompt:
        raise _Unreadable("more cached tokens than input tokens")
    return {"input": prompt - cached, "cached": cached, "output": output}


def _no_audio(usage: Mapping[str, Any]) -> None:
    for path in (
        ("prompt_tokens_details", "audio_tokens"),
        ("completion_tokens_details", "audio_tokens"),
    ):
        if _count(usage, *path, required=False):
            raise _Unreadable("audio tokens have no price here")


def read_openai_chat(usage: Mapping[str, Any]) -> dict[str, int]:
    """``prompt_tokens`` (of which ``prompt_tokens_details.cached_tokens``) and
    ``completion_tokens`` (reasoning and rejected prediction tokens included)."""
    _no_audio(usage)
    return _openai_split(
        _count(usage, "prompt_tokens"),
        _count(usage, "prompt_tokens_details", "cached_tokens", required=False),
        _count(usage, "completion_tokens"),
    )


def read_openai_responses(usage: Mapping[str, Any]) -> dict[str, int]:
    """``input_tokens`` (of which ``input_tokens_details.cached_tokens``), ``output_tokens``."""
    return _openai_split(
        _count(usage, "input_tokens"),
        _count(usage, "input_tokens_details", "cached_tokens", required=False),
        _count(usage, "output_tokens"),
    )


def read_openai_embeddings(usage: Mapping[str, Any]) -> dict[str, int]:
    """``prompt_tokens``."""
    return {"input": _count(usage, "prompt_tokens")}


def read_anthropic(usage: Mapping[str, Any]) -> dict[str, int]:
    """``input_tokens`` (uncached), ``cache_read_input_tokens``, ``cache_creation_input_tokens``
    (5-minute and 1-hour writes when ``cache_creation`` splits them), ``output_tokens``."""
    server = usage.get("server_tool_use")
    if isinstance(server, Mapping) and any(isinstance(v, int) and v > 0 for v in server.values()):
        raise _Unreadable("server tool use has no price here")
    written = _count(usage, "cache_creation_input_tokens", required=False)
    split = usage.get("cache_creation")
    one_hour = 0
    if isinstance(split, Mapping):
        five = _count(split, "ephemeral_5m_input_tokens", required=False)
        one_hour = _count(split, "ephemeral_1h_input_tokens", required=False)
        if five + one_hour != written:
            # The total is what is billed; an unexplained part is priced as the dearer write.
            one_hour = max(one_hour, written - five)
    return {
        "input": _count(usage, "input_tokens"),
        "cached": _count(usage, "cache_read_input_tokens", required=False),
        "cache_write": written - one_hour,
        "cache_write_1h": one_hour,
        "output": _count(usage, "output_tokens"),
    }


def _reader(read: Any) -> Any:
    def reader(policy: VendorPolicy, data: dict[str, Any], estimate: Estimate) -> Actual:
        return _settle(policy, estimate, data, read)

    return reader


# -- streams -------------------------------------------------------------------------------------


def _json(data: str) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _ask_chat_usage(request: dict[str, Any]) -> bool:
    """Chat streams state usage only when asked (``stream_options.include_usage``)."""
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    request["stream_options"] = {**(options if isinstance(options, dict) else {})}
    request["stream_options"]["include_usage"] = True
    return True


class _ChatStream:
    """Chat Completions chunks; the usage comes in a last chunk with no choices."""

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self._final: dict[str, Any] | None = None

    def feed(self, event: str | None, data: str) -> bool:
        chunk = _json(data) if data != "[DONE]" else None
        if chunk is None or not isinstance(chunk.get("usage"), dict):
            return True
        self._final = {"id": chunk.get("id"), "model": chunk.get("model"), "usage": chunk["usage"]}
        # The usage-only chunk the proxy asked for is not shown to a client that did not.
        return not (self.strip and chunk.get("choices") == [])

    @property
    def final(self) -> dict[str, Any] | None:
        return self._final


class _ResponsesStream:
    """Responses events; the usage comes with the finished response."""

    def __init__(self, strip: bool) -> None:
        self._final: dict[str, Any] | None = None

    def feed(self, event: str | None, data: str) -> bool:
        payload = _json(data)
        if payload is None:
            return True
        if payload.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            response = payload.get("response")
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self._final = response
        return True

    @property
    def final(self) -> dict[str, Any] | None:
        return self._final


class _MessagesStream:
    """Anthropic events: ``message_start`` states the input, ``message_delta`` the final
    output count; the stream is only complete at ``message_stop``."""

    def __init__(self, strip: bool) -> None:
        self._message: dict[str, Any] | None = None
        self._usage: dict[str, Any] = {}
        self._delta = False
        self._stopped = False

    def feed(self, event: str | None, data: str) -> bool:
        payload = _json(data)
        kind = payload.get("type") if payload is not None else None
        if payload is None:
            return True
        if kind == "message_start" and isinstance(payload.get("message"), dict):
            self._message = payload["message"]
            usage = self._message.get("usage")
            self._usage = dict(usage) if isinstance(usage, dict) else {}
        elif kind == "message_delta" and isinstance(payload.get("usage"), dict):
            # Cumulative counts: the last delta's are the answer's.
            self._usage.update({k: v for k, v in payload["usage"].items() if v is not None})
            self._delta = True
        elif kind == "message_stop":
            self._stopped = True
        return True

    @property
    def final(self) -> dict[str, Any] | None:
        if self._message is None or not (self._delta and self._stopped):
            return None
        return {
            "id": self._message.get("id"),
            "model": self._message.get("model"),
            "usage": self._usage,
        }


def _ask_nothing(request: dict[str, Any]) -> bool:
    return False


def _stream(usage: type[_ChatStream | _ResponsesStream | _MessagesStream]) -> Any:
    def make(strip: bool) -> StreamUsage:
        return usage(strip)

    return make


def register(registry: Registry) -> None:
    """Put this module's pricing code into ``registry`` under the names policy YAML uses."""
    registry.cost_functions["openai_chat"] = openai_chat_cost
    registry.cost_functions["openai_responses"] = openai_responses_cost
    registry.cost_functions["openai_embeddings"] = openai_embeddings_cost
    registry.cost_functions["anthropic_messages"] = anthropic_messages_cost
    registry.usage_readers["openai_chat"] = _reader(read_openai_chat)
    registry.usage_readers["openai_responses"] = _reader(read_openai_responses)
    registry.usage_readers["openai_embeddings"] = _reader(read_openai_embeddings)
    registry.usage_readers["anthropic_messages"] = _reader(read_anthropic)
    registry.streams["openai_chat"] = StreamMetering(_ask_chat_usage, _stream(_ChatStream))
    registry.streams["openai_responses"] = StreamMetering(_ask_nothing, _stream(_ResponsesStream))
    registry.streams["anthropic_messages"] = StreamMetering(_ask_nothing, _stream(_MessagesStream))
