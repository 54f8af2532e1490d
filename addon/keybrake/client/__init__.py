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

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import httpx

from keybrake.client import _calls
from keybrake.client._calls import Dollars, GroupBy, Outcome
from keybrake.client._models import (
    AuditEntry,
    Budget,
    Forbidden,
    InvalidRequest,
    IssuedKey,
    KeybrakeError,
    LabelBudget,
    NotFound,
    SpendRow,
    TransportError,
    Unauthorized,
    Unavailable,
    VaultKey,
    decode,
)
from keybrake.client._trust import ca_bundle_path, tls_verify

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

T = TypeVar("T")
DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:8081"


def _http_options(
    admin_url: str | None,
    token: str | None,
    timeout: float,
    verify: Any,
    ca_bundle: str | os.PathLike[str] | None,
) -> tuple[str, dict[str, Any]]:
    """The admin URL and the httpx client options both clients use."""
    url = (admin_url or os.environ.get("KEYBRAKE_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")
    tok = token if token is not None else os.environ.get("KEYBRAKE_ADMIN_TOKEN", "")
    return url, {
        "base_url": url,
        "headers": {"Authorization": f"Bearer {tok}"},
        "timeout": timeout,
        "verify": tls_verify(ca_bundle, verify),
        "trust_env": False,
    }


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
        self.admin_url, options = _http_options(admin_url, token, timeout, verify, ca_bundle)
        self._http = httpx.Client(**options, transport=transport)

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

    def _run(self, op: _calls.Op[T]) -> T:
        try:
            response = self._http.request(op.method, op.path, params=dict(op.params), json=op.body)
        except httpx.HTTPError as e:
            raise TransportError("connection_error", f"{self.admin_url}: {e}") from e
        return op.read(decode(response))

    def health(self) -> dict[str, Any]:
        """``GET /readyz``: ``{"status": "ok", "checks": {...}}``; raises `Unavailable` when the
        proxy is not ready (store unreachable, audit log not writable, clock skewed).

        >>> kb.health()["status"]  # doctest: +SKIP
        'ok'
        """
        return self._run(_calls.health())

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
        op = _calls.issue_key(
            vendor,
            daily_usd_cap,
            allowed_endpoints,
            agent_run_label,
            expires_in,
            usd_cap,
            max_requests_per_minute,
            allowed_accounts,
        )
        return self._run(op)

    def list_keys(self) -> list[VaultKey]:
        """Every key the store knows, with today's budgets (never secrets)."""
        return self._run(_calls.list_keys())

    def get_key(self, key_id: str) -> VaultKey:
        """One key with today's spend; raises `NotFound`.

        >>> kb.get_key(key.key_id).spent_today_usd  # doctest: +SKIP
        Decimal('12.34')
        """
        return self._run(_calls.get_key(key_id))

    def revoke_key(self, key_id: str) -> VaultKey:
        """Revoke a key (effective on the next request; repeating it is harmless)."""
        return self._run(_calls.revoke_key(key_id))

    def suspend_key(self, key_id: str, reason: str = "by operator") -> VaultKey:
        """Suspend a key: refused (``key_suspended``) on every replica until resumed.

        >>> kb.suspend_key(key.key_id, "refund loop").status  # doctest: +SKIP
        'suspended'
        """
        return self._run(_calls.suspend_key(key_id, reason))

    def resume_key(self, key_id: str) -> VaultKey:
        """Lift a suspension (also one the proxy made after an estimate overrun)."""
        return self._run(_calls.resume_key(key_id))

    def set_label_budget(
        self,
        label: str,
        daily_usd_cap: Dollars | None,
        usd_cap: Dollars | None = None,
        max_requests_per_minute: int | None = None,
    ) -> LabelBudget:
        """Set the limits all keys with ``label`` share: their spend per UTC day, their spend
        in all (``usd_cap``) and their requests per minute (each ``None``: none). Every limit
        is set at once: one left out is removed.

        >>> kb.set_label_budget("dramatiq/nightly-billing", 500).daily_usd_cap  # doctest: +SKIP
        Decimal('500.00')
        """
        return self._run(
            _calls.set_label_budget(label, daily_usd_cap, usd_cap, max_requests_per_minute)
        )

    def get_label_budget(self, label: str) -> LabelBudget:
        """The label's shared daily cap (``daily_usd_cap`` is None when it has none)."""
        return self._run(_calls.get_label_budget(label))

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
        op = _calls.spend(label, key_id, vendor, since, until, group_by)
        return self._run(op)

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
        op = _calls.audit(label, key_id, vendor, outcome, since, until, limit, before)
        return self._run(op)

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
        self.admin_url, options = _http_options(admin_url, token, timeout, verify, ca_bundle)
        self._http = httpx.AsyncClient(**options, transport=transport)

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

    async def _run(self, op: _calls.Op[T]) -> T:
        try:
            response = await self._http.request(
                op.method, op.path, params=dict(op.params), json=op.body
            )
        except httpx.HTTPError as e:
            raise TransportError("connection_error", f"{self.admin_url}: {e}") from e
        return op.read(decode(response))

    async def health(self) -> dict[str, Any]:
        """See `KeybrakeClient.health`."""
        return await self._run(_calls.health())

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
        op = _calls.issue_key(
            vendor,
            daily_usd_cap,
            allowed_endpoints,
            agent_run_label,
            expires_in,
            usd_cap,
            max_requests_per_minute,
            allowed_accounts,
        )
        return await self._run(op)

    async def list_keys(self) -> list[VaultKey]:
        """See `KeybrakeClient.list_keys`."""
        return await self._run(_calls.list_keys())

    async def get_key(self, key_id: str) -> VaultKey:
        """See `KeybrakeClient.get_key`."""
        return await self._run(_calls.get_key(key_id))

    async def revoke_key(self, key_id: str) -> VaultKey:
        """See `KeybrakeClient.revoke_key`."""
        return await self._run(_calls.revoke_key(key_id))

    async def suspend_key(self, key_id: str, reason: str = "by operator") -> VaultKey:
        """See `KeybrakeClient.suspend_key`."""
        return await self._run(_calls.suspend_key(key_id, reason))

    async def resume_key(self, key_id: str) -> VaultKey:
        """See `KeybrakeClient.resume_key`."""
        return await self._run(_calls.resume_key(key_id))

    async def set_label_budget(
        self,
        label: str,
        daily_usd_cap: Dollars | None,
        usd_cap: Dollars | None = None,
        max_requests_per_minute: int | None = None,
    ) -> LabelBudget:
        """See `KeybrakeClient.set_label_budget`."""
        return await self._run(
            _calls.set_label_budget(label, daily_usd_cap, usd_cap, max_requests_per_minute)
        )

    async def get_label_budget(self, label: str) -> LabelBudget:
        """See `KeybrakeClient.get_label_budget`."""
        return await self._run(_calls.get_label_budget(label))

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
        op = _calls.spend(label, key_id, vendor, since, until, group_by)
        return await self._run(op)

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
        op = _calls.audit(label, key_id, vendor, outcome, since, until, limit, before)
        return await self._run(op)

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
