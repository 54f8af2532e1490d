"""Issuer tokens and key selections: who may mint vault keys besides the operator, within what
limits, and which keys a kill switch stops.

An issuer token (``kbi_<43 url-safe characters>``, 256 bits, stored as its SHA-256 only) is a
bearer for the admin API bound to vendors, a label prefix, the endpoints it may grant per
vendor, the largest caps and lifetime a key may get, and optionally connected accounts. With
it a pipeline driver issues, reads, suspends and revokes keys under its prefix and reads
spend and audit rows of that prefix; nothing else (`IssuerScopeError`, ``403 issuer_scope``).

Labels are compared by ``/``-separated segments: a key is under ``beam/billing/`` when its
label is ``beam/billing`` or starts with ``beam/billing/`` (never ``beam/billing-evil/x``);
labels of keys minted with an issuer token have no empty, ``.`` or ``..`` segment.

>>> label_under("beam/billing/run-7", "beam/billing/")
True
>>> label_under("beam/billing-evil/run-7", "beam/billing")
False
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
from typing import Any

from keybrake.core.keys import hash_vault_key, parse_duration
from keybrake.core.money import format_usd
from keybrake.core.paths import EndpointPattern, PatternError
from keybrake.core.policy import PolicySet
from keybrake.store import IssuerRecord, KeyRecord
from keybrake.vault.keyspec import (
    IssueKeyRequest,
    KeySpecError,
    _label,
    _priced,
    _requests_per_minute,
    _usd_field,
    account_ids,
    api_time,
    body_errors,
)

__all__ = [
    "DEFAULT_MAX_EXPIRES_IN",
    "ISSUER_TOKEN_PREFIX",
    "CreateIssuerRequest",
    "IssuerScopeError",
    "KeySelector",
    "check_issue",
    "covers",
    "issuer_to_json",
    "label_under",
    "looks_like_issuer_token",
    "parse_prefix",
]

ISSUER_TOKEN_PREFIX = "kbi_"
DEFAULT_MAX_EXPIRES_IN = "24h"
_TOKEN = re.compile(r"kbi_[A-Za-z0-9_-]{43}")
_FIELDS = {
    "name",
    "vendors",
    "label_prefix",
    "allowed_endpoints",
    "max_daily_usd_cap",
    "max_usd_cap",
    "max_expires_in",
    "allowed_accounts",
    "budget_daily_usd_cap",
    "budget_usd_cap",
    "budget_max_requests_per_minute",
    "expires_in",
}
MAX_NAME = 100


class IssuerScopeError(Exception):
    """An issuer token asked for something outside its scope or limits; ``fields`` maps each
    field to why (``403 issuer_scope``)."""

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        self.fields = fields or {}
        detail = "; ".join(f"{k}: {v}" for k, v in self.fields.items())
        super().__init__(f"{message}: {detail}" if detail else message)


def looks_like_issuer_token(value: str) -> bool:
    """True for strings shaped like an issuer token.

    >>> looks_like_issuer_token("kbi_" + "a" * 43)
    True
    """
    return _TOKEN.fullmatch(value) is not None


def generate_issuer_token() -> str:
    """A new issuer token, shown once at creation and never stored (only its hash is)."""
    return f"{ISSUER_TOKEN_PREFIX}{secrets.token_urlsafe(32)}"


def _bad_segments(text: str) -> bool:
    return any(seg in ("", ".", "..") for seg in text.split("/"))


def parse_prefix(value: Any, errors: dict[str, str], name: str = "label_prefix") -> str:
    """A label prefix as stored: label characters, no empty, ``.`` or ``..`` segment, ending
    with ``/`` (added when missing).

    >>> parse_prefix("beam/billing", {})
    'beam/billing/'
    """
    problem = (
        "must be a label prefix such as 'beam/billing/': letters, digits and . _ : @ + = - "
        "in segments separated by '/', none of them empty, '.' or '..'"
    )
    if not isinstance(value, str) or not value.strip("/"):
        errors[name] = problem
        return ""
    base = value[:-1] if value.endswith("/") else value
    scratch: dict[str, str] = {}
    _label(base, scratch)
    if scratch or _bad_segments(base) or len(base) > 120:
        errors[name] = problem
        return ""
    return base + "/"


def label_under(label: str, prefix: str) -> bool:
    """Whether ``label`` is ``prefix`` (without its ``/``) or below it, segment-wise."""
    base = prefix.rstrip("/")
    return bool(base) and (label == base or label.startswith(base + "/"))


def covers(issuer: IssuerRecord, key: KeyRecord) -> bool:
    """Whether ``key`` is in the issuer's scope: one of its vendors, under its prefix."""
    return key.vendor in issuer.vendors and label_under(key.agent_run_label, issuer.label_prefix)


def _granted(patterns: tuple[str, ...], wanted: str) -> bool:
    """Whether one of ``patterns`` matches everything ``wanted`` matches: the same pattern,
    or one whose placeholders stand where ``wanted`` has a literal or a placeholder."""
    asked = EndpointPattern.parse(wanted)
    for text in patterns:
        have = EndpointPattern.parse(text)
        if str(have) == str(asked) or have.match(asked.method, asked.segments) is not None:
            return True
    return False


def check_issue(issuer: IssuerRecord, request: IssueKeyRequest) -> None:
    """Refuse (`IssuerScopeError`, every field named) a key the issuer may not mint."""
    fields: dict[str, str] = {}
    if request.vendor not in issuer.vendors:
        fields["vendor"] = f"this issuer token may issue keys for {', '.join(issuer.vendors)}"
    label = request.agent_run_label
    if not label_under(label, issuer.label_prefix) or _bad_segments(label):
        fields["agent_run_label"] = (
            f"must be under {issuer.label_prefix!r} (segments separated by '/', none of "
            "them empty, '.' or '..')"
        )
    allowed = issuer.endpoints_of(request.vendor)
    for i, endpoint in enumerate(request.allowed_endpoints):
        if not _granted(allowed, endpoint):
            fields[f"allowed_endpoints.{i}"] = f"{endpoint} is not among this issuer's endpoints"
    if request.daily_cap_micros > issuer.max_daily_cap_micros:
        fields["daily_usd_cap"] = f"at most {format_usd(issuer.max_daily_cap_micros)}"
    if issuer.max_usd_cap_micros is not None:
        if request.usd_cap_micros is None:
            fields["usd_cap"] = (
                f"required by this issuer token (at most {format_usd(issuer.max_usd_cap_micros)})"
            )
        elif request.usd_cap_micros > issuer.max_usd_cap_micros:
            fields["usd_cap"] = f"at most {format_usd(issuer.max_usd_cap_micros)}"
    if request.expires_in.total_seconds() > issuer.max_expires_in_seconds:
        fields["expires_in"] = f"at most {issuer.max_expires_in_seconds} seconds"
    extra = [a for a in request.allowed_accounts if a not in issuer.allowed_accounts]
    if extra:
        fields["allowed_accounts"] = "names accounts this issuer token may not grant"
    if fields:
        raise IssuerScopeError(f"outside the limits of issuer token {issuer.issuer_id}", fields)


@dataclasses.dataclass(frozen=True)
class CreateIssuerRequest:
    """A validated ``POST /vault/issuers`` body.

    >>> CreateIssuerRequest.from_json({"vendors": ["stripe"], "label_prefix": "beam/billing/",
    ...     "allowed_endpoints": ["POST /v1/payment_intents"], "max_daily_usd_cap": "300",
    ...     "max_expires_in": "2h"}, policies)  # doctest: +SKIP
    """

    name: str
    vendors: tuple[str, ...]
    label_prefix: str
    allowed_endpoints: tuple[tuple[str, tuple[str, ...]], ...]
    max_daily_cap_micros: int
    max_usd_cap_micros: int | None
    max_expires_in: dt.timedelta
    allowed_accounts: tuple[str, ...]
    budget_daily_micros: int | None
    budget_lifetime_micros: int | None
    expires_in: dt.timedelta | None
    budget_max_requests_per_minute: int | None = None

    @classmethod
    def from_json(cls, data: Any, policies: PolicySet) -> CreateIssuerRequest:
        errors = body_errors(data, _FIELDS)
        name = data.get("name") or ""
        if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
            errors["name"] = f"must be printable text of at most {MAX_NAME} characters"
            name = ""
        raw_vendors = data.get("vendors")
        vendors: list[str] = []
        known = ", ".join(sorted(policies.vendors))
        if not isinstance(raw_vendors, list) or not raw_vendors:
            errors["vendors"] = f"must be a list of vendors from: {known}"
        else:
            for v in raw_vendors:
                if not isinstance(v, str) or v not in policies.vendors:
                    errors["vendors"] = f"must be a list of vendors from: {known}"
                    break
                vendors.append(v)
        vendors = list(dict.fromkeys(vendors))
        prefix = parse_prefix(data.get("label_prefix"), errors)
        endpoints = _endpoints(data.get("allowed_endpoints"), vendors, policies, errors)
        max_daily = _usd_field(data.get("max_daily_usd_cap"), "max_daily_usd_cap", errors)
        max_usd = budget_daily = budget_lifetime = None
        if data.get("max_usd_cap") is not None:
            max_usd = _usd_field(data["max_usd_cap"], "max_usd_cap", errors)
        if data.get("budget_daily_usd_cap") is not None:
            budget_daily = _usd_field(data["budget_daily_usd_cap"], "budget_daily_usd_cap", errors)
        if data.get("budget_usd_cap") is not None:
            budget_lifetime = _usd_field(data["budget_usd_cap"], "budget_usd_cap", errors)
        budget_rpm = None
        if data.get("budget_max_requests_per_minute") is not None:
            rate_errors: dict[str, str] = {}
            budget_rpm = _requests_per_minute(data["budget_max_requests_per_minute"], rate_errors)
            if rate_errors:
                errors["budget_max_requests_per_minute"] = rate_errors["max_requests_per_minute"]
        max_expires = _duration(
            data.get("max_expires_in", DEFAULT_MAX_EXPIRES_IN), "max_expires_in", errors
        )
        expires = None
        if data.get("expires_in") is not None:
            expires = _duration(data["expires_in"], "expires_in", errors)
        accounts = _issuer_accounts(data.get("allowed_accounts"), vendors, policies, errors)
        if errors:
            raise KeySpecError(errors)
        assert max_daily is not None and max_expires is not None
        return cls(
            name,
            tuple(vendors),
            prefix,
            endpoints,
            max_daily,
            max_usd,
            max_expires,
            accounts,
            budget_daily,
            budget_lifetime,
            expires,
            budget_rpm,
        )

    def new_issuer(self, now: dt.datetime) -> tuple[IssuerRecord, str]:
        """A new issuer record and its token (the only time the token exists in clear)."""
        token = generate_issuer_token()
        record = IssuerRecord(
            issuer_id=f"iss_{secrets.token_hex(8)}",
            token_sha256=hash_vault_key(token),
            name=self.name,
            vendors=self.vendors,
            label_prefix=self.label_prefix,
            allowed_endpoints=self.allowed_endpoints,
            max_daily_cap_micros=self.max_daily_cap_micros,
            max_usd_cap_micros=self.max_usd_cap_micros,
            max_expires_in_seconds=int(self.max_expires_in.total_seconds()),
            allowed_accounts=self.allowed_accounts,
            budget_daily_micros=self.budget_daily_micros,
            budget_lifetime_micros=self.budget_lifetime_micros,
            max_requests_per_minute=self.budget_max_requests_per_minute,
            created_at=now,
            expires_at=None if self.expires_in is None else now + self.expires_in,
        )
        return record, token


def _duration(value: Any, name: str, errors: dict[str, str]) -> dt.timedelta | None:
    if not isinstance(value, str):
        errors[name] = "must be a duration string such as '30m', '2h', '7d' or 'PT2H'"
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        errors[name] = str(e)
        return None


def _endpoints(
    value: Any, vendors: list[str], policies: PolicySet, errors: dict[str, str]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{"stripe": ["POST /v1/payment_intents"], ...}``, or a list when there is one vendor;
    every pattern priced (or free) in that vendor's policy."""
    if isinstance(value, list) and len(vendors) == 1:
        value = {vendors[0]: value}
    if not isinstance(value, dict) or not value:
        errors["allowed_endpoints"] = (
            'must be {"<vendor>": ["POST /v1/...", ...]} (or a list, with one vendor)'
        )
        return ()
    out: list[tuple[str, tuple[str, ...]]] = []
    for vendor, patterns in value.items():
        where = f"allowed_endpoints.{str(vendor)[:32]}"
        if vendor not in vendors:
            errors[where] = "is not one of this issuer's vendors"
            continue
        if not isinstance(patterns, list) or not patterns or len(patterns) > 100:
            errors[where] = "must be a list of 1-100 strings like 'POST /v1/payment_intents'"
            continue
        parsed: list[str] = []
        for i, spec in enumerate(patterns):
            try:
                pattern = EndpointPattern.parse(spec) if isinstance(spec, str) else None
            except PatternError as e:
                errors[f"{where}.{i}"] = str(e)
                continue
            if pattern is None:
                errors[f"{where}.{i}"] = "must be a string"
            elif not _priced(policies, vendor, pattern):
                errors[f"{where}.{i}"] = (
                    f"{pattern} has no cost rule in the {vendor} policy (and is not free)"
                )
            else:
                parsed.append(str(pattern))
        out.append((vendor, tuple(dict.fromkeys(parsed))))
    missing = [v for v in vendors if v not in value]
    if missing:
        errors["allowed_endpoints"] = f"names no endpoint for {', '.join(missing)}"
    return tuple(out)


def _issuer_accounts(
    value: Any, vendors: list[str], policies: PolicySet, errors: dict[str, str]
) -> tuple[str, ...]:
    accounts = account_ids(value, errors)
    if accounts and not any(policies.vendors[v].account_headers for v in vendors):
        errors["allowed_accounts"] = "none of this issuer's vendors has an account header"
        return ()
    return accounts


def issuer_to_json(issuer: IssuerRecord, now: dt.datetime) -> dict[str, Any]:
    """The public JSON of an issuer token: never the token or its hash."""

    def usd(micros: int | None) -> str | None:
        return None if micros is None else format_usd(micros)

    return {
        "object": "issuer",
        "issuer_id": issuer.issuer_id,
        "name": issuer.name,
        "vendors": list(issuer.vendors),
        "label_prefix": issuer.label_prefix,
        "allowed_endpoints": {vendor: list(eps) for vendor, eps in issuer.allowed_endpoints},
        "max_daily_usd_cap": format_usd(issuer.max_daily_cap_micros),
        "max_usd_cap": usd(issuer.max_usd_cap_micros),
        "max_expires_in_seconds": issuer.max_expires_in_seconds,
        "allowed_accounts": list(issuer.allowed_accounts),
        "budget_daily_usd_cap": usd(issuer.budget_daily_micros),
        "budget_usd_cap": usd(issuer.budget_lifetime_micros),
        "budget_max_requests_per_minute": issuer.max_requests_per_minute,
        # The issuer's own budget (and rate limit) is the top node of the budget tree: every
        # call of every key it minted reserves against it in the one admission step.
        "budget_enforced": True,
        "created_at": api_time(issuer.created_at),
        "expires_at": api_time(issuer.expires_at),
        "revoked_at": api_time(issuer.revoked_at),
        "status": issuer.state(now),
    }


ACTIONS = ("revoke", "suspend", "resume")


@dataclasses.dataclass(frozen=True)
class KeySelector:
    """Which keys a kill switch stops: every key under ``label_prefix`` and/or minted by
    ``issuer_id`` (both given: keys that are both).

    >>> KeySelector.from_json({"label_prefix": "beam/billing/"}).label_prefix
    'beam/billing/'
    """

    label_prefix: str | None = None
    issuer_id: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> KeySelector:
        if not isinstance(data, dict) or set(data) - {"label_prefix", "issuer_id", "reason"}:
            raise KeySpecError(
                {"(body)": 'must be {"label_prefix": "...", "issuer_id": "iss_...", "reason": ...}'}
            )
        errors: dict[str, str] = {}
        prefix = issuer = None
        if data.get("label_prefix") is not None:
            prefix = parse_prefix(data["label_prefix"], errors)
        if data.get("issuer_id") is not None:
            issuer = data["issuer_id"]
            if not isinstance(issuer, str) or not re.fullmatch(r"iss_[0-9a-f]{1,64}", issuer):
                errors["issuer_id"] = "must be an issuer id such as 'iss_3f9a1c2b7d4e8f60'"
        if prefix is None and issuer is None and not errors:
            errors["(body)"] = "name the keys: label_prefix, issuer_id, or both"
        if errors:
            raise KeySpecError(errors)
        return cls(prefix, issuer)

    def selects(self, key: KeyRecord) -> bool:
        if self.label_prefix is not None and not label_under(
            key.agent_run_label, self.label_prefix
        ):
            return False
        return self.issuer_id is None or key.issuer_id == self.issuer_id

    def to_json(self) -> dict[str, Any]:
        return {"label_prefix": self.label_prefix, "issuer_id": self.issuer_id}
