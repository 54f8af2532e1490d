"""A small typed client for the Keybrake admin API, sync (`KeybrakeClient`) and async.

It wraps the admin listener's JSON API (``keybrake run --admin-port``): issue, list, inspect
and revoke vault keys, set shared label budgets, read spend summaries and the audit log.
Every refusal becomes an exception carrying the API's ``error.code``::

    from keybrake.client import KeybrakeClient, NotFound

    with KeybrakeClient("http://127.0.0.1:8081", token) as kb:
        key = kb.issue_key(vendor="stripe", daily_usd_cap=300,
                           allowed_endpoints=["POST /v1/payment_intents"],
                           expires_in="2h", agent_run_label="dramatiq/nightly-billing")
        key.vault_key                    # 'kbv_stripe_...': give it to the workers; shown only once
        kb.spend(label="dramatiq/nightly-billing")[0].spent_usd   # Decimal('300.00')
        kb.revoke_key(key.key_id).status                          # 'revoked'
        try:
            kb.get_key("key_nope")
        except NotFound as e:
            e.code, e.status                                      # ('not_found', 404)

``admin_url`` defaults to ``$KEYBRAKE_ADMIN_URL`` (else ``http://127.0.0.1:8081``) and the
token to ``$KEYBRAKE_ADMIN_TOKEN``. The token may be an issuer token (``kbi_…``, see
``keybrake issuers create``): pipeline code should hold one of those, scoped to its vendors,
label prefix and limits, never the admin token. Dollar amounts are `decimal.Decimal`, never floats.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Union
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

__all__ = [
    "AsyncKeybrakeClient",
    "AuditEntry",
    "Budget",
    "Forbidden",
    "InvalidRequest",
    "IssuedKey",
    "KeybrakeClient",
    "KeybrakeError",
    "LabelBudget",
    "NotFound",
    "SpendRow",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "VaultKey",
    "ca_bundle_path",
    "tls_verify",
]

DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:8081"
GroupBy = Literal["label", "key", "vendor", "hour", "day"]
Outcome = Literal["ok", "refused", "replayed", "vendor_error", "unknown"]
# ``Union``, not ``|``: an alias is evaluated at import, and ``|`` on types needs 3.10.
Dollars = Union[Decimal, int, str]


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
    """The shared daily cap of every key with one ``agent_run_label`` (None: no label cap)."""

    label: str
    daily_usd_cap: Decimal | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelBudget:
        return cls(label=str(data["label"]), daily_usd_cap=_usd(data.get("daily_usd_cap")))


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


# -- requests, shared by both clients -----------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] | None = None


def _dollars(value: Dollars) -> str:
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, str)):
        raise TypeError("dollar amounts must be Decimal, int or str (never float)")
    return str(value)


def _issue_call(
    vendor: str,
    daily_usd_cap: Dollars,
    allowed_endpoints: Sequence[str],
    agent_run_label: str,
    expires_in: str,
    usd_cap: Dollars | None,
    max_requests_per_minute: int | None = None,
    allowed_accounts: Sequence[str] = (),
) -> _Call:
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
    return _Call("POST", "/vault/keys", body=body)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _query(**values: str | int | None) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def _suspend_call(key_id: str, reason: str) -> _Call:
    return _Call("POST", f"/vault/keys/{_segment(key_id)}/suspend", body={"reason": reason})


def _resume_call(key_id: str) -> _Call:
    return _Call("POST", f"/vault/keys/{_segment(key_id)}/resume")


def _segment(value: str) -> str:
    return quote(value, safe="")


def _error(status: int | None, payload: Any, fallback: str) -> KeybrakeError:
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return TransportError("bad_response", fallback, status)
    code = str(error.get("code") or "unknown")
    message = str(error.get("message") or fallback)
    details = {k: v for k, v in error.items() if k not in ("code", "message", "type")}
    cls = _ERRORS_BY_STATUS.get(status or 0, KeybrakeError)
    return cls(code, message, status, details)


def _decode(response: httpx.Response) -> Any:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.is_success and payload is not None:
        return payload
    reason = f"HTTP {response.status_code} from {response.request.url.path}"
    raise _error(response.status_code, payload, reason)


def _items(payload: Any) -> list[Mapping[str, Any]]:
    data = payload.get("data") if isinstance(payload, dict) else None
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _resolve(admin_url: str | None, token: str | None) -> tuple[str, str]:
    url = (admin_url or os.environ.get("KEYBRAKE_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")
    tok = token if token is not None else os.environ.get("KEYBRAKE_ADMIN_TOKEN", "")
    return url, tok


# -- trust -------------------------------------------------------------------------------------

CA_BUNDLE_ENV: Final = "KEYBRAKE_CA_BUNDLE"
SYSTEM_CA: Final = "system"


def ca_bundle_path(value: str | os.PathLike[str] | None = None) -> str | None:
    """The CA file a worker trusts for Keybrake: ``value``, else ``$KEYBRAKE_CA_BUNDLE``;
    ``"system"`` is the operating system's CA file; ``None`` means the library's default.

    What each SDK reads on its own, for code that builds its clients itself: stripe none
    (``stripe.ca_bundle_path``), requests-based SDKs (twilio, resend) ``REQUESTS_CA_BUNDLE``,
    httpx and Python's ``ssl`` ``SSL_CERT_FILE``.

    >>> ca_bundle_path("/etc/keybrake/ca.pem")
    '/etc/keybrake/ca.pem'
    """
    raw = os.fspath(value) if value is not None else os.environ.get(CA_BUNDLE_ENV, "")
    if not raw:
        return None
    if raw == SYSTEM_CA:
        paths = ssl.get_default_verify_paths()
        return paths.cafile or paths.openssl_cafile
    return raw


def tls_verify(ca_bundle: str | os.PathLike[str] | None = None, default: Any = True) -> Any:
    """What httpx's ``verify=`` takes for `ca_bundle_path` (``default`` when there is none)."""
    if ca_bundle is not None and os.fspath(ca_bundle) == SYSTEM_CA:
        return ssl.create_default_context()
    path = ca_bundle_path(ca_bundle)
    if path is None:
        return default
    return ssl.create_default_context(cafile=path)


# -- the clients -------------------------------------------------------------------------------


class KeybrakeClient:
    """Synchronous admin API client (thread-safe; one `httpx.Client` underneath).

    >>> kb = KeybrakeClient("http://127.0.0.1:8081", "kba_...")  # doctest: +SKIP
    >>> [k.key_id for k in kb.list_keys() if k.status == "active"]  # doctest: +SKIP
    ['key_7Hq...']

    ``ca_bundle`` is the CA file that vouches for an HTTPS admin listener (a private CA:
    the operator's, or the Keybrake CA for ``keybrake run --tls-name``), or ``"system"`` for
    the operating system's store; default ``$KEYBRAKE_CA_BUNDLE``, else httpx's own
    (certifi). ``verify`` is passed to httpx as is when ``ca_bundle`` is not given (an
    `ssl.SSLContext`, ``False``); ``transport`` lets callers supply their own httpx transport.
    """

    def __init__(
        self,
        admin_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        verify: Any = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.admin_url, token = _resolve(admin_url, token)
        self._http = httpx.Client(
            base_url=self.admin_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=tls_verify(ca_bundle, verify),
            transport=transport,
            trust_env=False,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, call: _Call) -> Any:
        try:
            response = self._http.request(
                call.method, call.path, params=dict(call.params), json=call.body
            )
        except httpx.HTTPError as e:
            raise TransportError("connection_error", f"{self.admin_url}: {e}") from e
        return _decode(response)

    def health(self) -> dict[str, Any]:
        """``GET /readyz``: ``{"status": "ok", "checks": {...}}``; raises `Unavailable` when the
        proxy is not ready (store unreachable, audit log not writable, clock skewed).

        >>> kb.health()["status"]  # doctest: +SKIP
        'ok'
        """
        payload = self._send(_Call("GET", "/readyz"))
        return dict(payload) if isinstance(payload, dict) else {}

    def issue_key(
        self,
        *,
        vendor: str,
        daily_usd_cap: Dollars,
        allowed_endpoints: Sequence[str],
        agent_run_label: str,
        expires_in: str = "1h",
        usd_cap: Dollars | None = None,
        max_requests_per_minute: int | None = None,
        allowed_accounts: Sequence[str] = (),
    ) -> IssuedKey:
        """Issue a vault key; ``.vault_key`` is its secret, returned only this once.

        ``max_requests_per_minute`` defaults to the vendor policy's (None there: no limit).
        ``allowed_accounts`` lists the connected accounts (Stripe ``acct_…``) the key may act
        on through the vendor's account header; none by default.

        >>> key = kb.issue_key(vendor="stripe", daily_usd_cap=300,  # doctest: +SKIP
        ...     allowed_endpoints=["POST /v1/payment_intents"], expires_in="2h",
        ...     agent_run_label="dramatiq/nightly-billing")
        >>> key.daily_usd_cap, key.status  # doctest: +SKIP
        (Decimal('300.00'), 'active')
        """
        call = _issue_call(
            vendor,
            daily_usd_cap,
            allowed_endpoints,
            agent_run_label,
            expires_in,
            usd_cap,
            max_requests_per_minute,
            allowed_accounts,
        )
        return IssuedKey.from_json(self._send(call))

    def list_keys(self) -> list[VaultKey]:
        """Every key the store knows, with today's budgets (never secrets)."""
        return [VaultKey.from_json(d) for d in _items(self._send(_Call("GET", "/vault/keys")))]

    def get_key(self, key_id: str) -> VaultKey:
        """One key with today's spend; raises `NotFound`.

        >>> kb.get_key(key.key_id).spent_today_usd  # doctest: +SKIP
        Decimal('12.34')
        """
        return VaultKey.from_json(self._send(_Call("GET", f"/vault/keys/{_segment(key_id)}")))

    def revoke_key(self, key_id: str) -> VaultKey:
        """Revoke a key (effective on the next request; repeating it is harmless)."""
        return VaultKey.from_json(self._send(_Call("DELETE", f"/vault/keys/{_segment(key_id)}")))

    def suspend_key(self, key_id: str, reason: str = "by operator") -> VaultKey:
        """Suspend a key: refused (``key_suspended``) on every replica until resumed.

        >>> kb.suspend_key(key.key_id, "refund loop").status  # doctest: +SKIP
        'suspended'
        """
        return VaultKey.from_json(self._send(_suspend_call(key_id, reason)))

    def resume_key(self, key_id: str) -> VaultKey:
        """Lift a suspension (also one the proxy made after an estimate overrun)."""
        return VaultKey.from_json(self._send(_resume_call(key_id)))

    def set_label_budget(self, label: str, daily_usd_cap: Dollars | None) -> LabelBudget:
        """Cap the spend of all keys with ``label`` per UTC day (``None`` removes the cap).

        >>> kb.set_label_budget("dramatiq/nightly-billing", 500).daily_usd_cap  # doctest: +SKIP
        Decimal('500.00')
        """
        cap = None if daily_usd_cap is None else _dollars(daily_usd_cap)
        call = _Call("PUT", f"/vault/budgets/{_segment(label)}", body={"daily_usd_cap": cap})
        return LabelBudget.from_json(self._send(call))

    def get_label_budget(self, label: str) -> LabelBudget:
        """The label's shared daily cap (``daily_usd_cap`` is None when it has none)."""
        return LabelBudget.from_json(self._send(_Call("GET", f"/vault/budgets/{_segment(label)}")))

    def spend(
        self,
        *,
        label: str | None = None,
        key_id: str | None = None,
        vendor: str | None = None,
        since: str = "24h",
        until: str | None = None,
        group_by: GroupBy = "label",
    ) -> list[SpendRow]:
        """Calls, refusals, cap hits and dollars per group over a window.

        >>> [(r.group, r.spent_usd) for r in kb.spend(group_by="label")]  # doctest: +SKIP
        [('dramatiq/nightly-billing', Decimal('300.00'))]
        """
        params = _query(
            label=label, key=key_id, vendor=vendor, since=since, until=until, group_by=group_by
        )
        payload = self._send(_Call("GET", "/vault/spend", params))
        return [SpendRow.from_json(d) for d in _items(payload)]

    def audit(
        self,
        *,
        label: str | None = None,
        key_id: str | None = None,
        vendor: str | None = None,
        outcome: Outcome | None = None,
        since: str = "24h",
        until: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[AuditEntry]:
        """One page of audit rows, newest first (``before``: the last row's ``id``).

        >>> [(e.actor, e.message_id, e.outcome) for e in kb.audit(limit=2)]  # doctest: +SKIP
        [('charge_customer', '7b0c…', 'ok'), ('charge_customer', '19fe…', 'refused')]
        """
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
        payload = self._send(_Call("GET", "/vault/audit", params))
        return [AuditEntry.from_json(d) for d in _items(payload)]

    def iter_audit(self, *, page_size: int = 500, **filters: Any) -> Iterator[AuditEntry]:
        """Every audit row matching ``filters`` (as for `audit`), newest first, page by page."""
        before: int | None = None
        while True:
            page = self.audit(limit=page_size, before=before, **filters)
            yield from page
            if len(page) < page_size:
                return
            before = page[-1].id


class AsyncKeybrakeClient:
    """The same API as `KeybrakeClient`, for asyncio code.

    >>> async with AsyncKeybrakeClient(admin_url, token) as kb:  # doctest: +SKIP
    ...     key = await kb.issue_key(vendor="resend", daily_usd_cap=5,
    ...         allowed_endpoints=["POST /emails"], agent_run_label="beam/newsletter")
    ...     await kb.revoke_key(key.key_id)
    """

    def __init__(
        self,
        admin_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        verify: Any = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.admin_url, token = _resolve(admin_url, token)
        self._http = httpx.AsyncClient(
            base_url=self.admin_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=tls_verify(ca_bundle, verify),
            transport=transport,
            trust_env=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        try:
            response = await self._http.request(
                call.method, call.path, params=dict(call.params), json=call.body
            )
        except httpx.HTTPError as e:
            raise TransportError("connection_error", f"{self.admin_url}: {e}") from e
        return _decode(response)

    async def health(self) -> dict[str, Any]:
        """See `KeybrakeClient.health`."""
        payload = await self._send(_Call("GET", "/readyz"))
        return dict(payload) if isinstance(payload, dict) else {}

    async def issue_key(
        self,
        *,
        vendor: str,
        daily_usd_cap: Dollars,
        allowed_endpoints: Sequence[str],
        agent_run_label: str,
        expires_in: str = "1h",
        usd_cap: Dollars | None = None,
        max_requests_per_minute: int | None = None,
        allowed_accounts: Sequence[str] = (),
    ) -> IssuedKey:
        """See `KeybrakeClient.issue_key`."""
        call = _issue_call(
            vendor,
            daily_usd_cap,
            allowed_endpoints,
            agent_run_label,
            expires_in,
            usd_cap,
            max_requests_per_minute,
            allowed_accounts,
        )
        return IssuedKey.from_json(await self._send(call))

    async def list_keys(self) -> list[VaultKey]:
        """See `KeybrakeClient.list_keys`."""
        payload = await self._send(_Call("GET", "/vault/keys"))
        return [VaultKey.from_json(d) for d in _items(payload)]

    async def get_key(self, key_id: str) -> VaultKey:
        """See `KeybrakeClient.get_key`."""
        return VaultKey.from_json(await self._send(_Call("GET", f"/vault/keys/{_segment(key_id)}")))

    async def revoke_key(self, key_id: str) -> VaultKey:
        """See `KeybrakeClient.revoke_key`."""
        return VaultKey.from_json(
            await self._send(_Call("DELETE", f"/vault/keys/{_segment(key_id)}"))
        )

    async def suspend_key(self, key_id: str, reason: str = "by operator") -> VaultKey:
        """See `KeybrakeClient.suspend_key`."""
        return VaultKey.from_json(await self._send(_suspend_call(key_id, reason)))

    async def resume_key(self, key_id: str) -> VaultKey:
        """See `KeybrakeClient.resume_key`."""
        return VaultKey.from_json(await self._send(_resume_call(key_id)))

    async def set_label_budget(self, label: str, daily_usd_cap: Dollars | None) -> LabelBudget:
        """See `KeybrakeClient.set_label_budget`."""
        cap = None if daily_usd_cap is None else _dollars(daily_usd_cap)
        call = _Call("PUT", f"/vault/budgets/{_segment(label)}", body={"daily_usd_cap": cap})
        return LabelBudget.from_json(await self._send(call))

    async def get_label_budget(self, label: str) -> LabelBudget:
        """See `KeybrakeClient.get_label_budget`."""
        return LabelBudget.from_json(
            await self._send(_Call("GET", f"/vault/budgets/{_segment(label)}"))
        )

    async def spend(
        self,
        *,
        label: str | None = None,
        key_id: str | None = None,
        vendor: str | None = None,
        since: str = "24h",
        until: str | None = None,
        group_by: GroupBy = "label",
    ) -> list[SpendRow]:
        """See `KeybrakeClient.spend`."""
        params = _query(
            label=label, key=key_id, vendor=vendor, since=since, until=until, group_by=group_by
        )
        payload = await self._send(_Call("GET", "/vault/spend", params))
        return [SpendRow.from_json(d) for d in _items(payload)]

    async def audit(
        self,
        *,
        label: str | None = None,
        key_id: str | None = None,
        vendor: str | None = None,
        outcome: Outcome | None = None,
        since: str = "24h",
        until: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[AuditEntry]:
        """See `KeybrakeClient.audit`."""
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
        payload = await self._send(_Call("GET", "/vault/audit", params))
        return [AuditEntry.from_json(d) for d in _items(payload)]

    async def iter_audit(
        self, *, page_size: int = 500, **filters: Any
    ) -> AsyncIterator[AuditEntry]:
        """See `KeybrakeClient.iter_audit`."""
        before: int | None = None
        while True:
            page = await self.audit(limit=page_size, before=before, **filters)
            for entry in page:
                yield entry
            if len(page) < page_size:
                return
            before = page[-1].id
