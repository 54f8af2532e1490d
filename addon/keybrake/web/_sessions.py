"""Dashboard sign-in sessions and the checks on every state-changing request.

Sessions live in memory (idle timeout `SESSION_IDLE`, absolute `SESSION_MAX`) behind an
``HttpOnly; SameSite=Strict`` cookie, ``Secure`` when the dashboard is reached over HTTPS;
restarting the proxy signs everyone out. A POST must carry the session's CSRF token and come
from the dashboard's own origin (`check_post`).
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import time
from urllib.parse import parse_qsl

from mitmproxy import http

__all__ = [
    "MAX_FORM",
    "SESSION_COOKIE",
    "SESSION_IDLE",
    "SESSION_MAX",
    "Forbidden",
    "Session",
    "Sessions",
    "check_origin",
    "check_post",
    "cookies",
    "form_of",
    "session_cookie",
]

SESSION_COOKIE = "keybrake_session"
SESSION_IDLE = 3600.0
SESSION_MAX = 12 * 3600.0
MAX_SESSIONS = 1000
MAX_FORM = 16 * 1024


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


class Forbidden(Exception):
    """A state-changing request without a valid CSRF token or from another origin."""


def cookies(flow: http.HTTPFlow) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in flow.request.headers.get_all("cookie"):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            out.setdefault(name, value)
    return out


def form_of(flow: http.HTTPFlow) -> dict[str, str]:
    raw = flow.request.raw_content or b""
    if len(raw) > MAX_FORM:
        raise Forbidden("form too large")
    text = raw.decode("utf-8", "replace")
    return dict(parse_qsl(text, keep_blank_values=True))


def _https(flow: http.HTTPFlow) -> bool:
    proto = flow.request.headers.get("x-forwarded-proto", "").lower()
    return bool(flow.client_conn.tls_established) or proto == "https"


def session_cookie(flow: http.HTTPFlow, value: str, max_age: int) -> str:
    """The ``Set-Cookie`` value of a session id (``max_age=0`` signs out)."""
    cookie = f"{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    return cookie + "; Secure" if _https(flow) else cookie


def check_origin(flow: http.HTTPFlow) -> None:
    """Refuse cross-site POSTs (on top of the CSRF token and the SameSite cookie).

    The admin listener is a reverse proxy, which rewrites ``Host``: the browser's
    ``Sec-Fetch-Site`` is what tells a same-origin form from another site's.
    """
    site = flow.request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(f"Sec-Fetch-Site: {site[:40]}")
    if flow.request.headers.get("origin") == "null":
        raise Forbidden("Origin: null")


def check_post(flow: http.HTTPFlow, session: Session, form: dict[str, str]) -> None:
    """A state-changing request: same origin, and the session's CSRF token."""
    check_origin(flow)
    token = form.get("csrf", "")
    if not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise Forbidden("missing or wrong CSRF token")
