"""The `Core` addon: Keybrake's options, loaded policies, real secrets and the store.

The other addons (`AdminApi`, `VaultGuard`) read everything through the one `Runtime` this
addon owns, so options are parsed and validated in one place (``configure``) and a bad policy
file stops the proxy at start with the file name and the field path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import certifi
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from keybrake.auditlog.pump import AuditPump
from keybrake.auditlog.sinks import AuditSink
from keybrake.core.keys import parse_duration
from keybrake.core.policy import PolicyError, PolicySet, load_policies
from keybrake.proxy import _dispatch
from keybrake.proxy.credentials import VendorSecrets
from keybrake.proxy.limiter import FailureLimiter
from keybrake.proxy.listeners import Listeners
from keybrake.proxy.mitm_chain import check_options, unload_unused_addons
from keybrake.store import Store, StoreUnavailable, open_store

if TYPE_CHECKING:
    from keybrake.proxy.alerts import Alerts

__all__ = ["Core", "Runtime", "load_admin_token"]

log = logging.getLogger("keybrake")
SHUTDOWN_GRACE_SECONDS = 10.0
REDIS_RECOVERY_GRACE = dt.timedelta(minutes=15)
ADMIN_FAILURES_PER_MINUTE = 30
# A replica whose clock differs from the shared store's by more than this refuses vendor
# calls (503 clock_skewed): it would judge expiry and the UTC day differently from the rest.
MAX_CLOCK_SKEW_SECONDS = 30.0
CLOCK_CHECK_SECONDS = 15.0
# Shorter admin tokens get a warning at start (the generated ones have 43 characters).
MIN_ADMIN_TOKEN_CHARS = 32
DEFAULT_MAX_IDEMPOTENCY_ENTRIES = 10_000
DEFAULT_MAX_OBJECTS_PER_KEY = 100_000
# How often what the store keeps for expired keys is dropped.
HOUSEKEEPING_SECONDS = 600.0
# Largest body mitmproxy may buffer (requests and responses) when the operator set no limit.
DEFAULT_BODY_SIZE_LIMIT = "16m"


def load_admin_token(data_dir: Path) -> tuple[str, str]:
    """The admin token and where it comes from.

    ``KEYBRAKE_ADMIN_TOKEN`` wins; otherwise ``<data dir>/admin-token`` (created with mode
    0600 on first use).
    """
    env = os.environ.get("KEYBRAKE_ADMIN_TOKEN")
    if env:
        return env, "the KEYBRAKE_ADMIN_TOKEN environment variable"
    path = data_dir / "admin-token"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"kba_{secrets.token_urlsafe(32)}\n")
    return path.read_text().strip(), str(path)


def _same_secret(given: str, real: str) -> bool:
    """Whether a presented token is ``real``, in constant time; never for an empty ``real``.

    Both sides are hashed first, so neither the length nor any prefix of the real token
    changes how long the comparison takes.

    >>> _same_secret("kba_x", "kba_x"), _same_secret("kba_", "kba_x"), _same_secret("", "")
    (True, False, False)
    """
    if not real:
        return False
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    real_digest = hashlib.sha256(real.encode()).digest()
    return hmac.compare_digest(given_digest, real_digest)


def _reverse_targets(modes: list[str]) -> list[str]:
    """allow_hosts entries for reverse listeners' own upstreams.

    ``allow_hosts`` applies to every listener: without these, the admin listener's connections
    would be tunnelled to its placeholder upstream instead of reaching the addon.
    """
    out = []
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, ReverseMode):
            host, port = mode.address
            out.append(rf"^{re.escape(host)}:{port}$")
    return out


class Runtime:
    """State shared by Keybrake's addons for one proxy process."""

    def __init__(self) -> None:
        self.policies: PolicySet | None = None
        self.secrets: dict[str, VendorSecrets] = {}
        self.store: Store | None = None
        self.store_url = ""
        # What each reverse listener serves (admin, base URL) and its TLS; `Core` loads it.
        self.listeners = Listeners()
        self.data_dir = Path(".keybrake")
        self.admin_token = ""
        # The read-only token for GET /metrics ("" for none; set by `keybrake.proxy.metrics`).
        self.metrics_token = ""
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}"
        self.idempotency_ttl_seconds = 24 * 3600
        # Per-key bounds on what one key can make the shared store keep.
        self.max_idempotency_entries = DEFAULT_MAX_IDEMPOTENCY_ENTRIES
        self.max_objects_per_key = DEFAULT_MAX_OBJECTS_PER_KEY
        # Extra CA bundle for policies' upstream overrides (None: the system's roots).
        self.upstream_ca_bundle: Path | None = None
        # Seconds before each read of a held object whose charge its answer did not state.
        self.followup_delays: tuple[float, ...] = (30.0, 120.0, 600.0, 3600.0)
        # Vendor calls admitted and not yet audited: shutdown waits for them (bounded). Weak,
        # so a flow mitmproxy dropped without a response or error cannot hold shutdown up.
        self.inflight: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.audit_pump: AuditPump | None = None
        self.audit_sink: AuditSink | None = None
        # keybrake_audit_bodies (set by the audit addon): debug bodies in audit rows.
        self.audit_bodies = False
        # Wrong admin tokens per source address (admin API and dashboard sign-in together).
        self.admin_failures = FailureLimiter(limit=ADMIN_FAILURES_PER_MINUTE)
        # This process's clock minus the shared store's, last measured (0.0: none measured).
        self.clock_skew_seconds = 0.0
        # The alerts addon (`keybrake.proxy.alerts`): the admin API reports events to it.
        self.alerts: Alerts | None = None
        self._opened = False

    def clock_problem(self) -> str | None:
        """Why this replica must not judge expiry and days now, or ``None`` when it may."""
        skew = self.clock_skew_seconds
        if abs(skew) <= MAX_CLOCK_SKEW_SECONDS:
            return None
        return (
            f"this proxy's clock is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} "
            f"the shared store's (more than {MAX_CLOCK_SKEW_SECONDS:.0f}s); fix its time sync"
        )

    async def check_clock(self) -> None:
        """Measure the skew against the store's clock (Redis ``TIME``); logs changes."""
        store = await self.open_store()
        skew = await store.clock_skew()
        was = self.clock_problem()
        self.clock_skew_seconds = skew or 0.0
        now = self.clock_problem()
        if now and not was:
            # A warning: mitmdump exits on errors logged at start; a replica that refuses
            # calls and says why on /readyz is better than a crash loop.
            log.warning("keybrake: refusing vendor calls: %s", now)
        elif was and not now:
            log.warning("keybrake: clock back in sync with the store (%.1fs)", skew or 0.0)

    def admin_token_matches(self, given: str) -> bool:
        """Constant-time check of a presented admin token (see `_same_secret`)."""
        return _same_secret(given, self.admin_token)

    def metrics_token_matches(self, given: str) -> bool:
        """Constant-time check of a presented metrics token; ``False`` when none is set."""
        return _same_secret(given, self.metrics_token)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    async def flushed_audit_sink(self) -> AuditSink | None:
        """The audit sink, once every row in the store's outbox is in it (read-your-writes:
        what any replica answered before this call is in what the caller reads next)."""
        if self.audit_pump is not None:
            await self.audit_pump.flush()
        return self.audit_sink

    async def open_store(self) -> Store:
        """The opened store; opening is retried on every call until it works."""
        if self.store is None:
            raise StoreUnavailable("no store configured")
        if not self._opened:
            await self.store.open()
            self._opened = True
        return self.store


class Core:
    """Registers Keybrake's mitmproxy options and keeps the `Runtime` in sync with them."""

    name = "keybrake_core"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # mitmproxy loads an addon's ``addons`` with it: options, hooks and all.
        self.addons = [runtime.listeners]
        self._running = False
        self._upstream_bundle: Path | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._clock_watch: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    def load(self, loader: object) -> None:
        add = loader.add_option  # type: ignore[attr-defined]
        add(
            "keybrake_data_dir",
            str,
            os.environ.get("KEYBRAKE_DATA_DIR", ".keybrake"),
            "Directory for the embedded SQLite store, the admin token and the audit log.",
        )
        add(
            "keybrake_policies",
            str,
            os.environ.get("KEYBRAKE_POLICIES_DIR", "policies"),
            "Directory of vendor policy YAML files.",
        )
        add(
            "keybrake_store",
            str,
            os.environ.get("KEYBRAKE_STORE", ""),
            "Store URL: sqlite:///path/keybrake.db (default: under the data dir), "
            "redis://[user@]host:6379/0 or rediss://… (TLS); put the Redis password in "
            "KEYBRAKE_STORE_PASSWORD, not here (mitmproxy shows option values).",
        )
        add(
            "keybrake_idempotency_ttl",
            str,
            "24h",
            "How long a response is kept for idempotent replay (e.g. 24h, 30m).",
        )
        add(
            "keybrake_max_idempotency_entries",
            int,
            DEFAULT_MAX_IDEMPOTENCY_ENTRIES,
            "Most responses one vault key may keep for idempotent replay at once; past it "
            "its new idempotency keys are refused (429 quota_exceeded).",
        )
        add(
            "keybrake_max_objects",
            int,
            DEFAULT_MAX_OBJECTS_PER_KEY,
            "Most vendor objects one vault key may own (remembered for 90 days); past it its "
            "creating calls are refused (429 quota_exceeded).",
        )
        add(
            "keybrake_followup_delays",
            str,
            "30,120,600,3600",
            "Seconds before each read of a held object whose answer did not state its charge "
            "(Twilio prices a message after sending it).",
        )
        add(
            "keybrake_shutdown_grace",
            float,
            SHUTDOWN_GRACE_SECONDS,
            "Seconds shutdown waits for admitted vendor calls to settle and be audited.",
        )
        add(
            "keybrake_intercept_only_vendors",
            bool,
            True,
            "Decrypt only hosts named in vendor policies (sets allow_hosts); other allowed "
            "destinations (keybrake_passthrough) are tunnelled untouched.",
        )

    def configure(self, updated: set[str]) -> None:
        rt = self.runtime
        opts = ctx.options
        check_options(opts, updated)
        if "keybrake_data_dir" in updated:
            rt.data_dir = Path(opts.keybrake_data_dir).expanduser()
            try:
                rt.data_dir.mkdir(parents=True, exist_ok=True)
                rt.admin_token, where = load_admin_token(rt.data_dir)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"keybrake_data_dir {rt.data_dir}: cannot use it: {e.strerror}"
                ) from None
            if len(rt.admin_token) < MIN_ADMIN_TOKEN_CHARS:
                log.warning(
                    "keybrake: the admin token from %s has fewer than %d characters; "
                    "use a long random one (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`)",
                    where,
                    MIN_ADMIN_TOKEN_CHARS,
                )
        for name, attr in (
            ("keybrake_max_idempotency_entries", "max_idempotency_entries"),
            ("keybrake_max_objects", "max_objects_per_key"),
        ):
            if name in updated:
                if getattr(opts, name) < 1:
                    raise exceptions.OptionsError(f"{name} must be at least 1")
                setattr(rt, attr, getattr(opts, name))
        if "keybrake_followup_delays" in updated:
            try:
                rt.followup_delays = tuple(
                    float(part) for part in opts.keybrake_followup_delays.split(",") if part
                )
            except ValueError:
                rt.followup_delays = ()
            if not rt.followup_delays or min(rt.followup_delays) <= 0:
                raise exceptions.OptionsError(
                    "keybrake_followup_delays: give positive numbers of seconds, e.g. 30,120,600"
                )
        if "keybrake_idempotency_ttl" in updated:
            try:
                ttl = parse_duration(opts.keybrake_idempotency_ttl)
            except ValueError as e:
                raise exceptions.OptionsError(f"keybrake_idempotency_ttl: {e}") from None
            rt.idempotency_ttl_seconds = int(ttl.total_seconds())
        if "keybrake_policies" in updated:
            try:
                rt.policies = load_policies(Path(opts.keybrake_policies).expanduser())
            except PolicyError as e:
                raise exceptions.OptionsError(f"invalid Keybrake policy:\n{e}") from None
            rt.secrets = {v: VendorSecrets.from_env(p) for v, p in rt.policies.vendors.items()}
            for s in rt.secrets.values():
                if s.missing:
                    log.warning(
                        "keybrake: %s calls will be refused (503 secret_unavailable): "
                        "environment variable(s) %s not set",
                        s.vendor,
                        ", ".join(s.missing),
                    )
            self._configure_upstream_trust()
        if "keybrake_store" in updated or "keybrake_data_dir" in updated:
            url = opts.keybrake_store or f"sqlite:///{(rt.data_dir / 'keybrake.db').resolve()}"
            if url != rt.store_url:
                try:
                    rt.store = open_store(url)
                except ValueError as e:
                    raise exceptions.OptionsError(f"keybrake_store: {e}") from None
                rt.store_url = url
                rt._opened = False
        if "stream_large_bodies" in updated and opts.stream_large_bodies:
            # Streamed request bodies reach the vendor before the request hook runs (no checks,
            # no reservation), and streamed responses cannot be priced.
            raise exceptions.OptionsError(
                "stream_large_bodies cannot be used with Keybrake: streamed bodies would bypass "
                "its checks; unset it (vendor request bodies are limited to 1 MiB anyway)"
            )
        if (
            self._running
            and {
                "keybrake_policies",
                "keybrake_intercept_only_vendors",
                "body_size_limit",
            }
            & updated
        ):
            self._apply_derived_options()

    def _apply_derived_options(self) -> None:
        """Set mitmproxy options that follow from the policies.

        Done from ``running`` (and later reconfigurations), never while the command line's
        deferred options are still being applied: updating options then drops them.
        """
        rt = self.runtime
        opts = ctx.options
        if rt.policies is None:
            return
        if opts.keybrake_intercept_only_vendors and not opts.ignore_hosts:
            wanted = rt.policies.allow_hosts_regexes() + _reverse_targets(opts.mode)
            if list(opts.allow_hosts) != wanted:
                opts.update(allow_hosts=wanted)
        if opts.rawtcp:
            # Otherwise decrypted vendor bytes that do not look like HTTP (b"P0ST ...") would
            # be relayed as raw TCP, around every check.
            opts.update(rawtcp=False)
        if "body_size_limit" in opts and not opts.body_size_limit:
            # mitmproxy buffers whole bodies; without a limit one client could make it buffer
            # gigabytes before the guard's 1 MiB check sees the request. With one, a declared
            # length above it is refused (413) before a byte of the body is read.
            opts.update(body_size_limit=DEFAULT_BODY_SIZE_LIMIT)
        bundle = self._upstream_bundle
        if bundle is not None and opts.ssl_verify_upstream_trusted_ca != str(bundle):
            opts.update(ssl_verify_upstream_trusted_ca=str(bundle))

    def _configure_upstream_trust(self) -> None:
        """Trust the CA files of policy ``upstream:`` overrides in addition to the defaults."""
        rt = self.runtime
        assert rt.policies is not None
        extra = [
            p.upstream.ca_file
            for p in rt.policies.vendors.values()
            if p.upstream and p.upstream.ca_file
        ]
        if not extra:
            self._upstream_bundle = rt.upstream_ca_bundle = None
            return
        bundle = rt.data_dir / "upstream-ca-bundle.pem"
        parts = [Path(certifi.where()).read_text()]
        for f in extra:
            try:
                parts.append(Path(f).read_text())
            except OSError as e:
                raise exceptions.OptionsError(f"upstream ca_file {f}: {e.strerror}") from None
        bundle.write_text("\n".join(parts))
        self._upstream_bundle = rt.upstream_ca_bundle = bundle

    async def running(self) -> None:
        rt = self.runtime
        self._running = True
        unload_unused_addons(ctx.master)
        if _dispatch.install(ctx.master):
            log.info("keybrake: each mitmproxy event goes only to the addons that handle it")
        self._apply_derived_options()
        if rt.store_url.startswith("redis"):
            # A crashed replica's open reservations stay counted (safe); finish them as spent
            # once they are older than any request can be, even if no replica restarts.
            self._recovery = asyncio.create_task(self._recover_periodically())
            self._clock_watch = asyncio.create_task(self._watch_clock())
        self._housekeeping = asyncio.create_task(self._forget_expired_periodically())
        try:
            store = await rt.open_store()
            await rt.check_clock()
            # SQLite: one proxy process per store file, so every open reservation is a dead
            # one. Redis: only those older than any live request of another replica.
            grace = REDIS_RECOVERY_GRACE if rt.store_url.startswith("redis") else dt.timedelta(0)
            n = await store.recover_reservations(rt.now() - grace)
            if n:
                log.warning(
                    "keybrake: %d reservation(s) left open by a crash are now counted as spent", n
                )
        except StoreUnavailable as e:
            # A warning, not an error: mitmdump exits on errors logged at start, and a proxy
            # that fails closed is better than a crash loop under a supervisor.
            log.warning(
                "keybrake: store unavailable at start (%s); requests fail closed until it is back",
                e,
            )
        # What exists now (modules, policies, mitmproxy and its addons) lives as long as the
        # process: out of the cycle collector's way, so its full collections walk only what
        # calls made since, and the exit does not walk it all once more.
        gc.freeze()

    async def _recover_periodically(self) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                store = await self.runtime.open_store()
                await store.recover_reservations(self.runtime.now() - REDIS_RECOVERY_GRACE)
            except Exception as e:
                log.warning("keybrake: periodic reservation recovery failed: %s", e)

    async def _forget_expired_periodically(self) -> None:
        """Expired keys can make no more calls: what the store keeps for them goes."""
        while True:
            try:
                store = await self.runtime.open_store()
                await store.forget_expired_keys(self.runtime.now())
            except Exception as e:
                log.warning("keybrake: could not forget expired keys: %s", e)
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def _watch_clock(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_CHECK_SECONDS)
            try:
                await self.runtime.check_clock()
            except Exception as e:
                log.warning("keybrake: clock check failed: %s", e)

    async def done(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
        if self._clock_watch is not None:
            self._clock_watch.cancel()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        # mitmproxy calls done while connections are still being served: let calls already
        # admitted settle their reservations and write their audit rows first.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, float(ctx.options.keybrake_shutdown_grace))
        while len(self.runtime.inflight) > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if len(self.runtime.inflight) > 0:
            log.warning("keybrake: stopping with %d call(s) in flight", len(self.runtime.inflight))
        if self.runtime.audit_pump is not None:
            # Move the outbox to the audit sink while the store is still open (rows that
            # stay there are moved by another replica or at the next start).
            await self.runtime.audit_pump.close()
        if self.runtime.store is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.runtime.store.close()
