"""The `AuditTrail` addon: one audit row per vendor call that reached the addon.

Refusals, replays, vendor errors and calls that never got an answer are all recorded, with
the key, label, actor and message id, the estimated and actual cost, and the vendor's request
and object ids. Never secrets, and no bodies unless ``keybrake_audit_bodies`` is set (then
credentials are redacted). Destinations refused by `Egress` get a row too (vendor ``""``,
code ``egress_denied``; a refused ``CONNECT`` has the method ``CONNECT`` and its authority as
the path).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

from mitmproxy import ctx, exceptions, http

from keybrake._audit_sinks import AuditWriter, open_audit_sink
from keybrake.core import Runtime
from keybrake.guard import META, CallState

__all__ = ["AuditTrail", "audit_row"]

log = logging.getLogger("keybrake")
BODY_LIMIT = 4096


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit_row(call: CallState, flow: http.HTTPFlow, runtime: Runtime) -> dict[str, Any]:
    """The audit row of a finished call (see `keybrake._audit_sinks.COLUMNS`)."""
    return {
        "ts": _iso(runtime.now()),
        "key_id": call.key_id,
        "label": call.label,
        "vendor": call.vendor,
        "method": call.method or flow.request.method[:16],
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
    }


class AuditTrail:
    """Writes the audit row of every vendor call, off the event loop, in batches."""

    name = "keybrake_audit"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.writer: AuditWriter | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "keybrake_audit",
            str,
            os.environ.get("KEYBRAKE_AUDIT", ""),
            "Audit sink: empty for <data dir>/audit.db (SQLite), or postgresql://... shared "
            "by every replica.",
        )
        loader.add_option(
            "keybrake_audit_bodies",
            bool,
            False,
            "Debug: also record request/response bodies (truncated, secrets redacted).",
        )

    def configure(self, updated: set[str]) -> None:
        if "keybrake_audit" in updated or "keybrake_data_dir" in updated:
            old = self.writer
            try:
                sink = open_audit_sink(ctx.options.keybrake_audit, self.runtime.data_dir)
            except Exception as e:
                # Recording is a promise: refuse to start rather than run without it.
                raise exceptions.OptionsError(
                    f"keybrake_audit: cannot open audit sink: {e}"
                ) from None
            self.writer = AuditWriter(sink)
            self.runtime.audit_writer = self.writer
            self.runtime.audit_sink = sink
            if old is not None:
                old.close()

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A CONNECT refused by Egress (403 egress_denied) gets this hook, not ``response``.
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        call = flow.metadata.get(META)
        if not isinstance(call, CallState) or call.audited or self.writer is None:
            return
        call.audited = True
        self.runtime.inflight.discard(flow)
        try:
            row = audit_row(call, flow, self.runtime)
            if ctx.options.keybrake_audit_bodies:
                row["request_body"] = self._redacted(flow.request.get_text(strict=False))
                if flow.response is not None:
                    row["response_body"] = self._redacted(flow.response.get_text(strict=False))
            self.writer.submit(row)
        except Exception:
            log.exception("keybrake: could not build audit row")

    def _redacted(self, text: str | None) -> str | None:
        if not text:
            return None
        text = text[:BODY_LIMIT]
        for s in self.runtime.secrets.values():
            for value in (s.secret, s.username, s.account):
                if value:
                    text = text.replace(value, "[redacted]")
        return text

    def done(self) -> None:
        # Core.done has already waited for in-flight calls; rows that still arrive after
        # this are written through by the closed writer, not dropped.
        if self.writer is not None:
            self.writer.close()
            log.info("keybrake: audit flushed (%d rows written)", self.writer.written)
