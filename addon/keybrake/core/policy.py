"""Vendor policies: one YAML file per vendor in ``policies/``, validated with pydantic.

A policy says which hosts belong to the vendor, how a worker presents its credential, which
environment variable holds the real secret, and how every priced endpoint is costed. Adding a
vendor with simple pricing needs a YAML file only.

Errors name the file, the line and the dotted path of the bad field, one line each::

    >>> load_policies(Path("policies"))  # doctest: +SKIP
    PolicyError: policies/stripe.yaml:64: endpoints.0.cost.kind: Input should be 'amount_field', ...
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from keybrake.core._policy_errors import SourceLines, schema_problems, yaml_problem
from keybrake.core.money import UnknownCurrency, minor_unit_exponent, parse_usd
from keybrake.core.paths import EndpointPattern, PatternError

__all__ = [
    "MAX_REQUESTS_PER_MINUTE",
    "AmountFieldCost",
    "AuthPolicy",
    "BodyType",
    "CostRule",
    "DedupePolicy",
    "EndpointPolicy",
    "FixedCost",
    "FunctionCost",
    "HoldRule",
    "KnownObjectCost",
    "ModelPrice",
    "PerUnitCost",
    "PolicyError",
    "PolicySet",
    "UpstreamPolicy",
    "VendorPolicy",
    "load_policies",
    "load_policy_file",
]

# Largest request-rate limit a policy or a key may set (requests per minute).
MAX_REQUESTS_PER_MINUTE = 1_000_000
# All patterns are used with fullmatch: "$" alone would also accept a trailing newline.
_VENDOR_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_UPSTREAM_URL = re.compile(
    rf"(?P<scheme>https?)://(?P<host>{_LABEL}(?:\.{_LABEL})*|\d{{1,3}}(?:\.\d{{1,3}}){{3}})"
    r"(?::(?P<port>\d{1,5}))?/?",
    re.ASCII,
)
_MIN_FX_RATE = Decimal("0.000000001")
_MAX_FX_RATE = Decimal(1_000_000)


@functools.lru_cache(maxsize=4096)
def _parse_pattern(spec: str) -> EndpointPattern:
    """Parsed patterns are immutable: parse each spec once per process."""
    return EndpointPattern.parse(spec)


class PolicyError(Exception):
    """A policy file is missing, unreadable or invalid; the message names file and field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _usd(value: object) -> int:
    if isinstance(value, float):
        # YAML turns 0.0083 into a float; reparse its shortest repr so no binary noise leaks in.
        value = Decimal(repr(value))
    if not isinstance(value, str | int | Decimal) or isinstance(value, bool):
        raise ValueError("must be a dollar amount such as 0.0083 or '12.50'")
    return parse_usd(value)


def _currency_code(value: object) -> str:
    code = str(value).lower()
    try:
        minor_unit_exponent(code)
    except UnknownCurrency as e:
        raise ValueError(f"unknown currency {value!r}") from e
    return code


def _fx_rate(value: object) -> Decimal:
    bad = ValueError(
        f"must be a number of USD per unit between {_MIN_FX_RATE:f} and {_MAX_FX_RATE:f}"
    )
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise bad
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise bad from None
    if not d.is_finite() or not _MIN_FX_RATE <= d <= _MAX_FX_RATE:
        raise bad
    return d


def _host_name(value: object) -> str:
    if not isinstance(value, str) or not _HOST.fullmatch(value):
        raise ValueError(f"{value!r} is not a lowercase DNS host name")
    return value


def _regex(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a regular expression string")
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regex {value!r}: {e}") from e
    return value


HostName = Annotated[str, BeforeValidator(_host_name)]
CurrencyCode = Annotated[str, BeforeValidator(_currency_code)]
FxRate = Annotated[Decimal, BeforeValidator(_fx_rate)]


class UpstreamPolicy(_Model):
    """Send this vendor's traffic to another address (tests, on-prem gateways)."""

    url: str = Field(description="Base URL such as https://127.0.0.1:9443 (scheme, host, port).")
    ca_file: Path | None = Field(
        default=None, description="PEM CA file to trust for this upstream, added to the defaults."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        m = _UPSTREAM_URL.fullmatch(v.lower())
        if m is None or (m["port"] is not None and not 0 < int(m["port"]) < 65536):
            raise ValueError(
                "must look like https://host:port: a lowercase host name or IPv4 address and "
                "an optional port 1-65535 (no user, path, query or IPv6)"
            )
        return v.lower().rstrip("/")


class AuthPolicy(_Model):
    """How a worker presents its credential and how the real one is put back."""

    schemes: tuple[Literal["bearer", "basic_user", "basic_password", "api_key_header"], ...] = (
        Field(
            description=(
                "Accepted credential forms: 'bearer' (Authorization: Bearer KEY), 'basic_user' "
                "(Basic KEY: — Stripe), 'basic_password' (Basic ACCOUNT:KEY — Twilio), "
                "'api_key_header' (the key alone in the header named by key_header — "
                "Anthropic's x-api-key; a request may use it or Authorization, never both)."
            ),
            min_length=1,
        )
    )
    key_header: str = Field(
        default="x-api-key",
        description="For api_key_header: the request header carrying the key.",
    )
    secret_env: str = Field(description="Environment variable holding the real secret.")
    username_env: str | None = Field(
        default=None,
        description="For basic_password: env var of the real Basic username (account or key SID).",
    )
    account_env: str | None = Field(
        default=None, description="Env var of the real account id that appears in paths."
    )
    account_path_after: str | None = Field(
        default=None,
        description="Path segment after which the account id appears (Twilio: 'Accounts').",
    )
    raw_secret_patterns: tuple[Annotated[str, BeforeValidator(_regex)], ...] = Field(
        default=(), description="Regexes of real vendor secrets; presenting one is refused."
    )

    @field_validator("secret_env", "username_env", "account_env")
    @classmethod
    def _check_env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError("must be an environment variable name such as STRIPE_SECRET_KEY")
        return v

    @model_validator(mode="after")
    def _check_account(self) -> AuthPolicy:
        if (self.account_env is None) != (self.account_path_after is None):
            raise ValueError("account_env and account_path_after go together")
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", self.key_header) or self.key_header.lower() in (
            "authorization",
            "proxy-authorization",
        ):
            raise ValueError("key_header must be a plain header name other than Authorization")
        return self


class AmountFieldCost(_Model):
    """The request names its own amount: minor units in ``amount`` and a ``currency`` field."""

    kind: Literal["amount_field"]
    amount: str = Field(description="Dotted path of the minor-unit amount in the request body.")
    currency: str | None = Field(default="currency", description="Path of the currency field.")
    default_currency: str | None = Field(
        default=None, description="Currency when the request has no currency field."
    )
    known_object: str | None = Field(
        default=None,
        description=(
            "Path placeholder (e.g. 'id') naming an object whose amount the proxy remembered "
            "from an earlier response; used when the request carries no amount."
        ),
    )
    known_object_fields: tuple[str, ...] = Field(
        default=(),
        description=(
            "Body fields that may name such an object instead (Stripe refunds: 'charge', "
            "'payment_intent'); the largest amount remembered for the objects named is used."
        ),
    )


class KnownObjectCost(_Model):
    """The amount the proxy remembered for the object the call acts on; unknown → refused.

    For calls whose body carries no trustworthy amount (a PaymentIntent confirm, an invoice
    payment): the price is what an earlier response (create, retrieve) said the object is worth.
    """

    kind: Literal["known_object"]
    param: str | None = Field(
        default=None, description="Path placeholder naming the object, e.g. 'id'."
    )
    fields: tuple[str, ...] = Field(
        default=(),
        description="Body fields that may name the object; the largest remembered amount wins.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> KnownObjectCost:
        if (self.param is None) == (not self.fields):
            raise ValueError("name the object by exactly one of 'param' or 'fields'")
        return self


class FixedCost(_Model):
    """A fixed USD price per call."""

    kind: Literal["fixed_usd"]
    usd: Annotated[int, Field(description="Price per call in USD.")]

    @field_validator("usd", mode="before")
    @classmethod
    def _parse(cls, v: object) -> int:
        return _usd(v)


class PerUnitCost(_Model):
    """A USD price per unit counted by a named counter (recipients, SMS segments)."""

    kind: Literal["per_unit"]
    counter: str = Field(description="Registered counter name, e.g. 'email_recipients'.")
    unit_usd: int = Field(default=0, description="Price per unit in USD.")
    by_prefix: dict[str, int] = Field(
        default_factory=dict,
        description="Per-destination price: calling-code prefix -> USD per unit.",
    )
    prefix_field: str | None = Field(
        default=None, description="Body field holding the destination (e.g. 'To')."
    )
    refuse_unlisted: bool = Field(
        default=False,
        description=(
            "With by_prefix: refuse a destination no prefix matches, instead of pricing it "
            "at unit_usd."
        ),
    )
    min_usd_when_present: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Body field -> USD: a call carrying the field (a non-empty value) costs at least "
            "this much per call (Twilio: MediaUrl -> the MMS price)."
        ),
    )
    fields: tuple[str, ...] = Field(
        default=(),
        description="Body fields a generic counter reads ('list_items', 'integer_fields').",
    )

    @field_validator("unit_usd", mode="before")
    @classmethod
    def _parse(cls, v: object) -> int:
        return _usd(v)

    @field_validator("min_usd_when_present", mode="before")
    @classmethod
    def _parse_minimums(cls, v: object) -> dict[str, int]:
        if not isinstance(v, Mapping):
            raise ValueError("must be a mapping of body field to USD")
        return {str(k): _usd(price) for k, price in v.items()}

    @model_validator(mode="after")
    def _check_destination(self) -> PerUnitCost:
        if self.refuse_unlisted and not (self.by_prefix and self.prefix_field):
            raise ValueError("refuse_unlisted needs a by_prefix table and a prefix_field")
        return self

    @field_validator("by_prefix", mode="before")
    @classmethod
    def _parse_table(cls, v: object) -> dict[str, int]:
        if not isinstance(v, Mapping):
            raise ValueError("must be a mapping of calling-code prefix to USD")
        out: dict[str, int] = {}
        for k, price in v.items():
            key = str(k)
            if not re.fullmatch(r"[0-9]{1,6}", key):
                raise ValueError(f"prefix {key!r} must be digits (a calling code)")
            out[key] = _usd(price)
        return out


class FunctionCost(_Model):
    """A named Python cost function registered in ``keybrake.pricing``."""

    kind: Literal["function"]
    name: str
    options: dict[str, str | int | bool] = Field(default_factory=dict)


CostRule = Annotated[
    AmountFieldCost | FixedCost | PerUnitCost | FunctionCost | KnownObjectCost,
    Field(discriminator="kind"),
]


class ActualRule(_Model):
    """How to read what the vendor really charged from a successful response body."""

    amount: str | None = Field(default=None, description="Path of the minor-unit amount.")
    currency: str | None = Field(default="currency", description="Path of the currency.")
    charged_when: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Field -> values for which the amount was charged; otherwise cost is 0.",
    )
    price_list: bool = Field(
        default=False,
        description="The vendor never states a charge per call (it bills by a price list or "
        "plan): the estimate, a closed-world price, is the charge.",
    )
    price: str | None = Field(
        default=None,
        description=(
            "Instead of 'amount': path of a major-unit decimal price such as Twilio's "
            "'-0.00790' (sign ignored), in the currency at 'currency'. When it is null "
            "(Twilio prices a message after sending it) the estimate stands."
        ),
    )
    usage: str | None = Field(
        default=None,
        description=(
            "Instead of 'amount' or 'price': the name of a registered token-usage reader "
            "(keybrake.pricing.USAGE_READERS, e.g. 'openai_chat') that prices the answer's "
            "'usage' with the vendor's 'models' table, streamed answers included."
        ),
    )

    @model_validator(mode="after")
    def _check_amount_or_price(self) -> ActualRule:
        if sum(x is not None for x in (self.amount, self.price, self.usage)) > 1:
            raise ValueError("read one of amount, price or usage, not both")
        return self


class HoldRule(_Model):
    """What an object created or acted on by this call can still charge later, out of the
    proxy's sight (a PaymentIntent confirmed in a browser with its ``client_secret``, a
    Checkout session paid on Stripe's page, a trial that converts, a pending invoice item).

    After a successful answer that is not a charge (the ``actual`` rule's ``charged_when``
    does not match) and does not prove that nothing can move any more (``released_when``),
    the call's reservation is kept as a *hold* on the object, at the amount read here (or the
    estimate). Later answers about the object through the proxy settle the hold (charged)
    or release it (``released_when``); a later charging call on the object uses the hold
    rather than reserving again, so nothing is counted twice.
    """

    param: str = Field(
        default="id",
        description="Path placeholder naming the object on calls that act on it: its holds "
        "are used by the call (a create names none: it makes the hold).",
    )
    amount: str | None = Field(
        default=None,
        description="Response field (minor units) of what the object can charge; unset: "
        "the call's estimate.",
    )
    currency: str | None = Field(default="currency", description="Response currency field.")
    released_when: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Field -> values that prove nothing more can be charged (e.g. status: "
        "[canceled]; booleans read as 'true'/'false'): the hold is released.",
    )
    releases: str | None = Field(
        default=None,
        description="On a charged answer, also release this key's holds on the objects this "
        "response field names (lists are walked: an invoice's "
        "lines.data.parent.invoice_item_details.invoice_item); their amounts are in the "
        "charge.",
    )


def _per_mtok(value: object) -> int:
    """USD per million tokens (``2.50``) as micro-USD per million tokens (``2500000``)."""
    return _usd(value)


PerMillionTokens = Annotated[int, BeforeValidator(_per_mtok)]


class ModelPrice(_Model):
    """The price of one model, in USD per million tokens (the vendors' list prices).

    Stored as micro-USD per million tokens, so a token costs ``price / 1_000_000`` micro-USD
    exactly; a call's cost is rounded up to the micro-USD once, over all its tokens.
    """

    input: PerMillionTokens = Field(description="USD per million input (prompt) tokens.")
    cached_input: PerMillionTokens | None = Field(
        default=None,
        description="USD per million input tokens read from the prompt cache (unset: input).",
    )
    cache_write: PerMillionTokens | None = Field(
        default=None,
        description="USD per million input tokens written to the prompt cache (Anthropic's "
        "5-minute cache; unset: input).",
    )
    cache_write_1h: PerMillionTokens | None = Field(
        default=None,
        description="USD per million input tokens written to the 1-hour prompt cache "
        "(Anthropic; unset: cache_write).",
    )
    output: PerMillionTokens = Field(
        default=0,
        description="USD per million output tokens, reasoning/thinking tokens included "
        "(0 for embedding models).",
    )

    @property
    def cached_input_price(self) -> int:
        return self.input if self.cached_input is None else self.cached_input

    @property
    def cache_write_price(self) -> int:
        return self.input if self.cache_write is None else self.cache_write

    @property
    def cache_write_1h_price(self) -> int:
        return self.cache_write_price if self.cache_write_1h is None else self.cache_write_1h

    @property
    def dearest_input(self) -> int:
        """The most one input token can cost, whichever way the vendor bills it."""
        return max(
            self.input, self.cached_input_price, self.cache_write_price, self.cache_write_1h_price
        )


class DedupePolicy(_Model):
    """Content dedupe for vendors without idempotency keys (or SDKs sending random ones)."""

    by: Literal["body"] = Field(description="What makes two calls the same: the request body.")
    window: str = Field(description="How long a call is remembered: '10m', '1h', 'PT10M'.")

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: str) -> str:
        from keybrake.core.keys import parse_duration

        parse_duration(v)
        return v

    @property
    def seconds(self) -> int:
        from keybrake.core.keys import parse_duration

        return int(parse_duration(self.window).total_seconds())


BodyType = Literal["form", "json"]
"""How a request body is encoded: ``form`` (application/x-www-form-urlencoded) or ``json``
(application/json). The media type of the request alone picks the parser."""


def _body_types(value: object) -> tuple[str, ...]:
    """``form``, ``json`` or a list of them (YAML ``body: [form, json]``)."""
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise ValueError("name at least one body type: form or json")
    out: list[str] = []
    for item in items:
        if item not in ("form", "json"):
            raise ValueError(f"{item!r} is not a body type; use form or json")
        if item not in out:
            out.append(item)
    return tuple(out)


BodyTypes = Annotated[tuple[BodyType, ...], BeforeValidator(_body_types)]


class EndpointPolicy(_Model):
    """One allowlistable endpoint and how it is priced."""

    match: str = Field(description="Method and path pattern, e.g. 'POST /v1/payment_intents'.")
    free: bool = Field(default=False, description="Costs nothing (reads).")
    body: BodyTypes | None = Field(
        default=None,
        description=(
            "Body types the vendor accepts on this endpoint (form, json, or a list); unset: "
            "the vendor's. A request with another media type is refused (415)."
        ),
    )
    query: bool = Field(
        default=False,
        description=(
            "Allow a query string on a state-changing call (POST, PUT, PATCH, DELETE). Off: "
            "refused, since a vendor may read parameters from it that the proxy did not price "
            "(Stripe merges the query into the body's parameters). Reads always take one."
        ),
    )
    cost: CostRule | None = None
    actual: ActualRule | None = None
    object_id: str | None = Field(
        default="id", description="Response field holding the vendor object id."
    )
    remember_amount: str | None = Field(
        default=None,
        description="Response field (minor units) to remember for later calls on the object.",
    )
    hold: HoldRule | None = Field(
        default=None,
        description="Keep the reservation while the object can still charge later (HoldRule).",
    )
    expand: tuple[str, ...] = Field(
        default=(),
        description="Response fields the proxy asks the vendor to expand (Stripe expand[]) so "
        "that the answer states what was charged; collapsed back to their id for a worker that "
        "did not ask for them.",
    )
    followup: str | None = Field(
        default=None,
        description="Path the proxy reads, with the real secret, until a held object's answer "
        "states its charge ({account}: the real account id, {id}: the object): for vendors "
        "that price a call after answering it (Twilio messages).",
    )
    creates: str | None = Field(
        default=None,
        description="Response field naming the object(s) this call creates (lists are walked: "
        "data.id): the key is recorded as their owner.",
    )
    owned: str | None = Field(
        default=None,
        description="Path placeholder naming the object the call acts on, which must belong "
        "to the key (unset: the last placeholder that is not the vendor account; '' for none).",
    )
    params: tuple[str, ...] | None = Field(
        default=None,
        description="The request parameters this endpoint's rule understands, as dotted "
        "patterns ('amount', 'metadata.**', 'line_items.*.quantity'): priced ones and ones "
        "known not to change the cost. Any other is refused (unpriced_parameter). Required "
        "on every endpoint that is not a read.",
    )
    refused: dict[str, str] = Field(
        default_factory=dict,
        description="Parameters refused on purpose, each with the reason the refusal gives.",
    )
    owned_fields: tuple[str, ...] = Field(
        default=(),
        description="Body fields naming objects the call acts on: refused when another key "
        "created them (objects the proxy never saw made are allowed here).",
    )
    dedupe: DedupePolicy | None = Field(
        default=None, description="Replay identical calls within a window instead of resending."
    )

    @field_validator("match")
    @classmethod
    def _check_match(cls, v: str) -> str:
        try:
            return str(EndpointPattern.parse(v))
        except PatternError as e:
            raise ValueError(str(e)) from e

    @model_validator(mode="after")
    def _check_cost(self) -> EndpointPolicy:
        if self.free and self.cost is not None:
            raise ValueError("an endpoint is either free or has a cost rule, not both")
        return self

    @property
    def pattern(self) -> EndpointPattern:
        return _parse_pattern(self.match)

    def owned_segment(self, vendor: VendorPolicy) -> tuple[str, int] | None:
        """The placeholder naming the object this call acts on, and its segment index."""
        if self.owned == "":
            return None
        segments = self.pattern.segments
        account = None
        if vendor.auth.account_path_after in segments:
            account = segments.index(vendor.auth.account_path_after) + 1
        for index in range(len(segments) - 1, -1, -1):
            segment = segments[index]
            if not segment.startswith("{") or index == account:
                continue
            name = segment[1:].partition("}")[0]
            if self.owned is None or name == self.owned:
                return name, index
        return None

    def body_types(self, vendor: VendorPolicy) -> tuple[str, ...]:
        """The body types this endpoint accepts: its own, else the vendor's."""
        return self.body if self.body is not None else vendor.body


class VendorPolicy(_Model):
    """Everything Keybrake knows about one vendor."""

    vendor: str = Field(description="Short name used in vault keys and URLs, e.g. 'stripe'.")
    hosts: tuple[HostName, ...] = Field(description="API hosts that are intercepted.")
    upstream: UpstreamPolicy | None = None
    auth: AuthPolicy
    request_id_header: str | None = Field(default=None, description="Vendor request id header.")
    idempotency_header: str | None = Field(default=None, description="Vendor idempotency header.")
    account_headers: tuple[str, ...] = Field(
        default=(),
        description=(
            "Request headers that make the vendor act on another account (Stripe Connect: "
            "Stripe-Account, Stripe-Context). A request carrying one is refused unless the "
            "vault key lists that account in allowed_accounts."
        ),
    )
    idempotency_replay_statuses: tuple[int, ...] = Field(
        default=(),
        description=(
            "Non-2xx statuses the vendor itself stores and replays for a repeated idempotency "
            "key (Stripe: 402 card errors). 2xx are always stored."
        ),
    )
    body: BodyTypes = Field(
        default=("form",),
        description=(
            "Body types the vendor accepts (form, json, or a list): the request's media type "
            "must be one of them, and picks the parser; endpoints may narrow it."
        ),
    )
    fx_to_usd: dict[CurrencyCode, FxRate] = Field(
        default_factory=lambda: {"usd": Decimal(1)},
        description="USD per unit of each accepted currency.",
    )
    free_reads: bool = Field(default=False, description="Every GET endpoint is free.")
    max_requests_per_minute: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=MAX_REQUESTS_PER_MINUTE,
        description=(
            "Request-rate limit given to each new vault key of this vendor that does not set "
            "its own: requests in any 60 seconds, paid or free. Unset: no limit."
        ),
    )
    models: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description=(
            "Token prices per model name, as the request's 'model' names it (AI vendors): "
            "a model that is not listed is refused (unpriced_endpoint), never guessed."
        ),
    )
    refused_headers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Request headers refused on purpose (unpriced_parameter), each with the reason "
            "(Anthropic's anthropic-beta turns on features the price table does not know)."
        ),
    )
    endpoints: tuple[EndpointPolicy, ...] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _check_models(cls, v: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", name):
                raise ValueError(f"{name[:64]!r} is not a model name")
        return v

    @field_validator("vendor")
    @classmethod
    def _check_vendor(cls, v: str) -> str:
        if not _VENDOR_NAME.fullmatch(v):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (max 32)")
        return v

    @field_validator("hosts")
    @classmethod
    def _some_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one host")
        return v

    @field_validator("fx_to_usd")
    @classmethod
    def _default_usd(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        return {"usd": Decimal(1), **v}


class PolicySet:
    """All loaded vendor policies, indexed by vendor name and by host."""

    def __init__(self, policies: list[VendorPolicy], files: Mapping[str, Path]) -> None:
        self.vendors: dict[str, VendorPolicy] = {p.vendor: p for p in policies}
        self.files = dict(files)
        self.by_host: dict[str, VendorPolicy] = {h: p for p in policies for h in p.hosts}

    def for_host(self, host: str) -> VendorPolicy | None:
        return self.by_host.get(host.lower().rstrip("."))

    def allow_hosts_regexes(self) -> list[str]:
        """mitmproxy ``allow_hosts`` entries: only vendor hosts are ever decrypted."""
        return [rf"^{re.escape(h)}(:\d+)?$" for h in sorted(self.by_host)]


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (the last would win).
    Files are read by `_FastStrictLoader`; this one reads again a file that one refuses, for
    PyYAML's message (what is wrong, with the line it is on)."""


class _FastStrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same on libyaml's parser (a tenth of the CPU: most of a policy file's load time,
    paid at every start and every ``check-policy``); a file it refuses is read again by
    `_StrictLoader`, for the message."""


def _mapping_without_duplicates(
    loader: _StrictLoader | _FastStrictLoader, node: yaml.MappingNode
) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: let the normal constructor report it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


for _loader in (_StrictLoader, _FastStrictLoader):
    _loader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
    )


def _load_yaml(text: str) -> Any:
    """``text``'s document, by `_FastStrictLoader`; a `yaml.YAMLError` is `_StrictLoader`'s."""
    try:
        return yaml.load(text, Loader=_FastStrictLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (raises its own error)


def load_policy_file(path: Path) -> VendorPolicy:
    """Load and validate one vendor YAML file.

    A relative ``upstream.ca_file`` is taken relative to the policy file, and must exist.

    >>> load_policy_file(Path("policies/stripe.yaml")).vendor  # doctest: +SKIP
    'stripe'
    """
    try:
        text = path.read_text(encoding="utf-8")
        raw = _load_yaml(text)
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not valid UTF-8 text") from None
    except yaml.YAMLError as e:
        raise PolicyError(yaml_problem(path, e)) from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: (top level): must be a mapping")
    lines = functools.cache(lambda: SourceLines.of(text, _StrictLoader))

    def at(*loc: str | int) -> str:
        """``file:line`` of a field (errors found after validation)."""
        line = lines().line(loc)
        return f"{path}:{line}" if line is not None else str(path)

    try:
        policy = VendorPolicy.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(schema_problems(path, e, VendorPolicy, lines())) from None
    if policy.upstream is not None and policy.upstream.ca_file is not None:
        ca_file = policy.upstream.ca_file.expanduser()
        if not ca_file.is_absolute():
            ca_file = path.parent / ca_file
        if not ca_file.is_file():
            raise PolicyError(
                f"{at('upstream', 'ca_file')}: upstream.ca_file: {ca_file} is not a readable file"
            )
        upstream = policy.upstream.model_copy(update={"ca_file": ca_file})
        policy = policy.model_copy(update={"upstream": upstream})
    seen: dict[str, int] = {}
    for i, ep in enumerate(policy.endpoints):
        if ep.match in seen:
            raise PolicyError(
                f"{at('endpoints', i, 'match')}: endpoints.{i}.match: {ep.match!r} repeats "
                f"endpoints.{seen[ep.match]}"
            )
        seen[ep.match] = i
        if ep.params is None and ep.pattern.method not in ("GET", "HEAD"):
            raise PolicyError(
                f"{at('endpoints', i)}: endpoints.{i}.params: {ep.match!r} changes state: list "
                "the request parameters its rule understands (pricing is a closed world; [] "
                "for none)"
            )
        if ep.owned and ep.owned_segment(policy) is None:
            raise PolicyError(
                f"{at('endpoints', i, 'owned')}: endpoints.{i}.owned: {ep.match!r} has no "
                f"placeholder {{{ep.owned}}}"
            )
        for rule in (ep.cost, ep.actual):
            if (
                isinstance(rule, AmountFieldCost)
                and rule.default_currency
                and rule.default_currency.lower() not in policy.fx_to_usd
            ):
                part = "cost" if rule is ep.cost else "actual"
                raise PolicyError(
                    f"{at('endpoints', i, part, 'default_currency')}: "
                    f"endpoints.{i}.{part}.default_currency: "
                    f"{rule.default_currency!r} has no rate in fx_to_usd"
                )
    return policy


def load_policies(directory: Path) -> PolicySet:
    """Load every ``*.yaml``/``*.yml`` file of a policies directory.

    Fails (`PolicyError`) on the first bad file, on two files claiming one vendor or host, and
    on an empty directory.
    """
    if not directory.is_dir():
        raise PolicyError(f"{directory}: policies directory does not exist")
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not files:
        raise PolicyError(f"{directory}: no *.yaml vendor policies found")
    policies: list[VendorPolicy] = []
    seen_vendor: dict[str, Path] = {}
    seen_host: dict[str, Path] = {}
    for f in files:
        p = load_policy_file(f)
        if p.vendor in seen_vendor:
            raise PolicyError(
                f"{f}: vendor: {p.vendor!r} already defined in {seen_vendor[p.vendor]}"
            )
        seen_vendor[p.vendor] = f
        for h in p.hosts:
            if h in seen_host:
                raise PolicyError(f"{f}: hosts: {h!r} already claimed by {seen_host[h]}")
            seen_host[h] = f
        policies.append(p)
    return PolicySet(policies, seen_vendor)
