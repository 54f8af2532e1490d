"""The web dashboard on the admin listener: ``/``, ``/login``, ``/dashboard/...``.

Server-rendered HTML (Jinja2, autoescaped: labels and paths are user input) with one small
vendored script that refreshes the live parts of a page every few seconds, shows a banner and
greys them out as soon as a refresh fails (the page is served by the proxy it watches), and
asks before a revoke. No CDN.

- Sign in with the admin token (``POST /login``); the session lives in memory (idle timeout
  `SESSION_IDLE`, absolute `SESSION_MAX`) behind an ``HttpOnly; SameSite=Strict`` cookie,
  ``Secure`` when the dashboard is reached over HTTPS. Restarting the proxy signs everyone out.
- Every state-changing form carries the session's CSRF token; POSTs from another origin are
  refused whatever they carry.
- ``/`` is the on-call view: store health, keys at or near their cap, refusals by code,
  calls with no vendor answer, today's spend. ``/dashboard/keys`` lists, issues (the vault key
  is shown once) and revokes keys; ``/dashboard/spend`` charts spend per label;
  ``/dashboard/audit`` shows recent audit rows; ``/dashboard/summary.json`` is the overview
  as JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hmac
import json
import logging
import secrets
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import jinja2
from mitmproxy import http

from keybrake.auditlog.reports import OUTCOMES, SPENT_OUTCOMES_SQL, audit_rows
from keybrake.auditlog.sinks import audit_time
from keybrake.core.money import MICROS_PER_USD, format_usd
from keybrake.proxy.core import Runtime
from keybrake.proxy.limiter import source_of
from keybrake.store import KeyRecord, Store, StoreUnavailable
from keybrake.vault import IssueKeyRequest, KeySpecError, Vault
from keybrake.web.dashboard_issuers import IssuerPages
from keybrake.wire import LIVE_HEADER

__all__ = ["Dashboard", "Sessions", "axis_ticks", "spend_chart", "tick_label"]

log = logging.getLogger("keybrake")

SESSION_COOKIE = "keybrake_session"
SESSION_IDLE = 3600.0
SESSION_MAX = 12 * 3600.0
MAX_SESSIONS = 1000
MAX_FORM = 16 * 1024
NEAR_CAP = 0.8  # keys at or above this share of a cap are listed on the overview
REDACTED_FORM = b"token=[redacted+by+keybrake]"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
SPENT_SQL = (
    f"SUM(CASE WHEN outcome IN {SPENT_OUTCOMES_SQL} "
    "THEN COALESCE(actual_micros, estimate_micros, 0) ELSE 0 END)"
)


@dataclasses.dataclass
class Session:
    csrf: str
    created: float
    seen: float
    flash: list[str] = dataclasses.field(default_factory=list)
    reveal: dict[str, str] | None = None  # the vault key just issued: shown once, then gone
    reveal_issuer: dict[str, str] | None = None  # the issuer token just created: the same


class Sessions:
    """Dashboard sessions, in memory: ``create`` on login, ``get`` checks both timeouts."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def create(self) -> tuple[str, Session]:
        now = time.monotonic()
        self._expire(now)
        if len(self._sessions) >= MAX_SESSIONS:  # drop the oldest rather than grow forever
            oldest = min(self._sessions, key=lambda s: self._sessions[s].created)
            del self._sessions[oldest]
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._sessions.get(sid)
        now = time.monotonic()
        if session is None:
            return None
        if now - session.seen > SESSION_IDLE or now - session.created > SESSION_MAX:
            del self._sessions[sid]
            return None
        session.seen = now
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def _expire(self, now: float) -> None:
        for sid, s in list(self._sessions.items()):
            if now - s.seen > SESSION_IDLE or now - s.created > SESSION_MAX:
                del self._sessions[sid]


class _Forbidden(Exception):
    """A state-changing request without a valid CSRF token or from another origin."""


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


def _cookies(flow: http.HTTPFlow) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in flow.request.headers.get_all("cookie"):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            out.setdefault(name, value)
    return out


def _form(flow: http.HTTPFlow) -> dict[str, str]:
    raw = flow.request.raw_content or b""
    if len(raw) > MAX_FORM:
        raise _Forbidden("form too large")
    text = raw.decode("utf-8", "replace")
    return dict(parse_qsl(text, keep_blank_values=True))


def _https(flow: http.HTTPFlow) -> bool:
    proto = flow.request.headers.get("x-forwarded-proto", "").lower()
    return bool(flow.client_conn.tls_established) or proto == "https"


class Dashboard(IssuerPages):
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
        self._static: dict[str, bytes] = {}

    # -- routing ---------------------------------------------------------------------------------
    async def serve(self, flow: http.HTTPFlow, path: str) -> http.Response:
        method = flow.request.method.upper()
        if path.startswith("/static/"):
            return self._static_file(path)
        if path == "/login":
            if method == "POST":
                return self._login(flow)
            return self._page("login.html", {"error": None})
        sid = _cookies(flow).get(SESSION_COOKIE)
        session = self.sessions.get(sid)
        if session is None:
            if flow.request.headers.get(LIVE_HEADER):
                return self._text(401, "signed out")
            return _redirect("/login")
        try:
            form: dict[str, str] = {}
            if method == "POST":
                form = _form(flow)
                self._check_post(flow, session, form)
            return await self._route(flow, path, method, session, sid, form)
        except _Forbidden as e:
            log.warning("keybrake dashboard: refused %s %s: %s", method, path[:100], e)
            return self._text(403, "Forbidden: reload the page and try again.")
        except StoreUnavailable as e:
            log.error("keybrake dashboard: store unavailable: %s", e)
            return self._text(503, "The store is unavailable; see /readyz.")

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
                return _redirect("/login", cookie=self._cookie(flow, "", max_age=0))
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
            return self._text(405, "Method not allowed")
        if method not in ("GET", "HEAD"):
            return self._text(405, "Method not allowed")
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
        return self._text(404, "No such page")

    # -- auth ------------------------------------------------------------------------------------
    def _login(self, flow: http.HTTPFlow) -> http.Response:
        try:
            form = _form(flow)
            self._check_origin(flow)
        except _Forbidden as e:
            log.warning("keybrake dashboard: refused sign-in: %s", e)
            return self._text(403, "Forbidden")
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
        return _redirect("/", cookie=self._cookie(flow, sid, max_age=int(SESSION_MAX)))

    def _cookie(self, flow: http.HTTPFlow, value: str, max_age: int) -> str:
        cookie = f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
        return cookie + "; Secure" if _https(flow) else cookie

    def _check_origin(self, flow: http.HTTPFlow) -> None:
        """Refuse cross-site POSTs (on top of the CSRF token and the SameSite cookie).

        The admin listener is a reverse proxy, which rewrites ``Host``: the browser's
        ``Sec-Fetch-Site`` is what tells a same-origin form from another site's.
        """
        site = flow.request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise _Forbidden(f"Sec-Fetch-Site: {site[:40]}")
        if flow.request.headers.get("origin") == "null":
            raise _Forbidden("Origin: null")

    def _check_post(self, flow: http.HTTPFlow, session: Session, form: dict[str, str]) -> None:
        self._check_origin(flow)
        token = form.get("csrf", "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise _Forbidden("missing or wrong CSRF token")

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
        except KeySpecError as e:
            now = rt.now()
            return self._page(
                "keys.html",
                {
                    "keys": await self._key_rows(now),
                    "now": now,
                    "span": _span,
                    "reveal": None,
                    "flash": [],
                    "errors": e.fields,
                    "values": form,
                    "vendors": self._vendors(),
                },
                session,
                status=422,
            )
        record, vault_key = await self._vault(await rt.open_store()).issue(request)
        # Post/redirect/get: a reload must not issue a second key; the key is shown once.
        session.reveal = {"key_id": record.key_id, "vault_key": vault_key}
        return _redirect("/dashboard/keys")

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
        return _redirect("/dashboard/keys")

    # -- overview --------------------------------------------------------------------------------
    async def _query(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        sink = self.runtime.audit_sink
        if sink is None:
            return []
        # The sinks are synchronous (SQLite, psycopg): keep them off the event loop.
        return await asyncio.to_thread(sink.query, sql, params)

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
        p = self.runtime.audit_sink.placeholder if self.runtime.audit_sink else "?"
        day, hour = audit_time(now - dt.timedelta(days=1)), audit_time(now - dt.timedelta(hours=1))
        refusals = await self._query(
            f"SELECT code, COUNT(*) AS n, "  # noqa: S608 (constant SQL, values are parameters)
            f"SUM(CASE WHEN ts >= {p} THEN 1 ELSE 0 END) AS last_hour, MAX(ts) AS last_ts "
            f"FROM audit WHERE outcome = 'refused' AND ts >= {p} GROUP BY code ORDER BY n DESC",
            [hour, day],
        )
        totals = await self._query(
            f"SELECT COUNT(*) AS calls, {SPENT_SQL} AS spent, "  # noqa: S608
            "SUM(CASE WHEN outcome = 'unknown' THEN 1 ELSE 0 END) AS unknown, "
            "SUM(CASE WHEN outcome = 'vendor_error' THEN 1 ELSE 0 END) AS vendor_errors "
            f"FROM audit WHERE ts >= {p}",
            [day],
        )
        recent = await self._query(
            "SELECT * FROM audit WHERE outcome IN ('refused', 'unknown', 'vendor_error') "  # noqa: S608
            f"AND ts >= {p} ORDER BY id DESC LIMIT 10",
            [day],
        )
        writer = self.runtime.audit_pump
        t = totals[0] if totals else {}
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
        sink = await self.runtime.flushed_audit_sink()
        p = sink.placeholder if sink else "?"
        rows = await self._query(
            f"SELECT label, substr(ts, 1, {width}) AS bucket, {SPENT_SQL} AS spent, "  # noqa: S608
            "COUNT(*) AS calls, SUM(CASE WHEN outcome = 'refused' THEN 1 ELSE 0 END) AS refusals "
            f"FROM audit WHERE ts >= {p} GROUP BY label, substr(ts, 1, {width})",
            [audit_time(start)],
        )
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
    def _page(
        self,
        template: str,
        context: dict[str, Any],
        session: Session | None = None,
        status: int = 200,
    ) -> http.Response:
        html = self.env.get_template(template).render(
            **context, session=session, csrf=session.csrf if session else ""
        )
        return http.Response.make(
            status,
            html.encode(),
            {"Content-Type": "text/html; charset=utf-8", **_security_headers()},
        )

    def _redirect_to(self, location: str) -> http.Response:
        return _redirect(location)

    @staticmethod
    def _text(status: int, text: str) -> http.Response:
        headers = {"Content-Type": "text/plain; charset=utf-8", **_security_headers()}
        return http.Response.make(status, text.encode(), headers)

    def _static_file(self, path: str) -> http.Response:
        name = path.removeprefix("/static/")
        suffix = name[name.rfind(".") :] if "." in name else ""
        if "/" in name or suffix not in STATIC_TYPES:
            return self._text(404, "No such file")
        if name not in self._static:
            try:
                self._static[name] = (
                    resources.files("keybrake.web").joinpath("static", name).read_bytes()
                )
            except (FileNotFoundError, IsADirectoryError):
                return self._text(404, "No such file")
        return http.Response.make(
            200,
            self._static[name],
            {
                "Content-Type": STATIC_TYPES[suffix],
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
            },
        )


def axis_ticks(peak: int, most: int = 5) -> list[int]:
    """Round ticks for an axis from 0 to at least ``peak`` micro-USD, at most ``most`` steps.

    A step is 1, 2 or 5 times a power of ten (of micro-USD), the smallest that covers
    ``peak`` in ``most`` steps; an empty chart gets one step of $1.

    >>> [t / 1_000_000 for t in axis_ticks(31_000_000)]
    [0.0, 10.0, 20.0, 30.0, 40.0]
    >>> [t / 1_000_000 for t in axis_ticks(2_300_000)]
    [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    >>> axis_ticks(0)
    [0, 1000000]
    """
    if peak <= 0:
        return [0, MICROS_PER_USD]
    power = 1
    while True:
        for mantissa in (1, 2, 5):
            step = mantissa * power
            n = -(-peak // step)  # ceiling division
            if n <= most:
                return [i * step for i in range(n + 1)]
        power *= 10


def tick_label(micros: int, step: int) -> str:
    """A tick's dollar amount with the decimals its axis needs: ``10``, ``0.50``, ``0.005``.

    >>> tick_label(20_000_000, 10_000_000), tick_label(1_500_000, 500_000)
    ('20', '1.50')
    >>> tick_label(4_000, 2_000), tick_label(2_000_000_000, 1_000_000_000)
    ('0.004', '2,000')
    """
    if step % MICROS_PER_USD == 0:
        return f"{micros // MICROS_PER_USD:,}"
    decimals = 2
    while step % 10 ** (6 - decimals):
        decimals += 1
    whole, fraction = divmod(micros, MICROS_PER_USD)
    return f"{whole:,}." + f"{fraction:06d}"[:decimals]


def spend_chart(rows: list[dict[str, Any]], buckets: list[str]) -> dict[str, Any]:
    """Stacked bars of spend per label per bucket, laid out for an inline SVG.

    The top seven labels by spend get their own colour; the rest are summed as "other".
    """
    totals: dict[str, int] = {}
    for r in rows:
        label = r["label"] or "(no key)"
        totals[label] = totals.get(label, 0) + int(r["spent"] or 0)
    ranked = sorted(totals, key=lambda lbl: -totals[lbl])
    top = ranked[:7]
    series = top + (["other"] if len(ranked) > 7 else [])
    cell: dict[tuple[str, str], int] = {}
    for r in rows:
        label = r["label"] or "(no key)"
        name = label if label in top else "other"
        cell[(name, r["bucket"])] = cell.get((name, r["bucket"]), 0) + int(r["spent"] or 0)
    per_bucket = [sum(cell.get((s, b), 0) for s in series) for b in buckets]
    ticks = axis_ticks(max(per_bucket, default=0))
    ceiling = ticks[-1]
    w, h, left, bottom, top_pad = 900, 260, 70, 30, 10
    plot_h = h - bottom - top_pad
    slot = (w - left - 10) / max(1, len(buckets))
    bars = []
    for i, b in enumerate(buckets):
        y = float(h - bottom)
        for j, s in enumerate(series):
            v = cell.get((s, b), 0)
            if not v:
                continue
            bh = max(1.0, v / ceiling * plot_h)
            y -= bh
            bars.append(
                {
                    "x": round(left + i * slot + slot * 0.1, 1),
                    "y": round(y, 1),
                    "w": round(slot * 0.8, 1),
                    "h": round(bh, 1),
                    "color": PALETTE[j % len(PALETTE)],
                    "title": f"{s} {b}: ${format_usd(v)}",
                }
            )
    every = max(1, len(buckets) // 8)
    xlabels = [
        {"x": round(left + i * slot + slot / 2, 1), "label": b[11:13] + "h" if "T" in b else b[5:]}
        for i, b in enumerate(buckets)
        if i % every == 0
    ]
    legend = [
        {"label": s, "color": PALETTE[j % len(PALETTE)], "spent": totals.get(s, 0)}
        for j, s in enumerate(series)
    ]
    if "other" in series:
        legend[-1]["spent"] = sum(totals[lbl] for lbl in ranked[7:])
    per_label = [
        {
            "label": lbl,
            "spent": totals[lbl],
            "calls": sum(int(r["calls"]) for r in rows if (r["label"] or "(no key)") == lbl),
            "refusals": sum(
                int(r["refusals"] or 0) for r in rows if (r["label"] or "(no key)") == lbl
            ),
        }
        for lbl in ranked
    ]
    return {
        "chart": {"w": w, "h": h, "left": left, "base": h - bottom, "bars": bars},
        "ticks": [
            {"y": round(h - bottom - plot_h * t / ceiling, 1), "label": tick_label(t, ticks[1])}
            for t in ticks
        ],
        "xlabels": xlabels,
        "legend": legend,
        "per_label": per_label,
        "total": sum(totals.values()),
    }


def _security_headers() -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "Content-Security-Policy": CSP,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }


def _redirect(location: str, cookie: str | None = None) -> http.Response:
    headers = {"Location": quote(location, safe="/?=&"), **_security_headers()}
    if cookie is not None:
        headers["Set-Cookie"] = cookie
    return http.Response.make(303, b"", headers)
