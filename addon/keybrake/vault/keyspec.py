"""Validation of key-issue and budget requests, shared by the admin API and the CLI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Collection
from typing import Any

from keybrake.core.keys import generate_key_id, generate_vault_key, hash_vault_key, parse_duration
from keybrake.core.money import MoneyError, format_usd, parse_usd
from keybrake.core.paths import EndpointPattern, PatternError
from keybrake.core.policy import MAX_REQUESTS_PER_MINUTE, PolicySet
from keybrake.store import BudgetState, KeyRecord, LabelBudget

__all__ = [
    "IssueKeyRequest",
    "KeyCapsChange",
    "KeySpecError",
    "account_ids",
    "api_time",
    "body_errors",
    "key_to_json",
    "parse_label_budget",
]

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/@+=-]{0,127}")
_FIELDS = {
    "vendor",
    "daily_usd_cap",
    "usd_cap",
    "allowed_endpoints",
    "expires_in",
    "agent_run_label",
    "max_requests_per_minute",
    "allowed_accounts",
    "share_objects",
}
SHARE_OBJECTS = ("none", "label")
_ACCOUNT = re.compile(r"[A-Za-z0-9_]{1,64}")
MAX_ACCOUNTS = 100


class KeySpecError(ValueError):
    """One or more fields are invalid; ``fields`` maps each field to its problem."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))


def _usd_field(value: Any, name: str, errors: dict[str, str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        errors[name] = "must be a dollar amount (number or decimal string)"
        return None
    try:
        micros = parse_usd(str(value))
    except MoneyError as e:
        errors[name] = str(e)
        return None
    if micros <= 0:
        errors[name] = "must be greater than 0"
        return None
    return micros


def _requests_per_minute(value: object, errors: dict[str, str]) -> int | None:
    """A request-rate limit: an integer, or its digits as a string (the admin API reads JSON
    numbers as strings so that no number is ever a float)."""
    number = 0  # anything that is not a whole number is refused like 0
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 7:
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if not 1 <= number <= MAX_REQUESTS_PER_MINUTE:
        errors["max_requests_per_minute"] = (
            f"must be a whole number of requests from 1 to {MAX_REQUESTS_PER_MINUTE:,}"
        )
        return None
    return number


def _label(value: Any, errors: dict[str, str], name: str = "agent_run_label") -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        errors[name] = (
            "must be 1-128 characters: letters, digits, space and . _ : / @ + = - "
            "(starting with a letter or digit)"
        )
        return ""
    return value


@dataclasses.dataclass(frozen=True)
class IssueKeyRequest:
    """A validated ``POST /vault/keys`` body.

    >>> IssueKeyRequest.from_json({"vendor": "stripe", "daily_usd_cap": "300",
    ...     "allowed_endpoints": ["POST /v1/payment_intents"], "expires_in": "2h",
    ...     "agent_run_label": "dramatiq/nightly-billing"}, policies)  # doctest: +SKIP
    """

    vendor: str
    daily_cap_micros: int
    usd_cap_micros: int | None
    allowed_endpoints: tuple[str, ...]
    expires_in: dt.timedelta
    agent_run_label: str
    # None: no request-rate limit (neither the request nor the vendor policy set one).
    max_requests_per_minute: int | None = None
    allowed_accounts: tuple[str, ...] = ()
    share_objects: str = "none"

    @classmethod
    def from_json(cls, data: Any, policies: PolicySet) -> IssueKeyRequest:
        errors = body_errors(data, _FIELDS)
        vendor = data.get("vendor")
        if not isinstance(vendor, str) or vendor not in policies.vendors:
            known = ", ".join(sorted(policies.vendors))
            errors["vendor"] = f"must be one of: {known}"
            vendor = None
        daily = _usd_field(data.get("daily_usd_cap"), "daily_usd_cap", errors)
        usd_cap = None
        if data.get("usd_cap") is not None:
            usd_cap = _usd_field(data.get("usd_cap"), "usd_cap", errors)
        expires_raw = data.get("expires_in", "1h")
        expires = dt.timedelta(0)
        if not isinstance(expires_raw, str):
            errors["expires_in"] = "must be a duration string such as '30m', '2h', '7d' or 'PT2H'"
        else:
            try:
                expires = parse_duration(expires_raw)
            except ValueError as e:
                errors["expires_in"] = str(e)
        label = _label(data.get("agent_run_label"), errors)
        rpm = None  # absent or null: the vendor policy's
        if data.get("max_requests_per_minute") is not None:
            rpm = _requests_per_minute(data["max_requests_per_minute"], errors)
        elif vendor is not None:
            rpm = policies.vendors[vendor].max_requests_per_minute
        endpoints: list[str] = []
        raw_eps = data.get("allowed_endpoints")
        if not isinstance(raw_eps, list) or not raw_eps or len(raw_eps) > 100:
            errors["allowed_endpoints"] = (
                "must be a list of 1-100 strings like 'POST /v1/payment_intents'"
            )
        else:
            for i, spec in enumerate(raw_eps):
                if not isinstance(spec, str):
                    errors[f"allowed_endpoints.{i}"] = "must be a string"
                    continue
                try:
                    pattern = EndpointPattern.parse(spec)
                except PatternError as e:
                    errors[f"allowed_endpoints.{i}"] = str(e)
                    continue
                if vendor is not None and not _priced(policies, vendor, pattern):
                    errors[f"allowed_endpoints.{i}"] = (
                        f"{pattern} has no cost rule in the {vendor} policy (and is not free)"
                    )
                    continue
                endpoints.append(str(pattern))
        accounts = _accounts(data.get("allowed_accounts"), vendor, policies, errors)
        share = data.get("share_objects") or "none"
        if share not in SHARE_OBJECTS:
            errors["share_objects"] = "must be 'none' (default) or 'label'"
        if errors:
            raise KeySpecError(errors)
        assert vendor is not None and daily is not None
        return cls(vendor, daily, usd_cap, tuple(endpoints), expires, label, rpm, accounts, share)

    def new_key(self, now: dt.datetime) -> tuple[KeyRecord, str]:
        """A new key record and its vault key (the only time the vault key exists in clear).

        >>> record, vault_key = spec.new_key(now)  # doctest: +SKIP
        """
        vault_key = generate_vault_key(self.vendor)
        record = KeyRecord(
            key_id=generate_key_id(),
            secret_sha256=hash_vault_key(vault_key),
            vendor=self.vendor,
            agent_run_label=self.agent_run_label,
            daily_cap_micros=self.daily_cap_micros,
            usd_cap_micros=self.usd_cap_micros,
            allowed_endpoints=self.allowed_endpoints,
            created_at=now,
            expires_at=now + self.expires_in,
            max_requests_per_minute=self.max_requests_per_minute,
            allowed_accounts=self.allowed_accounts,
            share_objects=self.share_objects,
        )
        return record, vault_key


def _accounts(
    value: object, vendor: str | None, policies: PolicySet, errors: dict[str, str]
) -> tuple[str, ...]:
    """``allowed_accounts``: vendor account ids (``acct_…``) the key may name in the vendor's
    account header; only for vendors whose policy has one."""
    accounts = account_ids(value, errors)
    if accounts and vendor is not None and not policies.vendors[vendor].account_headers:
        errors["allowed_accounts"] = f"the {vendor} policy names no account header"
        return ()
    return accounts


def body_errors(data: Any, fields: Collection[str]) -> dict[str, str]:
    """The errors of a request body so far: one per field not in ``fields`` (a dict of
    field path -> message to add to); `KeySpecError` at once when it is not a JSON object."""
    if not isinstance(data, dict):
        raise KeySpecError({"(body)": "must be a JSON object"})
    return {str(k)[:64]: "unknown field" for k in data if k not in fields}


def account_ids(value: object, errors: dict[str, str]) -> tuple[str, ...]:
    """``allowed_accounts`` as a list of vendor account ids (``acct_…``), each once; ``()``
    with the error recorded when it is not one."""
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > MAX_ACCOUNTS
        or not all(isinstance(v, str) and _ACCOUNT.fullmatch(v) for v in value)
    ):
        errors["allowed_accounts"] = (
            f"must be a list of at most {MAX_ACCOUNTS} account ids such as 'acct_1Nv0FG…'"
        )
        return ()
    return tuple(dict.fromkeys(value))


def _priced(policies: PolicySet, vendor: str, pattern: EndpointPattern) -> bool:
    policy = policies.vendors[vendor]
    segments = pattern.segments
    for ep in policy.endpoints:
        if ep.pattern.match(pattern.method, segments) is not None:
            return True
    return policy.free_reads and pattern.method in ("GET", "HEAD")


def parse_label_budget(label: str, data: Any) -> LabelBudget:
    """A validated ``PUT /vault/budgets/{label}`` body: the label node's limits, each
    optional (absent or null: none): ``{"daily_usd_cap": 500, "usd_cap": 5000,
    "max_requests_per_minute": 600}``. The body replaces every limit of the label."""
    errors: dict[str, str] = {}
    _label(label, errors, "label")
    fields = {"daily_usd_cap", "usd_cap", "max_requests_per_minute"}
    if not isinstance(data, dict) or set(data) - fields:
        errors["(body)"] = (
            'must be {"daily_usd_cap": <dollars or null>, "usd_cap": <dollars or null>, '
            '"max_requests_per_minute": <1-100000 or null>}'
        )
        raise KeySpecError(errors)
    daily = lifetime = rate = None
    if data.get("daily_usd_cap") is not None:
        daily = _usd_field(data["daily_usd_cap"], "daily_usd_cap", errors)
    if data.get("usd_cap") is not None:
        lifetime = _usd_field(data["usd_cap"], "usd_cap", errors)
    if data.get("max_requests_per_minute") is not None:
        rate = _requests_per_minute(data["max_requests_per_minute"], errors)
    if errors:
        raise KeySpecError(errors)
    return LabelBudget(label, daily, lifetime, rate)


@dataclasses.dataclass(frozen=True)
class KeyCapsChange:
    """A validated ``PATCH /vault/keys/{key_id}`` body: the caps to change.

    ``{"daily_usd_cap": "50"}`` changes the daily cap; ``{"usd_cap": "500"}`` the lifetime
    cap, and ``{"usd_cap": null}`` removes it. A cap below what is spent is allowed: the key's
    paid calls are refused from then on.
    """

    daily_cap_micros: int | None = None
    usd_cap_micros: int | None = None
    clear_usd_cap: bool = False

    @classmethod
    def from_json(cls, data: Any) -> KeyCapsChange:
        if not isinstance(data, dict) or not data or set(data) - {"daily_usd_cap", "usd_cap"}:
            raise KeySpecError(
                {"(body)": 'must be {"daily_usd_cap": <dollars>, "usd_cap": <dollars or null>}'}
            )
        errors: dict[str, str] = {}
        daily = usd = None
        if "daily_usd_cap" in data:
            daily = _usd_field(data["daily_usd_cap"], "daily_usd_cap", errors)
        if data.get("usd_cap") is not None:
            usd = _usd_field(data["usd_cap"], "usd_cap", errors)
        if errors:
            raise KeySpecError(errors)
        return cls(daily, usd, "usd_cap" in data and data["usd_cap"] is None)


def api_time(t: dt.datetime | None) -> str | None:
    """Times in the admin API's JSON: UTC ISO-8601 with ``Z`` (None stays None)."""
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if t else None


def key_to_json(
    key: KeyRecord, now: dt.datetime, budgets: tuple[BudgetState, ...] = ()
) -> dict[str, Any]:
    """The public JSON of a key: never the vault key or its hash."""
    out: dict[str, Any] = {
        "object": "vault_key",
        "key_id": key.key_id,
        "vendor": key.vendor,
        "agent_run_label": key.agent_run_label,
        "daily_usd_cap": format_usd(key.daily_cap_micros),
        "usd_cap": format_usd(key.usd_cap_micros) if key.usd_cap_micros is not None else None,
        "allowed_endpoints": list(key.allowed_endpoints),
        "max_requests_per_minute": key.max_requests_per_minute,
        "allowed_accounts": list(key.allowed_accounts),
        "share_objects": key.share_objects,
        # The issuer token that minted the key (None: the admin token or the command line).
        "issuer_id": key.issuer_id,
        "created_at": api_time(key.created_at),
        "expires_at": api_time(key.expires_at),
        "revoked_at": api_time(key.revoked_at),
        "suspended_at": api_time(key.suspended_at),
        "suspended_reason": key.suspended_reason,
        "status": key.state(now),
    }
    if budgets:
        out["budgets"] = [
            {
                "scope": b.scope,
                "window": b.window,
                "cap_usd": format_usd(b.cap_micros) if b.cap_micros is not None else None,
                "spent_usd": format_usd(b.spent_micros),
                "reserved_usd": format_usd(b.reserved_micros),
                "remaining_usd": format_usd(b.remaining_micros)
                if b.remaining_micros is not None
                else None,
            }
            for b in budgets
        ]
        key_b = budgets[0]
        out["spent_today_usd"] = format_usd(key_b.used_micros)
        rem = [b.remaining_micros for b in budgets if b.remaining_micros is not None]
        out["remaining_usd"] = format_usd(min(rem)) if rem else None
    return out
