"""What pricing is made of: request bodies, estimates, actuals, and the registry of the
vendor code that policy YAML can name.

Vendor modules (`keybrake.pricing.vendors`) import this module only, and put their counters,
cost functions, usage readers and stream metering into a `Registry` when asked to
(``register(registry)``); `keybrake.pricing` builds the one registry the proxy prices with.
Importing a vendor module changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from keybrake.core.errors import Refusal
from keybrake.core.policy import FunctionCost, PerUnitCost, VendorPolicy
from keybrake.pricing.bodies import AmbiguousField, FormError, parse_json_body, parse_stripe_form
from keybrake.pricing.sse import StreamMetering

__all__ = [
    "MEDIA_TYPES",
    "Actual",
    "AsyncCostFunction",
    "Body",
    "CostFunction",
    "Counter",
    "Estimate",
    "Registry",
    "StoreLookup",
    "UsageReader",
    "media_type",
    "parse_body",
]


class Body:
    """Read-only access to a request body by dotted path, for form and JSON bodies alike."""

    def __init__(self, kind: str, data: Any) -> None:
        self.kind = kind
        self._data = data

    @property
    def root(self) -> Any:
        """The whole parsed body: a JSON value, or the `FormTree` of a form body."""
        return self._data

    def get(self, path: str) -> Any:
        """The value at ``path`` (``line_items.0.price_data.unit_amount``) or None."""
        if self.kind == "form":
            return self._data.get(path)
        node = self._data
        for part in path.split("."):
            if isinstance(node, dict):
                node = node.get(part)
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def leaf_paths(self) -> list[str]:
        """The dotted path of every value the body carries (``line_items.0.quantity``)."""
        if self.kind == "form":
            return list(self._data.leaf_paths())
        out: list[str] = []

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict) and node:
                for key, child in node.items():
                    walk(child, f"{path}.{key}" if path else str(key))
            elif isinstance(node, list) and node:
                for i, item in enumerate(node):
                    walk(item, f"{path}.{i}" if path else str(i))
            elif path:
                out.append(path)

        walk(self._data, "")
        return out

    def get_node(self, path: str) -> Any:
        """The value at ``path`` whatever its shape: a scalar, or nested lists and objects
        (a form body's nested fields read as objects of strings), or None."""
        if self.kind == "form":
            return self._data.get_value(path)
        return self.get(path)

    def get_int(self, path: str) -> int | None:
        """A non-negative integer field; anything else refuses rather than guessing."""
        if self.kind == "form":
            value = self._data.get_int(path)
            return int(value) if value is not None else None
        v = self.get(path)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | str | Decimal):
            raise ValueError(f"{path} must be an integer")
        if isinstance(v, Decimal):
            if v != v.to_integral_value():
                raise ValueError(f"{path} must be an integer")
            v = int(v)
        if isinstance(v, str):
            if not v.isdigit() or len(v) > 18:
                raise ValueError(f"{path} must be an integer")
            v = int(v)
        number = int(v)
        if number < 0:
            raise ValueError(f"{path} must not be negative")
        return number

    def get_list(self, path: str) -> list[Any]:
        """The list at ``path`` (a lone value is a one-item list), or []."""
        if self.kind == "form":
            return list(self._data.get_list(path))
        v = self.get(path)
        if v is None:
            return []
        if isinstance(v, list):
            return v
        if isinstance(v, dict) and all(k.isdigit() for k in v):
            return [v[k] for k in sorted(v, key=int)]
        return [v]


MEDIA_TYPES: dict[str, str] = {
    "application/x-www-form-urlencoded": "form",
    "application/json": "json",
}
"""Media type → body type. Nothing else is ever parsed: no sniffing, no ``+json`` suffixes."""
_MEDIA_OF: dict[str, str] = {kind: media for media, kind in MEDIA_TYPES.items()}


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """The lower-cased ``type/subtype`` of a Content-Type and its parameters.

    >>> media_type("Application/X-WWW-Form-Urlencoded; charset=UTF-8; x=json")
    ('application/x-www-form-urlencoded', {'charset': 'utf-8', 'x': 'json'})
    """
    head, *params = content_type.split(";")
    out: dict[str, str] = {}
    for param in params:
        name, _, value = param.partition("=")
        out[name.strip().lower()] = value.strip().strip('"').lower()
    return head.strip().lower(), out


def parse_body(accepted: tuple[str, ...], content_types: list[str], raw: bytes) -> Body:
    """Parse a request body exactly as the vendor will, or refuse it.

    The media type alone (type/subtype, case-insensitive, parameters ignored) picks the parser,
    and it must be one of the ``accepted`` body types (the endpoint's policy). A body the
    proxy would read one way and the vendor another is the cheapest way around a cap: a JSON
    body sent as form data, a form body with a charset the vendor decodes differently, two
    Content-Type headers. An empty body is an empty set of parameters whatever its type.
    """
    wanted = " or ".join(_MEDIA_OF[kind] for kind in accepted)
    if len(content_types) > 1:
        raise Refusal("unsupported_media_type", "a request may have only one Content-Type")
    if not raw:
        kind = accepted[0]
        if content_types:
            kind = MEDIA_TYPES.get(media_type(content_types[0])[0], "")
            if kind not in accepted:
                raise Refusal(
                    "unsupported_media_type", f"this endpoint takes {wanted} request bodies"
                )
        return Body(kind, parse_json_body(b"{}") if kind == "json" else parse_stripe_form(b""))
    if not content_types:
        raise Refusal("unsupported_media_type", f"a request body needs Content-Type {wanted}")
    media, params = media_type(content_types[0])
    kind = MEDIA_TYPES.get(media, "")
    if kind not in accepted:
        raise Refusal(
            "unsupported_media_type",
            f"this endpoint takes {wanted} request bodies, not {media[:64] or 'an empty type'}",
        )
    if params.get("charset", "utf-8") not in ("utf-8", "utf8"):
        raise Refusal("unsupported_media_type", "request bodies must be UTF-8")
    try:
        return Body(kind, parse_json_body(raw) if kind == "json" else parse_stripe_form(raw))
    except AmbiguousField as e:
        raise Refusal("ambiguous_amount", f"request body is ambiguous: {e}") from None
    except (FormError, ValueError) as e:
        raise Refusal("invalid_request", f"request body cannot be parsed: {e}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Estimate:
    """What a call may cost, in micro-USD, plus the vendor-side amount it came from."""

    micros: int
    amount_minor: int | None = None
    currency: str | None = None
    basis: str = "rule"
    # AI vendors: the model the request names, whose token prices settle the call.
    model: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Actual:
    """What the vendor reports it charged; ``micros`` None means keep the estimate.

    ``charged`` is False when the answer says this call moved no money (the ``actual``
    rule's ``charged_when`` did not match); the object may still charge later (`HoldRule`).
    """

    micros: int | None
    amount_minor: int | None = None
    currency: str | None = None
    note: str = ""
    charged: bool = True


StoreLookup = Callable[[str], Awaitable[int | None]]
Counter = Callable[[Body, PerUnitCost], int]
CostFunction = Callable[[Body, Mapping[str, str], FunctionCost, VendorPolicy], int]
AsyncCostFunction = Callable[
    [Body, Mapping[str, str], FunctionCost, VendorPolicy, StoreLookup], Awaitable[int]
]

UsageReader = Callable[[VendorPolicy, dict[str, Any], Estimate], Actual]


@dataclasses.dataclass(slots=True)
class Registry:
    """The vendor code that policy YAML names, by name (`keybrake.pricing.REGISTRY`)."""

    counters: dict[str, Counter] = dataclasses.field(default_factory=dict)
    """Counters for ``per_unit`` rules: how many units (recipients, segments) a call uses."""
    cost_functions: dict[str, CostFunction] = dataclasses.field(default_factory=dict)
    """Cost functions for ``function`` rules: micro-USD from the body and path parameters."""
    async_cost_functions: dict[str, AsyncCostFunction] = dataclasses.field(default_factory=dict)
    """Cost functions that may also look up amounts the proxy remembered (Stripe price ids)."""
    usage_readers: dict[str, UsageReader] = dataclasses.field(default_factory=dict)
    """Readers for ``actual: {usage: name}`` rules: the charge from an answer's token usage."""
    streams: dict[str, StreamMetering] = dataclasses.field(default_factory=dict)
    """Stream metering by usage reader name (``actual: {usage: openai_chat}``)."""
