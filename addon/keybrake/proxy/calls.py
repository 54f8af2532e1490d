"""One vendor call's record: what admission decided and settlement learned.

Every addon that needs to know about a call (audit, metrics, redaction, egress pinning) reads
it through `call_of`, never by importing the admission or settlement code. The record lives
in a side table keyed by the flow (weakly: it goes with the flow), so nothing but a small
plain breadcrumb (`BREADCRUMB`) is put in ``flow.metadata``, where mitmweb and flow files
can show and store it.
"""

from __future__ import annotations

import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from keybrake.auditlog.sinks import audit_time
from keybrake.store import BudgetState, KeyRecord

if TYPE_CHECKING:
    from keybrake.core.policy import EndpointPolicy
    from keybrake.pricing import Estimate
    from keybrake.pricing.sse import StreamMeter
    from keybrake.proxy.core import Runtime

__all__ = ["BREADCRUMB", "CallState", "audit_row", "call_of", "track"]

BODY_LIMIT = 4096
BREADCRUMB = "keybrake"
"""``flow.metadata`` key of the call's plain summary (vendor, key, label, outcome, money)."""

_CALLS: weakref.WeakKeyDictionary[http.HTTPFlow, CallState] = weakref.WeakKeyDictionary()


@dataclass
class CallState:
    """What Keybrake knows about one vendor call (or one refused destination)."""

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
    # The usage rows the reservation was made in (from the admission, for the settlement).
    ledger_rows: tuple[tuple[str, str], ...] = ()
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
    idem_ttl_seconds: int = 1
    idem_sha256: str | None = None
    vendor_request_id: str | None = None
    object_id: str | None = None
    amount_minor: int | None = None
    currency: str | None = None
    latency_ms: float | None = None
    audited: bool = False
    # Base-URL mode: where the client reached us, to keep vendor links on the proxy.
    client_base: str | None = None
    # A streamed answer metered as it passes (`keybrake.pricing.sse`): the usage reader's name,
    # whether the proxy asked for usage the client did not (stripped again), and the meter.
    stream_usage: str | None = None
    stream_strip: bool = False
    meter: StreamMeter | None = None

    def breadcrumb(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "key_id": self.key_id,
            "label": self.label,
            "outcome": self.outcome,
            "code": self.code,
            "estimate_micros": self.estimate.micros if self.estimate else None,
            "actual_micros": self.actual_micros,
            "status": self.status,
            "latency_ms": self.latency_ms,
        }


def track(flow: http.HTTPFlow, call: CallState) -> CallState:
    """Make ``call`` the record of ``flow``."""
    _CALLS[flow] = call
    return call


def call_of(flow: http.HTTPFlow) -> CallState | None:
    """The record of a vendor call (or refused destination); None for any other flow."""
    return _CALLS.get(flow)


def audit_row(call: CallState, flow: http.HTTPFlow | None, runtime: Runtime) -> dict[str, Any]:
    """The audit row of a finished call (see `keybrake.auditlog.sinks.COLUMNS`). Never secrets;
    ``event_id`` makes moving it to the sink idempotent."""
    return {
        "event_id": uuid.uuid4().hex,
        "ts": audit_time(runtime.now()),
        "key_id": call.key_id,
        "label": call.label,
        "vendor": call.vendor,
        "method": call.method or (flow.request.method[:16] if flow is not None else ""),
        "path": call.path or None,
        "status": call.status,
        "outcome": call.outcome if call.outcome != "forwarded" else "unknown",
        "code": call.code,
        "estimate_micros": call.estimate.micros if call.estimate else None,
        "actual_micros": call.actual_micros,
        "amount_minor": call.amount_minor,
        "currency": call.currency,
        "vendor_request_id": call.vendor_request_id,
        "vendor_object_id": call.object_id,
        "idempotency_key": call.idempotency_key,
        "vendor_idempotency_key": call.vendor_idempotency_key,
        "actor": call.actor,
        "message_id": call.message_id,
        "latency_ms": round(call.latency_ms, 3) if call.latency_ms is not None else None,
        "instance": runtime.instance_id,
        "note": call.note or None,
        "request_body": None,
        "response_body": None,
    } | (_bodies(flow, runtime) if runtime.audit_bodies and flow is not None else {})


def _bodies(flow: http.HTTPFlow, runtime: Runtime) -> dict[str, str | None]:
    """Debug (``keybrake_audit_bodies``): the bodies, truncated, with the real secrets out."""

    def redacted(text: str | None) -> str | None:
        if not text:
            return None
        text = text[:BODY_LIMIT]
        for s in runtime.secrets.values():
            for value in (s.secret, s.username, s.account):
                if value:
                    text = text.replace(value, "[redacted]")
        return text

    response = flow.response.get_text(strict=False) if flow.response is not None else None
    return {
        "request_body": redacted(flow.request.get_text(strict=False)),
        "response_body": redacted(response),
    }
