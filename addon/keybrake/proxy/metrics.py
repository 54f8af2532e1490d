"""The `Metrics` addon: Prometheus metrics, served as ``GET /metrics`` on the admin listener.

Counted in this process (sum over replicas in PromQL): vendor calls by outcome and refusal
code, refusals, micro-USD spent and reserved per label, vendor latency, store latency (the
runtime's store is wrapped in a timing proxy when it is opened) and the audit writer's queue.

Scraping has its own read-only token, so a Prometheus server never holds the admin token:
``KEYBRAKE_METRICS_TOKEN``, or the file named by ``keybrake_metrics_token_file`` (the file
Prometheus's ``credentials_file`` reads may be the same one). With one set, ``/metrics`` asks
for ``Authorization: Bearer <metrics token>`` (the admin token is accepted too) and the token
opens nothing else; with none, ``/metrics`` is open on an admin listener bound to loopback and
refused on any other (see `keybrake.web.admin`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from mitmproxy import ctx, exceptions, http
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keybrake.auditlog.reports import SPENT_OUTCOMES
from keybrake.proxy.calls import call_of
from keybrake.proxy.core import Runtime
from keybrake.store import Store, StoreUnavailable

__all__ = ["MAX_LABELS", "Metrics", "TimedStore", "load_metrics_token"]

# agent_run_label is chosen by whoever issues keys; past this many distinct values per process
# new ones are counted under "_other" so a label per run cannot blow up Prometheus.
MAX_LABELS = 500
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
VENDOR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DONE = "keybrake_metrics_counted"
METRICS_TOKEN_ENV = "KEYBRAKE_METRICS_TOKEN"


def load_metrics_token(token_file: str, admin_token: str) -> str:
    """The token ``GET /metrics`` asks for, ``""`` when none is set.

    ``$KEYBRAKE_METRICS_TOKEN`` or what ``token_file`` holds (stripped, as Prometheus reads
    its ``credentials_file``), not both. Raises
    `exceptions.OptionsError` for an unreadable or empty file, or a token that is the admin
    token (the scraper would hold the admin token after all).
    """
    env = os.environ.get(METRICS_TOKEN_ENV, "")
    if env and token_file:
        raise exceptions.OptionsError(
            f"keybrake_metrics_token_file: set it or {METRICS_TOKEN_ENV}, not both"
        )
    token = env.strip()
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not text"
            raise exceptions.OptionsError(
                f"keybrake_metrics_token_file {path}: cannot read it: {why}"
            ) from None
        if not token:
            raise exceptions.OptionsError(f"keybrake_metrics_token_file {path} is empty")
    if token and token == admin_token:
        raise exceptions.OptionsError(
            "the metrics token must differ from the admin token: give the scraper a token "
            "of its own (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


class TimedStore:
    """A `Store` whose every coroutine method is timed into a histogram.

    ``TimedStore(store, observe)`` delegates everything to ``store``;
    ``observe(op, seconds, failed)`` is called after each awaited call.
    """

    def __init__(self, inner: Store, observe: Callable[[str, float, bool], None]) -> None:
        self.inner = inner
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            failed = False
            try:
                return await attr(*args, **kwargs)
            except StoreUnavailable:
                failed = True
                raise
            finally:
                self._observe(name, time.perf_counter() - start, failed)

        self.__dict__[name] = timed  # made once per method, not on every call
        return timed


class _AuditCollector(Collector):
    """The audit pump's backlog and totals, read at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        writer = self.runtime.audit_pump
        depth = GaugeMetricFamily(
            "keybrake_audit_queue_depth",
            "Audit rows waiting to be written to the sink (the store's outbox, last seen).",
        )
        written = CounterMetricFamily(
            "keybrake_audit_rows_written", "Audit rows this replica moved to the sink."
        )
        dropped = CounterMetricFamily(
            "keybrake_audit_rows_dropped",
            "Audit rows lost because the store was unavailable for too long.",
        )
        failures = CounterMetricFamily(
            "keybrake_audit_write_failures", "Failed (retried) writes to the audit sink."
        )
        if writer is not None:
            depth.add_metric([], writer.depth)
            written.add_metric([], writer.written)
            dropped.add_metric([], writer.dropped)
            failures.add_metric([], writer.failures)
        yield from (depth, written, dropped, failures)


class Metrics:
    """Counts vendor calls from `CallState` (after `VaultGuard` and `AuditTrail` ran)."""

    name = "keybrake_metrics"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # A registry per instance: mitmproxy re-creates addons when a script is reloaded.
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "keybrake_requests",
            "Vendor calls that reached Keybrake, by outcome (ok, held, overrun, refused, "
            "replayed, vendor_error, unknown) and refusal code.",
            ["vendor", "outcome", "code"],
            registry=r,
        )
        self.refusals = Counter(
            "keybrake_refusals",
            "Calls refused by Keybrake (nothing was forwarded), by code.",
            ["vendor", "code"],
            registry=r,
        )
        self.spent = Counter(
            "keybrake_spend_micro_usd",
            "Micro-USD counted as spent: settled actual costs, and the estimate kept when "
            "the vendor's answer was an error or never came.",
            ["vendor", "label"],
            registry=r,
        )
        self.overruns = Counter(
            "keybrake_estimate_overruns",
            "Calls whose vendor charged (or can charge) more than their estimate: booked as "
            "charged, and the key suspended.",
            ["vendor", "label"],
            registry=r,
        )
        self.reservations = Counter(
            "keybrake_reservations_micro_usd",
            "Micro-USD reserved against caps before forwarding (every reservation).",
            ["vendor", "label"],
            registry=r,
        )
        self.reserved = Gauge(
            "keybrake_reserved_micro_usd",
            "Micro-USD reserved by calls in flight in this process right now.",
            ["vendor", "label"],
            registry=r,
        )
        self.vendor_latency = Histogram(
            "keybrake_vendor_latency_seconds",
            "Time from the request reaching Keybrake to the vendor's answer (forwarded calls).",
            ["vendor", "outcome"],
            buckets=VENDOR_BUCKETS,
            registry=r,
        )
        self.store_latency = Histogram(
            "keybrake_store_latency_seconds",
            "Latency of store operations (reserve, settle, get_key_by_secret_hash, ...).",
            ["backend", "op"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "keybrake_store_errors",
            "Store operations that failed (the proxy failed closed).",
            ["backend", "op"],
            registry=r,
        )
        self.store_up = Gauge(
            "keybrake_store_up", "1 if the store answered a ping at scrape time.", registry=r
        )
        r.register(_AuditCollector(runtime))
        ProcessCollector(registry=r)
        self._labels: set[str] = set()
        self._in_flight: dict[str, tuple[str, str, int]] = {}
        # `metric.labels(...)` takes a lock and builds a key on every call: the children are
        # looked up once per label set (bounded: vendors x outcomes x codes, MAX_LABELS labels).
        self._children: dict[tuple[object, ...], Any] = {}
        self._store_timers: dict[tuple[str, str], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def load(self, loader: object) -> None:
        loader.add_option(  # type: ignore[attr-defined]
            "keybrake_metrics_token_file",
            str,
            os.environ.get("KEYBRAKE_METRICS_TOKEN_FILE", ""),
            f"File holding the bearer token GET /metrics asks for (or set {METRICS_TOKEN_ENV}); "
            "without one, /metrics is open on a loopback admin listener and refused on others.",
        )

    # -- options, the scrape token and store timing ------------------------------------------------
    def configure(self, updated: set[str]) -> None:
        # Core (earlier in the chain) has just opened the store and read the admin token.
        rt = self.runtime
        if {"keybrake_metrics_token_file", "keybrake_data_dir"} & updated:
            rt.metrics_token = load_metrics_token(
                ctx.options.keybrake_metrics_token_file, rt.admin_token
            )
        if rt.store is not None and not isinstance(rt.store, TimedStore):
            rt.store = cast(Store, TimedStore(rt.store, self._observe_store))

    def _backend(self) -> str:
        return self.runtime.store_url.partition(":")[0] or "none"

    def _observe_store(self, op: str, seconds: float, failed: bool) -> None:
        backend = self._backend()
        # One dict lookup per store call: the histogram child of (backend, op).
        timer = self._store_timers.get((backend, op))
        if timer is None:
            timer = self._store_timers[(backend, op)] = self.store_latency.labels(backend, op)
        timer.observe(seconds)
        if failed:
            self._child(self.store_errors, backend, op).inc()

    # -- calls -----------------------------------------------------------------------------------
    def _label(self, label: str | None) -> str:
        if not label:
            return ""
        if label in self._labels:
            return label
        if len(self._labels) < MAX_LABELS:
            self._labels.add(label)
            return label
        return "_other"

    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.reservation_id is None:
            return
        if call.outcome != "forwarded" or flow.id in self._in_flight:
            return
        amount = call.estimate.micros if call.estimate else 0
        held = (call.vendor, self._label(call.label), amount)
        self._in_flight[flow.id] = held
        self._child(self.reservations, held[0], held[1]).inc(amount)
        self._child(self.reserved, held[0], held[1]).inc(amount)

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)  # a CONNECT refused by Egress

    def _count(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or flow.metadata.get(_DONE):
            return
        flow.metadata[_DONE] = True
        held = self._in_flight.pop(flow.id, None)
        if held is not None:
            self._child(self.reserved, held[0], held[1]).dec(held[2])
        outcome = "unknown" if call.outcome == "forwarded" else call.outcome
        self._child(self.requests, call.vendor, outcome, call.code or "").inc()
        if outcome == "refused":
            self._child(self.refusals, call.vendor, call.code or "").inc()
        elif outcome == "overrun":
            self._child(self.overruns, call.vendor, self._label(call.label)).inc()
        if outcome in SPENT_OUTCOMES:
            spent = call.actual_micros
            if spent is None:
                spent = call.estimate.micros if call.estimate else 0
            if spent:
                self._child(self.spent, call.vendor, self._label(call.label)).inc(spent)
        if outcome not in ("refused", "replayed") and call.latency_ms is not None:
            self._child(self.vendor_latency, call.vendor, outcome).observe(call.latency_ms / 1000)

    # -- exposition ------------------------------------------------------------------------------
    async def exposition(self) -> http.Response:
        """The ``/metrics`` response (the caller checked who is asking)."""
        up = 0
        try:
            store = await self.runtime.open_store()
            await asyncio.wait_for(store.ping(), timeout=2)
            up = 1
        except (StoreUnavailable, TimeoutError):
            pass
        self.store_up.set(up)
        return http.Response.make(
            200,
            generate_latest(self.registry),
            {"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"},
        )
