"""The dashboard's HTTP answers: pages, plain text, redirects and its static files, each
with the security headers (a strict CSP: no inline script, no other origin)."""

from __future__ import annotations

from importlib import resources
from urllib.parse import quote

from mitmproxy import http

__all__ = ["CSP", "STATIC_TYPES", "StaticFiles", "html", "redirect", "security_headers", "text"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def security_headers() -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "Content-Security-Policy": CSP,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }


def redirect(location: str, cookie: str | None = None) -> http.Response:
    headers = {"Location": quote(location, safe="/?=&"), **security_headers()}
    if cookie is not None:
        headers["Set-Cookie"] = cookie
    return http.Response.make(303, b"", headers)


def html(status: int, page: str) -> http.Response:
    return http.Response.make(
        status, page.encode(), {"Content-Type": "text/html; charset=utf-8", **security_headers()}
    )


def text(status: int, body: str) -> http.Response:
    headers = {"Content-Type": "text/plain; charset=utf-8", **security_headers()}
    return http.Response.make(status, body.encode(), headers)


class StaticFiles:
    """``/static/NAME``: the package's ``web/static`` files, read once, by name only."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}

    def serve(self, path: str) -> http.Response:
        name = path.removeprefix("/static/")
        suffix = name[name.rfind(".") :] if "." in name else ""
        if "/" in name or suffix not in STATIC_TYPES:
            return text(404, "No such file")
        if name not in self._files:
            try:
                self._files[name] = (
                    resources.files("keybrake.web").joinpath("static", name).read_bytes()
                )
            except (FileNotFoundError, IsADirectoryError):
                return text(404, "No such file")
        return http.Response.make(
            200,
            self._files[name],
            {
                "Content-Type": STATIC_TYPES[suffix],
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
            },
        )
