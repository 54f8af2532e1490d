"""Settlement: what a vendor's answer changes, in one atomic store step (DESIGN §2).

The answer is parsed once; from it the call's reservation is finished (settled at the charge
the vendor states, released when it refused, kept as spent when the charge is not stated, or
kept as a hold on an object that can still charge), the objects it created become its key's,
the amount it states is remembered for later calls on the object, the response is kept for
idempotent replay, and the call's audit row is appended: all in one `Store.settle_call`, so a
replica that dies after it loses nothing and one that dies before it leaves the reservation
counted. Then the spend headers go on the answer and, in base-URL mode, vendor links are
pointed back at the proxy.

Rare paths make separate store calls beside that one: a call that used an object's existing
holds, an estimate overrun (the key is suspended), an invoice that includes held items.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any, Final, Literal

from mitmproxy import http

from keybrake.core.errors import Refusal
from keybrake.core.money import MoneyError, format_usd, minor_to_micro_usd
from keybrake.core.paths import PathRejected, normalize_path
from keybrake.core.policy import EndpointPolicy, FixedCost, VendorPolicy
from keybrake.pricing import Estimate, actual_cost, hold_amount, releases_hold, values_at
from keybrake.proxy._followup import PriceFollowup
from keybrake.proxy._headers import rewrite
from keybrake.proxy._idempotency import stored_from
from keybrake.proxy.admission import endpoint_for, json_object
from keybrake.proxy.calls import CallState, audit_row
from keybrake.proxy.core import Runtime
from keybrake.store import Settlement, Store, StoredResponse
from keybrake.wire import REMAINING_USD_HEADER, SPENT_USD_HEADER

__all__ = ["MAX_STORED_RESPONSE", "VENDOR_REFUSED", "Settler"]

log = logging.getLogger("keybrake")

MAX_STORED_RESPONSE: Final = 256 * 1024
"""Larger answers are not kept for replay (the vendor's own idempotency still applies): what
one key can make the store hold is bounded by this times keybrake_max_idempotency_entries."""
VENDOR_REFUSED: Final = frozenset({400, 401, 402, 403, 404, 409, 422, 429})
"""Vendor statuses that mean "refused, nothing charged": the reservation is released."""

# "next_page_uri": "https://api.twilio.com/2010-04-01/..." (a JSON member holding a link)
_VENDOR_LINK = re.compile(
    rb'"(?P<key>[A-Za-z0-9_]+_ur(?P<kind>[il]))"\s*:\s*"https://(?P<host>[A-Za-z0-9.-]+)'
    rb'(?P<path>/[^"\\]*)"'
)
_Finish = Literal["settled", "released", "unknown", "held"]


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    """The vendor's answer, parsed once: ``data`` is its JSON object, if it is one."""

    status: int
    data: dict[str, Any] | None
    content: bytes


class Settler:
    """Settles answered (and unanswered) vendor calls; owns the price follow-up reads."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.followup = PriceFollowup(runtime, self.settle_read)

    def close(self) -> None:
        self.followup.close()

    # -- an answer -------------------------------------------------------------------------------
    async def answered(self, flow: http.HTTPFlow, call: CallState) -> None:
        """Settle a forwarded call from the vendor's answer, in one store step."""
        rt = self.runtime
        response = flow.response
        assert response is not None and rt.policies is not None
        policy = rt.policies.vendors[call.vendor]
        call.status = response.status_code
        call.latency_ms = (time.monotonic() - call.started) * 1000
        if policy.request_id_header:
            call.vendor_request_id = response.headers.get(policy.request_id_header)
        content = response.content or b""
        data = json_object(content)
        if call.meter is not None:
            # Streamed: the body went on as it came; the meter read the usage on the way.
            content, data = b"", call.meter.final
        if data is not None and call.endpoint is not None and call.endpoint.object_id:
            oid = data.get(call.endpoint.object_id)
            call.object_id = oid if isinstance(oid, str) else None
        plan = self._plan(call, rt.now())
        store: Store | None = None
        try:
            store = await rt.open_store()
            plan = await self._outcome(
                store, policy, _Answer(response.status_code, data, content), call, plan
            )
        except Exception as e:
            # Whatever was reserved stays counted (the conservative booking).
            log.error("keybrake: could not price the answer of %s: %s", call.key_id, e)
            plan = dataclasses.replace(plan, finish="unknown", created=(), remember=None)
            call.outcome = "unknown"
            call.actual_micros = call.estimate.micros if call.estimate else None
            call.note = "settlement failed: estimate kept as spent"
        self._collapse_expansions(response, call)
        await self._commit(store, flow, call, plan, self._replayable(policy, response, call))
        counted = call.kept_held if call.kept_held is not None else (call.actual_micros or 0)
        spend_headers(response, call, counted - (call.estimate.micros if call.estimate else 0))
        flow.comment = f"keybrake {call.key_id} [{call.label}] {call.outcome}"
        # After storing for replay, so the stored response stays vendor-shaped.
        self.rewrite_links(flow, call)

    async def unanswered(self, flow: http.HTTPFlow, call: CallState, why: str) -> None:
        """Sent, but no answer came back (``why``): the estimate stays spent (it may have
        been charged)."""
        call.outcome, call.note = "unknown", f"no vendor response ({why}): estimate kept as spent"
        call.latency_ms = (time.monotonic() - call.started) * 1000
        call.actual_micros = call.estimate.micros if call.estimate else None
        plan = dataclasses.replace(self._plan(call, self.runtime.now()), finish="unknown")
        store: Store | None = None
        try:
            store = await self.runtime.open_store()
        except Exception as e:
            log.error("keybrake: store unavailable settling %s: %s", call.reservation_id, e)
        await self._commit(store, flow, call, plan)

    async def unsent(self, flow: http.HTTPFlow, call: CallState, why: str) -> None:
        """Never sent (``why``: the vendor could not be reached): nothing can have been
        charged, so the reservation is released with the audit row, in one step."""
        call.outcome, call.actual_micros = "refused", 0
        call.note = f"never sent ({why}): reservation released"
        await self.refused(flow, call)

    async def refused(self, flow: http.HTTPFlow, call: CallState) -> None:
        """A refusal or a replay: give back what the admission took (if it got that far:
        the reservation, the idempotency claim) and append the audit row, in one step."""
        call.latency_ms = (time.monotonic() - call.started) * 1000
        plan = dataclasses.replace(self._plan(call, self.runtime.now()), finish="released")
        store: Store | None = None
        try:
            store = await self.runtime.open_store()
        except Exception as e:
            log.error("keybrake: store unavailable auditing a refusal: %s", e)
        await self._commit(store, flow, call, plan)
        call.reservation_id = None

    async def _commit(
        self,
        store: Store | None,
        flow: http.HTTPFlow | None,
        call: CallState,
        plan: Settlement,
        replayable: StoredResponse | None = None,
    ) -> None:
        """The one store step (``replayable``: the answer kept for idempotent replay); on
        failure the reservation stays counted and the audit row is left to
        `keybrake.proxy.audit.AuditTrail` (``call.audited`` stays False)."""
        plan = dataclasses.replace(  # one copy: `replace` costs microseconds per call
            plan,
            finish=plan.finish if plan.reservation_id is not None else None,
            idempotency_response=replayable,
            audit=audit_row(call, flow, self.runtime),
        )
        if store is None:
            return
        try:
            if plan.finish is not None and not plan.ledger_rows:
                # Reserved outside the admission (a hold finished meanwhile): the store
                # finds the reservation's rows itself.
                await _finish_one(store, plan)
                plan = dataclasses.replace(plan, finish=None)
            await store.settle_call(plan)
            call.audited = True
            call.idem_scope = None
        except Exception as e:
            log.error(
                "keybrake: could not settle %s (kept reserved, counted): %s", call.reservation_id, e
            )

    @staticmethod
    def _plan(call: CallState, now: Any) -> Settlement:
        return Settlement(
            key_id=call.key_id or "",
            label=call.label or "",
            vendor=call.vendor,
            now=now,
            reservation_id=call.reservation_id,
            ledger_rows=call.ledger_rows,
            idempotency_scope=call.idem_scope,
            idempotency_ttl_seconds=call.idem_ttl_seconds,
            idempotency_sha256=call.idem_sha256,
        )

    def _replayable(
        self, policy: VendorPolicy, response: http.Response, call: CallState
    ) -> StoredResponse | None:
        """The answer kept for idempotent replay, or None (the claim is then abandoned)."""
        if call.idem_scope is None or call.meter is not None:
            return None  # a streamed answer was not kept: nothing to replay
        status = response.status_code
        if not (200 <= status < 300 or status in policy.idempotency_replay_statuses):
            return None
        stored = stored_from(response)
        return stored if len(stored.body) <= MAX_STORED_RESPONSE else None

    async def _outcome(
        self, store: Store, policy: VendorPolicy, answer: _Answer, call: CallState, plan: Settlement
    ) -> Settlement:
        """What the answer means for the ledger; sets the call's outcome and money."""
        status, data, content = answer.status, answer.data, answer.content
        estimate = call.estimate or Estimate(0)
        endpoint = call.endpoint
        ok = 200 <= status < 300
        if ok and endpoint is not None and endpoint.hold is not None:
            if data is None:
                # Nothing readable about the object: whatever was reserved stays spent.
                call.note = "response body unreadable: estimate kept as spent"
                call.actual_micros, call.outcome = estimate.micros, "ok"
                return await self._finish(store, call, plan, "unknown")
            plan = await self._settle_object(store, policy, endpoint, data, call, plan)
        elif ok:
            rule = endpoint.actual if endpoint else None
            # The body was parsed once; only an unreadable one is handed over raw.
            actual = actual_cost(policy, rule, data if data is not None else content, estimate)
            micros = actual.micros if actual.micros is not None else estimate.micros
            call.note = actual.note
            if actual.amount_minor is not None:
                call.amount_minor, call.currency = actual.amount_minor, actual.currency
            if call.meter is not None and data is None:
                actual = dataclasses.replace(
                    actual, note="the stream ended without stating its usage: estimate kept"
                )
            unstated = actual.micros is None and estimate.micros > 0
            if unstated and endpoint is not None and isinstance(endpoint.cost, FixedCost):
                unstated = False  # a fixed price is the charge by definition
            plan = await self._finish(
                store, call, plan, "unknown" if unstated else "settled", micros
            )
            call.actual_micros, call.outcome = micros, "unknown" if unstated else "ok"
            if unstated:
                # Never "estimate kept" silently: counted, audited as unknown, and logged.
                why = f" ({actual.note})" if actual.note else ""
                call.note = f"the answer does not state what was charged{why}: estimate counted"
                log.warning(
                    "keybrake: %s %s on %s: the vendor's answer does not state the charge",
                    call.method,
                    call.path,
                    call.key_id,
                )
            if micros > estimate.micros:
                await self._overrun(store, call, micros, estimate.micros)
        elif status in VENDOR_REFUSED:
            # The vendor refused the call: it charged nothing. Holds the call used stay: the
            # object can still charge what it could before.
            call.actual_micros, call.outcome = 0, "vendor_error"
            return dataclasses.replace(plan, finish="released")
        else:
            call.actual_micros, call.outcome = estimate.micros, "vendor_error"
            call.note = f"vendor answered {status}: estimate kept as spent"
            return dataclasses.replace(plan, finish="unknown")
        if endpoint is not None and data is not None:
            plan = dataclasses.replace(
                plan,
                remember=self._remembered(data, policy, endpoint),
                created=self._created(data, endpoint, call),
            )
        return plan

    async def _finish(
        self,
        store: Store,
        call: CallState,
        plan: Settlement,
        kind: _Finish,
        micros: int = 0,
        hold: tuple[str, int] | None = None,
    ) -> Settlement:
        """Finish the call's reservation and the holds it used, as one: the first (the
        oldest hold, else the reservation) as ``kind``, the others released. The call's own
        reservation alone goes into the one settlement step; holds take their own calls."""
        reservations = [*call.holds, *([call.reservation_id] if call.reservation_id else [])]
        if not reservations:
            return plan
        first, *extra = reservations
        finished = dataclasses.replace(plan, finish=kind, actual_micros=micros, hold=hold)
        if not call.holds:
            return finished
        await _finish_one(store, dataclasses.replace(finished, reservation_id=first))
        for reservation_id in extra:
            await store.release(reservation_id)
        return plan

    async def _settle_object(
        self,
        store: Store,
        policy: VendorPolicy,
        endpoint: EndpointPolicy,
        data: dict[str, Any],
        call: CallState,
        plan: Settlement,
    ) -> Settlement:
        """Settle a call on an object that can charge later (see `HoldRule`).

        The call's reservation and the holds it used cover the same object: a charged answer
        settles them (once), an answer proving nothing more can move releases them, any other
        answer keeps them as one hold at what the object can still charge.
        """
        rule = endpoint.hold
        assert rule is not None
        estimate = call.estimate or Estimate(0)
        bound = max(estimate.micros, call.held_micros)
        reserved = bool(call.holds or call.reservation_id)
        actual = actual_cost(policy, endpoint.actual, data, estimate) if endpoint.actual else None
        oid = data.get(endpoint.object_id or "id")
        object_id = oid if isinstance(oid, str) and oid else call.held_for
        unstated = actual is not None and actual.charged and actual.micros is None
        if actual is not None and actual.charged and not unstated:
            micros = actual.micros if actual.micros is not None else bound
            call.note = actual.note
            if actual.amount_minor is not None:
                call.amount_minor, call.currency = actual.amount_minor, actual.currency
            plan = await self._finish(store, call, plan, "settled", micros)
            if rule.releases:
                await self._release_included(store, policy, rule.releases, data, call)
            call.actual_micros, call.outcome = micros, "ok"
            if micros > bound and reserved:
                await self._overrun(store, call, micros, bound)
            return plan
        call.actual_micros, call.outcome = 0, "ok"
        if not reserved:
            return plan
        if releases_hold(rule, data):
            call.note = "released: nothing more can be charged"
            return await self._finish(store, call, plan, "released")
        if object_id is None:  # nothing to hold on to: keep it counted instead
            call.actual_micros, call.note = bound, "no object id in the answer: estimate kept"
            return await self._finish(store, call, plan, "unknown")
        amount = hold_amount(policy, rule, data, Estimate(bound))
        plan = await self._finish(store, call, plan, "held", hold=(object_id, amount))
        if endpoint.followup and call.reservation_id:
            self.followup.schedule(policy, endpoint.followup, object_id)
        call.kept_held = amount
        # "held" is the outcome of the call that made the hold; a call that only used it
        # (a read, a confirm that needs a browser step) is ok, and the hold stays.
        call.outcome = "held" if call.reservation_id else "ok"
        call.note = f"${format_usd(amount)} held: {object_id[:64]} can still charge later"
        if unstated:
            call.note = f"${format_usd(amount)} held: the answer does not state the charge yet"
        if amount > bound:
            await self._overrun(store, call, amount, bound)
        return plan

    async def settle_read(
        self, policy: VendorPolicy, path: str, object_id: str, data: dict[str, Any]
    ) -> bool:
        """Finish the holds of ``object_id`` from the proxy's own read of it; True when done.

        The read is audited like a vendor call, under the key whose hold it finished."""
        try:
            read = endpoint_for(policy, "GET", normalize_path(path).segments)[0]
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
        call = CallState(vendor=policy.vendor, method="GET", path=path, actor="keybrake")
        call.key_id, call.status, call.object_id = holds[0].key_id, 200, object_id
        call.estimate = Estimate(held)
        kind: _Finish
        if actual is not None and actual.charged and actual.micros is not None:
            kind, call.outcome, call.actual_micros = "settled", "ok", actual.micros
            call.note = (
                f"read by the proxy: the hold of {object_id[:64]} settled at the charge stated"
            )
        elif releases_hold(read.hold, data):
            kind, call.outcome, call.actual_micros = "released", "ok", 0
            call.note = f"read by the proxy: {object_id[:64]} was not charged; its hold released"
        else:
            return False
        key = await store.get_key(holds[0].key_id)
        call.label = key.agent_run_label if key else None
        call.holds = tuple(h.reservation_id for h in holds)
        plan = await self._finish(
            store, call, self._plan(call, self.runtime.now()), kind, call.actual_micros or 0
        )
        await self._commit(store, None, call, plan)
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

    @staticmethod
    def _created(
        data: dict[str, Any], endpoint: EndpointPolicy, call: CallState
    ) -> tuple[str, ...]:
        """The objects this call created belong to its key (and, for sharing, its label)."""
        if not endpoint.creates or call.key is None or not 200 <= (call.status or 0) < 300:
            return ()
        ids = [v for v in values_at(data, endpoint.creates) if isinstance(v, str) and v]
        return tuple(ids[:1000])

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

    @staticmethod
    def _remembered(
        data: dict[str, Any], policy: VendorPolicy, endpoint: EndpointPolicy
    ) -> tuple[str, int] | None:
        """The object's amount, kept so later amount-less calls on it can be priced."""
        if not endpoint.remember_amount:
            return None
        object_id = data.get(endpoint.object_id or "id")
        if not isinstance(object_id, str):
            return None
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
                return None  # an option without a plain amount (tiers, custom): nothing known
            try:
                micros = max(
                    micros, minor_to_micro_usd(amount, str(currency).lower(), policy.fx_to_usd)
                )
            except MoneyError:
                return None  # a currency without a rate: better unknown than understated
        return object_id, micros

    # -- the answer the worker sees ----------------------------------------------------------------
    @staticmethod
    def _collapse_expansions(response: http.Response, call: CallState) -> None:
        """What the proxy expanded for itself goes back to an id, as the worker asked."""
        if not call.expanded:
            return
        try:
            data = json.loads(response.content or b"")
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        for name in call.expanded:
            value = data.get(name)
            if isinstance(value, dict) and isinstance(value.get("id"), str):
                data[name] = value["id"]
        response.content = json.dumps(data).encode()

    def rewrite_links(self, flow: http.HTTPFlow, call: CallState) -> None:
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


async def _finish_one(store: Store, plan: Settlement) -> None:
    assert plan.reservation_id is not None
    if plan.finish == "settled":
        await store.settle(plan.reservation_id, plan.actual_micros)
    elif plan.finish == "released":
        await store.release(plan.reservation_id)
    elif plan.finish == "unknown":
        await store.mark_unknown(plan.reservation_id)
    elif plan.finish == "held":
        assert plan.hold is not None
        await store.hold(plan.reservation_id, plan.vendor, *plan.hold)


def spend_headers(response: http.Response, call: CallState, delta: int) -> None:
    """``X-Keybrake-Spent-Usd`` and ``-Remaining-Usd``: the key's budgets as of the admission,
    moved by what this call left counted beyond its reservation (``delta``)."""
    if not call.budgets:
        return
    key_budget = call.budgets[0]
    spent = key_budget.used_micros + delta
    remaining = [
        b.cap_micros - b.spent_micros - b.reserved_micros - delta
        for b in call.budgets
        if b.cap_micros is not None
    ]
    values = {SPENT_USD_HEADER: format_usd(max(0, spent))}
    if remaining:
        values[REMAINING_USD_HEADER] = format_usd(max(0, min(remaining)))
    rewrite(response.headers, values)  # both in one pass (a vendor's own copies replaced)
