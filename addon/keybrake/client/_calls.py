"""The admin API's requests, built once for both clients (Python 3.9+).

Each function returns an `Op`: the HTTP request to make and how to read its answer.
`keybrake.client.KeybrakeClient` sends it with ``httpx.Client`` and
`keybrake.client.AsyncKeybrakeClient` with ``httpx.AsyncClient``; neither builds a request
or reads an answer itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Generic, Literal, TypeVar, Union
from urllib.parse import quote

from keybrake.client._models import AuditEntry, IssuedKey, LabelBudget, SpendRow, VaultKey, items

__all__ = [
    "Dollars",
    "GroupBy",
    "Op",
    "Outcome",
    "audit",
    "get_key",
    "get_label_budget",
    "health",
    "issue_key",
    "list_keys",
    "resume_key",
    "revoke_key",
    "set_label_budget",
    "spend",
    "suspend_key",
]

T = TypeVar("T")
GroupBy = Literal["label", "key", "vendor", "hour", "day"]
Outcome = Literal["ok", "refused", "replayed", "vendor_error", "unknown"]
# ``Union``, not ``|``: an alias is evaluated at import, and ``|`` on types needs 3.10.
Dollars = Union[Decimal, int, str]


@dataclass(frozen=True)
class Op(Generic[T]):
    """One admin API call: the request, and the reader of its (decoded JSON) answer."""

    method: str
    path: str
    read: Callable[[Any], T]
    params: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] | None = None


def _dollars(value: Dollars) -> str:
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, str)):
        raise TypeError("dollar amounts must be Decimal, int or str (never float)")
    return str(value)


def _query(**values: str | int | None) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def _segment(value: str) -> str:
    return quote(value, safe="")


def _key_path(key_id: str, action: str = "") -> str:
    return f"/vault/keys/{_segment(key_id)}{action}"


def _dict(payload: Any) -> dict[str, Any]:
    return dict(payload) if isinstance(payload, dict) else {}


def _keys(payload: Any) -> list[VaultKey]:
    return [VaultKey.from_json(d) for d in items(payload)]


def _spend_rows(payload: Any) -> list[SpendRow]:
    return [SpendRow.from_json(d) for d in items(payload)]


def _audit_entries(payload: Any) -> list[AuditEntry]:
    return [AuditEntry.from_json(d) for d in items(payload)]


def health() -> Op[dict[str, Any]]:
    return Op("GET", "/readyz", _dict)


def issue_key(
    vendor: str,
    daily_usd_cap: Dollars,
    allowed_endpoints: Sequence[str],
    agent_run_label: str,
    expires_in: str,
    usd_cap: Dollars | None,
    max_requests_per_minute: int | None = None,
    allowed_accounts: Sequence[str] = (),
) -> Op[IssuedKey]:
    if isinstance(allowed_endpoints, str):
        raise TypeError("allowed_endpoints must be a list of strings, not one string")
    body: dict[str, Any] = {
        "vendor": vendor,
        "daily_usd_cap": _dollars(daily_usd_cap),
        "allowed_endpoints": list(allowed_endpoints),
        "expires_in": expires_in,
        "agent_run_label": agent_run_label,
    }
    if usd_cap is not None:
        body["usd_cap"] = _dollars(usd_cap)
    if max_requests_per_minute is not None:
        body["max_requests_per_minute"] = max_requests_per_minute
    if allowed_accounts:
        body["allowed_accounts"] = list(allowed_accounts)
    return Op("POST", "/vault/keys", IssuedKey.from_json, body=body)


def list_keys() -> Op[list[VaultKey]]:
    return Op("GET", "/vault/keys", _keys)


def get_key(key_id: str) -> Op[VaultKey]:
    return Op("GET", _key_path(key_id), VaultKey.from_json)


def revoke_key(key_id: str) -> Op[VaultKey]:
    return Op("DELETE", _key_path(key_id), VaultKey.from_json)


def suspend_key(key_id: str, reason: str) -> Op[VaultKey]:
    return Op("POST", _key_path(key_id, "/suspend"), VaultKey.from_json, body={"reason": reason})


def resume_key(key_id: str) -> Op[VaultKey]:
    return Op("POST", _key_path(key_id, "/resume"), VaultKey.from_json)


def set_label_budget(
    label: str,
    daily_usd_cap: Dollars | None,
    usd_cap: Dollars | None = None,
    max_requests_per_minute: int | None = None,
) -> Op[LabelBudget]:
    body = {
        "daily_usd_cap": None if daily_usd_cap is None else _dollars(daily_usd_cap),
        "usd_cap": None if usd_cap is None else _dollars(usd_cap),
        "max_requests_per_minute": max_requests_per_minute,
    }
    path = f"/vault/budgets/{_segment(label)}"
    return Op("PUT", path, LabelBudget.from_json, body=body)


def get_label_budget(label: str) -> Op[LabelBudget]:
    return Op("GET", f"/vault/budgets/{_segment(label)}", LabelBudget.from_json)


def spend(
    label: str | None,
    key_id: str | None,
    vendor: str | None,
    since: str,
    until: str | None,
    group_by: GroupBy,
) -> Op[list[SpendRow]]:
    params = _query(
        label=label, key=key_id, vendor=vendor, since=since, until=until, group_by=group_by
    )
    return Op("GET", "/vault/spend", _spend_rows, params=params)


def audit(
    label: str | None,
    key_id: str | None,
    vendor: str | None,
    outcome: Outcome | None,
    since: str,
    until: str | None,
    limit: int,
    before: int | None,
) -> Op[list[AuditEntry]]:
    params = _query(
        label=label,
        key=key_id,
        vendor=vendor,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
        before=before,
    )
    return Op("GET", "/vault/audit", _audit_entries, params=params)
