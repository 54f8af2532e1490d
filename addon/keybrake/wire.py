"""The wire contract the proxy and its clients share: header names and refusal codes.

Standard library only, and importable on every Python the worker side supports: the proxy
(`keybrake.core.errors`, `keybrake.proxy`) writes these, the worker side (`keybrake.client`,
`keybrake.integrations`) reads them. A refusal is a JSON body with a stable ``error.code``
(one of `REFUSAL_STATUS`), the same code in `ERROR_HEADER`, and ``CAP_HIT_HEADER: true``
when the code is ``cap_exhausted`` (DESIGN §3).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACTOR_HEADER",
    "CAP_HIT_HEADER",
    "ERROR_HEADER",
    "HEADER_PREFIX",
    "IDEMPOTENCY_KEY_HEADER",
    "LIVE_HEADER",
    "MESSAGE_ID_HEADER",
    "REFUSAL_STATUS",
    "REMAINING_USD_HEADER",
    "REPLAYED_HEADER",
    "RETRYABLE_CODES",
    "RETRY_SAFE",
    "SPENT_USD_HEADER",
]

HEADER_PREFIX: Final = "x-keybrake-"
"""Every header of this contract starts so; the proxy strips them all before the vendor."""

# Sent by workers (the proxy records them in the audit row and strips them).
ACTOR_HEADER: Final = "X-Keybrake-Actor"
MESSAGE_ID_HEADER: Final = "X-Keybrake-Message-Id"
IDEMPOTENCY_KEY_HEADER: Final = "X-Keybrake-Idempotency-Key"
"""The idempotency key of a vendor whose API has none of its own."""
LIVE_HEADER: Final = "X-Keybrake-Live"
"""Set by the dashboard's live view polling (never counted as a user request)."""

# Sent by the proxy.
ERROR_HEADER: Final = "X-Keybrake-Error"
CAP_HIT_HEADER: Final = "X-Keybrake-Cap-Hit"
REPLAYED_HEADER: Final = "X-Keybrake-Replayed"
SPENT_USD_HEADER: Final = "X-Keybrake-Spent-Usd"
REMAINING_USD_HEADER: Final = "X-Keybrake-Remaining-Usd"

REFUSAL_STATUS: Final[dict[str, int]] = {
    "vault_key_missing": 401,
    "vault_key_unknown": 401,
    "vault_key_revoked": 401,
    "vault_key_expired": 401,
    "admin_token_invalid": 401,
    "issuer_token_revoked": 401,
    "issuer_token_expired": 401,
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
    "issuer_scope": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "idempotency_in_flight": 409,
    "label_tree_conflict": 409,
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
    "vendor_frozen": 503,
    "internal_error": 503,
}
"""Every refusal code and its HTTP status. ``issuer_scope``: an issuer token asked for something
outside its scope or limits (``error.fields`` names each field). ``vendor_frozen``: an operator
froze every call to the vendor; a 503 that is never retried (it lasts until lifted).
``label_tree_conflict``: a key was asked for with a label whose keys are in another budget
tree (minted by another issuer token, or by the operator when the caller is an issuer, or the
other way round): a label's spend is never split between two trees."""

RETRY_SAFE: Final = frozenset({"upstream_unreachable"})
"""Codes whose answer says "retry" (``Stripe-Should-Retry``/``X-Should-Retry: true``):
nothing reached the vendor and nothing stays counted."""

RETRYABLE_CODES: Final = frozenset(
    {
        "store_unavailable",
        "internal_error",
        "idempotency_in_flight",
        "rate_limited",
        "upstream_unreachable",
        "upstream_failed",
    }
)
"""Refusals that may succeed later; every other one (cap hit, revoked or expired key, endpoint
not allowed, ...) fails the same way on every retry. ``upstream_unreachable``: nothing was
sent. ``upstream_failed`` is a timeout by another name: the retry is as safe as the call's
idempotency key."""
