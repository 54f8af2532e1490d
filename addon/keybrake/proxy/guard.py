"""The `VaultGuard` addon: every vendor call passes its checks or is refused.

Request hook: `keybrake.proxy.admission.Admitter` routes, checks, prices and admits the call in one
store step, then swaps the real secret in. Response and error hooks:
`keybrake.proxy.settlement.Settler` settles it, with its audit row, in one store step. Refusals and
replays are audited in one store step too. The call's record is kept with `keybrake.proxy.calls`.

A call that gets no answer is told apart by whether its request was sent
(`keybrake.proxy._failed_flows.request_was_sent`): never sent (the vendor could not be reached)
releases the reservation and answers ``502 upstream_unreachable``, retry safe; sent but
unanswered keeps the estimate spent and answers ``502 upstream_failed``. Either answer
replaces mitmproxy's HTML error page.

Hooks never raise: any internal error becomes a ``503`` refusal, never a forwarded request.
"""

from __future__ import annotations

import logging

from mitmproxy import http, tcp
from mitmproxy.proxy.mode_specs import ReverseMode

from keybrake.core.errors import Refusal, refusal_response
from keybrake.pricing import STREAMS
from keybrake.pricing.sse import StreamMeter
from keybrake.proxy._failed_flows import allow_error_answers, answer_flow, request_was_sent
from keybrake.proxy._headers import redact
from keybrake.proxy._idempotency import replay_response
from keybrake.proxy.admission import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_VENDOR_BODY,
    Admitter,
    json_object,
    route,
)
from keybrake.proxy.calls import BREADCRUMB, CallState, call_of, track
from keybrake.proxy.core import Runtime
from keybrake.proxy.credentials import REDACTED
from keybrake.proxy.settlement import Settler
from keybrake.store import StoredResponse, StoreUnavailable

__all__ = ["REDACTED", "VaultGuard"]

log = logging.getLogger("keybrake")


class VaultGuard:
    """Admits, forwards and settles vendor calls; refuses everything else about them."""

    name = "keybrake_guard"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.admitter = Admitter(runtime)
        self.settler = Settler(runtime)
        allow_error_answers()

    def done(self) -> None:
        self.settler.close()

    # -- request -----------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse oversized vendor requests before their body is buffered."""
        if flow.response or flow.error or not flow.live:
            return
        found = route(self.runtime, flow)
        if found is None:
            return
        headers = flow.request.headers
        length = headers.get("content-length", "")
        too_big = not length.isdigit() and "content-length" in headers
        too_big = too_big or (length.isdigit() and int(length) > MAX_VENDOR_BODY)
        fields = headers.fields
        refusal = None
        if too_big:
            refusal = Refusal(
                "body_too_large", f"vendor requests are limited to {MAX_VENDOR_BODY} bytes"
            )
        elif (
            len(fields) > MAX_HEADERS or sum(len(k) + len(v) for k, v in fields) > MAX_HEADER_BYTES
        ):
            refusal = Refusal(
                "headers_too_large",
                f"vendor requests are limited to {MAX_HEADERS} headers and {MAX_HEADER_BYTES} "
                "bytes of headers",
            )
        if refusal is not None:
            call = self._track(flow, CallState(vendor=found[0].vendor))
            await self._refuse(flow, call, refusal)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        found = route(self.runtime, flow)
        if found is None:
            if isinstance(flow.client_conn.proxy_mode, ReverseMode):
                # Claimed by neither the admin API nor a vendor route: the admin listener's
                # placeholder upstream must never be reached.
                flow.response = refusal_response(
                    Refusal("not_found", "no such admin route or vendor")
                )
            return
        policy, target = found
        call = self._track(flow, CallState(vendor=policy.vendor))
        if isinstance(flow.client_conn.proxy_mode, ReverseMode) and flow.request.host_header:
            scheme = "https" if flow.client_conn.tls_established else "http"
            call.client_base = f"{scheme}://{flow.request.host_header}/{policy.vendor}"
        refusal: Refusal | None = None
        try:
            stored = await self.admitter.admit(flow, policy, target, call)
            if stored is not None:
                await self._replay(flow, call, stored)
            else:
                flow.metadata[BREADCRUMB] = call.breadcrumb()
            return
        except Refusal as r:
            refusal = r
        except StoreUnavailable as e:
            log.error("keybrake: store unavailable: %s", e)
            refusal = Refusal(
                "store_unavailable", "the budget store is unavailable; nothing was forwarded"
            )
        except Exception:
            log.exception("keybrake: internal error in request hook (request refused)")
            refusal = Refusal("internal_error", "internal error in keybrake; nothing was forwarded")
        await self._refuse(flow, call, refusal)

    def _track(self, flow: http.HTTPFlow, call: CallState) -> CallState:
        self.runtime.inflight.add(flow)
        return track(flow, call)

    async def _refuse(self, flow: http.HTTPFlow, call: CallState, refusal: Refusal) -> None:
        """Answer with the error contract; release what the admission took (if it got that
        far) and audit the refusal, in one store step."""
        call.outcome, call.code = "refused", refusal.code
        call.status = refusal.status
        # Also if mitmproxy then gives up on the flow (a body over its body_size_limit).
        answer_flow(flow, refusal_response(refusal))
        flow.comment = f"keybrake refused: {refusal.code}"
        flow.marked = ":no_entry:"
        self._redact(flow)
        await self.settler.refused(flow, call)
        self._finished(flow, call)

    async def _replay(self, flow: http.HTTPFlow, call: CallState, stored: StoredResponse) -> None:
        """The answer of an earlier call with the same idempotency key, as it was."""
        rt = self.runtime
        assert rt.policies is not None
        policy = rt.policies.vendors[call.vendor]
        flow.response = replay_response(stored)
        if policy.request_id_header:
            call.vendor_request_id = flow.response.headers.get(policy.request_id_header)
        endpoint = call.endpoint
        if endpoint is not None and endpoint.object_id:
            data = json_object(stored.body)
            oid = data.get(endpoint.object_id) if data is not None else None
            call.object_id = oid if isinstance(oid, str) else None
        call.outcome, call.status, call.actual_micros = "replayed", stored.status_code, 0
        flow.comment = f"keybrake {call.key_id} [{call.label}] replayed"
        self._redact(flow)
        await self.settler.refused(flow, call)  # nothing to finish: the audit row only
        self._finished(flow, call)

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
        call = call_of(flow)
        if call is None:
            return
        self._redact(flow)
        response = flow.response
        if call.outcome != "forwarded" or call.stream_usage is None or response is None:
            return
        if "text/event-stream" not in response.headers.get("content-type", "").lower():
            return  # an error answer, read whole as usual
        metering = STREAMS[call.stream_usage]
        # Dropping events changes the length: only a stream without a stated one is edited.
        strip = call.stream_strip and "content-length" not in response.headers
        call.meter = StreamMeter(metering.usage(strip), strip=strip)
        response.stream = call.meter  # chunks go on as they arrive, metered on the way

    async def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or flow.response is None:
            return
        self._redact(flow)
        if call.outcome != "forwarded":
            self.settler.rewrite_links(flow, call)
            return  # refused or replayed: nothing reached the vendor, already audited
        try:
            await self.settler.answered(flow, call)
        except Exception:
            log.exception("keybrake: internal error settling %s (kept reserved)", call.key_id)
        self._finished(flow, call)

    async def error(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None:
            return
        self._redact(flow)
        if call.outcome != "forwarded":
            return
        why = (flow.error.msg if flow.error else "") or "no answer"
        sent = request_was_sent(flow)
        if not flow.client_conn.connected:
            call.code = "client_closed"  # the worker left first: there is no one to answer
        else:
            refusal = _unanswered(call.vendor, sent)
            call.code, call.status = refusal.code, refusal.status
            answer_flow(flow, refusal_response(refusal))
        log.warning(
            "keybrake: %s call of %s %s: %s", call.vendor, call.key_id, call.code, why[:200]
        )
        try:
            if sent:
                await self.settler.unanswered(flow, call, why[:200])
            else:
                await self.settler.unsent(flow, call, why[:200])
        except Exception:
            log.exception("keybrake: internal error settling %s (kept reserved)", call.key_id)
        self._finished(flow, call)

    def _finished(self, flow: http.HTTPFlow, call: CallState) -> None:
        flow.metadata[BREADCRUMB] = call.breadcrumb()
        if call.audited:
            self.runtime.inflight.discard(flow)

    @staticmethod
    def _redact(flow: http.HTTPFlow) -> None:
        """Remove credentials from the flow before mitmweb, flow files or logs can show it."""
        redact(flow.request.headers, REDACTED)


def _unanswered(vendor: str, sent: bool) -> Refusal:
    """The answer to a call the vendor did not answer. The worker is not told why (the
    upstream's address is the operator's business): the audit note and the log say it."""
    if not sent:
        return Refusal(
            "upstream_unreachable",
            f"{vendor} could not be reached; nothing was sent and nothing was charged, "
            "so retrying is safe",
        )
    return Refusal(
        "upstream_failed",
        f"the request was sent to {vendor} but no answer came back; it may have been "
        "charged, so its estimate stays counted: check before retrying",
    )
