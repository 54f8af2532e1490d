"""Vendor policies: one YAML file per vendor in ``policies/``, validated with pydantic.

A policy says which hosts belong to the vendor, how a worker presents its credential, which
environment variable holds the real secret, and how every priced endpoint is costed. Adding a
vendor with simple pricing needs a YAML file only.

Errors name the file and the dotted path of the bad field::

    >>> load_policies(Path("policies"))  # doctest: +SKIP
    PolicyError: policies/stripe.yaml: endpoints.0.cost.kind: Input should be 'amount_field', ...
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keybrake._money import UnknownCurrency, minor_unit_exponent, parse_usd
from keybrake._paths import EndpointPattern, PatternError

__all__ = [
    "AmountFieldCost",
    "AuthPolicy",
    "CostRule",
    "EndpointPolicy",
    "FixedCost",
    "FunctionCost",
    "PerUnitCost",
    "PolicyError",
    "PolicySet",
    "UpstreamPolicy",
    "VendorPolicy",
    "load_policies",
    "load_policy_file",
]

_VENDOR_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


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


class UpstreamPolicy(_Model):
    """Send this vendor's traffic to another address (tests, on-prem gateways)."""

    url: str = Field(description="Base URL such as https://127.0.0.1:9443 (scheme, host, port).")
    ca_file: Path | None = Field(
        default=None, description="PEM CA file to trust for this upstream, added to the defaults."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/?#]+/?$", v):
            raise ValueError("must look like https://host:port (no path)")
        return v.rstrip("/")


class AuthPolicy(_Model):
    """How a worker presents its credential and how the real one is put back."""

    schemes: tuple[Literal["bearer", "basic_user", "basic_password"], ...] = Field(
        description=(
            "Accepted credential forms: 'bearer' (Authorization: Bearer KEY), 'basic_user' "
            "(Basic KEY: — Stripe), 'basic_password' (Basic ACCOUNT:KEY — Twilio)."
        ),
        min_length=1,
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
    raw_secret_patterns: tuple[str, ...] = Field(
        default=(), description="Regexes of real vendor secrets; presenting one is refused."
    )

    @field_validator("secret_env", "username_env", "account_env")
    @classmethod
    def _check_env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError("must be an environment variable name such as STRIPE_SECRET_KEY")
        return v

    @field_validator("raw_secret_patterns")
    @classmethod
    def _check_patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from e
        return v

    @model_validator(mode="after")
    def _check_account(self) -> AuthPolicy:
        if (self.account_env is None) != (self.account_path_after is None):
            raise ValueError("account_env and account_path_after go together")
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

    @field_validator("unit_usd", mode="before")
    @classmethod
    def _parse(cls, v: object) -> int:
        return _usd(v)

    @field_validator("by_prefix", mode="before")
    @classmethod
    def _parse_table(cls, v: object) -> dict[str, int]:
        if not isinstance(v, Mapping):
            raise ValueError("must be a mapping of calling-code prefix to USD")
        out: dict[str, int] = {}
        for k, price in v.items():
            key = str(k)
            if not key.isdigit():
                raise ValueError(f"prefix {key!r} must be digits (a calling code)")
            out[key] = _usd(price)
        return out


class FunctionCost(_Model):
    """A named Python cost function registered in ``keybrake.pricing``."""

    kind: Literal["function"]
    name: str
    options: dict[str, str | int | bool] = Field(default_factory=dict)


CostRule = Annotated[
    AmountFieldCost | FixedCost | PerUnitCost | FunctionCost, Field(discriminator="kind")
]


class ActualRule(_Model):
    """How to read what the vendor really charged from a successful response body."""

    amount: str | None = Field(default=None, description="Path of the minor-unit amount.")
    currency: str | None = Field(default="currency", description="Path of the currency.")
    charged_when: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Field -> values for which the amount was charged; otherwise cost is 0.",
    )


class EndpointPolicy(_Model):
    """One allowlistable endpoint and how it is priced."""

    match: str = Field(description="Method and path pattern, e.g. 'POST /v1/payment_intents'.")
    free: bool = Field(default=False, description="Costs nothing (reads).")
    cost: CostRule | None = None
    actual: ActualRule | None = None
    object_id: str | None = Field(
        default="id", description="Response field holding the vendor object id."
    )
    remember_amount: str | None = Field(
        default=None,
        description="Response field (minor units) to remember for later calls on the object.",
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
        return EndpointPattern.parse(self.match)


class VendorPolicy(_Model):
    """Everything Keybrake knows about one vendor."""

    vendor: str = Field(description="Short name used in vault keys and URLs, e.g. 'stripe'.")
    hosts: tuple[str, ...] = Field(min_length=1, description="API hosts that are intercepted.")
    upstream: UpstreamPolicy | None = None
    auth: AuthPolicy
    request_id_header: str | None = Field(default=None, description="Vendor request id header.")
    idempotency_header: str | None = Field(default=None, description="Vendor idempotency header.")
    body: Literal["form", "json"] = Field(default="form", description="Request body encoding.")
    fx_to_usd: dict[str, Decimal] = Field(
        default_factory=lambda: {"usd": Decimal(1)},
        description="USD per unit of each accepted currency.",
    )
    free_reads: bool = Field(default=False, description="Every GET endpoint is free.")
    endpoints: tuple[EndpointPolicy, ...] = Field(min_length=1)

    @field_validator("vendor")
    @classmethod
    def _check_vendor(cls, v: str) -> str:
        if not _VENDOR_NAME.match(v):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (max 32)")
        return v

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            if not _HOST.match(h):
                raise ValueError(f"{h!r} is not a lowercase DNS host name")
        return v

    @field_validator("fx_to_usd", mode="before")
    @classmethod
    def _parse_fx(cls, v: object) -> dict[str, Decimal]:
        if not isinstance(v, Mapping):
            raise ValueError("must map currency codes to USD rates")
        out: dict[str, Decimal] = {}
        for code, rate in v.items():
            c = str(code).lower()
            try:
                minor_unit_exponent(c)
            except UnknownCurrency as e:
                raise ValueError(f"unknown currency {code!r}") from e
            d = Decimal(repr(rate)) if isinstance(rate, float) else Decimal(str(rate))
            if not d.is_finite() or d <= 0:
                raise ValueError(f"rate for {code!r} must be a positive number")
            out[c] = d
        out.setdefault("usd", Decimal(1))
        return out


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


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"{path}: {loc}: {e['msg']}")
    return "\n".join(lines)


def load_policy_file(path: Path) -> VendorPolicy:
    """Load and validate one vendor YAML file.

    >>> load_policy_file(Path("policies/stripe.yaml")).vendor  # doctest: +SKIP
    'stripe'
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: (top level): must be a mapping")
    try:
        policy = VendorPolicy.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(_format_validation_error(path, e)) from None
    for i, ep in enumerate(policy.endpoints):
        for rule in (ep.cost, ep.actual):
            if (
                isinstance(rule, AmountFieldCost)
                and rule.default_currency
                and rule.default_currency.lower() not in policy.fx_to_usd
            ):
                raise PolicyError(
                    f"{path}: endpoints.{i}.cost.default_currency: "
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
