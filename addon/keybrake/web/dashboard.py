"""The web dashboard on the admin listener: ``/``, ``/login``, ``/dashboard/...``.

Server-rendered HTML (Jinja2, autoescaped: labels and paths are user input) with one small
vendored script that refreshes the live parts of a page every few seconds, shows a banner and
greys them out as soon as a refresh fails (the page is served by the proxy it watches), and
asks before a revoke. No CDN.

- Sign in with the admin token (``POST /login``); sessions and the CSRF and origin checks on
  every state-changing form are in `keybrake.web._sessions`.
- ``/`` is the on-call view: store health, keys at or near their cap, refusals by code,
  calls with no vendor answer, today's spend. ``/dashboard/keys`` lists, issues (the vault key
  is shown once) and revokes keys (`keybrake.vault`); ``/dashboard/spend`` charts spend per
  label (`keybrake.web._charts`); ``/dashboard/audit`` shows recent audit rows;
  ``/dashboard/summary.json`` is the overview as JSON. The queries are
  `keybrake.auditlog.reports`'s; answers and static files are `keybrake.web._responses`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import jinja2
from mitmproxy import ctx, exceptions, http

from keybrake.auditlog.reports import (
    OUTCOMES,
    audit_rows,
    recent_problems,
    refusals_by_code,
    spend_by_label,
    totals_since,
)
from keybrake.auditlog.sinks import audit_time
from keybrake.core.errors import Refusal
from keybrake.core.money import format_usd
from keybrake.proxy.core import Runtime
from keybrake.proxy.limiter import source_of
from keybrake.store import KeyRecord, Store, StoreUnavailable
from keybrake.vault import IssueKeyRequest, KeySpecError, Vault
from keybrake.web._charts import PALETTE, spend_chart
from keybrake.web._responses import StaticFiles, html, redirect, text
from keybrake.web._sessions import (
    SESSION_COOKIE,
    SESSION_MAX,
    Forbidden,
    Session,
    Sessions,
    check_origin,
    check_post,
    cookies,
    form_of,
    session_cookie,
)
from keybrake.web.dashboard_issuers import IssuerPages
from keybrake.web.dashboard_tree import TreePage
from keybrake.wire import LIVE_HEADER

__all__ = ["Dashboard"]

_R = TypeVar("_R")

log = logging.getLogger("keybrake")

NEAR_CAP = 0.8  # keys at or above this share of a cap are listed on the overview
REDACTED_FORM = b"token=[redacted+by+keybrake]"


@dataclasses.dataclass
class KeyRow:
    key_id: str
    vendor: str
    label: str
    status: str
    daily_cap: int
    usd_cap: int | None
    max_requests_per_minute: int | None
    spent: int
    remaining: int | None
    used: float  # the largest share of any cap in use (spent + reserved), 0..1+
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    allowed_endpoints: tuple[str, ...]
    suspended_reason: str | None = None


def _ago(ts: str | None, now: dt.datetime) -> str:
    if not ts:
        return ""
    try:
        t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return ts
    return _span(now - t) + " ago"


def _span(delta: dt.timedelta) -> str:
    s = int(abs(delta.total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _store_where(url: str) -> str:
    """The store URL without secrets, short: ``sqlite keybrake.db``, ``redis 10.0.0.5:6379/0``.

    >>> _store_where("redis://:pw@10.0.0.5:6379/0?prefix=kb:")
    'redis 10.0.0.5:6379/0'
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return "sqlite " + url.rstrip("/").rsplit("/", 1)[-1]
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme} {host}{parts.path}"


DEFAULT_REFRESH_SECONDS = 5
REFRESH_RANGE = (1, 3600)


class Dashboard(IssuerPages, TreePage):
    """Serves the dashboard's routes for `keybrake.web.admin.AdminApi`."""

    name = "keybrake_dashboard"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sessions = Sessions()
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("keybrake.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["usd"] = lambda m: "" if m is None else format_usd(int(m))
        self.env.globals["palette"] = PALETTE
        self.env.globals["refresh_ms"] = DEFAULT_REFRESH_SECONDS * 1000
        self.static = StaticFiles()

    def load(self, loader: object) -> None:
        loader.add_option(  # type: ignore[attr-defined]
            "keybrake_dashboard_refresh",
            int,
            DEFAULT_REFRESH_SECONDS,
            "Seconds between the dashboard's refreshes of its live figures "
            f"({REFRESH_RANGE[0]}-{REFRESH_RANGE[1]}); a refresh that takes longer, or 5 s "
            "when that is less, says the proxy is not answering.",
        )

    def configure(self, updated: set[str]) -> None:
        if "keybrake_dashboard_refresh" in updated:
            seconds = ctx.options.keybrake_dashboard_refresh
            low, high = REFRESH_RANGE
            if not low <= seconds <= high:
                raise exceptions.OptionsError(
                    f"keybrake_dashboard_refresh is {seconds}: give {low} to {high} seconds"
                )
            self.env.globals["refresh_ms"] = seconds * 1000

    # -- routing ---------------------------------------------------------------------------------
    async def serve(self, flow: http.HTTPFlow, path: str) -> http.Response:
        method = flow.request.method.upper()
        if path.startswith("/static/"):
            return self.static.serve(path)
        if path == "/login":
            if method == "POST":
                return self._login(flow)
            return self._page("login.html", {"error": None})
        sid = cookies(flow).get(SESSION_COOKIE)
        session = self.sessions.get(sid)
        if session is None:
            if flow.request.headers.get(LIVE_HEADER):
                return text(401, "signed out")
            return redirect("/login")
        try:
            form: dict[str, str] = {}
            if method == "POST":
                form = form_of(flow)
                check_post(flow, session, form)
            return await self._route(flow, path, method, session, sid, form)
        except Forbidden as e:
            log.warning("keybrake dashboard: refused %s %s: %s", method, path[:100], e)
            return text(403, "Forbidden: reload the page and try again.")
        except StoreUnavailable as e:
            log.error("keybrake dashboard: store unavailable: %s", e)
            return text(503, "The store is unavailable; see /readyz.")

    async def _route(
        self,
        flow: http.HTTPFlow,
        path: str,
        method: str,
        session: Session,
        sid: str | None,
        form: dict[str, str],
    ) -> http.Response:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        if method == "POST":
            if parts == ["logout"]:
                self.sessions.drop(sid)
                return redirect("/login", cookie=session_cookie(flow, "", max_age=0))
            if parts == ["dashboard", "keys"]:
                return await self._issue(session, form)
            if len(parts) == 4 and parts[:2] == ["dashboard", "keys"] and parts[3] == "revoke":
                return await self._revoke(session, parts[2])
            if len(parts) == 4 and parts[:2] == ["dashboard", "keys"] and parts[3] == "resume":
                return await self._resume(session, parts[2])
            if len(parts) == 4 and parts[:2] == ["dashboard", "keys"] and parts[3] == "suspend":
                return await self._suspend(session, parts[2])
            if parts == ["dashboard", "issuers"]:
                return await self._create_issuer(session, form)
            if len(parts) == 4 and parts[:2] == ["dashboard", "issuers"] and parts[3] == "revoke":
                return await self._revoke_issuer(session, parts[2], form)
            if parts == ["dashboard", "freezes"]:
                return await self._freeze(session, form.get("vendor", ""), "freeze", form)
            if len(parts) == 4 and parts[:2] == ["dashboard", "freezes"]:
                return await self._freeze(session, parts[2], parts[3], form)
            return text(405, "Method not allowed")
        if method not in ("GET", "HEAD"):
            return text(405, "Method not allowed")
        if not parts:
            return self._page("overview.html", await self._overview(), session)
        if parts == ["dashboard", "summary.json"]:
            return self._summary_json(await self._overview())
        if parts == ["dashboard", "keys"]:
            return await self._keys_page(session)
        if parts == ["dashboard", "spend"]:
            return self._page("spend.html", await self._spend(flow), session)
        if parts == ["dashboard", "audit"]:
            return self._page("audit.html", await self._audit(flow), session)
        if parts == ["dashboard", "issuers"]:
            return await self._issuers_page(session)
        if parts == ["dashboard", "tree"]:
            return await self._tree_page(flow, session)
        return text(404, "No such page")

    # -- auth ------------------------------------------------------------------------------------
    def _login(self, flow: http.HTTPFlow) -> http.Response:
        try:
            form = form_of(flow)
            check_origin(flow)
        except Forbidden as e:
            log.warning("keybrake dashboard: refused sign-in: %s", e)
            return text(403, "Forbidden")
        finally:
            # The token must not stay in the flow (mitmweb, flow files).
            flow.request.content = REDACTED_FORM
        source = source_of(flow)
        if self.runtime.admin_failures.blocked(source):
            log.warning("keybrake dashboard: sign-in from %s refused: too many failures", source)
            ctx = {"error": "Too many wrong tokens from this address. Try again in a minute."}
            return self._page("login.html", ctx, status=429)
        if not self.runtime.admin_token_matches(form.get("token", "").strip()):
            self.runtime.admin_failures.record(source)
            log.warning("keybrake dashboard: failed sign-in from %s", source)
            ctx = {"error": "That is not the admin token."}
            return self._page("login.html", ctx, status=401)
        sid, _ = self.sessions.create()
        log.info("keybrake dashboard: signed in from %s", flow.client_conn.peername)
        return redirect("/", cookie=session_cookie(flow, sid, max_age=int(SESSION_MAX)))

    # -- keys ------------------------------------------------------------------------------------
    def _vault(self, store: Store) -> Vault:
        return Vault(store, now=self.runtime.now, via="dashboard")

    async def _key_rows(self, now: dt.datetime) -> list[KeyRow]:
        views = await self._vault(await self.runtime.open_store()).keys(limit=500)
        return [
            KeyRow(
                key_id=v.key.key_id,
                vendor=v.key.vendor,
                label=v.key.agent_run_label,
                status=v.key.state(now),
                daily_cap=v.key.daily_cap_micros,
                usd_cap=v.key.usd_cap_micros,
                max_requests_per_minute=v.key.max_requests_per_minute,
                spent=v.spent_today_micros,
                remaining=v.remaining_micros,
                used=v.used,
                created_at=v.key.created_at,
                expires_at=v.key.expires_at,
                revoked_at=v.key.revoked_at,
                allowed_endpoints=v.key.allowed_endpoints,
                suspended_reason=v.key.suspended_reason,
            )
            for v in views
        ]

    async def _keys_page(self, session: Session) -> http.Response:
        now = self.runtime.now()
        rows = await self._key_rows(now)
        order = {"suspended": 0, "active": 1, "expired": 2, "revoked": 3}
        rows.sort(key=lambda r: (order.get(r.status, 3), -r.created_at.timestamp()))
        reveal, session.reveal = session.reveal, None
        flash, session.flash = session.flash, []
        return self._page(
            "keys.html",
            {
                "keys": rows,
                "now": now,
                "span": _span,
                "reveal": reveal,
                "flash": flash,
                "errors": {},
                "values": {"expires_in": "2h", "vendor": ""},
                "vendors": self._vendors(),
            },
            session,
        )

    def _vendors(self) -> dict[str, list[str]]:
        policies = self.runtime.policies
        if policies is None:
            return {}
        return {
            name: [ep.match for ep in p.endpoints] for name, p in sorted(policies.vendors.items())
        }

    async def _issue(self, session: Session, form: dict[str, str]) -> http.Response:
        rt = self.runtime
        assert rt.policies is not None
        body: dict[str, Any] = {
            "vendor": form.get("vendor", ""),
            "agent_run_label": form.get("label", "").strip(),
            "daily_usd_cap": form.get("daily_usd_cap", "").strip(),
            "expires_in": form.get("expires_in", "").strip() or "1h",
            "allowed_endpoints": [
                line.strip() for line in form.get("allowed_endpoints", "").splitlines()
            ],
        }
        body["allowed_endpoints"] = [e for e in body["allowed_endpoints"] if e]
        if form.get("usd_cap", "").strip():
            body["usd_cap"] = form["usd_cap"].strip()
        if form.get("max_requests_per_minute", "").strip():
            body["max_requests_per_minute"] = form["max_requests_per_minute"].strip()
        try:
            request = IssueKeyRequest.from_json(body, rt.policies)
            record, vault_key = await self._vault(await rt.open_store()).issue(request)
        except (KeySpecError, Refusal) as e:
            # A label in another budget tree (409 label_tree_conflict) is shown like a field
            # error of the label.
            fields = e.fields if isinstance(e, KeySpecError) else {"agent_run_label": e.message}
            now = rt.now()
            return self._page(
                "keys.html",
                {
                    "keys": await self._key_rows(now),
                    "now": now,
                    "span": _span,
                    "reveal": None,
                    "flash": [],
                    "errors": fields,
                    "values": form,
                    "vendors": self._vendors(),
                },
                session,
                status=422 if isinstance(e, KeySpecError) else e.status,
            )
        # Post/redirect/get: a reload must not issue a second key; the key is shown once.
        session.reveal = {"key_id": record.key_id, "vault_key": vault_key}
        return redirect("/dashboard/keys")

    async def _revoke(self, session: Session, key_id: str) -> http.Response:
        key = await self._vault(await self.runtime.open_store()).revoke(key_id)
        return self._done(session, key_id, key, "Revoked")

    async def _suspend(self, session: Session, key_id: str) -> http.Response:
        vault = self._vault(await self.runtime.open_store())
        key = await vault.suspend(key_id, "by operator (dashboard)")
        return self._done(session, key_id, key, "Suspended")

    async def _resume(self, session: Session, key_id: str) -> http.Response:
        key = await self._vault(await self.runtime.open_store()).resume(key_id)
        return self._done(session, key_id, key, "Resumed")

    def _done(
        self, session: Session, key_id: str, key: KeyRecord | None, done: str
    ) -> http.Response:
        """Flash what an action did (or that the key is not there) and go back to the keys."""
        if key is None:
            session.flash.append(f"No vault key {key_id[:64]}.")
        else:
            session.flash.append(f"{done} {key.key_id} ({key.agent_run_label}).")
        return redirect("/dashboard/keys")

    # -- overview --------------------------------------------------------------------------------
    async def _report(self, report: Callable[..., _R], *args: Any) -> _R | None:
        """Run an `keybrake.auditlog.reports` query on the audit sink (None: no sink). The sinks
        are synchronous (SQLite, psycopg): keep them off the event loop."""
        sink = self.runtime.audit_sink
        if sink is None:
            return None
        return await asyncio.to_thread(report, sink, *args)

    async def _store_health(self) -> dict[str, Any]:
        url = self.runtime.store_url
        out: dict[str, Any] = {"backend": _store_where(url), "ok": False}
        start = time.perf_counter()
        try:
            store = await self.runtime.open_store()
            await asyncio.wait_for(store.ping(), timeout=2)
            out["ok"] = True
        except StoreUnavailable as e:
            out["error"] = str(e)[:200]
        except TimeoutError:
            out["error"] = "no answer within 2s"
        out["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return out

    async def _overview(self) -> dict[str, Any]:
        now = self.runtime.now()
        health = await self._store_health()
        await self.runtime.flushed_audit_sink()
        keys: list[KeyRow] = []
        if health["ok"]:
            keys = await self._key_rows(now)
        hot = sorted(
            (k for k in keys if k.status == "active" and k.used >= NEAR_CAP),
            key=lambda k: -k.used,
        )
        day, hour = now - dt.timedelta(days=1), now - dt.timedelta(hours=1)
        refusals = await self._report(refusals_by_code, day, hour) or []
        t = await self._report(totals_since, day) or {}
        recent = await self._report(recent_problems, day) or []
        writer = self.runtime.audit_pump
        return {
            "now": now,
            "span": _span,
            "ago": lambda ts: _ago(ts, now),
            "store": health,
            "audit": {
                "depth": writer.depth if writer else None,
                "written": writer.written if writer else 0,
                "dropped": writer.dropped if writer else 0,
                "failures": writer.failures if writer else 0,
            },
            "hot_keys": hot,
            "active_keys": sum(1 for k in keys if k.status == "active"),
            "refusals": refusals,
            "calls_24h": int(t.get("calls") or 0),
            "spent_24h": int(t.get("spent") or 0),
            "unknown_24h": int(t.get("unknown") or 0),
            "vendor_errors_24h": int(t.get("vendor_errors") or 0),
            "recent_problems": recent,
            "instance": self.runtime.instance_id,
        }

    def _summary_json(self, data: dict[str, Any]) -> http.Response:
        body = {
            "as_of": audit_time(data["now"]),
            "store": data["store"],
            "audit": data["audit"],
            "active_keys": data["active_keys"],
            "keys_near_cap": [
                {
                    "key_id": k.key_id,
                    "label": k.label,
                    "vendor": k.vendor,
                    "used_pct": round(k.used * 100, 1),
                    "spent_today_usd": format_usd(k.spent),
                    "remaining_usd": format_usd(k.remaining) if k.remaining is not None else None,
                }
                for k in data["hot_keys"]
            ],
            "refusals_24h": {r["code"]: int(r["n"]) for r in data["refusals"]},
            "calls_24h": data["calls_24h"],
            "spent_24h_usd": format_usd(data["spent_24h"]),
            "unknown_24h": data["unknown_24h"],
        }
        return http.Response.make(
            200,
            json.dumps(body, separators=(",", ":")).encode(),
            {"Content-Type": "application/json", "Cache-Control": "no-store"},
        )

    # -- spend -----------------------------------------------------------------------------------
    async def _spend(self, flow: http.HTTPFlow) -> dict[str, Any]:
        now = self.runtime.now()
        window = flow.request.query.get("range", "24h")
        if window not in ("24h", "7d", "30d"):
            window = "24h"
        if window == "24h":
            start = now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=23)
            step, width = dt.timedelta(hours=1), 13
            buckets = [(start + i * step).strftime("%Y-%m-%dT%H") for i in range(24)]
        else:
            n = 7 if window == "7d" else 30
            start = now.replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(
                days=n - 1
            )
            step, width = dt.timedelta(days=1), 10
            buckets = [(start + i * step).strftime("%Y-%m-%d") for i in range(n)]
        await self.runtime.flushed_audit_sink()
        rows = await self._report(spend_by_label, start, width) or []
        return {"window": window, **spend_chart(rows, buckets)}

    # -- audit -----------------------------------------------------------------------------------
    async def _audit(self, flow: http.HTTPFlow) -> dict[str, Any]:
        now = self.runtime.now()
        q = flow.request.query
        filters = {
            "label": q.get("label") or None,
            "key_id": q.get("key") or None,
            "vendor": q.get("vendor") or None,
            "outcome": q.get("outcome") if q.get("outcome") in OUTCOMES else None,
        }
        rows: list[dict[str, Any]] = []
        sink = await self.runtime.flushed_audit_sink()
        if sink is not None:
            rows = await asyncio.to_thread(
                lambda: audit_rows(
                    sink,
                    label=filters["label"],
                    key_id=filters["key_id"],
                    vendor=filters["vendor"],
                    outcome=filters["outcome"],
                    since=now - dt.timedelta(days=7),
                    limit=200,
                )
            )
        return {
            "rows": rows,
            "filters": filters,
            "outcomes": OUTCOMES,
            "ago": lambda ts: _ago(ts, now),
        }

    # -- responses -------------------------------------------------------------------------------
    def _redirect_to(self, location: str) -> http.Response:
        return redirect(location)

    def _page(
        self,
        template: str,
        context: dict[str, Any],
        session: Session | None = None,
        status: int = 200,
    ) -> http.Response:
        page = self.env.get_template(template).render(
            **context, session=session, csrf=session.csrf if session else ""
        )
        return html(status, page)
