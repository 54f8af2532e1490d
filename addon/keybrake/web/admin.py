"""The `AdminApi` addon: the admin listener's JSON API for vault keys and budgets.

Served from inside the proxy on the reverse-mode (admin / base-URL) listener:

- ``POST /vault/keys`` issue a key (the vault key is shown once, in this response only)
- ``GET /vault/keys``, ``GET /vault/keys/{key_id}`` (never secrets)
- ``DELETE /vault/keys/{key_id}`` revoke (repeating it is harmless); ``POST /vault/revoke``
  (``{"vault_key": "kbv_…"}``) revokes by the vault key itself, kept out of URLs and logs
- ``PATCH /vault/keys/{key_id}`` (``{"daily_usd_cap": …, "usd_cap": … or null}``) raise or
  lower a key's caps; every replica's next admission reads them
- ``POST /vault/keys/{key_id}/suspend`` (``{"reason": …}``) / ``…/resume``: a suspended key is
  refused until resumed; the proxy suspends a key itself after an estimate overrun
- ``PUT /vault/budgets/{label}`` / ``GET /vault/budgets/{label}`` a label's shared limits
- ``GET /vault/spend`` / ``GET /vault/audit`` spend summaries and audit rows
- ``GET /vault/alerts`` alert rules, webhooks and deliveries; ``POST /vault/alerts/test``
  (`keybrake.auditlog.reports`)
- ``GET /vault/tree`` the budget tree (issuer → label → key): spent, reserved, remaining
  (`keybrake.vault.tree`)
- ``/vault/issuers…``, ``/vault/bulk/…``, ``/vault/freezes…``: issuer tokens, kill switches
  and vendor freezes (`keybrake.web.delegated`)
- ``GET /healthz`` (no token) the process is up; ``GET /readyz`` (no token) store reachable,
  policies loaded, audit log writable, clock in sync (``503`` and what is wrong otherwise)
- ``GET /metrics`` Prometheus metrics (`keybrake.proxy.metrics`): the metrics token, or none on a
  loopback listener when no metrics token is set
- ``/``, ``/login``, ``/logout``, ``/dashboard/...``, ``/static/...`` the web dashboard
  (`keybrake.web.dashboard`, its own login and session cookie)

Every ``/vault`` call needs ``Authorization: Bearer <admin token>``, compared in constant time
(see `Runtime.admin_token_matches`), or an issuer token (``kbi_…``, found by its SHA-256),
which opens the routes `IssuerRoutes.route_for_issuer` lists, within its scope. ``/metrics``
takes the read-only metrics token (or the admin token); the metrics token opens nothing
else. Without a metrics token ``/metrics`` is open when the admin listener is bound to
loopback only, and refused on any other address, so an exposed listener never publishes its
metrics by accident. Thirty wrong tokens from one address in a minute block that address
(``429 rate_limited``) for the rest of the minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol
from urllib.parse import unquote

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode

from keybrake.auditlog.reports import ReportError, add_caps, audit_rows, parse_time, spend_summary
from keybrake.auditlog.sinks import AuditSink
from keybrake.core.errors import Refusal, refusal_response
from keybrake.core.keys import hash_vault_key
from keybrake.core.paths import split_base_url
from keybrake.proxy.core import Runtime
from keybrake.proxy.limiter import source_of
from keybrake.proxy.listeners import ADMIN, is_loopback_host
from keybrake.store import IssuerRecord, StoreUnavailable
from keybrake.vault import (
    IssueKeyRequest,
    KeyCapsChange,
    KeySpecError,
    Vault,
    key_to_json,
    looks_like_issuer_token,
    parse_label_budget,
)
from keybrake.web.delegated import IssuerRoutes

__all__ = ["AdminApi", "MetricsPage", "Pages", "is_dashboard_path", "is_loopback_host"]

log = logging.getLogger("keybrake")
MAX_ADMIN_BODY = 64 * 1024
_KEY_ACTIONS = ("suspend", "resume")


def _json(status: int, payload: Any) -> http.Response:
    return http.Response.make(
        status,
        json.dumps(payload, separators=(",", ":")).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


class Pages(Protocol):
    """The dashboard: answers its own routes (see `is_dashboard_path`)."""

    async def serve(self, flow: http.HTTPFlow, path: str) -> http.Response: ...


class MetricsPage(Protocol):
    """The ``/metrics`` exposition."""

    async def exposition(self) -> http.Response: ...


def is_dashboard_path(path: str) -> bool:
    return path in ("/", "/login", "/logout") or path.startswith(("/dashboard/", "/static/"))


class AdminApi(IssuerRoutes):
    """Answers ``/vault/...``, ``/healthz``, ``/metrics`` and the dashboard's routes."""

    name = "keybrake_admin"

    def __init__(
        self,
        runtime: Runtime,
        dashboard: Pages | None = None,
        metrics: MetricsPage | None = None,
    ) -> None:
        self.runtime = runtime
        self.dashboard = dashboard
        self.metrics = metrics

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return
        path = flow.request.path.split("?", 1)[0]
        first, _ = split_base_url(flow.request.path)
        rt = self.runtime
        listeners = rt.listeners
        roles = listeners.roles_of(flow.client_conn)
        if listeners.plain_http_refused(flow):
            flow.metadata["keybrake_admin"] = True
            flow.response = refusal_response(
                Refusal("tls_required", "this listener answers HTTPS only: use https://")
            )
            _redact_authorization(flow)
            return
        if rt.policies is not None and first in rt.policies.vendors:
            return  # base-URL mode: the guard takes it (or refuses it on an admin-only listener)
        flow.metadata["keybrake_admin"] = True
        try:
            if path == "/healthz":
                flow.response = _json(200, {"status": "ok", "instance": rt.instance_id})
            elif path == "/readyz":
                flow.response = await self._ready()
            elif ADMIN not in roles:
                raise Refusal("not_found", f"no such vendor route: {path[:100]}")
            elif path == "/vault" or path.startswith("/vault/"):
                issuer = await self._authorize_vault(flow)
                flow.response = await self._route(flow, path, issuer)
            elif path == "/metrics" and self.metrics is not None:
                self._authorize_scrape(flow)
                flow.response = await self.metrics.exposition()
            elif self.dashboard is not None and is_dashboard_path(path):
                flow.response = await self.dashboard.serve(flow, path)
            else:
                raise Refusal("not_found", f"no such admin route or vendor: {path[:100]}")
        except Refusal as r:
            flow.response = refusal_response(r)
        except StoreUnavailable as e:
            log.error("keybrake admin: store unavailable: %s", e)
            flow.response = refusal_response(
                Refusal("store_unavailable", "the store is unavailable")
            )
        except Exception:
            log.exception("keybrake admin: internal error")
            flow.response = refusal_response(Refusal("internal_error", "internal error"))
        _redact_authorization(flow)

    def _bearer(self, flow: http.HTTPFlow) -> tuple[str, bool]:
        """The ``Authorization`` token and whether its scheme is ``Bearer``; refused first when
        the address has guessed wrong too often."""
        if self.runtime.admin_failures.blocked(source_of(flow)):
            raise Refusal(
                "rate_limited",
                "too many wrong admin tokens from this address; retry in a minute",
            )
        scheme, _, token = flow.request.headers.get("authorization", "").partition(" ")
        return token.strip(), scheme.lower() == "bearer"

    def _count_guess(self, flow: http.HTTPFlow, token: str) -> None:
        if token:  # a guess, not a forgotten header
            self.runtime.admin_failures.record(source_of(flow))

    def _wrong_token(self, flow: http.HTTPFlow, token: str) -> Refusal:
        self._count_guess(flow, token)
        return Refusal("admin_token_invalid", "missing or wrong admin token")

    def _authorize(self, flow: http.HTTPFlow) -> None:
        token, bearer = self._bearer(flow)
        # Compared even when the scheme is wrong: the answer takes as long either way.
        if not (self.runtime.admin_token_matches(token) and bearer):
            raise self._wrong_token(flow, token)

    async def _authorize_vault(self, flow: http.HTTPFlow) -> IssuerRecord | None:
        """The admin token (None: full power), or an active issuer token (its record).

        A wrong token counts against the address as with `_authorize`; an issuer token is
        found by its SHA-256 (the store's lookup by digest leaks nothing of the token)."""
        rt = self.runtime
        token, bearer = self._bearer(flow)
        # Compared even when the scheme is wrong: the answer takes as long either way.
        if rt.admin_token_matches(token) and bearer:
            return None
        issuer = None
        if bearer and looks_like_issuer_token(token):
            issuer = await (await self._vault()).issuer_of_token(token)
        if issuer is None:
            raise self._wrong_token(flow, token)
        state = issuer.state(rt.now())
        if state == "revoked":
            raise Refusal("issuer_token_revoked", f"issuer token {issuer.issuer_id} was revoked")
        if state == "expired":
            raise Refusal("issuer_token_expired", f"issuer token {issuer.issuer_id} expired")
        return issuer

    def _authorize_scrape(self, flow: http.HTTPFlow) -> None:
        """``/metrics``: the metrics or admin token; nothing on loopback without a metrics token."""
        rt = self.runtime
        mode = flow.client_conn.proxy_mode
        if not rt.metrics_token and is_loopback_host(mode.listen_host(ctx.options.listen_host)):
            return
        token, bearer = self._bearer(flow)
        # Both compared (`|`, not `or`) whatever the scheme: the answer takes as long either way.
        known = rt.metrics_token_matches(token) | rt.admin_token_matches(token)
        if known and bearer:
            return
        self._count_guess(flow, token)
        if rt.metrics_token:
            raise Refusal(
                "metrics_token_invalid",
                "missing or wrong metrics token: send Authorization: Bearer <the metrics "
                "token> (KEYBRAKE_METRICS_TOKEN or the keybrake_metrics_token_file option)",
            )
        raise Refusal(
            "metrics_token_invalid",
            "this admin listener is not bound to loopback, so /metrics needs a token: set "
            "KEYBRAKE_METRICS_TOKEN (or the keybrake_metrics_token_file option) and give the "
            "scraper Authorization: Bearer <that token>",
        )

    async def _ready(self) -> http.Response:
        """``/readyz``: store reachable, policies loaded, audit sink writable, clock in sync.

        Each check says ``ok`` or what is wrong, in words that name no secret (the store's
        errors carry its URL without a password)."""
        rt = self.runtime
        checks: dict[str, str] = {}
        try:
            store = await rt.open_store()
            await store.ping()
            checks["store"] = "ok"
        except StoreUnavailable as e:
            checks["store"] = str(e)
        checks["policies"] = (
            "ok" if rt.policies is not None and rt.policies.vendors else "no vendor policy loaded"
        )
        checks["audit"] = await _audit_writable(rt.audit_sink)
        skew = round(rt.clock_skew_seconds, 3)
        checks["clock"] = rt.clock_problem() or "ok"
        ready = all(v == "ok" for v in checks.values())
        if ready:
            status = "ok"
        elif checks["store"] != "ok":
            status = "unavailable"
        elif checks["clock"] != "ok":
            status = "clock_skewed"
        else:
            status = "not_ready"
        body = {"status": status, "instance": rt.instance_id, "clock_skew_s": skew}
        return _json(200 if ready else 503, body | {"checks": checks})

    async def _route(
        self, flow: http.HTTPFlow, path: str, issuer: IssuerRecord | None = None
    ) -> http.Response:
        method = flow.request.method.upper()
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if issuer is not None:
            return await self.route_for_issuer(flow, method, parts, path, issuer)
        if (delegated := await self.route_delegation(flow, method, parts)) is not None:
            return delegated
        if parts == ["vault", "keys"]:
            if method == "POST":
                return await self._issue(flow)
            if method == "GET":
                return await self._list()
            raise Refusal("method_not_allowed", f"{method} not allowed on /vault/keys")
        if len(parts) == 3 and parts[:2] == ["vault", "keys"]:
            if method == "GET":
                return await self._get(parts[2])
            if method == "DELETE":
                return await self._revoke(parts[2])
            if method == "PATCH":
                return await self._set_caps(flow, parts[2])
            raise Refusal("method_not_allowed", f"{method} not allowed on a key")
        if len(parts) == 4 and parts[:2] == ["vault", "keys"] and parts[3] in _KEY_ACTIONS:
            if method != "POST":
                raise Refusal("method_not_allowed", f"{method} not allowed on {parts[3]}")
            return await self._suspend_or_resume(flow, parts[2], parts[3])
        if parts == ["vault", "revoke"] and method == "POST":
            return await self._revoke_by_vault_key(flow)
        if parts[:2] == ["vault", "alerts"]:
            return await self._alerts(flow, method, parts[2:])
        if parts == ["vault", "spend"] and method == "GET":
            return await self._spend(flow)
        if parts == ["vault", "tree"] and method == "GET":
            return _json(200, await (await self._vault()).tree())
        if parts == ["vault", "audit"] and method == "GET":
            return await self._audit(flow)
        if len(parts) >= 3 and parts[:2] == ["vault", "budgets"]:
            # Labels contain "/" (dramatiq/nightly-billing): the rest of the path is the label.
            label = unquote(path[len("/vault/budgets/") :])
            if method == "PUT":
                return await self._put_budget(label, flow)
            if method == "GET":
                return await self._get_budget(label)
            raise Refusal("method_not_allowed", f"{method} not allowed on a budget")
        raise Refusal("not_found", f"no such admin route: {path[:100]}")

    def _body(self, flow: http.HTTPFlow) -> Any:
        raw = flow.request.raw_content or b""
        if len(raw) > MAX_ADMIN_BODY:
            raise Refusal(
                "body_too_large", f"admin request bodies are limited to {MAX_ADMIN_BODY} bytes"
            )
        try:
            return json.loads(
                raw or b"{}", parse_float=str, parse_int=str, parse_constant=_no_constant
            )
        except (ValueError, RecursionError):
            raise Refusal("invalid_request", "body must be a JSON object") from None

    async def _vault(self) -> Vault:
        return Vault(await self.runtime.open_store(), now=self.runtime.now, via="admin API")

    async def _issue(self, flow: http.HTTPFlow) -> http.Response:
        rt = self.runtime
        assert rt.policies is not None
        try:
            request = IssueKeyRequest.from_json(self._body(flow), rt.policies)
        except KeySpecError as e:
            raise Refusal("invalid_request", str(e), extra={"fields": e.fields}) from None
        record, vault_key = await (await self._vault()).issue(request)
        return _json(201, key_to_json(record, rt.now()) | {"vault_key": vault_key})

    async def _list(self) -> http.Response:
        now = self.runtime.now()
        views = await (await self._vault()).keys()
        return _json(200, {"object": "list", "data": [v.to_json(now) for v in views]})

    async def _get(self, key_id: str) -> http.Response:
        view = await (await self._vault()).key(key_id)
        if view is None:
            raise _no_key(key_id)
        return _json(200, view.to_json(self.runtime.now()))

    async def _revoke(self, key_id: str) -> http.Response:
        key = await (await self._vault()).revoke(key_id)
        if key is None:
            raise _no_key(key_id)
        if self.runtime.alerts is not None:
            self.runtime.alerts.key_revoked(key, "the admin API")
        return _json(200, key_to_json(key, self.runtime.now()))

    async def _revoke_by_vault_key(self, flow: http.HTTPFlow) -> http.Response:
        """``POST /vault/revoke`` ``{"vault_key": "kbv_…"}``: the secret stays out of the URL."""
        data = self._body(flow)
        vault_key = data.get("vault_key") if isinstance(data, dict) else None
        if not isinstance(vault_key, str) or not vault_key:
            raise Refusal("invalid_request", 'body must be {"vault_key": "kbv_..."}')
        vault = await self._vault()
        key = await vault.store.get_key_by_secret_hash(hash_vault_key(vault_key))
        if key is None:
            raise Refusal("not_found", "no vault key matches the vault key given")
        return await self._revoke(key.key_id)

    async def _set_caps(self, flow: http.HTTPFlow, key_id: str) -> http.Response:
        """``PATCH /vault/keys/{key_id}``: new caps, read by every replica's next admission."""
        try:
            change = KeyCapsChange.from_json(self._body(flow))
        except KeySpecError as e:
            raise Refusal("invalid_request", str(e), extra={"fields": e.fields}) from None
        view = await (await self._vault()).set_caps(key_id, change)
        if view is None:
            raise _no_key(key_id)
        return _json(200, view.to_json(self.runtime.now()))

    async def _suspend_or_resume(
        self, flow: http.HTTPFlow, key_id: str, action: str
    ) -> http.Response:
        """``POST /vault/keys/{key_id}/suspend`` (``{"reason": "…"}``) and ``…/resume``."""
        vault = await self._vault()
        if action == "suspend":
            data = self._body(flow)
            reason = data.get("reason") if isinstance(data, dict) else None
            if reason is not None and not isinstance(reason, str):
                raise Refusal("invalid_request", "reason must be a string")
            key = await vault.suspend(key_id, reason)
        else:
            key = await vault.resume(key_id)
        if key is None:
            raise _no_key(key_id)
        return _json(200, key_to_json(key, self.runtime.now()))

    async def _alerts(self, flow: http.HTTPFlow, method: str, rest: list[str]) -> http.Response:
        """``GET /vault/alerts`` (rules, webhooks, deliveries waiting and recent) and
        ``POST /vault/alerts/test`` (a test alert to every webhook, through the outbox)."""
        alerts = self.runtime.alerts
        if alerts is None:
            raise Refusal("not_found", "alerts are not loaded in this proxy")
        if rest == [] and method == "GET":
            limit = _query(flow, "limit") or "50"
            if not limit.isdigit() or not 1 <= int(limit) <= 200:
                raise Refusal("invalid_request", "limit must be a whole number from 1 to 200")
            return _json(200, await alerts.overview(int(limit)))
        if rest == ["test"] and method == "POST":
            if not alerts.config.webhooks:
                raise Refusal("invalid_request", "no webhooks are configured (keybrake_alerts)")
            return _json(202, await alerts.send_test())
        if rest in ([], ["test"]):
            raise Refusal("method_not_allowed", f"{method} not allowed here")
        raise Refusal("not_found", "no such admin route")

    async def _report_sink(self) -> AuditSink:
        """The audit sink with the outbox moved to it: every call answered so far is in it."""
        sink = await self.runtime.flushed_audit_sink()
        if sink is None:
            raise Refusal("store_unavailable", "the audit log is not configured")
        return sink

    async def _spend(
        self, flow: http.HTTPFlow, issuer: IssuerRecord | None = None
    ) -> http.Response:
        """``GET /vault/spend?label=&key=&vendor=&since=24h&until=&group_by=label`` (an
        issuer token: the rows of its prefix and vendors only)."""
        now = self.runtime.now()
        sink = await self._report_sink()
        try:
            rows = spend_summary(
                sink,
                group_by=_query(flow, "group_by") or "label",  # type: ignore[arg-type]
                label=_query(flow, "label"),
                key_id=_query(flow, "key"),
                vendor=_query(flow, "vendor"),
                since=parse_time(_query(flow, "since") or "24h", now),
                until=parse_time(u, now, "until") if (u := _query(flow, "until")) else None,
                label_prefix=issuer.label_prefix if issuer else None,
                vendors=issuer.vendors if issuer else None,
            )
        except ReportError as e:
            raise Refusal("invalid_request", str(e)) from None
        await add_caps(rows, await self.runtime.open_store(), now)
        return _json(200, {"object": "list", "data": rows})

    async def _audit(
        self, flow: http.HTTPFlow, issuer: IssuerRecord | None = None
    ) -> http.Response:
        """``GET /vault/audit?label=&key=&vendor=&outcome=&since=&until=&limit=&before=`` (an
        issuer token: the rows of its prefix and vendors only)."""
        now = self.runtime.now()
        sink = await self._report_sink()
        try:
            limit = int(_query(flow, "limit") or 50)
            before = int(b) if (b := _query(flow, "before")) else None
            rows = audit_rows(
                sink,
                label=_query(flow, "label"),
                key_id=_query(flow, "key"),
                vendor=_query(flow, "vendor"),
                outcome=_query(flow, "outcome"),
                since=parse_time(_query(flow, "since") or "24h", now),
                until=parse_time(u, now, "until") if (u := _query(flow, "until")) else None,
                limit=limit,
                before_id=before,
                label_prefix=issuer.label_prefix if issuer else None,
                vendors=issuer.vendors if issuer else None,
            )
        except (ReportError, ValueError) as e:
            raise Refusal("invalid_request", str(e)) from None
        next_before = rows[-1]["id"] if len(rows) == limit else None
        return _json(200, {"object": "list", "data": rows, "next_before": next_before})

    async def _put_budget(self, label: str, flow: http.HTTPFlow) -> http.Response:
        try:
            cap = parse_label_budget(label, self._body(flow))
        except KeySpecError as e:
            raise Refusal("invalid_request", str(e), extra={"fields": e.fields}) from None
        return _json(200, await (await self._vault()).set_label_budget(label, cap))

    async def _get_budget(self, label: str) -> http.Response:
        return _json(200, await (await self._vault()).label_budget(label))


def _no_key(key_id: str) -> Refusal:
    return Refusal("not_found", f"no vault key {key_id[:64]!r}")


def _redact_authorization(flow: http.HTTPFlow) -> None:
    if "authorization" in flow.request.headers:
        flow.request.headers["authorization"] = "[redacted by keybrake]"


async def _audit_writable(sink: AuditSink | None) -> str:
    """``ok``, or why the audit sink cannot take rows now (checked off the event loop)."""
    if sink is None:
        return "the audit log is not open"
    check = getattr(sink, "check_writable", None)
    if check is None:
        return "ok"
    try:
        await asyncio.wait_for(asyncio.to_thread(check), timeout=5)
    except TimeoutError:
        return "the audit log did not answer within 5s"
    except Exception as e:
        return f"the audit log cannot be written: {type(e).__name__}"
    return "ok"


def _query(flow: http.HTTPFlow, name: str) -> str | None:
    value = flow.request.query.get(name)
    return value if value else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
