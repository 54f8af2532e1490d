"""The error contract: every refusal made by the proxy (DESIGN §3).

A refusal is a JSON body shaped like a Stripe error (so the stripe SDK exposes the response
headers to the caller), a stable ``error.code``, the ``X-Keybrake-Error`` header, and headers
that tell SDKs whether to retry: ``Stripe-Should-Retry`` (the stripe SDK obeys it before
looking at the status) and ``X-Should-Retry`` (Stainless-generated SDKs). Always "false",
except for `RETRY_SAFE` codes: the call never left the proxy, so a retry cannot charge twice.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keybrake.wire import CAP_HIT_HEADER, ERROR_HEADER, REFUSAL_STATUS, RETRY_SAFE

if TYPE_CHECKING:
    from mitmproxy import http

__all__ = ["Refusal", "refusal_response"]


class Refusal(Exception):
    """Raised inside the request pipeline; becomes a refusal response.

    >>> Refusal("endpoint_not_allowed", "POST /v1/refunds is not in this key's allowlist")
    Refusal('endpoint_not_allowed', ...)
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = REFUSAL_STATUS[code]
        self.extra = extra or {}
        self.headers = headers or {}


def refusal_response(refusal: Refusal) -> http.Response:
    """The HTTP response for a refusal.

    ``error.type`` is ``keybrake_error`` and ``error.message`` is set, which is what the stripe
    SDK needs to build a typed error carrying ``e.headers``.
    """
    error: dict[str, Any] = {
        "type": "keybrake_error",
        "code": refusal.code,
        "message": refusal.message,
    }
    error.update(refusal.extra)
    payload = {
        "error": error,
        # The same facts at the top level, where the Twilio (code, message) and Resend
        # (statusCode, name, message) SDKs look for them.
        "code": refusal.code,
        "message": refusal.message,
        "statusCode": refusal.status,
        "name": refusal.code,
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    retry = "true" if refusal.code in RETRY_SAFE else "false"
    headers = {
        "Content-Type": "application/json",
        ERROR_HEADER: refusal.code,
        "Stripe-Should-Retry": retry,
        "X-Should-Retry": retry,
        "Cache-Control": "no-store",
    }
    if refusal.code == "cap_exhausted":
        headers[CAP_HIT_HEADER] = "true"
    headers.update(refusal.headers)
    # Imported here: the command line reads `Refusal` without loading mitmproxy.
    from mitmproxy.http import Response

    return Response.make(refusal.status, body, headers)
