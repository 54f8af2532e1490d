"""The `Alerts` addon: thresholds and events become notifications that arrive.

What fires (each once per window, decided in the store: `keybrake.store.alerts`):

- ``threshold``: a budget node (key day, key lifetime, label day, and every node kind in
  `NODE_KINDS`) reached a threshold percent of its cap (spent, see `_alert_rules`), checked
  after each settled call, off the call's path; once per node, threshold and UTC day (daily
  caps) or once ever (lifetime caps).
- ``cap_hit``: a call was refused ``cap_exhausted``; once per budget and window.
- ``key_suspended``: a call cost more than its estimate and its key was suspended.
- ``key_revoked`` / ``issuer_revoked``: through the admin API (`Alerts.event`).
- ``audit_behind``: the audit outbox holds more than ``audit_behind_rows``, or the audit
  sink keeps failing; once per hour.
- ``store_unreachable``: the store failed for ``store_down_seconds``. It cannot go through
  the store's outbox: it is sent from memory (retried while the process lives), once per
  outage of this replica.

Every fired alert is one row per subscribed webhook in the store's alert outbox, committed
before anything is sent; this addon's loop claims due rows, sends them (`_alert_webhooks`)
and retries failures with exponential backoff and jitter until ``max_attempts``. A
restart, a ``kill -9`` or a receiver outage loses nothing: the rows wait in the store and
any replica sends them. Nothing here runs on a vendor call's path: the hooks only schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any, Final

from mitmproxy import ctx, exceptions, http
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keybrake.proxy._alert_rules import (
    AlertConfig,
    AlertConfigError,
    Node,
    Webhook,
    crossed,
    load_alert_config,
    nodes_of,
    parse_thresholds,
    threshold_alert,
    window_end,
)
from keybrake.proxy._alert_webhooks import send
from keybrake.proxy.calls import CallState, call_of
from keybrake.proxy.core import Runtime
from keybrake.store import IssuerRecord, KeyRecord, StoreUnavailable, utc_day
from keybrake.store.alerts import alert_outbox

__all__ = ["Alerts"]

log = logging.getLogger("keybrake")

BATCH: Final = 20
# A claimed delivery is another replica's (or, after a crash, the next start's) to send
# after the timeout and this long: a send is cut off at the timeout (`_alert_webhooks.send`).
LEASE_MARGIN_SECONDS: Final = 5.0
# Dedupe keys this process knows fired (so it skips the store step); cleared when full.
MAX_KNOWN: Final = 100_000
# Keys with a held call, read again after its follow-up reads (`_later`); the oldest go first.
MAX_RECHECKS: Final = 10_000
RECHECK_MARGIN_SECONDS: Final = 2.0
_SPENDING: Final = frozenset({"ok", "overrun", "vendor_error", "unknown", "held"})


def _part(text: str) -> str:
    """One field of a dedupe key: ``:`` (allowed in labels) and ``%`` escaped, so no two
    nodes' keys can be the same string (one label cannot pre-empt another's alert)."""
    return urllib.parse.quote(text, safe="/@+=._- ")


class _AlertCollector(Collector):
    def __init__(self, alerts: Alerts) -> None:
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        a = self.alerts
        fired = CounterMetricFamily(
            "keybrake_alerts_fired",
            "Alerts this replica fired first (deduplicated).",
            labels=["kind"],
        )
        for kind, n in sorted(a.fired.items()):
            fired.add_metric([kind], n)
        deliveries = CounterMetricFamily(
            "keybrake_alert_deliveries",
            "Alert deliveries this replica finished, by webhook and result (delivered, failed: "
            "gave up after max_attempts).",
            labels=["webhook", "result"],
        )
        for (hook, result), n in sorted(a.finished.items()):
            deliveries.add_metric([hook, result], n)
        attempts = CounterMetricFamily(
            "keybrake_alert_delivery_failures",
            "Failed (retried) alert delivery attempts, by webhook.",
            labels=["webhook"],
        )
        for hook, n in sorted(a.attempt_failures.items()):
            attempts.add_metric([hook], n)
        pending = GaugeMetricFamily(
            "keybrake_alert_outbox_due",
            "Alert deliveries due and not yet sent, last seen by this replica's loop.",
        )
        pending.add_metric([], a.due_seen)
        yield from (fired, deliveries, attempts, pending)


class Alerts:
    """Fires alerts (see the module), runs the delivery loop, answers ``/vault/alerts``."""

    name = "keybrake_alerts"

    def __init__(self, runtime: Runtime, registry: CollectorRegistry | None = None) -> None:
        self.runtime = runtime
        self.config = AlertConfig()
        self.fired: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.attempt_failures: dict[str, int] = {}
        self.due_seen = 0
        self._known: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._rechecks: dict[str, tuple[KeyRecord, str, list[float]]] = {}
        self._store_failing_since: float | None = None
        self._store_alerted = False
        runtime.alerts = self
        if registry is not None:
            registry.register(_AlertCollector(self))

    # -- options -----------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        loader.add_option(
            "keybrake_alerts",
            str,
            os.environ.get("KEYBRAKE_ALERTS", ""),
            "Alerts file (TOML): per-label/per-key thresholds and the webhooks alerts are "
            "sent to; secrets named by environment variable or file, never written there.",
        )
        loader.add_option(
            "keybrake_alert_thresholds",
            str,
            os.environ.get("KEYBRAKE_ALERT_THRESHOLDS", "50,80,100"),
            "Default alert thresholds, percent of each cap (the alerts file may override).",
        )

    def configure(self, updated: set[str]) -> None:
        if not {"keybrake_alerts", "keybrake_alert_thresholds"} & updated:
            return
        try:
            default = parse_thresholds(
                ctx.options.keybrake_alert_thresholds, "keybrake_alert_thresholds"
            )
            self.config = load_alert_config(ctx.options.keybrake_alerts, default)
        except AlertConfigError as e:
            raise exceptions.OptionsError(f"keybrake_alerts: {e}") from None

    async def running(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._deliver_forever())

    async def done(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        # Alerts still being fired are committed before the store closes (bounded).
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)

    # -- observing calls (never on the call's path: only a task is scheduled) ------------------
    def response(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def _observe(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or flow.metadata.get(self.name):
            return
        if call.code == "store_unavailable":
            self._store_failed()
        if call.key is None:
            return
        flow.metadata[self.name] = True
        if call.code == "cap_exhausted":
            self._spawn(self._cap_hit(call, flow.response))
        if call.outcome == "overrun":
            self._spawn(self._suspended(call))
        if call.outcome in _SPENDING and self._may_cross(call):
            self._spawn(self._check_budgets(call.key, call.vendor))
        if call.outcome == "held":
            # Its hold is settled later, off any call (`_followup`): the key's budgets are
            # read again after each follow-up read, by the delivery loop.
            self._later(call.key, call.vendor)

    def _may_cross(self, call: CallState) -> bool:
        """Whether a threshold not known to have fired may be reached now, judged from the
        budgets as of the call's admission (spent + reserved, its own estimate included) plus
        what it cost: more than it can have spent, so a call far below every threshold (or
        whose thresholds all fired) costs no store read."""
        key = call.key
        if key is None or not call.budgets:
            return call.key is not None  # no snapshot: read the store
        extra = call.actual_micros or 0
        for node in nodes_of(call.budgets, plus_reserved=True):
            bound = dataclasses.replace(node, spent_micros=node.spent_micros + extra)
            percents = self.config.thresholds_for(node, key.agent_run_label, key.key_id)
            for percent in crossed(bound, percents):
                if self._threshold_key(node, percent) not in self._known:
                    return True
        return False

    @staticmethod
    def _threshold_key(node: Node, percent: int) -> str:
        return f"threshold:{node.kind}:{_part(node.node_id)}:{node.window}:{percent}"

    def _later(self, key: KeyRecord, vendor: str) -> None:
        start = time.monotonic()
        due = [start + d + RECHECK_MARGIN_SECONDS for d in self.runtime.followup_delays]
        self._rechecks.pop(key.key_id, None)
        if len(self._rechecks) >= MAX_RECHECKS:  # the oldest goes (it is read at its next call)
            self._rechecks.pop(next(iter(self._rechecks)))
        self._rechecks[key.key_id] = (key, vendor, sorted(due))

    async def _run_rechecks(self) -> None:
        now = time.monotonic()
        for key_id, (key, vendor, due) in list(self._rechecks.items()):
            if due[0] > now:
                continue
            left = [t for t in due if t > now]
            if left:
                self._rechecks[key_id] = (key, vendor, left)
            else:
                del self._rechecks[key_id]
            await self._check_budgets(key, vendor)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_budgets(self, key: KeyRecord, vendor: str) -> None:
        """Every node of ``key``'s budgets, against its thresholds (one store read, then one
        store step per threshold newly reached)."""
        try:
            store = await self.runtime.open_store()
            budgets = await store.budgets(key, self.runtime.now())
            for node in nodes_of(budgets):
                percents = self.config.thresholds_for(node, key.agent_run_label, key.key_id)
                for percent in crossed(node, percents):
                    dedupe = self._threshold_key(node, percent)
                    alert = threshold_alert(node, percent, key.agent_run_label, vendor)
                    alert["key_id"] = key.key_id
                    await self.fire(dedupe, alert, window_end(node.window))
        except Exception as e:
            self._report(e, "threshold check failed")

    async def _cap_hit(self, call: CallState, response: http.Response | None) -> None:
        budget, window = "", utc_day(self.runtime.now())
        with contextlib.suppress(Exception):
            error = json.loads(response.content or b"{}")["error"] if response else {}
            budget, window = str(error.get("budget", "")), str(error.get("window", window))
        budget = budget or f"key:{call.key_id}"
        summary = f"cap reached for {budget} ({window}): a call of key {call.key_id} was refused"
        alert = {
            "kind": "cap_hit",
            "severity": "critical",
            "summary": summary,
            "node": {"scope": budget, "window": window},
            "key_id": call.key_id,
            "label": call.label,
            "vendor": call.vendor,
        }
        try:
            await self.fire(f"cap_hit:{_part(budget)}:{_part(window)}", alert, window_end(window))
        except Exception as e:
            self._report(e, "cap alert not fired")

    async def _suspended(self, call: CallState) -> None:
        alert = {
            "kind": "key_suspended",
            "severity": "critical",
            "summary": f"key {call.key_id} suspended: {call.note or 'estimate overrun'}",
            "key_id": call.key_id,
            "label": call.label,
            "vendor": call.vendor,
            "details": {"reason": call.note},
        }
        try:
            token = call.reservation_id or uuid.uuid4().hex
            await self.fire(f"key_suspended:{call.key_id}:{token}", alert, self._days(7))
        except Exception as e:
            self._report(e, "suspension alert not fired")

    def event(self, kind: str, summary: str, **fields: Any) -> None:
        """An event the admin side reports (``key_revoked``, ``issuer_revoked``): fired once
        per subject, in the background."""
        subject = (
            fields.pop("subject", None)
            or fields.get("key_id")
            or fields.get("issuer_id")
            or uuid.uuid4().hex
        )
        alert = {"kind": kind, "severity": "warning", "summary": summary, **fields}

        async def fire() -> None:
            try:
                await self.fire(f"{kind}:{subject}", alert, self._days(30))
            except Exception as e:
                self._report(e, f"{kind} alert not fired")

        with contextlib.suppress(RuntimeError):  # no running loop: nothing to do
            self._spawn(fire())

    def key_revoked(self, key: KeyRecord, via: str) -> None:
        """``key_revoked``: once per key."""
        self.event(
            "key_revoked",
            f"key {key.key_id} (label {key.agent_run_label!r}, {key.vendor}) revoked via {via}",
            key_id=key.key_id,
            label=key.agent_run_label,
            vendor=key.vendor,
        )

    def keys_stopped(self, action: str, selector: dict[str, Any], key_ids: list[str]) -> None:
        """A kill switch (``POST /vault/bulk/revoke|suspend``): one alert for the action
        (``key_revoked`` / ``key_suspended``, ``details.bulk``), not one per key."""
        kind = "key_revoked" if action == "revoke" else "key_suspended"
        shown = ", ".join(f"{k}={v}" for k, v in selector.items() if v)
        self.event(
            kind,
            f"kill switch: {len(key_ids)} key(s) {action}{'d' if action == 'revoke' else 'ed'} "
            f"({shown})",
            subject=f"bulk:{uuid.uuid4().hex}",
            details={"bulk": True, "selector": selector, "count": len(key_ids),
                     "key_ids": key_ids[:100]},
        )  # fmt: skip

    def issuer_revoked(self, issuer: IssuerRecord, keys: int) -> None:
        """``issuer_revoked``: once per issuer token."""
        self.event(
            "issuer_revoked",
            f"issuer token {issuer.issuer_id} ({issuer.name}, labels under "
            f"{issuer.label_prefix!r}) revoked; {keys} of its keys revoked with it",
            issuer_id=issuer.issuer_id,
            details={"revoked_keys": keys},
        )

    def _days(self, n: int) -> Any:
        import datetime as dt

        return self.runtime.now() + dt.timedelta(days=n)

    # -- firing --------------------------------------------------------------------------------
    def _complete(self, alert: dict[str, Any]) -> dict[str, Any]:
        return {
            "alert_id": uuid.uuid4().hex,
            "at": self.runtime.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "instance": self.runtime.instance_id,
            **alert,
        }

    def _rows(self, dedupe: str, alert: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"webhook": w.name, "dedupe": dedupe, "alert": alert, "attempts": 0, "error": None}
            for w in self.config.webhooks
            if alert["kind"] in w.events
        ]

    async def fire(self, dedupe: str, alert: dict[str, Any], expires_at: Any) -> bool:
        """Queue ``alert`` for every subscribed webhook unless ``dedupe`` fired already (in
        its window); True when this replica was first."""
        if dedupe in self._known:
            return False
        alert = self._complete(alert)
        store = await self.runtime.open_store()
        first = await alert_outbox(store).fire(
            dedupe, self._rows(dedupe, alert), self.runtime.now(), expires_at
        )
        if len(self._known) >= MAX_KNOWN:
            self._known.clear()
        self._known.add(dedupe)
        if first:
            self.fired[alert["kind"]] = self.fired.get(alert["kind"], 0) + 1
            log.info("keybrake: alert %s: %s", alert["kind"], alert["summary"])
        return bool(first)

    async def send_test(self) -> dict[str, Any]:
        """A test alert to every webhook, through the outbox like any other."""
        alert = {
            "kind": "test",
            "severity": "info",
            "summary": "Keybrake test alert: this webhook receives Keybrake's alerts",
        }
        dedupe = f"test:{uuid.uuid4().hex}"
        await self.fire(dedupe, alert, self._days(1))
        return {"dedupe_key": dedupe, "webhooks": [w.name for w in self.config.webhooks]}

    # -- delivering ----------------------------------------------------------------------------
    def _hook(self, name: str) -> Webhook | None:
        return next((w for w in self.config.webhooks if w.name == name), None)

    def _backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter: uniform(c/2, c), c = min(max, base * 2**attempts)."""
        c = self.config
        ceiling = min(c.retry_max_seconds, c.retry_base_seconds * 2 ** min(attempts, 30))
        return random.uniform(ceiling / 2, ceiling)

    async def deliver_due(self) -> int:
        """Send what is due now (one batch); returns how many rows were claimed."""
        import datetime as dt

        store = await self.runtime.open_store()
        outbox = alert_outbox(store)
        lease = self.config.timeout_seconds + LEASE_MARGIN_SECONDS
        rows = await outbox.due(self.runtime.now(), BATCH, lease)
        self.due_seen = len(rows)

        async def one(row_id: str, row: dict[str, Any]) -> None:
            hook = self._hook(str(row.get("webhook")))
            attempts = int(row.get("attempts", 0)) + 1
            if hook is None:  # a webhook removed from the alerts file since it was queued
                ok, status, problem = False, None, "webhook no longer configured"
                attempts = self.config.max_attempts
            else:
                ok, status, problem = await send(
                    hook,
                    row["alert"],
                    str(row.get("dedupe")),
                    attempts,
                    self.config.timeout_seconds,
                )
            row = {**row, "attempts": attempts, "error": problem or None, "status": status}
            name = str(row.get("webhook"))
            if ok or attempts >= self.config.max_attempts:
                result = "delivered" if ok else "failed"
                finished = {
                    **row,
                    "result": result,
                    "finished_at": self.runtime.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                if await outbox.done(row_id, finished):
                    self.finished[(name, result)] = self.finished.get((name, result), 0) + 1
                    if not ok:
                        log.error(
                            "keybrake: alert %s to webhook %s given up after %d attempts (%s)",
                            row["alert"].get("kind"), name, attempts, problem,
                        )  # fmt: skip
                return
            self.attempt_failures[name] = self.attempt_failures.get(name, 0) + 1
            delay = self._backoff(attempts - 1)
            log.warning(
                "keybrake: alert delivery to webhook %s failed (%s); attempt %d, retrying in %.1fs",
                name, problem, attempts, delay,
            )  # fmt: skip
            await outbox.retry(row_id, row, self.runtime.now() + dt.timedelta(seconds=delay))

        await asyncio.gather(*(one(i, r) for i, r in rows))
        return len(rows)

    async def _deliver_forever(self) -> None:
        # Not at once: mitmdump stops when an error is logged before `running` has returned.
        await asyncio.sleep(min(0.2, self.config.poll_seconds))
        while True:
            claimed = 0
            try:
                if self.config.webhooks:
                    claimed = await self.deliver_due()
                await self._check_audit()
                await self._run_rechecks()
                self._store_back()
            except StoreUnavailable as e:
                self._store_failed(str(e))
            except Exception as e:
                self._report(e, "alert delivery loop")
            if claimed < BATCH:
                await asyncio.sleep(self.config.poll_seconds)

    async def _check_audit(self) -> None:
        pump = self.runtime.audit_pump
        if pump is None:
            return
        behind = pump.depth >= self.config.audit_behind_rows
        failing = pump.failures >= 5
        if not (behind or failing):
            return
        hour = self.runtime.now().strftime("%Y-%m-%dT%H")
        why = f"{pump.depth} rows waiting" if behind else f"{pump.failures} failed writes in a row"
        alert = {
            "kind": "audit_behind",
            "severity": "warning",
            "summary": f"the audit sink is behind on {self.runtime.instance_id}: {why}",
            "details": {"queue_depth": pump.depth, "failures": pump.failures},
        }
        await self.fire(f"audit_behind:{hour}", alert, self._days(1))

    # -- the store is down: sent from memory -----------------------------------------------------
    def _store_back(self) -> None:
        self._store_failing_since = None
        self._store_alerted = False

    def _store_failed(self, problem: str = "") -> None:
        now = time.monotonic()
        if self._store_failing_since is None:
            self._store_failing_since = now
        if self._store_alerted or now - self._store_failing_since < self.config.store_down_seconds:
            return
        self._store_alerted = True
        alert = self._complete(
            {
                "kind": "store_unreachable",
                "severity": "critical",
                "summary": f"the store is unreachable from {self.runtime.instance_id}: "
                "vendor calls are refused (503 store_unavailable)",
            }
        )
        dedupe = f"store_unreachable:{self.runtime.instance_id}:{alert['alert_id']}"
        log.warning("keybrake: alert store_unreachable (sent from memory)")
        for hook in self.config.webhooks:
            if "store_unreachable" in hook.events:
                self._spawn(self._send_from_memory(hook, alert, dedupe))

    async def _send_from_memory(self, hook: Webhook, alert: dict[str, Any], dedupe: str) -> None:
        attempts = 0
        while attempts < self.config.max_attempts:
            attempts += 1
            ok, _, _ = await send(hook, alert, dedupe, attempts, self.config.timeout_seconds)
            key = (hook.name, "delivered" if ok else "failed")
            if ok:
                self.finished[key] = self.finished.get(key, 0) + 1
                return
            self.attempt_failures[hook.name] = self.attempt_failures.get(hook.name, 0) + 1
            await asyncio.sleep(self._backoff(attempts - 1))
        self.finished[(hook.name, "failed")] = self.finished.get((hook.name, "failed"), 0) + 1

    # -- the admin surface ---------------------------------------------------------------------
    async def overview(self, limit: int = 50) -> dict[str, Any]:
        """``GET /vault/alerts``: rules, webhooks (never secrets or URL paths), deliveries
        waiting and recent ones."""
        store = await self.runtime.open_store()
        outbox = alert_outbox(store)
        return {
            **self.config.public(),
            "pending": await outbox.pending(limit),
            "recent": await outbox.recent(limit),
        }

    def _report(self, exc: Exception, what: str) -> None:
        if isinstance(exc, StoreUnavailable):
            self._store_failed(str(exc))
            log.warning("keybrake: %s: the store is unavailable", what)
        else:
            log.error("keybrake: %s: %s", what, type(exc).__name__)
