"""The `VaultGuard` addon: every vendor call passes its checks or is refused.

Request hook, in order (DESIGN §2): vendor → credential → key state → request rate →
allowlist → price → reserve → swap the real secret in and forward. Response hook: settle the
reservation to the actual cost, add the spend headers, and redact credentials before anything
shows the flow.
Hooks never raise: any internal error becomes a ``503`` refusal, never a forwarded request.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

from mitmproxy import http, tcp
from mitmproxy.proxy.mode_specs import ReverseMode

from keybrake._followup import PriceFollowup
from keybrake._idempotency import (
    body_fingerprint,
    replay_response,
    stored_from,
    vendor_idempotency_key,
)
from keybrake._limiter import FailureLimiter, source_of
from keybrake._money import MoneyError, format_usd, minor_to_micro_usd
from keybrake._paths import (
    EndpointPattern,
    NormalizedPath,
    PathRejected,
    match_any,
    normalize_method,
    normalize_path,
    split_base_url,
)
from keybrake.core import Runtime
from keybrake.credentials import (
    Presented,
    authorization_for,
    extract_credential,
    matches_raw_secret,
)
from keybrake.errors import Refusal, refusal_response
from keybrake.keys import VAULT_KEY_PREFIX, hash_vault_key, looks_like_vault_key
from keybrake.policy import EndpointPolicy, FixedCost, HoldRule, VendorPolicy, _parse_pattern
from keybrake.pricing import (
    Body,
    Estimate,
    actual_cost,
    check_parameters,
    estimate_cost,
    hold_amount,
    parse_body,
    releases_hold,
    values_at,
)
from keybrake.store import (
    BudgetState,
    KeyRecord,
    ObjectOwner,
    ReserveResult,
    Store,
    StoreUnavailable,
)

__all__ = ["CallState", "VaultGuard"]

log = logging.getLogger("keybrake")

META = "keybrake"
IN_FLIGHT_SECONDS = 300
# Larger answers are not kept for replay (the vendor's own idempotency still applies): what
# one key can make the store hold is bounded by this times keybrake_max_idempotency_entries.
MAX_STORED_RESPONSE = 256 * 1024
MAX_VENDOR_BODY = 1024 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
# "next_page_uri": "https://api.twilio.com/2010-04-01/..." (a JSON member holding a link)
_VENDOR_LINK = re.compile(
    rb'"(?P<key>[A-Za-z0-9_]+_ur(?P<kind>[il]))"\s*:\s*"https://(?P<host>[A-Za-z0-9.-]+)'
    rb'(?P<path>/[^"\\]*)"'
)
# Vendor statuses that mean "refused, nothing charged": the reservation is released.
VENDOR_REFUSED = frozenset({400, 401, 402, 403, 404, 409, 422, 429})
REDACTED = "[redacted by keybrake]"
# Methods that change nothing at the vendor.
_READS = frozenset({"GET", "HEAD"})


@dataclass
class CallState:
    """What the guard knows about one vendor call; kept in ``flow.metadata["keybrake"]``."""

    vendor: str
    started: float = field(default_factory=time.monotonic)
    method: str = ""
    path: str = ""
    key_id: str | None = None
    label: str | None = None
    key: KeyRecord | None = None
    outcome: str = "pending"
    code: str | None = None
    reservation_id: str | None = None
    # Holds of the object this call acts on, used instead of a new reservation.
    holds: tuple[str, ...] = ()
    held_for: str | None = None
    held_micros: int = 0
    # What stays held for the object after the vendor's answer (None: nothing held).
    kept_held: int | None = None
    estimate: Estimate | None = None
    endpoint: EndpointPolicy | None = None
    budgets: tuple[BudgetState, ...] = ()
    actual_micros: int | None = None
    note: str = ""
    status: int | None = None
    actor: str | None = None
    message_id: str | None = None
    idempotency_key: str | None = None
    vendor_idempotency_key: str | None = None
    # Expansions the worker asked for in its body, and those the proxy added.
    body_expand: tuple[str, ...] = ()
    expanded: tuple[str, ...] = ()
    idem_scope: str | None = None
    vendor_request_id: str | None = None
    object_id: str | None = None
    amount_minor: int | None = None
    currency: str | None = None
    latency_ms: float | None = None
    audited: bool = False
    # Base-URL mode: where the client reached us, to keep vendor links on the proxy.
    client_base: str | None = None

    def breadcrumb(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "key_id": self.key_id,
            "label": self.label,
            "outcome": self.outcome,
            "code": self.code,
            "estimate_micros": self.estimate.micros if self.estimate else None,
            "actual_micros": self.actual_micros,
        }


def _route(rt: Runtime, flow: http.HTTPFlow) -> tuple[VendorPolicy, str] | None:
    """The vendor policy a flow belongs to and the request target to check, or None.

    Forward proxy: the destination host. Base-URL listener: ``/{vendor}/...``.
    """
    if rt.policies is None:
        return None
    if isinstance(flow.client_conn.proxy_mode, ReverseMode):
        first, target = split_base_url(flow.request.path)
        policy = rt.policies.vendors.get(first)
        if policy is None:
            return None
        return policy, target
    policy = rt.policies.for_host(flow.request.host)
    if policy is not None:
        return policy, flow.request.path
    # Not a vendor destination; but if SNI or Host names a vendor, someone is trying to get
    # a vendor-bound request past the checks: treat it as that vendor's (and refuse below).
    for name in (flow.client_conn.sni, flow.request.host_header):
        if name and (claimed := rt.policies.for_host(_host_only(name))) is not None:
            return claimed, flow.request.path
    return None


def _cap_refusal(result: ReserveResult, needed_micros: int) -> Refusal:
    b = result.exceeded
    assert b is not None
    return Refusal(
        "cap_exhausted",
        f"spend cap reached for {b.scope} ({b.window}): this call needs "
        f"${format_usd(needed_micros)}, ${format_usd(b.remaining_micros or 0)} remains",
        extra={
            "budget": b.scope,
            "window": b.window,
            "cap_usd": format_usd(b.cap_micros or 0),
            "spent_usd": format_usd(b.spent_micros + b.reserved_micros),
            "remaining_usd": format_usd(b.remaining_micros or 0),
            "needed_usd": format_usd(needed_micros),
        },
    )


def _may_use(owner: ObjectOwner | None, key: KeyRecord) -> bool:
    """Whether ``key`` may act on an object ``owner`` created (None: never seen made)."""
    if owner is None:
        return False
    if owner.key_id == key.key_id:
        return True
    return (
        key.share_objects == "label"
        and bool(key.agent_run_label)
        and owner.label == key.agent_run_label
    )


def _not_owned(key: KeyRecord, object_id: str) -> Refusal:
    return Refusal(
        "object_not_owned",
        f"{object_id[:64]} was not created through the proxy by vault key {key.key_id}; "
        "another key's objects (or ones the proxy never saw made) need their id, or '*', in "
        "the key's allowed_endpoints",
    )


def _header_text(value: str | None, limit: int = 200) -> str | None:
    """A worker-supplied header value, printable and bounded, for the audit log."""
    if not value:
        return None
    return "".join(ch for ch in value if ch.isprintable())[:limit] or None


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(content, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _host_only(value: str) -> str:
    """The host of ``host[:port]``; anything else is returned whole (and will not match)."""
    if value.startswith("["):
        return value.split("]")[0] + "]"
    host, sep, port = value.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else value


def _mentions_vault_key(text: str) -> bool:
    """True if a vault key prefix appears in ``text`` under any layers of %-encoding."""
    for _ in range(4):
        if VAULT_KEY_PREFIX in text.lower():
            return True
        decoded = unquote_plus(text)
        if decoded == text:
            return False
        text = decoded
    return True  # four layers of encoding: refuse rather than guess


class VaultGuard:
    """Checks, prices, reserves and swaps credentials on vendor calls."""

    name = "keybrake_guard"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.key_failures = FailureLimiter()
        self.followup = PriceFollowup(runtime, self._settle_read)

    def done(self) -> None:
        self.followup.close()

    # -- request -----------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse oversized vendor requests before their body is buffered."""
        if flow.response or flow.error or not flow.live:
            return
        route = _route(self.runtime, flow)
        if route is None:
            return
        length = flow.request.headers.get("content-length", "")
        too_big = not length.isdigit() and "content-length" in flow.request.headers
        too_big = too_big or (length.isdigit() and int(length) > MAX_VENDOR_BODY)
        fields = flow.request.headers.fields
        header_bytes = sum(len(k) + len(v) for k, v in fields)
        refusal = None
        if too_big:
            refusal = Refusal(
                "body_too_large", f"vendor requests are limited to {MAX_VENDOR_BODY} bytes"
            )
        elif len(fields) > MAX_HEADERS or header_bytes > MAX_HEADER_BYTES:
            refusal = Refusal(
                "headers_too_large",
                f"vendor requests are limited to {MAX_HEADERS} headers and {MAX_HEADER_BYTES} "
                "bytes of headers",
            )
        if refusal is not None:
            call = CallState(vendor=route[0].vendor)
            flow.metadata[META] = call
            self.runtime.inflight.add(flow)
            self._refuse(flow, call, refusal)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        route = _route(self.runtime, flow)
        if route is None:
            if isinstance(flow.client_conn.proxy_mode, ReverseMode):
                # Claimed by neither the admin API nor a vendor route: the admin listener's
                # placeholder upstream must never be reached.
                flow.response = refusal_response(
                    Refusal("not_found", "no such admin route or vendor")
                )
            return
        policy, target = route
        call = CallState(vendor=policy.vendor)
        flow.metadata[META] = call
        self.runtime.inflight.add(flow)
        if isinstance(flow.client_conn.proxy_mode, ReverseMode) and flow.request.host_header:
            scheme = "https" if flow.client_conn.tls_established else "http"
            call.client_base = f"{scheme}://{flow.request.host_header}/{policy.vendor}"
        try:
            await self._admit(flow, policy, target, call)
        except Refusal as r:
            await self._abandon(call)
            self._refuse(flow, call, r)
        except StoreUnavailable as e:
            log.error("keybrake: store unavailable: %s", e)
            await self._abandon(call)
            self._refuse(
                flow,
                call,
                Refusal(
                    "store_unavailable", "the budget store is unavailable; nothing was forwarded"
                ),
            )
        except Exception:
            log.exception("keybrake: internal error in request hook (request refused)")
            await self._abandon(call)
            self._refuse(
                flow,
                call,
                Refusal("internal_error", "internal error in keybrake; nothing was forwarded"),
            )

    async def _admit(
        self, flow: http.HTTPFlow, policy: VendorPolicy, target: str, call: CallState
    ) -> None:
        req = flow.request
        if len(req.raw_content or b"") > MAX_VENDOR_BODY:
            # Chunked bodies carry no Content-Length for requestheaders to check.
            raise Refusal(
                "body_too_large", f"vendor requests are limited to {MAX_VENDOR_BODY} bytes"
            )
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode):
            self._check_host_consistency(flow, policy)
        try:
            method = normalize_method(req.method)
            path = normalize_path(target)
        except PathRejected as e:
            raise Refusal("path_rejected", f"request target refused: {e}") from None
        call.method, call.path = method, path.path
        call.actor = _header_text(req.headers.get("x-keybrake-actor"))
        call.message_id = _header_text(req.headers.get("x-keybrake-message-id"))
        if _mentions_vault_key(path.query) or _mentions_vault_key(req.path):
            raise Refusal("vault_key_in_query", "a vault key must not be sent in the URL")
        try:
            key, presented = await self._authenticate(policy, req, call)
        except Refusal as r:
            if r.code in ("vault_key_unknown", "raw_secret_refused", "vault_key_missing"):
                # Only requests whose key does not verify are limited: an address shared by
                # many workers (NAT, a sidecar, a load balancer) keeps working for valid keys
                # while a neighbour guesses.
                source = source_of(flow)
                if self.key_failures.blocked(source):
                    raise Refusal(
                        "rate_limited",
                        "too many requests with invalid vault keys from this address; retry "
                        "in a minute",
                    ) from None
                self.key_failures.record(source)
            raise
        self._check_accounts(policy, key, req)
        await self._forward(flow, policy, key, presented, method, path, call)

    @staticmethod
    def _check_accounts(policy: VendorPolicy, key: KeyRecord, req: http.Request) -> None:
        """Headers that switch the vendor account (Stripe Connect) only name accounts the
        key lists; otherwise the key could act on every connected account."""
        for name in policy.account_headers:
            values = req.headers.get_all(name)
            if not values:
                continue
            if len(values) > 1 or values[0].strip() not in key.allowed_accounts:
                raise Refusal(
                    "account_mismatch",
                    f"{name} names an account vault key {key.key_id} may not act on",
                )

    async def _authenticate(
        self, policy: VendorPolicy, req: http.Request, call: CallState
    ) -> tuple[KeyRecord, Presented]:
        """The active vault key presented on the request (looked up by its SHA-256)."""
        rt = self.runtime
        presented = extract_credential(policy.auth, req.headers.get_all("authorization"))
        if rt.secrets[policy.vendor].is_real_secret(presented.credential) or matches_raw_secret(
            policy.auth, presented.credential
        ):
            raise Refusal(
                "raw_secret_refused",
                "a real vendor secret was sent to the proxy; workers must use a vault key",
            )
        if not looks_like_vault_key(presented.credential):
            raise Refusal("vault_key_unknown", "the credential is not a Keybrake vault key")
        store = await rt.open_store()
        if (problem := rt.clock_problem()) is not None:
            raise Refusal("clock_skewed", problem)
        key = await store.get_key_by_secret_hash(hash_vault_key(presented.credential))
        if key is None:
            raise Refusal("vault_key_unknown", "unknown vault key")
        call.key_id, call.label, call.key = key.key_id, key.agent_run_label, key
        state = key.state(rt.now())
        if state == "revoked":
            raise Refusal("vault_key_revoked", f"vault key {key.key_id} was revoked")
        if state == "expired":
            raise Refusal(
                "vault_key_expired",
                f"vault key {key.key_id} expired at {key.expires_at.isoformat()}",
            )
        if state == "suspended":
            raise Refusal(
                "key_suspended",
                f"vault key {key.key_id} is suspended ({key.suspended_reason}); an operator "
                "can resume it",
            )
        if key.vendor != policy.vendor:
            raise Refusal(
                "vendor_mismatch",
                f"vault key {key.key_id} is for {key.vendor}, not {policy.vendor}",
            )
        return key, presented

    async def _forward(
        self,
        flow: http.HTTPFlow,
        policy: VendorPolicy,
        key: KeyRecord,
        presented: Presented,
        method: str,
        path: NormalizedPath,
        call: CallState,
    ) -> None:
        """Allowlist, price, idempotency, reserve; then swap the real secret in."""
        rt = self.runtime
        req = flow.request
        secrets_ = rt.secrets[policy.vendor]
        store = await rt.open_store()
        now = rt.now()
        if (limit := key.max_requests_per_minute) is not None:
            # Every request made with the key counts, paid or free: a runaway loop must not
            # use up the vendor account's own rate limit, which every other worker shares.
            rate = await store.count_request(key.key_id, limit, now)
            if not rate.ok:
                wait = rate.retry_after_seconds
                raise Refusal(
                    "rate_limited",
                    f"vault key {key.key_id} is limited to {limit} requests per minute; "
                    f"retry in {wait}s",
                    extra={"max_requests_per_minute": limit, "retry_after_s": wait},
                    headers={"Retry-After": str(wait)},
                )
        allowed = [_parse_pattern(p) for p in key.allowed_endpoints]
        granted = match_any(allowed, method, path)
        if granted is None:
            raise Refusal(
                "endpoint_not_allowed",
                f"{method} {path.path} is not in the allowlist of vault key {key.key_id}",
            )
        endpoint, params = self._endpoint_for(policy, method, path.segments)
        call.endpoint = endpoint
        if endpoint is not None:
            await self._check_path_owner(store, policy, endpoint, key, granted, params)

        new_path = self._rewrite_account(
            policy, path.segments, presented.username, secrets_.account
        )
        if secrets_.missing:
            raise Refusal(
                "secret_unavailable",
                f"the proxy has no real {policy.vendor} secret: set {', '.join(secrets_.missing)}",
            )

        if path.query and method not in _READS and not (endpoint is not None and endpoint.query):
            # Stripe merges query parameters into the body's: a priced call's parameters are
            # read from its body only, so anything in the query would be unpriced.
            raise Refusal(
                "unpriced_parameter",
                f"{method} {path.path} takes its parameters in the body; the query string "
                "is refused",
            )
        accepted = endpoint.body_types(policy) if endpoint is not None else policy.body
        body = parse_body(accepted, req.headers.get_all("content-type"), req.raw_content or b"")
        if endpoint is not None and endpoint.expand and body.kind == "form":
            call.body_expand = tuple(str(v) for v in body.get_list("expand"))
        if endpoint is not None:
            await self._check_field_owners(store, policy, endpoint, key, body)
            # One key must not fill the store every key shares with objects it owns.
            if (
                endpoint.creates
                and method not in _READS
                and await store.count_objects(key.key_id) >= self.runtime.max_objects_per_key
            ):
                raise Refusal(
                    "quota_exceeded",
                    f"vault key {key.key_id} owns {self.runtime.max_objects_per_key} "
                    "objects already; issue a new key for more",
                )

        async def recall(object_id: str) -> int | None:
            return await store.recall_amount(key.key_id, policy.vendor, object_id)

        if endpoint is None:
            estimate = Estimate(0, basis="free")
        else:
            estimate = await estimate_cost(policy, endpoint, body, params, recall)
            # After pricing, so a body of the wrong shape is refused as such first.
            check_parameters(endpoint, body)
        call.estimate = estimate
        call.amount_minor, call.currency = estimate.amount_minor, estimate.currency

        if await self._idempotency_begin(flow, policy, endpoint, key, method, path.path, call):
            return

        if endpoint is not None and endpoint.hold is not None:
            held_for = params.get(endpoint.hold.param)
            if held_for and await self._adopt_holds(store, policy, key, held_for, call):
                self._swap(flow, policy, presented, method, new_path, path.query, call)
                return
        if estimate.basis == "free":
            # Free calls (reads) move no money: no reservation, no cap check.
            self._swap(flow, policy, presented, method, new_path, path.query, call)
            return
        reservation_id = f"res_{secrets.token_hex(12)}"
        result = await store.reserve(key, reservation_id, estimate.micros, now)
        call.budgets = result.budgets
        if not result.ok:
            raise _cap_refusal(result, estimate.micros)
        call.reservation_id = reservation_id
        self._swap(flow, policy, presented, method, new_path, path.query, call)

    async def _check_path_owner(
        self,
        store: Store,
        policy: VendorPolicy,
        endpoint: EndpointPolicy,
        key: KeyRecord,
        granted: EndpointPattern,
        params: dict[str, str],
    ) -> None:
        """A call naming an object in its path acts on it: it must be the key's own (or its
        label's, when the key shares by label), or named in the key's allowlist by its id, or
        reached through an allowlist entry that marks the segment shared (``*``)."""
        owned = endpoint.owned_segment(policy)
        if owned is None or not (object_id := params.get(owned[0])):
            return
        segment = granted.segments[owned[1]]
        if segment == "*" or not segment.startswith("{"):
            return  # shared, or this very object named by the operator
        if not _may_use(await store.object_owner(policy.vendor, object_id), key):
            raise _not_owned(key, object_id)

    @staticmethod
    async def _check_field_owners(
        store: Store, policy: VendorPolicy, endpoint: EndpointPolicy, key: KeyRecord, body: Body
    ) -> None:
        """Objects named in the body (a refund's charge, a payment's customer) must not be
        another key's; objects the proxy never saw made (existing customers) may be used."""
        for name in endpoint.owned_fields:
            value = body.get_node(name)
            for object_id in value if isinstance(value, list) else [value]:
                if not isinstance(object_id, str) or not object_id:
                    continue
                owner = await store.object_owner(policy.vendor, object_id)
                if owner is not None and not _may_use(owner, key):
                    raise _not_owned(key, object_id)

    async def _adopt_holds(
        self, store: Store, policy: VendorPolicy, key: KeyRecord, object_id: str, call: CallState
    ) -> bool:
        """Use the key's holds on ``object_id`` for this call instead of a new reservation.

        The holds already reserve what the object can charge; a charging call on it (a
        confirm, a capture, an update that raises its amount) only needs the difference,
        checked against the cap in the budgets the hold lives in. False: no holds.
        """
        assert call.estimate is not None
        holds = [h for h in await store.holds(policy.vendor, object_id) if h.key_id == key.key_id]
        if not holds:
            return False
        held = sum(h.amount_micros for h in holds)
        first = holds[0]
        # Raised by what the call needs beyond the holds (often nothing: the answer then
        # only carries the budgets for the spend headers).
        result = await store.raise_hold(
            first.reservation_id,
            first.amount_micros + max(0, call.estimate.micros - held),
            key,
        )
        call.budgets = result.budgets
        if not result.ok:
            if not result.budgets:  # finished meanwhile: start over with a reservation
                return False
            raise _cap_refusal(result, call.estimate.micros - held)
        call.holds = tuple(h.reservation_id for h in holds)
        call.held_for = object_id
        call.held_micros = max(held, call.estimate.micros)
        return True

    def _swap(
        self,
        flow: http.HTTPFlow,
        policy: VendorPolicy,
        presented: Presented,
        method: str,
        new_path: str,
        query: str,
        call: CallState,
    ) -> None:
        """The real secret goes in, every Keybrake header comes out, the checked path goes out."""
        req = flow.request
        secrets_ = self.runtime.secrets[policy.vendor]
        for name in [h for h in req.headers if h.lower().startswith("x-keybrake-")]:
            del req.headers[name]
        req.headers["Authorization"] = authorization_for(presented, secrets_)
        worker_idem = req.headers.get(policy.idempotency_header or "")
        if policy.idempotency_header and worker_idem:
            # Vendors scope idempotency keys to the whole account: namespaced per vault key, a
            # worker can neither read another key's stored answer nor poison a key another
            # worker is about to use. Deterministic, so the vendor still deduplicates retries.
            call.vendor_idempotency_key = vendor_idempotency_key(call.key_id, worker_idem[:255])
            req.headers[policy.idempotency_header] = call.vendor_idempotency_key
        query = self._ask_for_expansions(req, method, query, call)
        # Forward exactly what was checked: method, origin-form path, vendor host over TLS.
        req.method = method
        req.authority = ""
        req.path = new_path + (f"?{query}" if query else "")
        if policy.upstream is not None:
            scheme, _, hostport = policy.upstream.url.partition("://")
            host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
            req.scheme = scheme
            req.host = host
            req.port = int(port) if port else (443 if scheme == "https" else 80)
        else:
            # Never plain HTTP: a cleartext request to the proxy still leaves over TLS.
            if isinstance(flow.client_conn.proxy_mode, ReverseMode):
                req.host = policy.hosts[0]
            req.scheme, req.port = "https", 443
        call.outcome = "forwarded"
        flow.metadata[META] = call

    @staticmethod
    def _ask_for_expansions(req: http.Request, method: str, query: str, call: CallState) -> str:
        """Ask the vendor to expand what states the charge (a subscription's latest_invoice)
        when the worker did not: the answer is collapsed back before the worker sees it.
        Returns the query string to forward."""
        endpoint = call.endpoint
        if endpoint is None or not endpoint.expand:
            return query
        asked = {v for k, v in parse_qsl(query) if k.startswith("expand")}
        if method not in _READS:
            asked |= set(call.body_expand)
        added = tuple(f for f in endpoint.expand if f not in asked)
        if not added:
            return query
        call.expanded = added
        extra = urlencode([("expand[]", f) for f in added])
        if method in _READS:
            return f"{query}&{extra}" if query else extra
        body = req.raw_content or b""
        req.content = body + (b"&" if body else b"") + extra.encode()
        return query

    async def _idempotency_begin(
        self,
        flow: http.HTTPFlow,
        policy: VendorPolicy,
        endpoint: EndpointPolicy | None,
        key: KeyRecord,
        method: str,
        path: str,
        call: CallState,
    ) -> bool:
        """Claim the call's idempotency scope; True when it was answered from the cache.

        The scope is the vendor's idempotency header (Stripe/Resend ``Idempotency-Key``), else
        ``X-Keybrake-Idempotency-Key``, else the body itself for endpoints with ``dedupe``.
        """
        rt = self.runtime
        if method in _READS:
            return False  # reads change nothing: the vendor replays nothing, neither do we
        headers = flow.request.headers
        idem = None
        if policy.idempotency_header:
            idem = headers.get(policy.idempotency_header)
        idem = idem or headers.get("x-keybrake-idempotency-key")
        body = flow.request.raw_content or b""
        fingerprint = body_fingerprint(method, path, body)
        ttl = rt.idempotency_ttl_seconds
        if idem:
            call.idempotency_key = idem[:255]
        if endpoint is not None and endpoint.dedupe is not None:
            # Content dedupe wins over a header: some SDKs send a random key per call.
            scope = f"dedupe:{fingerprint}"
            ttl = endpoint.dedupe.seconds
        elif call.idempotency_key:
            scope = f"idem:{call.idempotency_key}"
        else:
            return False
        store = await rt.open_store()
        # An entry is of no use once its key has expired: it goes with the key.
        ttl = max(1, min(ttl, int((key.expires_at - rt.now()).total_seconds()) + 1))
        begin = await store.idempotency_begin(
            key.key_id, scope, fingerprint, ttl, IN_FLIGHT_SECONDS, rt.max_idempotency_entries
        )
        if begin.status == "started":
            call.idem_scope = scope
            return False
        if begin.status == "in_flight":
            raise Refusal(
                "idempotency_in_flight",
                "a request with this idempotency key is still in flight; retry after it finishes",
            )
        if begin.status == "mismatch":
            raise Refusal(
                "idempotency_mismatch",
                "this idempotency key was used with a different request body",
            )
        if begin.status == "full":
            raise Refusal(
                "quota_exceeded",
                f"vault key {key.key_id} keeps {rt.max_idempotency_entries} responses for "
                "idempotent replay already; retry when older ones expire",
            )
        assert begin.response is not None
        flow.response = replay_response(begin.response)
        if policy.request_id_header:
            call.vendor_request_id = flow.response.headers.get(policy.request_id_header)
        data = _json_object(begin.response.body)
        if data is not None and endpoint is not None and endpoint.object_id:
            oid = data.get(endpoint.object_id)
            call.object_id = oid if isinstance(oid, str) else None
        call.outcome, call.status = "replayed", begin.response.status_code
        call.actual_micros = 0
        flow.comment = f"keybrake {key.key_id} [{key.agent_run_label}] replayed"
        self._redact(flow)
        return True

    async def _abandon(self, call: CallState) -> None:
        if call.idem_scope is None:
            return
        scope, call.idem_scope = call.idem_scope, None
        try:
            store = await self.runtime.open_store()
            await store.idempotency_abandon(call.key_id or "", scope)
        except Exception:
            # The claim expires after IN_FLIGHT_SECONDS; a retry then proceeds.
            log.exception("keybrake: could not release idempotency claim")

    def _check_host_consistency(self, flow: http.HTTPFlow, policy: VendorPolicy) -> None:
        names = [flow.request.host]
        if flow.request.authority:
            names.append(_host_only(flow.request.authority))
        if flow.request.host_header:
            names.append(_host_only(flow.request.host_header))
        if flow.client_conn.sni:
            names.append(flow.client_conn.sni)
        for n in names:
            if n.lower().rstrip(".") not in policy.hosts:
                raise Refusal(
                    "host_mismatch",
                    "destination, Host header and TLS SNI must all name the same vendor host",
                )

    @staticmethod
    def _endpoint_for(
        policy: VendorPolicy, method: str, segments: tuple[str, ...]
    ) -> tuple[EndpointPolicy | None, dict[str, str]]:
        for ep in policy.endpoints:
            params = ep.pattern.match(method, segments)
            if params is not None:
                return ep, params
        if policy.free_reads and method in ("GET", "HEAD"):
            return None, {}
        raise Refusal(
            "unpriced_endpoint",
            f"{method} /{'/'.join(segments)} has no cost rule in the {policy.vendor} policy",
        )

    @staticmethod
    def _rewrite_account(
        policy: VendorPolicy,
        segments: tuple[str, ...],
        presented_user: str | None,
        real_account: str | None,
    ) -> str:
        from urllib.parse import quote

        segs = list(segments)
        after = policy.auth.account_path_after
        if after is not None and after in segs:
            i = segs.index(after) + 1
            if i < len(segs):
                named = segs[i]
                if named not in {presented_user, real_account}:
                    raise Refusal(
                        "account_mismatch", "the path names an account this key may not use"
                    )
                if real_account:
                    segs[i] = real_account
        return "/" + "/".join(quote(s, safe="-._~!$&'()*+,=:@") for s in segs) if segs else "/"

    def _refuse(self, flow: http.HTTPFlow, call: CallState, refusal: Refusal) -> None:
        call.outcome, call.code = "refused", refusal.code
        flow.response = refusal_response(refusal)
        flow.comment = f"keybrake refused: {refusal.code}"
        flow.marked = ":no_entry:"
        flow.metadata[META] = call
        self._redact(flow)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Decrypted vendor traffic that mitmproxy could not parse as HTTP is never relayed."""
        rt = self.runtime
        server = flow.server_conn.address
        names = [flow.client_conn.sni, server[0] if server else None]
        if rt.policies is not None and any(n and rt.policies.for_host(n) for n in names):
            log.warning("keybrake: killed a non-HTTP connection to a vendor host")
            flow.kill()

    # -- response ------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if isinstance(flow.metadata.get(META), CallState):
            self._redact(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        call = flow.metadata.get(META)
        if not isinstance(call, CallState) or flow.response is None:
            return
        self._redact(flow)
        call.status = flow.response.status_code
        call.latency_ms = (time.monotonic() - call.started) * 1000
        if call.outcome != "forwarded":
            self._rewrite_links(flow, call)
            return  # refused or replayed: nothing reached the vendor
        try:
            await self._settle(flow, call)
        except StoreUnavailable as e:
            log.error(
                "keybrake: could not settle %s (kept reserved, counted): %s", call.reservation_id, e
            )
        except Exception:
            log.exception(
                "keybrake: internal error settling %s (kept reserved)", call.reservation_id
            )
        finally:
            self._collapse_expansions(flow, call)
            await self._finish_idempotency(flow, call)
        # After storing for replay, so the stored response stays vendor-shaped.
        self._rewrite_links(flow, call)

    @staticmethod
    def _collapse_expansions(flow: http.HTTPFlow, call: CallState) -> None:
        """What the proxy expanded for itself goes back to an id, as the worker asked."""
        if not call.expanded or flow.response is None:
            return
        try:
            data = json.loads(flow.response.content or b"")
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        for name in call.expanded:
            value = data.get(name)
            if isinstance(value, dict) and isinstance(value.get("id"), str):
                data[name] = value["id"]
        flow.response.content = json.dumps(data).encode()

    def _rewrite_links(self, flow: http.HTTPFlow, call: CallState) -> None:
        """Base-URL mode: absolute vendor links in JSON (``next_page_url``) point back at
        the proxy, so paging stays on it; ``*_uri`` fields become paths."""
        rt = self.runtime
        if call.client_base is None or flow.response is None or rt.policies is None:
            return
        if "json" not in flow.response.headers.get("content-type", "").lower():
            return
        hosts = {h.lower() for h in rt.policies.vendors[call.vendor].hosts}
        base = call.client_base.encode()

        def relink(m: re.Match[bytes]) -> bytes:
            if m["host"].lower().decode() not in hosts:
                return m[0]
            link = m["path"] if m["kind"] == b"i" else base + m["path"]
            return b'"' + m["key"] + b'":"' + link + b'"'

        content = flow.response.content or b""
        rewritten = _VENDOR_LINK.sub(relink, content)
        if rewritten != content:
            flow.response.content = rewritten

    async def _settle(self, flow: http.HTTPFlow, call: CallState) -> None:
        rt = self.runtime
        assert flow.response is not None
        store = await rt.open_store()
        assert rt.policies is not None
        policy = rt.policies.vendors[call.vendor]
        status = flow.response.status_code
        estimate = call.estimate or Estimate(0)
        content = flow.response.content or b""
        data = _json_object(content)
        if policy.request_id_header:
            call.vendor_request_id = flow.response.headers.get(policy.request_id_header)
        if data is not None and call.endpoint is not None and call.endpoint.object_id:
            oid = data.get(call.endpoint.object_id)
            call.object_id = oid if isinstance(oid, str) else None
        if 200 <= status < 300 and call.endpoint is not None and call.endpoint.hold is not None:
            if data is None:
                # Nothing readable about the object: whatever was reserved stays spent.
                call.note = "response body unreadable: estimate kept as spent"
                if call.reservation_id is not None:
                    await store.mark_unknown(call.reservation_id)
                call.actual_micros, call.outcome = estimate.micros, "ok"
            else:
                await self._settle_object(
                    store, policy, call.endpoint, call.endpoint.hold, data, call
                )
                await self._remember(data, policy, call.endpoint, call.key_id or "")
        elif 200 <= status < 300:
            rule = call.endpoint.actual if call.endpoint else None
            # The body was parsed once above; only an unreadable one is handed over raw.
            actual = actual_cost(policy, rule, data if data is not None else content, estimate)
            micros = actual.micros if actual.micros is not None else estimate.micros
            call.note = actual.note
            if actual.amount_minor is not None:
                call.amount_minor, call.currency = actual.amount_minor, actual.currency
            unstated = actual.micros is None and estimate.micros > 0
            if unstated and call.endpoint is not None and isinstance(call.endpoint.cost, FixedCost):
                unstated = False  # a fixed price is the charge by definition
            if call.reservation_id is not None:
                if unstated:
                    await store.mark_unknown(call.reservation_id)
                else:
                    await store.settle(call.reservation_id, micros)
            call.actual_micros, call.outcome = micros, "unknown" if unstated else "ok"
            if unstated:
                # Never "estimate kept" silently: counted, audited as unknown, and logged.
                call.note = "the answer does not state what was charged: estimate counted"
                log.warning(
                    "keybrake: %s %s on %s: the vendor's answer does not state the charge",
                    call.method,
                    call.path,
                    call.key_id,
                )
            if micros > estimate.micros:
                await self._overrun(store, call, micros, estimate.micros)
            if call.endpoint is not None and data is not None:
                await self._remember(data, policy, call.endpoint, call.key_id or "")
        elif status in VENDOR_REFUSED:
            # The vendor refused the call: it charged nothing. Holds the call used stay: the
            # object can still charge what it could before.
            if call.reservation_id is not None:
                await store.release(call.reservation_id)
            call.actual_micros, call.outcome = 0, "vendor_error"
        else:
            if call.reservation_id is not None:
                await store.mark_unknown(call.reservation_id)
            call.actual_micros, call.outcome = estimate.micros, "vendor_error"
            call.note = f"vendor answered {status}: estimate kept as spent"
        if 200 <= status < 300 and data is not None:
            await self._record_created(store, policy, data, call)
        # What this call leaves counted (spent, or still held) against what it reserved.
        counted = call.kept_held if call.kept_held is not None else (call.actual_micros or 0)
        delta = counted - estimate.micros
        self._spend_headers(flow, call, delta)
        flow.comment = f"keybrake {call.key_id} [{call.label}] {call.outcome}"

    async def _settle_object(
        self,
        store: Store,
        policy: VendorPolicy,
        endpoint: EndpointPolicy,
        rule: HoldRule,
        data: dict[str, Any],
        call: CallState,
    ) -> None:
        """Settle a call on an object that can charge later (see `HoldRule`).

        The call's reservation and the holds it used cover the same object: a charged answer
        settles them (once), an answer proving nothing more can move releases them, any other
        answer keeps them as one hold at what the object can still charge.
        """
        estimate = call.estimate or Estimate(0)
        bound = max(estimate.micros, call.held_micros)
        reservations = [*call.holds, *([call.reservation_id] if call.reservation_id else [])]
        actual = actual_cost(policy, endpoint.actual, data, estimate) if endpoint.actual else None
        oid = data.get(endpoint.object_id or "id")
        object_id = oid if isinstance(oid, str) and oid else call.held_for
        unstated = actual is not None and actual.charged and actual.micros is None
        if actual is not None and actual.charged and not unstated:
            micros = actual.micros if actual.micros is not None else bound
            call.note = actual.note
            if actual.amount_minor is not None:
                call.amount_minor, call.currency = actual.amount_minor, actual.currency
            if reservations:
                await store.settle(reservations[0], micros)
                for extra in reservations[1:]:
                    await store.release(extra)
            if rule.releases:
                await self._release_included(store, policy, rule.releases, data, call)
            call.actual_micros, call.outcome = micros, "ok"
            if micros > bound and reservations:
                await self._overrun(store, call, micros, bound)
            return
        call.actual_micros, call.outcome = 0, "ok"
        if not reservations:
            return
        if releases_hold(rule, data):
            for reservation_id in reservations:
                await store.release(reservation_id)
            call.note = "released: nothing more can be charged"
            return
        if object_id is None:  # nothing to hold on to: keep it counted instead
            await store.mark_unknown(reservations[0])
            for extra in reservations[1:]:
                await store.release(extra)
            call.actual_micros, call.note = bound, "no object id in the answer: estimate kept"
            return
        amount = hold_amount(policy, rule, data, Estimate(bound))
        await store.hold(reservations[0], policy.vendor, object_id, amount)
        if endpoint.followup and call.reservation_id:
            self._follow_up(policy, endpoint.followup, object_id)
        for extra in reservations[1:]:
            await store.release(extra)
        call.kept_held = amount
        # "held" is the outcome of the call that made the hold; a call that only used it
        # (a read, a confirm that needs a browser step) is ok, and the hold stays.
        call.outcome = "held" if call.reservation_id else "ok"
        call.note = f"${format_usd(amount)} held: {object_id[:64]} can still charge later"
        if unstated:
            call.note = f"${format_usd(amount)} held: the answer does not state the charge yet"
        if amount > bound:
            await self._overrun(store, call, amount, bound)

    def _follow_up(self, policy: VendorPolicy, template: str, object_id: str) -> None:
        self.followup.schedule(policy, template, object_id)

    async def _settle_read(
        self, policy: VendorPolicy, path: str, object_id: str, data: dict[str, Any]
    ) -> bool:
        """Finish the holds of ``object_id`` from the proxy's own read of it; True when done.

        The read is audited like a vendor call, under the key whose hold it finished."""
        try:
            read = self._endpoint_for(policy, "GET", normalize_path(path).segments)[0]
        except (Refusal, PathRejected):
            return True  # nothing to read it with: stop trying
        if read is None or read.hold is None:
            return True
        store = await self.runtime.open_store()
        holds = await store.holds(policy.vendor, object_id)
        if not holds:
            return True
        held = sum(h.amount_micros for h in holds)
        actual = actual_cost(policy, read.actual, data, Estimate(held)) if read.actual else None
        if actual is not None and actual.charged and actual.micros is not None:
            outcome, spent = "ok", actual.micros
            await store.settle(holds[0].reservation_id, spent)
            note = f"read by the proxy: the hold of {object_id[:64]} settled at the charge stated"
        elif releases_hold(read.hold, data):
            outcome, spent = "ok", 0
            await store.release(holds[0].reservation_id)
            note = f"read by the proxy: {object_id[:64]} was not charged; its hold released"
        else:
            return False
        for extra in holds[1:]:
            await store.release(extra.reservation_id)
        key = await store.get_key(holds[0].key_id)
        writer = self.runtime.audit_writer
        if writer is not None:
            writer.submit(
                {
                    "ts": self.runtime.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "key_id": holds[0].key_id,
                    "label": key.agent_run_label if key else None,
                    "vendor": policy.vendor,
                    "method": "GET",
                    "path": path,
                    "status": 200,
                    "outcome": outcome,
                    "estimate_micros": held,
                    "actual_micros": spent,
                    "vendor_object_id": object_id,
                    "actor": "keybrake",
                    "instance": self.runtime.instance_id,
                    "note": note,
                }
            )
        return True

    @staticmethod
    async def _release_included(
        store: Store, policy: VendorPolicy, path: str, data: dict[str, Any], call: CallState
    ) -> None:
        """A charge that includes other held objects (an invoice paying pending invoice
        items): their amounts are in this charge, so their holds are released."""
        for object_id in {v for v in values_at(data, path) if isinstance(v, str)}:
            for hold in await store.holds(policy.vendor, object_id):
                if hold.key_id == call.key_id:
                    await store.release(hold.reservation_id)

    async def _record_created(
        self, store: Store, policy: VendorPolicy, data: dict[str, Any], call: CallState
    ) -> None:
        """The objects this call created belong to its key (and, for sharing, its label)."""
        endpoint = call.endpoint
        if endpoint is None or not endpoint.creates or call.key is None:
            return
        ids = [v for v in values_at(data, endpoint.creates) if isinstance(v, str) and v]
        if ids:
            await store.record_objects(call.key, policy.vendor, ids[:1000], self.runtime.now())

    async def _overrun(self, store: Store, call: CallState, actual: int, bound: int) -> None:
        """The vendor charged (or can charge) more than the estimate: booked as it is, and
        the key is suspended so that a gap in pricing cannot be used twice."""
        call.outcome = "overrun"
        reason = (
            f"estimate overrun: {call.method} {call.path} cost ${format_usd(actual)}, "
            f"estimated ${format_usd(bound)}"
        )
        call.note = f"{reason}; {call.note}" if call.note else reason
        log.warning("keybrake: %s on %s: key suspended", reason, call.key_id)
        if call.key_id is not None:
            await store.suspend_key(call.key_id, self.runtime.now(), reason)

    async def _finish_idempotency(self, flow: http.HTTPFlow, call: CallState) -> None:
        if call.idem_scope is None or flow.response is None:
            return
        assert self.runtime.policies is not None
        policy = self.runtime.policies.vendors[call.vendor]
        status = flow.response.status_code
        stored = stored_from(flow.response)
        replayable = 200 <= status < 300 or status in policy.idempotency_replay_statuses
        if replayable and len(stored.body) <= MAX_STORED_RESPONSE:
            scope, call.idem_scope = call.idem_scope, None
            try:
                store = await self.runtime.open_store()
                await store.idempotency_complete(
                    call.key_id or "", scope, stored, self.runtime.idempotency_ttl_seconds
                )
            except Exception:
                log.exception("keybrake: could not store the response for replay")
        else:
            await self._abandon(call)

    async def _remember(
        self, data: dict[str, Any], policy: VendorPolicy, endpoint: EndpointPolicy, key_id: str
    ) -> None:
        """Keep the object's amount so later amount-less calls on it can be priced."""
        if not endpoint.remember_amount:
            return
        object_id = data.get(endpoint.object_id or "id")
        if not isinstance(object_id, str):
            return
        # The amount in the object's currency and, where the object can be paid in others
        # (Stripe prices' currency_options), in each of those: the dearest is remembered.
        amounts = [(data.get(endpoint.remember_amount), data.get("currency", "usd"))]
        options = data.get("currency_options")
        if isinstance(options, dict):
            amounts += [
                (option.get(endpoint.remember_amount), code)
                for code, option in options.items()
                if isinstance(option, dict)
            ]
        micros = 0
        for amount, currency in amounts:
            if not isinstance(amount, int) or isinstance(amount, bool):
                return  # an option without a plain amount (tiers, custom): nothing known
            try:
                micros = max(
                    micros, minor_to_micro_usd(amount, str(currency).lower(), policy.fx_to_usd)
                )
            except MoneyError:
                return  # a currency without a rate: better unknown than understated
        store = await self.runtime.open_store()
        await store.remember_amount(key_id, policy.vendor, object_id, micros)

    @staticmethod
    def _spend_headers(flow: http.HTTPFlow, call: CallState, delta: int) -> None:
        if flow.response is None or not call.budgets:
            return
        key_budget = call.budgets[0]
        spent = key_budget.spent_micros + key_budget.reserved_micros + delta
        remaining = [
            b.cap_micros - b.spent_micros - b.reserved_micros - delta
            for b in call.budgets
            if b.cap_micros is not None
        ]
        flow.response.headers["X-Keybrake-Spent-Usd"] = format_usd(max(0, spent))
        if remaining:
            flow.response.headers["X-Keybrake-Remaining-Usd"] = format_usd(max(0, min(remaining)))

    async def error(self, flow: http.HTTPFlow) -> None:
        call = flow.metadata.get(META)
        if not isinstance(call, CallState):
            return
        self._redact(flow)
        if call.outcome != "forwarded":
            return
        call.outcome, call.note = "unknown", "no vendor response: estimate kept as spent"
        call.latency_ms = (time.monotonic() - call.started) * 1000
        call.actual_micros = call.estimate.micros if call.estimate else None
        await self._abandon(call)
        if call.reservation_id is None:
            return
        try:
            store = await self.runtime.open_store()
            await store.mark_unknown(call.reservation_id)
        except Exception:
            log.exception(
                "keybrake: could not mark %s unknown (it stays reserved, counted)",
                call.reservation_id,
            )

    @staticmethod
    def _redact(flow: http.HTTPFlow) -> None:
        """Remove credentials from the flow before mitmweb, flow files or logs can show it."""
        for name in ("authorization", "proxy-authorization"):
            if name in flow.request.headers:
                flow.request.headers[name] = REDACTED
