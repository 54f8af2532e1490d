"""Admission: everything a vendor call must pass before it is forwarded (DESIGN §2).

Route → credential → key → account → allowlist → ownership → price → one atomic store
admission (the key's state, the request rate, the key's object quota, the idempotency claim
or replay, the reservation over every budget) → swap the real secret in. Any problem raises
`Refusal`; nothing reaches the vendor until `Admitter.admit` returns.

Keys are kept in process once seen (by the SHA-256 of the vault key): what a key may call
never changes, and everything that does (revocation, suspension, caps) is read by the store's
admission itself, so a revocation is refused on the very next call on every replica.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections import OrderedDict
from decimal import Decimal
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode

from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.proxy.mode_specs import ReverseMode

from keybrake.core.errors import Refusal
from keybrake.core.keys import VAULT_KEY_PREFIX, hash_vault_key, looks_like_vault_key
from keybrake.core.money import format_usd
from keybrake.core.paths import (
    EndpointPattern,
    NormalizedPath,
    PathRejected,
    match_any,
    normalize_method,
    normalize_path,
    split_base_url,
)
from keybrake.core.policy import EndpointPolicy, VendorPolicy, _parse_pattern
from keybrake.pricing import STREAMS, Body, Estimate, check_parameters, estimate_cost, parse_body
from keybrake.proxy._headers import HeaderView, rewrite
from keybrake.proxy._idempotency import body_fingerprint, vendor_idempotency_key
from keybrake.proxy.calls import CallState
from keybrake.proxy.core import Runtime
from keybrake.proxy.credentials import (
    Presented,
    authorization_for,
    extract_credential,
    extract_header_credential,
    matches_raw_secret,
)
from keybrake.proxy.limiter import FailureLimiter, source_of
from keybrake.proxy.listeners import BASE_URL
from keybrake.store import (
    Admission,
    AdmissionRequest,
    BudgetState,
    Hold,
    IdempotencyClaim,
    KeyRecord,
    ObjectOwner,
    Store,
    StoredResponse,
)
from keybrake.wire import ACTOR_HEADER, HEADER_PREFIX, IDEMPOTENCY_KEY_HEADER, MESSAGE_ID_HEADER

__all__ = [
    "IN_FLIGHT_SECONDS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_VENDOR_BODY",
    "READS",
    "Admitter",
    "json_object",
    "route",
]

IN_FLIGHT_SECONDS: Final = 300
MAX_VENDOR_BODY: Final = 1024 * 1024
MAX_HEADERS: Final = 100
MAX_HEADER_BYTES: Final = 32 * 1024
READS: Final = frozenset({"GET", "HEAD"})
"""Methods that change nothing at the vendor."""
_KEY_CACHE_SIZE: Final = 10_000


def route(rt: Runtime, flow: http.HTTPFlow) -> tuple[VendorPolicy, str] | None:
    """The vendor policy a flow belongs to and the request target to check, or None.

    Forward proxy: the destination host. Base-URL listener: ``/{vendor}/...``.
    """
    if rt.policies is None:
        return None
    if isinstance(flow.client_conn.proxy_mode, ReverseMode):
        if BASE_URL not in rt.listeners.roles_of(flow.client_conn):
            return None  # an admin-only listener: /{vendor}/… is not served there
        first, target = split_base_url(flow.request.path)
        policy = rt.policies.vendors.get(first)
        return None if policy is None else (policy, target)
    policy = rt.policies.for_host(flow.request.host)
    if policy is not None:
        return policy, flow.request.path
    # Not a vendor destination; but if SNI or Host names a vendor, someone is trying to get
    # a vendor-bound request past the checks: treat it as that vendor's (and refuse below).
    for name in (flow.client_conn.sni, flow.request.host_header):
        if name and (claimed := rt.policies.for_host(_host_only(name))) is not None:
            return claimed, flow.request.path
    return None


def json_object(content: bytes) -> dict[str, Any] | None:
    """A JSON object body (fractions as `Decimal`), or None."""
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


def _header_text(value: str | None, limit: int = 200) -> str | None:
    """A worker-supplied header value, printable and bounded, for the audit log."""
    if not value:
        return None
    return "".join(ch for ch in value if ch.isprintable())[:limit] or None


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


def cap_refusal(exceeded: BudgetState | None, needed_micros: int) -> Refusal:
    b = exceeded
    assert b is not None
    return Refusal(
        "cap_exhausted",
        f"spend cap reached for {b.scope} ({b.window}): this call needs "
        f"${format_usd(needed_micros)}, ${format_usd(b.remaining_micros or 0)} remains",
        extra={
            "budget": b.scope,
            "node": b.node,
            "window": b.window,
            "cap_usd": format_usd(b.cap_micros or 0),
            "spent_usd": format_usd(b.used_micros),
            "remaining_usd": format_usd(b.remaining_micros or 0),
            "needed_usd": format_usd(needed_micros),
        },
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Checked:
    """A vendor call once its caller is known: what pricing and admission work from."""

    flow: http.HTTPFlow
    policy: VendorPolicy
    key: KeyRecord
    presented: Presented
    method: str
    path: NormalizedPath
    call: CallState
    headers: HeaderView


class Admitter:
    """Runs the checks of one vendor call and makes its one atomic store admission."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.key_failures = FailureLimiter()
        self._keys: OrderedDict[str, KeyRecord] = OrderedDict()

    async def admit(
        self, flow: http.HTTPFlow, policy: VendorPolicy, target: str, call: CallState
    ) -> StoredResponse | None:
        """Check, price and admit ``flow``, then swap the real secret in; or raise `Refusal`.
        Returns the stored response when the call is answered by idempotent replay."""
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
        headers = HeaderView(req.headers.fields)  # read once: every check below asks it
        call.actor = _header_text(headers.get(ACTOR_HEADER))
        call.message_id = _header_text(headers.get(MESSAGE_ID_HEADER))
        if _mentions_vault_key(path.query) or _mentions_vault_key(req.path):
            raise Refusal("vault_key_in_query", "a vault key must not be sent in the URL")
        try:
            key, presented = await self._authenticate(policy, headers, call)
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
        self._check_accounts(policy, key, headers)
        return await self._price_and_admit(
            _Checked(flow, policy, key, presented, method, path, call, headers)
        )

    # -- who is calling ------------------------------------------------------------------------
    async def _authenticate(
        self, policy: VendorPolicy, headers: HeaderView, call: CallState
    ) -> tuple[KeyRecord, Presented]:
        """The vault key presented on the request (looked up by its SHA-256)."""
        rt = self.runtime
        if "api_key_header" in policy.auth.schemes and policy.auth.key_header in headers:
            presented = extract_header_credential(
                policy.auth,
                headers.get_all(policy.auth.key_header),
                headers.get_all("authorization"),
            )
        else:
            presented = extract_credential(policy.auth, headers.get_all("authorization"))
        if rt.secrets[policy.vendor].is_real_secret(presented.credential) or matches_raw_secret(
            policy.auth, presented.credential
        ):
            raise Refusal(
                "raw_secret_refused",
                "a real vendor secret was sent to the proxy; workers must use a vault key",
            )
        if not looks_like_vault_key(presented.credential):
            raise Refusal("vault_key_unknown", "the credential is not a Keybrake vault key")
        if (problem := rt.clock_problem()) is not None:
            raise Refusal("clock_skewed", problem)
        key = await self._key(hash_vault_key(presented.credential))
        call.key_id, call.label, call.key = key.key_id, key.agent_run_label, key
        self._refuse_inactive(key)
        if key.vendor != policy.vendor:
            raise Refusal(
                "vendor_mismatch",
                f"vault key {key.key_id} is for {key.vendor}, not {policy.vendor}",
            )
        return key, presented

    async def _key(self, secret_sha256: str) -> KeyRecord:
        """The key of a vault key: from this process's cache, else the store. A key last seen
        suspended is read again (it may have been resumed); revocation and expiry are final."""
        key = self._keys.get(secret_sha256)
        if key is None or key.suspended_at is not None:
            store = await self.runtime.open_store()
            key = await store.get_key_by_secret_hash(secret_sha256)
            if key is None:
                raise Refusal("vault_key_unknown", "unknown vault key")
            self._remember_key(key)
        return key

    def _remember_key(self, key: KeyRecord) -> None:
        self._keys[key.secret_sha256] = key
        self._keys.move_to_end(key.secret_sha256)
        if len(self._keys) > _KEY_CACHE_SIZE:
            self._keys.popitem(last=False)

    def _refuse_inactive(self, key: KeyRecord) -> None:
        state = key.state(self.runtime.now())
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

    @staticmethod
    def _check_accounts(policy: VendorPolicy, key: KeyRecord, headers: HeaderView) -> None:
        """Headers that switch the vendor account (Stripe Connect) only name accounts the
        key lists; otherwise the key could act on every connected account."""
        for name in policy.account_headers:
            values = headers.get_all(name)
            if not values:
                continue
            if len(values) > 1 or values[0].strip() not in key.allowed_accounts:
                raise Refusal(
                    "account_mismatch",
                    f"{name} names an account vault key {key.key_id} may not act on",
                )

    # -- what it may do, and what it costs -----------------------------------------------------
    async def _price_and_admit(self, c: _Checked) -> StoredResponse | None:
        flow, policy, key, method, path, call = c.flow, c.policy, c.key, c.method, c.path, c.call
        rt = self.runtime
        req = flow.request
        secrets_ = rt.secrets[policy.vendor]
        store = await rt.open_store()
        granted = match_any([_parse_pattern(p) for p in key.allowed_endpoints], method, path)
        if granted is None:
            raise Refusal(
                "endpoint_not_allowed",
                f"{method} {path.path} is not in the allowlist of vault key {key.key_id}",
            )
        endpoint, params = endpoint_for(policy, method, path.segments)
        call.endpoint = endpoint
        for name, reason in policy.refused_headers.items():
            if name in c.headers:
                raise Refusal("unpriced_parameter", f"the {name} header is refused: {reason}")
        if endpoint is not None:
            await self._check_path_owner(store, c, endpoint, granted, params)
        new_path = _rewrite_account(policy, path.segments, c.presented.username, secrets_.account)
        if secrets_.missing:
            raise Refusal(
                "secret_unavailable",
                f"the proxy has no real {policy.vendor} secret: set {', '.join(secrets_.missing)}",
            )
        if path.query and method not in READS and not (endpoint is not None and endpoint.query):
            # Stripe merges query parameters into the body's: a priced call's parameters are
            # read from its body only, so anything in the query would be unpriced.
            raise Refusal(
                "unpriced_parameter",
                f"{method} {path.path} takes its parameters in the body; the query string "
                "is refused",
            )
        accepted = endpoint.body_types(policy) if endpoint is not None else policy.body
        body = parse_body(accepted, c.headers.get_all("content-type"), req.raw_content or b"")
        estimate = Estimate(0, basis="free")
        if endpoint is not None:
            if endpoint.expand and body.kind == "form":
                call.body_expand = tuple(str(v) for v in body.get_list("expand"))
            await self._check_field_owners(store, policy, endpoint, key, body)

            async def recall(object_id: str) -> int | None:
                return await store.recall_amount(key.key_id, policy.vendor, object_id)

            estimate = await estimate_cost(policy, endpoint, body, params, recall)
            # After pricing, so a body of the wrong shape is refused as such first.
            check_parameters(endpoint, body)
        call.estimate = estimate
        call.amount_minor, call.currency = estimate.amount_minor, estimate.currency

        claim = self._idempotency_claim(c, endpoint)
        holds: tuple[Hold, ...] = ()
        if endpoint is not None and endpoint.hold is not None:
            held_for = params.get(endpoint.hold.param)
            if held_for:
                holds = tuple(
                    h for h in await store.holds(policy.vendor, held_for) if h.key_id == key.key_id
                )
                call.held_for = held_for if holds else None
        paid = estimate.basis != "free" and not holds
        reservation_id = f"res_{secrets.token_hex(12)}" if paid else None
        admission = await store.admit(
            AdmissionRequest(
                key.key_id,
                rt.now(),
                reservation_id=reservation_id,
                estimate_micros=estimate.micros if paid else 0,
                rate_limit=key.max_requests_per_minute,
                idempotency=claim,
                max_objects=(
                    rt.max_objects_per_key
                    if endpoint and endpoint.creates and method not in READS
                    else None
                ),
            )
        )
        if admission.key is not None:
            self._remember_key(admission.key)
            call.key = admission.key
        if admission.status == "refused":
            raise self._refusal(admission, key, estimate)
        if admission.status == "replay":
            assert admission.response is not None
            return admission.response
        if claim is not None:
            call.idem_scope, call.idem_ttl_seconds = claim.scope, claim.ttl_seconds
            call.idem_sha256 = claim.body_sha256
        call.budgets = admission.budgets
        call.reservation_id, call.ledger_rows = reservation_id, admission.ledger_rows
        if holds and not await self._use_holds(store, key, holds, call):
            # The holds were finished meanwhile (the object charged or was released): the
            # call reserves its own estimate like any other.
            call.reservation_id = f"res_{secrets.token_hex(12)}"
            reserved = await store.reserve(key, call.reservation_id, estimate.micros, rt.now())
            if not reserved.ok:
                call.reservation_id = None
                raise cap_refusal(reserved.exceeded, estimate.micros)
            call.budgets, call.held_for = reserved.budgets, None
        _ask_for_stream_usage(req, endpoint, body, call)
        self._swap(c, new_path)
        return None

    def _refusal(self, admission: Admission, key: KeyRecord, estimate: Estimate) -> Refusal:
        code = admission.code or "internal_error"
        if code == "cap_exhausted":
            return cap_refusal(admission.exceeded, estimate.micros)
        if code == "rate_limited":
            node = admission.detail or "key"
            limit = admission.rate_limit or key.max_requests_per_minute
            wait = admission.retry_after_seconds
            whose = {
                "key": f"vault key {key.key_id} is",
                "label": f"the keys of label {key.agent_run_label!r} are together",
                "issuer": f"the keys of issuer {key.issuer_id} are together",
            }.get(node, f"vault key {key.key_id} is")
            return Refusal(
                "rate_limited",
                f"{whose} limited to {limit} requests per minute; retry in {wait}s",
                extra={"max_requests_per_minute": limit, "retry_after_s": wait, "node": node},
                headers={"Retry-After": str(wait)},
            )
        if code == "quota_exceeded" and admission.detail == "objects":
            return Refusal(
                code,
                f"vault key {key.key_id} owns {self.runtime.max_objects_per_key} objects "
                "already; issue a new key for more",
            )
        if code == "quota_exceeded":
            return Refusal(
                code,
                f"vault key {key.key_id} keeps {self.runtime.max_idempotency_entries} responses "
                "for idempotent replay already; retry when older ones expire",
            )
        if code == "idempotency_in_flight":
            return Refusal(
                code,
                "a request with this idempotency key is still in flight; retry after it finishes",
            )
        if code == "idempotency_mismatch":
            return Refusal(code, "this idempotency key was used with a different request body")
        if code == "vendor_frozen":
            return Refusal(
                code,
                f"every call to {key.vendor} is frozen by an operator ({admission.detail}); "
                "refused until the freeze is lifted",
            )
        if admission.key is not None:
            self._refuse_inactive(admission.key)
        return Refusal(code, "unknown vault key")

    def _idempotency_claim(
        self, c: _Checked, endpoint: EndpointPolicy | None
    ) -> IdempotencyClaim | None:
        """The idempotency scope a state-changing call claims: the vendor's idempotency header
        (Stripe/Resend ``Idempotency-Key``), else ``X-Keybrake-Idempotency-Key``, else the
        body itself for endpoints with ``dedupe``. Reads claim nothing (nothing to replay)."""
        flow, policy, key, method, call = c.flow, c.policy, c.key, c.method, c.call
        path = c.path.path
        if method in READS:
            return None
        rt = self.runtime
        headers = c.headers
        idem = headers.get(policy.idempotency_header) if policy.idempotency_header else None
        idem = idem or headers.get(IDEMPOTENCY_KEY_HEADER)
        fingerprint = body_fingerprint(method, path, flow.request.raw_content or b"")
        ttl = rt.idempotency_ttl_seconds
        if idem:
            call.idempotency_key = idem[:255]
        if endpoint is not None and endpoint.dedupe is not None:
            # Content dedupe wins over a header: some SDKs send a random key per call.
            scope, ttl = f"dedupe:{fingerprint}", endpoint.dedupe.seconds
        elif call.idempotency_key:
            scope = f"idem:{call.idempotency_key}"
        else:
            return None
        # An entry is of no use once its key has expired: it goes with the key.
        ttl = max(1, min(ttl, int((key.expires_at - rt.now()).total_seconds()) + 1))
        return IdempotencyClaim(
            scope, fingerprint, ttl, IN_FLIGHT_SECONDS, rt.max_idempotency_entries
        )

    @staticmethod
    async def _check_path_owner(
        store: Store,
        c: _Checked,
        endpoint: EndpointPolicy,
        granted: EndpointPattern,
        params: dict[str, str],
    ) -> None:
        """A call naming an object in its path acts on it: it must be the key's own (or its
        label's, when the key shares by label), or named in the key's allowlist by its id, or
        reached through an allowlist entry that marks the segment shared (``*``)."""
        policy, key = c.policy, c.key
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

    @staticmethod
    async def _use_holds(
        store: Store, key: KeyRecord, holds: tuple[Hold, ...], call: CallState
    ) -> bool:
        """Use the key's holds on the object for this call instead of a new reservation;
        False when they were finished meanwhile.

        The holds already reserve what the object can charge; a charging call on it (a
        confirm, a capture, an update that raises its amount) only needs the difference,
        checked against the cap in the budgets the hold lives in.
        """
        assert call.estimate is not None
        held = sum(h.amount_micros for h in holds)
        first = holds[0]
        result = await store.raise_hold(
            first.reservation_id, first.amount_micros + max(0, call.estimate.micros - held), key
        )
        if not result.ok:
            if not result.budgets:
                return False
            raise cap_refusal(result.exceeded, call.estimate.micros - held)
        call.budgets = result.budgets
        call.holds = tuple(h.reservation_id for h in holds)
        call.held_micros = max(held, call.estimate.micros)
        return True

    # -- forwarding ----------------------------------------------------------------------------
    def _swap(self, c: _Checked, new_path: str) -> None:
        """The real secret goes in, every Keybrake header comes out, the checked path goes out."""
        flow, policy, presented, method, call = c.flow, c.policy, c.presented, c.method, c.call
        query = c.path.query
        req = flow.request
        secrets_ = self.runtime.secrets[policy.vendor]
        # Forward exactly what was checked: method, origin-form path, vendor host over TLS.
        if policy.upstream is not None:
            scheme, _, hostport = policy.upstream.url.partition("://")
            host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
            dest = (scheme, host, int(port) if port else (443 if scheme == "https" else 80))
        elif isinstance(flow.client_conn.proxy_mode, ReverseMode):
            dest = ("https", policy.hosts[0], 443)
        else:
            # Never plain HTTP: a cleartext request to the proxy still leaves over TLS.
            dest = ("https", req.host, 443)
        changed: dict[str, str] = {}
        if presented.scheme == "api_key_header":
            assert secrets_.secret is not None
            changed[policy.auth.key_header] = secrets_.secret
        else:
            changed["Authorization"] = authorization_for(presented, secrets_)
        worker_idem = c.headers.get(policy.idempotency_header or "")
        if policy.idempotency_header and worker_idem:
            # Vendors scope idempotency keys to the whole account: namespaced per vault key, a
            # worker can neither read another key's stored answer nor poison a key another
            # worker is about to use. Deterministic, so the vendor still deduplicates retries.
            call.vendor_idempotency_key = vendor_idempotency_key(call.key_id, worker_idem[:255])
            changed[policy.idempotency_header] = call.vendor_idempotency_key
        if "host" in c.headers:
            # What mitmproxy's host/port setters do to a Host header, once instead of twice.
            changed["Host"] = url.hostport(*dest)
        # Every Keybrake header out, the real secret in: one pass over the fields.
        rewrite(req.headers, changed, drop_prefix=HEADER_PREFIX)
        query = _ask_for_expansions(req, method, query, call)
        req.method = method
        req.authority = ""
        req.path = new_path + (f"?{query}" if query else "")
        req.scheme = dest[0]
        req.data.host, req.data.port = dest[1], dest[2]  # the Host header is set above
        call.outcome = "forwarded"

    @staticmethod
    def _check_host_consistency(flow: http.HTTPFlow, policy: VendorPolicy) -> None:
        req = flow.request
        names = [req.host]
        if req.authority:
            names.append(_host_only(req.authority))
        if host_header := req.host_header:  # a header scan each time it is read
            names.append(_host_only(host_header))
        if flow.client_conn.sni:
            names.append(flow.client_conn.sni)
        for n in names:
            if n.lower().rstrip(".") not in policy.hosts:
                raise Refusal(
                    "host_mismatch",
                    "destination, Host header and TLS SNI must all name the same vendor host",
                )


def endpoint_for(
    policy: VendorPolicy, method: str, segments: tuple[str, ...]
) -> tuple[EndpointPolicy | None, dict[str, str]]:
    """The policy endpoint a call matches and its path placeholders; refuses the unpriced."""
    for ep in policy.endpoints:
        params = ep.pattern.match(method, segments)
        if params is not None:
            return ep, params
    if policy.free_reads and method in READS:
        return None, {}
    raise Refusal(
        "unpriced_endpoint",
        f"{method} /{'/'.join(segments)} has no cost rule in the {policy.vendor} policy",
    )


def _rewrite_account(
    policy: VendorPolicy,
    segments: tuple[str, ...],
    presented_user: str | None,
    real_account: str | None,
) -> str:
    """The forwarded path: the real account id in place of the one the worker named."""
    segs = list(segments)
    after = policy.auth.account_path_after
    if after is not None and after in segs:
        i = segs.index(after) + 1
        if i < len(segs):
            if segs[i] not in {presented_user, real_account}:
                raise Refusal("account_mismatch", "the path names an account this key may not use")
            if real_account:
                segs[i] = real_account
    return "/" + "/".join(quote(s, safe="-._~!$&'()*+,=:@") for s in segs) if segs else "/"


def _ask_for_stream_usage(
    req: http.Request, endpoint: EndpointPolicy | None, body: Body, call: CallState
) -> None:
    """A streamed call priced by its token usage: make the stream state it (OpenAI chat
    streams do only when asked) and remember to meter it (`keybrake.pricing.sse`)."""
    usage = endpoint.actual.usage if endpoint is not None and endpoint.actual else None
    if usage is None or body.kind != "json" or body.get("stream") is not True:
        return
    metering = STREAMS.get(usage)
    if metering is None:
        return
    data = json.loads(req.raw_content or b"{}")
    if metering.ask(data):
        req.content = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        call.stream_strip = True
    call.stream_usage = usage


def _ask_for_expansions(req: http.Request, method: str, query: str, call: CallState) -> str:
    """Ask the vendor to expand what states the charge (a subscription's latest_invoice)
    when the worker did not: the answer is collapsed back before the worker sees it.
    Returns the query string to forward."""
    endpoint = call.endpoint
    if endpoint is None or not endpoint.expand:
        return query
    asked = {v for k, v in parse_qsl(query) if k.startswith("expand")}
    if method not in READS:
        asked |= set(call.body_expand)
    added = tuple(f for f in endpoint.expand if f not in asked)
    if not added:
        return query
    call.expanded = added
    extra = urlencode([("expand[]", f) for f in added])
    if method in READS:
        return f"{query}&{extra}" if query else extra
    body = req.raw_content or b""
    req.content = body + (b"&" if body else b"") + extra.encode()
    return query
