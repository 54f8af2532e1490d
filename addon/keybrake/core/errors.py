"""The error contract: every refusal made by the proxy (DESIGN §3).

A refusal is a JSON body shaped like a Stripe error (so the stripe SDK exposes the response
headers to the caller), a stable ``error.code``, the ``X-Keybrake-Error`` header, and headers
that tell SDKs whether to retry: ``Stripe-Should-Retry`` (the stripe SDK obeys it before
looking at the status) and ``X-Should-Retry`` (Stainless-generated SDKs). Always "false",
except for `RETRY_SAFE` codes: the call never left the proxy, so a retry cannot charge twice.
"""

from __future__ import annotations

import json
from typing import Any, Final

from mitmproxy import http

__all__ = ["REFUSAL_STATUS", "RETRY_SAFE", "Refusal", "refusal_response"]

REFUSAL_STATUS: Final[dict[str, int]] = {
    "vault_key_missing": 401,
    "vault_key_unknown": 401,
    "vault_key_revoked": 401,
    "vault_key_expired": 401,
    "admin_token_invalid": 401,
    "metrics_token_invalid": 401,
    "raw_secret_refused": 403,
    "endpoint_not_allowed": 403,
    "unpriced_endpoint": 403,
    "ambiguous_amount": 403,
    "unknown_currency": 403,
    "path_rejected": 403,
    "host_mismatch": 403,
    "credential_ambiguous": 403,
    "vault_key_in_query": 403,
    "account_mismatch": 403,
    "vendor_mismatch": 403,
    "egress_denied": 403,
    "unpriced_parameter": 403,
    "object_not_owned": 403,
    "key_suspended": 403,
    "tls_required": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "idempotency_in_flight": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "headers_too_large": 431,
    "invalid_request": 422,
    "output_limit_required": 422,
    "idempotency_mismatch": 422,
    "cap_exhausted": 429,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "upstream_unreachable": 502,
    "upstream_failed": 502,
    "store_unavailable": 503,
    "secret_unavailable": 503,
    "clock_skewed": 503,
    "internal_error": 503,
}
RETRY_SAFE: Final = frozenset({"upstream_unreachable"})
"""Codes whose answer says "retry": nothing reached the vendor and nothing stays counted."""


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
        "X-Keybrake-Error": refusal.code,
        "Stripe-Should-Retry": retry,
        "X-Should-Retry": retry,
        "Cache-Control": "no-store",
    }
    if refusal.code == "cap_exhausted":
        headers["X-Keybrake-Cap-Hit"] = "true"
    headers.update(refusal.headers)
    return http.Response.make(refusal.status, body, headers)
