"""The `AuditTrail` addon: one audit row per vendor call that reached the addon.

Refusals, replays, vendor errors and calls that never got an answer are all recorded, with
the key, label, actor and message id, the estimated and actual cost, and the vendor's request
and object ids. Never secrets, and no bodies unless ``keybrake_audit_bodies`` is set (then
credentials are redacted). Destinations refused by `Egress` get a row too (vendor ``""``,
code ``egress_denied``; a refused ``CONNECT`` has the method ``CONNECT`` and its authority as
the path).

Rows go to the store's audit outbox: most with the call's settlement, in the same store step;
this addon appends the rows of calls nothing settled. Its `AuditPump` moves them from there to
the audit sink (``keybrake_audit``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, cast

from mitmproxy import ctx, exceptions, http

from keybrake.auditlog.pump import AuditPump
from keybrake.auditlog.sinks import open_audit_sink
from keybrake.proxy.calls import BREADCRUMB, CallState, audit_row, call_of
from keybrake.proxy.core import Runtime

__all__ = ["AuditTrail"]

log = logging.getLogger("keybrake")


def _call(flow: http.HTTPFlow) -> CallState | None:
    call = call_of(flow)
    if call is None:
        # A record an addon still keeps in ``flow.metadata`` itself (not a plain breadcrumb).
        legacy = flow.metadata.get(BREADCRUMB)
        if hasattr(legacy, "audited") and hasattr(legacy, "outcome"):
            return cast(CallState, legacy)
    return call


class AuditTrail:
    """Appends the audit row of every call nothing else audited; runs the `AuditPump`."""

    name = "keybrake_audit"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pump: AuditPump | None = None
        self._running = False
        self._retiring: set[asyncio.Task[None]] = set()

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
        if "keybrake_audit_bodies" in updated:
            self.runtime.audit_bodies = ctx.options.keybrake_audit_bodies
        if "keybrake_audit" in updated or "keybrake_data_dir" in updated:
            old = self.pump
            try:
                sink = open_audit_sink(ctx.options.keybrake_audit, self.runtime.data_dir)
            except Exception as e:
                # Recording is a promise: refuse to start rather than run without it.
                raise exceptions.OptionsError(
                    f"keybrake_audit: cannot open audit sink: {e}"
                ) from None
            self.pump = AuditPump(self.runtime.open_store, sink, self.runtime.instance_id)
            self.runtime.audit_pump = self.pump
            self.runtime.audit_sink = sink
            if self._running:
                self.pump.start()
            if old is not None:
                self._retire(old, self.pump)

    def _retire(self, old: AuditPump, new: AuditPump) -> None:
        """Stop a replaced pump and close its sink; the new pump takes over the outbox."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # configured before the event loop runs: nothing started
            old.sink.close()
            return

        async def retire() -> None:
            for row in await old.stop():
                new.keep(row)
            await asyncio.to_thread(old.sink.close)

        task = loop.create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def running(self) -> None:
        self._running = True
        if self.pump is not None:
            self.pump.start()

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    async def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A CONNECT refused by Egress (403 egress_denied) gets this hook, not ``response``.
        await self._record(flow)

    async def _record(self, flow: http.HTTPFlow) -> None:
        call = _call(flow)
        if call is None or call.audited or self.pump is None:
            return
        call.audited = True
        try:
            row = audit_row(call, flow, self.runtime)
        except Exception:
            log.exception("keybrake: could not build audit row")
            self.runtime.inflight.discard(flow)
            return
        try:
            store = await self.runtime.open_store()
            await store.append_audit(row)
        except Exception as e:
            # Kept by the pump and appended once the store is back (it says so, loudly).
            log.warning("keybrake: audit row kept in memory: the store did not take it: %s", e)
            self.pump.keep(row)
        finally:
            # Shutdown waits for in-flight calls: this one is recorded (or kept) now.
            self.runtime.inflight.discard(flow)

    async def done(self) -> None:
        # `Core.done` has normally closed the pump already (before closing the store); rows
        # that still arrive after this wait in the store's outbox for the next start.
        if self.pump is not None:
            await self.pump.close()
            log.info("keybrake: audit flushed (%d rows written)", self.pump.written)
