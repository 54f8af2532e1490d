"""What the admin API answers, as typed values, and the errors it refuses with.

Python 3.9+ (the worker side). Dollar amounts are `decimal.Decimal`, never floats.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import httpx

__all__ = [
    "AuditEntry",
    "Budget",
    "Forbidden",
    "InvalidRequest",
    "IssuedKey",
    "KeybrakeError",
    "LabelBudget",
    "NotFound",
    "SpendRow",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "VaultKey",
    "decode",
    "items",
]


# -- errors ------------------------------------------------------------------------------------


class KeybrakeError(Exception):
    """The admin API refused a call (or could not be reached).

    ``code`` is the API's stable ``error.code`` (``not_found``, ``invalid_request``, ...),
    ``status`` the HTTP status (``None`` when no answer came) and ``details`` the rest of the
    error object (for ``invalid_request``: ``details["fields"]`` maps each bad field to why).

    >>> try:
    ...     kb.get_key("key_missing")  # doctest: +SKIP
    ... except NotFound as e:
    ...     print(e.code, e.status)
    not_found 404
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details: dict[str, Any] = dict(details or {})


class Unauthorized(KeybrakeError):
    """401: the admin token is missing or wrong."""


class Forbidden(KeybrakeError):
    """403: the token may not do this (an issuer token outside its scope or limits:
    ``code`` ``issuer_scope``, ``details["fields"]`` names each field)."""


class NotFound(KeybrakeError):
    """404: no such key (or admin route)."""


class InvalidRequest(KeybrakeError):
    """400/405/413/422: the request was refused as invalid; ``fields`` says which and why."""

    @property
    def fields(self) -> dict[str, str]:
        """``{"daily_usd_cap": "must be greater than 0", ...}`` (empty if not given)."""
        raw = self.details.get("fields")
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


class Unavailable(KeybrakeError):
    """503: the proxy's store (or audit log) is unavailable; retrying later may work."""


class TransportError(KeybrakeError):
    """The admin API could not be reached or did not answer with JSON (``status`` may be None)."""


_ERRORS_BY_STATUS: Final[dict[int, type[KeybrakeError]]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: InvalidRequest,
    413: InvalidRequest,
    422: InvalidRequest,
    503: Unavailable,
}


# -- results -----------------------------------------------------------------------------------


def _usd(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _time(value: Any) -> dt.datetime | None:
    return None if not value else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Budget:
    """One budget a key counts against today: the key itself, its label, ..."""

    scope: str
    window: str
    cap_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Budget:
        return cls(
            scope=str(data["scope"]),
            window=str(data["window"]),
            cap_usd=_usd(data.get("cap_usd")),
            spent_usd=_usd(data.get("spent_usd")) or Decimal(0),
            reserved_usd=_usd(data.get("reserved_usd")) or Decimal(0),
            remaining_usd=_usd(data.get("remaining_usd")),
        )


@dataclass(frozen=True)
class VaultKey:
    """A vault key as the admin API shows it: never its secret.

    ``spent_today_usd``/``remaining_usd``/``budgets`` are filled by `get_key`/`list_keys`.
    """

    key_id: str
    vendor: str
    agent_run_label: str
    daily_usd_cap: Decimal
    usd_cap: Decimal | None
    allowed_endpoints: tuple[str, ...]
    created_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    status: str
    max_requests_per_minute: int | None = None
    allowed_accounts: tuple[str, ...] = ()
    suspended_at: dt.datetime | None = None
    suspended_reason: str | None = None
    spent_today_usd: Decimal | None = None
    remaining_usd: Decimal | None = None
    budgets: tuple[Budget, ...] = ()
    # The issuer token that minted it (None: the admin token or the command line).
    issuer_id: str | None = None

    @classmethod
    def _fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "key_id": str(data["key_id"]),
            "vendor": str(data["vendor"]),
            "agent_run_label": str(data["agent_run_label"]),
            "daily_usd_cap": Decimal(str(data["daily_usd_cap"])),
            "usd_cap": _usd(data.get("usd_cap")),
            "allowed_endpoints": tuple(str(e) for e in data.get("allowed_endpoints", ())),
            "created_at": _time(data.get("created_at")),
            "expires_at": _time(data.get("expires_at")),
            "revoked_at": _time(data.get("revoked_at")),
            "status": str(data["status"]),
            "max_requests_per_minute": _int_or_none(data.get("max_requests_per_minute")),
            "allowed_accounts": tuple(str(a) for a in data.get("allowed_accounts") or ()),
            "suspended_at": _time(data.get("suspended_at")),
            "suspended_reason": data.get("suspended_reason"),
            "spent_today_usd": _usd(data.get("spent_today_usd")),
            "remaining_usd": _usd(data.get("remaining_usd")),
            "budgets": tuple(Budget.from_json(b) for b in data.get("budgets") or ()),
            "issuer_id": data.get("issuer_id"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VaultKey:
        return cls(**cls._fields(data))


@dataclass(frozen=True)
class IssuedKey(VaultKey):
    """A freshly issued key, with the vault key itself (shown once; hidden from ``repr``)."""

    vault_key: str = field(default="", repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IssuedKey:
        return cls(**cls._fields(data), vault_key=str(data["vault_key"]))


@dataclass(frozen=True)
class LabelBudget:
    """The limits every key with one ``agent_run_label`` shares: a daily cap, a lifetime cap
    (``usd_cap``) and a request-rate limit (each None: none)."""

    label: str
    daily_usd_cap: Decimal | None
    usd_cap: Decimal | None = None
    max_requests_per_minute: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelBudget:
        rate = data.get("max_requests_per_minute")
        return cls(
            label=str(data["label"]),
            daily_usd_cap=_usd(data.get("daily_usd_cap")),
            usd_cap=_usd(data.get("usd_cap")),
            max_requests_per_minute=None if rate is None else int(rate),
        )


@dataclass(frozen=True)
class SpendRow:
    """One group of a spend summary (a label, key, vendor, hour or day).

    ``spent_usd`` counts settled costs of successful calls plus the estimates kept for calls
    that may have charged (vendor errors, lost answers).
    """

    group_by: str
    group: str | None
    calls: int
    refusals: int
    cap_hits: int
    replays: int
    spent_micros: int
    spent_usd: Decimal
    first_at: dt.datetime | None
    last_at: dt.datetime | None
    daily_cap_usd: Decimal | None = None
    remaining_usd: Decimal | None = None
    label: str | None = None
    vendor: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpendRow:
        return cls(
            group_by=str(data["group_by"]),
            group=None if data.get("group") is None else str(data["group"]),
            calls=int(data["calls"]),
            refusals=int(data.get("refusals") or 0),
            cap_hits=int(data.get("cap_hits") or 0),
            replays=int(data.get("replays") or 0),
            spent_micros=int(data["spent_micros"]),
            spent_usd=Decimal(str(data["spent_usd"])),
            first_at=_time(data.get("first_at")),
            last_at=_time(data.get("last_at")),
            daily_cap_usd=_usd(data.get("daily_cap_usd")),
            remaining_usd=_usd(data.get("remaining_usd")),
            label=data.get("label"),
            vendor=data.get("vendor"),
        )


@dataclass(frozen=True)
class AuditEntry:
    """One audit row: a vendor call that reached the proxy (refused, replayed or forwarded).

    ``actor``/``message_id`` are what the worker sent in ``X-Keybrake-Actor`` and
    ``X-Keybrake-Message-Id``; ``raw`` keeps every column as the API returned it.
    """

    id: int
    ts: dt.datetime | None
    key_id: str | None
    label: str | None
    vendor: str | None
    method: str | None
    path: str | None
    status: int | None
    outcome: str | None
    code: str | None
    estimate_micros: int | None
    actual_micros: int | None
    idempotency_key: str | None
    actor: str | None
    message_id: str | None
    vendor_request_id: str | None
    vendor_object_id: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditEntry:
        text = {
            k: None if data.get(k) is None else str(data[k])
            for k in (
                "key_id",
                "label",
                "vendor",
                "method",
                "path",
                "outcome",
                "code",
                "idempotency_key",
                "actor",
                "message_id",
                "vendor_request_id",
                "vendor_object_id",
            )
        }
        return cls(
            id=int(data["id"]),
            ts=_time(data.get("ts")),
            status=_int(data.get("status")),
            estimate_micros=_int(data.get("estimate_micros")),
            actual_micros=_int(data.get("actual_micros")),
            raw=dict(data),
            **text,
        )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _error(status: int | None, payload: Any, fallback: str) -> KeybrakeError:
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return TransportError("bad_response", fallback, status)
    code = str(error.get("code") or "unknown")
    message = str(error.get("message") or fallback)
    details = {k: v for k, v in error.items() if k not in ("code", "message", "type")}
    cls = _ERRORS_BY_STATUS.get(status or 0, KeybrakeError)
    return cls(code, message, status, details)


def decode(response: httpx.Response) -> Any:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.is_success and payload is not None:
        return payload
    reason = f"HTTP {response.status_code} from {response.request.url.path}"
    raise _error(response.status_code, payload, reason)


def items(payload: Any) -> list[Mapping[str, Any]]:
    data = payload.get("data") if isinstance(payload, dict) else None
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
