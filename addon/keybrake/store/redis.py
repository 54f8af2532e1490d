"""`RedisStore`: the backend shared by many proxy replicas, on `redis.asyncio`.

Every multi-key check-and-change is one Lua script shipped next to this module (``*.lua``,
each starting with a comment naming its ``KEYS`` and ``ARGV``), so replicas never overspend a
cap or finish a reservation twice. redis-py's `Script` reloads a script on ``NOSCRIPT``, so a
restarted (empty) Redis is picked up without restarting the proxy.

Connection settings come from the store URL (`parse_redis_url`: AUTH, ACL user, TLS with a
CA file and client certificate); the password is kept out of ``url``, ``repr`` and every
message.

The hot path's two scripts (``admit.lua``, ``settle_call.lua``) asked for in the same
event-loop turn, or while the batch before them is out, are sent in one pipeline: on a busy
replica Redis then reads and answers a burst at once, which is most of its CPU per request
(`RedisStore._batched`).

Timeouts are short and nothing is retried: when Redis is away a call fails within about two
seconds with `StoreUnavailable` (the proxy answers 503) and the connection pool reconnects on
a later call. All keys live under ``prefix``:

- ``key:<key_id>`` hash, ``secret:<sha256>`` → key id, ``keys`` sorted set by creation time
- ``label-budgets`` hash label → daily cap
- ``usage:<scope>:<window>`` hash ``spent``/``reserved`` (daily windows expire after a few
  days, ``lifetime`` never does)
- ``res:<id>`` reservation hash while the call is open (deleted when it is finished),
  ``open-reservations`` sorted set by creation time
- ``amounts:<key_id>`` hash ``<vendor>:<object_id>`` → micro-USD remembered for one key and
  when that ends (30 days)
- ``owner:<vendor>:<object_id>`` string ``<key id>\n<amount>\n<label>``: the key that created
  the object, 90 days, with the amount remembered for it by its creator when one was (then
  not in ``amounts``); ``objs:<key_id>`` sorted set of the key's owner records (by expiry)
- ``idm:<key_id>:<scope>`` idempotency entry (a string: state, body hash, then the claim's
  start or the stored response), kept its TTL; ``idem-index:<key_id>`` the key's entries
- ``rate:<key_id>`` hash of a key's requests per 5-second bucket, kept 70 seconds
- ``{iss}issuer:<issuer_id>`` hash, ``{iss}issuer-token:<sha256>`` → issuer id, ``{iss}issuers``
  sorted set by creation time (one hash tag: ``create_issuer.lua`` stays in one slot on a
  Redis Cluster)
- ``frozen-vendors`` hash vendor → frozen_at (µs), a newline, the reason: the freezes; each
  freeze is also the field ``!frozen:<vendor>`` (value: the reason) of ``label-budgets``,
  which ``admit.lua`` reads already. On a Redis Cluster every budget tree has its own
  label-budgets hash: a freeze is written into each of them (`_freeze_hashes`), so the check
  stays inside the admission's one slot and costs no extra round trip

The indexes kept per vault key (``objs``, ``amounts``, ``idem-index``) get their TTL once, from
the key's expiry (every replica sets it the first time it touches one): `forget_key` deletes
them when the key is revoked or expired, the TTL is the backstop. Daily usage hashes get
theirs once too (their name carries the day). A Redis restarted empty under a running replica
may leave that day's usage hashes without one (about 150 bytes per budget, that day only: the
next day's have new names).

On a Redis Cluster (``redis+cluster://``) the same keys carry a hash tag, so each admission and
settlement is still one script on one master: every key of a budget tree (a vault key and its
label: the key record, usage, reservations, idempotency entries, rate counts, object index,
remembered amounts, hold sets) is named ``<prefix>{<tag>}…``, where the tag is one of 16 fixed
buckets (`_CLUSTER_TAGS`) picked by a hash of the label (of the key id without one). Each bucket
has its own ``audit`` stream and consumer group, ``open-reservations`` and ``label-budgets``,
so the audit pump and crash recovery read a fixed set of keys (no ``KEYS``/``SCAN``, no index).
What is looked up store-wide stays untagged, in its own slot, written outside the call's script:
``keys``, ``keys-expiring``, ``secret:<sha256>``, ``key-label:<key_id>`` (the key's label, so
its tree is found from its id) and ``owner:<vendor>:<object_id>`` (claimed by ``own.lua`` before
the settlement that indexes it). Legacy entries (``obj:``, ``amount:``) are not read there.

What stays behind a call (``tests/store/test_redis_footprint.py``): an owner record per object
it created (90 days, or until its key is forgotten) and an idempotency entry per idempotency
key (its TTL, 24 h by default). Everything else is per vault key, per budget and day, or
deleted when the call is finished. Entries written by earlier versions (``obj:``, ``amount:``)
are still read until they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.resources
import json
import logging
import re
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from keybrake.store._base import (
    OBJECT_TTL,
    Admission,
    AdmissionRequest,
    BudgetState,
    Hold,
    IdempotencyBegin,
    IssuerRecord,
    KeyRecord,
    LabelBudget,
    LabelTreeConflict,
    ObjectOwner,
    RateResult,
    ReserveResult,
    Settlement,
    StoredResponse,
    StoreUnavailable,
    VendorFreeze,
    utc_day,
)
from keybrake.store._common import (
    EPOCH,
    FROZEN_FIELD,
    RATE_BUCKET_MS,
    RATE_BUCKETS,
    KeyMemo,
    TreeCaps,
    check_idempotency_times,
    check_label,
    check_label_limits,
    check_micros,
    check_rate_limit,
    epoch_micros,
    issuer_limits_field,
    rate_bucket,
    rate_verdict,
    usage_plan,
)
from keybrake.store._lane import ScriptLane
from keybrake.store._redis_url import PASSWORD_ENV, RedisTarget, parse_redis_url

log = logging.getLogger("keybrake")

__all__ = ["RedisStore"]


# A connection's TCP connect and TLS handshake: a burst opens up to _MAX_CONNECTIONS at once
# (64 TLS handshakes in one event loop took over a second on a busy 2-core machine), and a
# Redis that refuses connections fails at once whatever this is.
_CONNECT_TIMEOUT_SECONDS = 2.0
_OPERATION_TIMEOUT_SECONDS = 2.0
_MAX_CONNECTIONS = 64
_DAILY_USAGE_TTL_SECONDS = 4 * 24 * 3600
_AMOUNT_TTL_SECONDS = 30 * 24 * 3600
# Written into the scripts when they are loaded (`--#include _consts`), not sent per call.
_LUA_CONSTANTS = (
    f"local RATE_BUCKETS, RATE_TTL_MS = {RATE_BUCKETS}, {(RATE_BUCKETS + 1) * RATE_BUCKET_MS}\n"
    f"local DAILY_USAGE_TTL, OBJECT_TTL = {_DAILY_USAGE_TTL_SECONDS}, "
    f"{int(OBJECT_TTL.total_seconds())}\n"
    f"local AMOUNT_TTL = {_AMOUNT_TTL_SECONDS}\n"
)
# Responses kept for replay are compressed from this size on.
_COMPRESS_FROM = 256
# Names of keys whose TTL this process has set (it is the same every time): forgotten in bulk
# past this many, which only costs setting some again.
_TTL_MEMORY = 100_000
_AUDIT_GROUP = "audit"
# The key record's fields that change after it is created (admit.lua reads only these once
# this process knows the rest).
_MUTABLE_KEY_FIELDS = frozenset(
    {
        "expires_at",
        "agent_run_label",
        "daily_cap_micros",
        "usd_cap_micros",
        "revoked_at",
        "suspended_at",
        "suspended_reason",
    }
)
# The hot path's scripts: sent together when asked for in the same event-loop turn.
_BATCHED = frozenset({"admit", "settle_call", "own"})
_SCRIPTS = (
    "create_key",
    "create_issuer",
    "revoke",
    "suspend",
    "set_caps",
    "reserve",
    "finish",
    "hold",
    "raise_hold",
    "record_objects",
    "admit",
    "settle_call",
    "idempotency_begin",
    "idempotency_finish",
    "count_request",
    "own",
    "audit_read",
    "audit_ack",
    "probe",
)


# On a Redis Cluster every budget tree (a vault key and its label: the key record, usage,
# reservations, idempotency entries, objects, holds) lives in one of this many hash-tag
# buckets, each with its own audit stream, open-reservation index and label budgets. Fixed:
# replicas must agree on it, and a budget tree never moves. Up to this many masters share the
# load of the trees.
_CLUSTER_BUCKETS = 16


def _spread_tags(count: int) -> tuple[str, ...]:
    """``count`` hash tags whose slots split the slot space evenly (``t<n>``, the first ``n``
    that falls in each range): a cluster whose masters hold even slot ranges (as
    ``redis-cli --cluster create`` makes them) holds even numbers of buckets.

    >>> _spread_tags(2)
    ('t2', 't0')
    """
    width = REDIS_CLUSTER_HASH_SLOTS // count
    tags: list[str | None] = [None] * count
    n = 0
    while None in tags:
        tag = f"t{n}"
        index = key_slot(tag.encode()) // width
        if index < count and tags[index] is None:
            tags[index] = tag
        n += 1
    return tuple(tag for tag in tags if tag is not None)


_CLUSTER_TAGS = _spread_tags(_CLUSTER_BUCKETS)
# Errors of a cluster client that are not `RedisError`s (a slot no node serves).
_CLUSTER_ERRORS = (redis.exceptions.RedisClusterException,)

# A script call waiting for its turn's pipeline: name, keys, args, and where its answer goes.
_Pending = tuple[str, Sequence[str], Sequence[str | bytes], "asyncio.Future[Any]"]


def _split_key_label(value: str) -> tuple[str, str]:
    """A cluster's ``key-label:<key_id>`` value: the label, or ``!<issuer id>\n<label>`` for
    a key an issuer minted (a label never starts with ``!``) -> (label, issuer or "")."""
    if value.startswith("!"):
        issuer, _, label = value[1:].partition("\n")
        return label, issuer
    return value, ""


def _moment(micros: bytes | str) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=int(micros))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"unexpected Redis reply {value!r}")


def _pack_response(response: StoredResponse) -> bytes:
    """A response kept for replay as stored: ``status\\nheaders JSON\\n`` then the body,
    zlib-compressed (``status`` then ends in ``z``) when that makes it smaller: vendor JSON
    (Stripe's is indented) shrinks to a third or less, and thousands are kept per key."""
    headers = json.dumps([list(pair) for pair in response.headers], separators=(",", ":"))
    status, body = str(response.status_code), response.body
    if len(body) >= _COMPRESS_FROM:
        packed = zlib.compress(body, 1)
        if len(packed) < len(body):
            status, body = status + "z", packed
    return f"{status}\n{headers}\n".encode() + body


def _unpack_response(stored: bytes | str) -> StoredResponse:
    raw = stored.encode() if isinstance(stored, str) else bytes(stored)
    status, headers, body = raw.split(b"\n", 2)
    if status.endswith(b"z"):
        status, body = status[:-1], zlib.decompress(body)
    return StoredResponse(
        status_code=int(status),
        headers=tuple((str(k), str(v)) for k, v in json.loads(headers)),
        body=body,
    )


def _key_fields(record: KeyRecord) -> list[str]:
    fields = {
        "key_id": record.key_id,
        "secret_sha256": record.secret_sha256,
        "vendor": record.vendor,
        "agent_run_label": record.agent_run_label,
        "daily_cap_micros": str(record.daily_cap_micros),
        "allowed_endpoints": json.dumps(list(record.allowed_endpoints)),
        "created_at": str(epoch_micros(record.created_at)),
        "expires_at": str(epoch_micros(record.expires_at)),
    }
    # Optional fields are left out rather than stored as a sentinel string.
    if record.usd_cap_micros is not None:
        fields["usd_cap_micros"] = str(record.usd_cap_micros)
    if record.revoked_at is not None:
        fields["revoked_at"] = str(epoch_micros(record.revoked_at))
    if record.vendor_account is not None:
        fields["vendor_account"] = record.vendor_account
    if record.max_requests_per_minute is not None:
        fields["max_requests_per_minute"] = str(record.max_requests_per_minute)
    if record.allowed_accounts:
        fields["allowed_accounts"] = json.dumps(list(record.allowed_accounts))
    if record.share_objects != "none":
        fields["share_objects"] = record.share_objects
    if record.suspended_at is not None:
        fields["suspended_at"] = str(epoch_micros(record.suspended_at))
        fields["suspended_reason"] = record.suspended_reason or ""
    if record.issuer_id is not None:
        fields["issuer_id"] = record.issuer_id
    return [item for pair in fields.items() for item in pair]


def _issuer_fields(record: IssuerRecord) -> list[str]:
    fields = {
        "issuer_id": record.issuer_id,
        "token_sha256": record.token_sha256,
        "name": record.name,
        "vendors": json.dumps(list(record.vendors)),
        "label_prefix": record.label_prefix,
        "allowed_endpoints": json.dumps(
            [[vendor, list(eps)] for vendor, eps in record.allowed_endpoints]
        ),
        "max_daily_cap_micros": str(record.max_daily_cap_micros),
        "max_expires_in_seconds": str(record.max_expires_in_seconds),
        "allowed_accounts": json.dumps(list(record.allowed_accounts)),
        "created_at": str(epoch_micros(record.created_at)),
    }
    optional = {
        "max_usd_cap_micros": record.max_usd_cap_micros,
        "budget_daily_micros": record.budget_daily_micros,
        "budget_lifetime_micros": record.budget_lifetime_micros,
        "max_requests_per_minute": record.max_requests_per_minute,
        "expires_at": None if record.expires_at is None else epoch_micros(record.expires_at),
        "revoked_at": None if record.revoked_at is None else epoch_micros(record.revoked_at),
    }
    fields.update({name: str(value) for name, value in optional.items() if value is not None})
    return [item for pair in fields.items() for item in pair]


def _issuer_record(raw: Mapping[bytes | str, bytes | str]) -> IssuerRecord | None:
    if not raw:
        return None
    f = {_text(k): _text(v) for k, v in raw.items()}

    def number(name: str) -> int | None:
        return int(f[name]) if name in f else None

    return IssuerRecord(
        issuer_id=f["issuer_id"],
        token_sha256=f["token_sha256"],
        name=f["name"],
        vendors=tuple(json.loads(f["vendors"])),
        label_prefix=f["label_prefix"],
        allowed_endpoints=tuple(
            (vendor, tuple(eps)) for vendor, eps in json.loads(f["allowed_endpoints"])
        ),
        max_daily_cap_micros=int(f["max_daily_cap_micros"]),
        max_usd_cap_micros=number("max_usd_cap_micros"),
        max_expires_in_seconds=int(f["max_expires_in_seconds"]),
        allowed_accounts=tuple(json.loads(f["allowed_accounts"])),
        budget_daily_micros=number("budget_daily_micros"),
        budget_lifetime_micros=number("budget_lifetime_micros"),
        max_requests_per_minute=number("max_requests_per_minute"),
        created_at=_moment(f["created_at"]),
        expires_at=_moment(f["expires_at"]) if "expires_at" in f else None,
        revoked_at=_moment(f["revoked_at"]) if "revoked_at" in f else None,
    )


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as numbers, in the stream's order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def _to_do(*items: bool) -> str:
    """A script's list of first-time steps (admit.lua's ARGV[14]): ``''`` when there are none,
    the common case, else ``'1'``/``'0'`` per item."""
    return "".join("1" if item else "0" for item in items) if any(items) else ""


def _key_record(raw: Mapping[bytes | str, bytes | str]) -> KeyRecord | None:
    if not raw:
        return None
    f = {_text(k): _text(v) for k, v in raw.items()}
    return KeyRecord(
        key_id=f["key_id"],
        secret_sha256=f["secret_sha256"],
        vendor=f["vendor"],
        agent_run_label=f["agent_run_label"],
        daily_cap_micros=int(f["daily_cap_micros"]),
        allowed_endpoints=tuple(json.loads(f["allowed_endpoints"])),
        created_at=_moment(f["created_at"]),
        expires_at=_moment(f["expires_at"]),
        usd_cap_micros=int(f["usd_cap_micros"]) if "usd_cap_micros" in f else None,
        revoked_at=_moment(f["revoked_at"]) if "revoked_at" in f else None,
        vendor_account=f.get("vendor_account"),
        max_requests_per_minute=(
            int(f["max_requests_per_minute"]) if "max_requests_per_minute" in f else None
        ),
        allowed_accounts=tuple(json.loads(f.get("allowed_accounts", "[]"))),
        suspended_at=_moment(f["suspended_at"]) if "suspended_at" in f else None,
        suspended_reason=f.get("suspended_reason"),
        share_objects=f.get("share_objects", "none"),
        issuer_id=f.get("issuer_id"),
    )


class EvictionNotAllowed(redis.exceptions.RedisError):
    """Redis may evict keys and the store URL does not allow it (see `_check_eviction`)."""


class RedisTooOld(redis.exceptions.RedisError):
    """The server rejects forms of Redis 7.0 the scripts use (see `_check_version`)."""


class _TLSConnection(redis.asyncio.Connection):
    """A TLS connection on its store's one `ssl.SSLContext`.

    redis-py's ``SSLConnection`` builds a context per connection (~20 ms of CPU each, loading
    CA files): a burst of new connections would stall the event loop past the connect timeout.
    """

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs: Any) -> None:
        self.tls_context = tls_context
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "ssl": self.tls_context}


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisStore:
    """The `Store` in Redis, shared by every replica that uses the same ``url`` and ``prefix``.

    ``url`` is a store URL (see `parse_redis_url`: user, password, TLS options and
    ``?prefix=``); ``password`` is used when the URL has none, and ``prefix`` wins over the
    URL's. ``self.url`` is the URL as messages show it: without password or prefix.
    ``audit_claim_idle_ms`` is how long an outbox row another consumer claimed stays its own
    before `audit_batch` claims it again; it wins over the URL's (default 30 s).

    Example::

        store = RedisStore("redis://127.0.0.1:6379/0", prefix="keybrake:")
        store = RedisStore("rediss://keybrake@10.0.0.5:6380/0?ssl_ca_certs=/etc/kb/ca.pem",
                           password=os.environ["KEYBRAKE_STORE_PASSWORD"])
        await store.open()
        result = await store.reserve(key, "res_1", 2_000_000, now)
    """

    def __init__(
        self,
        url: str,
        prefix: str | None = None,
        *,
        password: str | None = None,
        audit_claim_idle_ms: int | None = None,
    ) -> None:
        self._target: RedisTarget = parse_redis_url(url, password)
        self._audit_claim_idle_ms = (
            self._target.audit_claim_idle_ms if audit_claim_idle_ms is None else audit_claim_idle_ms
        )
        self.url = self._target.url
        self.prefix = self._target.prefix if prefix is None else prefix
        self._tls_context = self._target.ssl_context()
        self._client: redis.asyncio.Redis | None = None
        # Labels and issuers never change: the usage hashes of a key's reservations are named
        # from them.
        self._labels: dict[str, str] = {}
        self._issuers: dict[str, str] = {}
        # The fields of each key record that never change, once read: admit reads the rest.
        self._key_static: dict[str, dict[str, str]] = {}
        self._key_expiry_ms: dict[str, int] = {}
        # The record last made of each key's answer (the common case: nothing changed).
        self._key_answers = KeyMemo(_TTL_MEMORY)
        # Per key and UTC day: the names admit.lua is called with that do not depend on the
        # call (everything but the idempotency entry and the reservation).
        self._admit_names: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._ttl_set: set[str] = set()
        self._scripts: dict[str, AsyncScript] = {}
        self._pending: list[_Pending] = []
        # The hot path's script calls, on their own connection (not on a cluster).
        self._lane = (
            None
            if self._target.cluster
            else ScriptLane(
                self._target,
                self._tls_context,
                connect_timeout=_CONNECT_TIMEOUT_SECONDS,
                timeout=_OPERATION_TIMEOUT_SECONDS,
            )
        )
        self._sending: set[asyncio.Task[Exception | None]] = set()
        self._lane_driver: asyncio.Task[None] | None = None
        # How many calls the lane's last batch held (see `_batched`).
        self._lane_batch = 0
        self._warned_unverified = False
        self._cluster = self._target.cluster
        # Hash tags of the budget trees: one empty tag (names as ever) on a single server.
        self._tags: tuple[str, ...] = _CLUSTER_TAGS if self._cluster else ("",)
        # The tag of reservations this process has seen (on a cluster; forgotten when done).
        self._res_tags: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    # -- plumbing ------------------------------------------------------------------------------
    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None and self._cluster:
            self._client = self._cluster_client()
        if self._client is None:
            # No client-side retries: a replica must fail closed fast, not hang a request.
            # A bounded pool that waits briefly for a free connection absorbs bursts (the
            # default pool fails at once with "Too many connections").
            tls: dict[str, Any] = {}
            if self._tls_context is not None:
                tls = {"connection_class": _TLSConnection, "tls_context": self._tls_context}
            pool = redis.asyncio.BlockingConnectionPool(
                max_connections=_MAX_CONNECTIONS,
                timeout=_OPERATION_TIMEOUT_SECONDS,
                socket_connect_timeout=_CONNECT_TIMEOUT_SECONDS,
                socket_timeout=_OPERATION_TIMEOUT_SECONDS,
                retry=Retry(NoBackoff(), 0),
                **self._target.connection_kwargs(),
                **tls,
            )
            client = redis.asyncio.Redis.from_pool(pool)
            self._register_scripts(client)
            self._client = client
        return self._client

    def _register_scripts(self, client: Any) -> None:
        package = importlib.resources.files("keybrake.store")
        shared = {
            f"--#include {part}": package.joinpath(f"{part}.lua").read_text("utf-8")
            for part in ("_tree", "_rate", "_reservation")
        }
        shared["--#include _consts"] = _LUA_CONSTANTS

        def source(name: str) -> str:
            text = package.joinpath(f"{name}.lua").read_text("utf-8")
            for line, part in shared.items():
                text = text.replace(line, part)
            return text

        self._scripts = {name: client.register_script(source(name)) for name in _SCRIPTS}

    def _cluster_client(self) -> Any:
        """A `RedisCluster` client: it discovers the topology from any node the URL names and
        follows ``MOVED`` after a failover. No retries: during a failover calls fail closed
        (503) fast, and a later call finds the new master."""
        t = self._target
        tls: dict[str, Any] = {}
        if t.tls:
            # redis-py's cluster client makes its own TLS contexts from the same files.
            tls = {
                "ssl": True,
                "ssl_ca_certs": t.ca_certs,
                "ssl_certfile": t.certfile,
                "ssl_keyfile": t.keyfile,
                "ssl_cert_reqs": "required" if t.verify else "none",
                "ssl_check_hostname": t.verify,
            }
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in t.nodes],
            require_full_coverage=True,
            retry=Retry(NoBackoff(), 0),
            # Per node; the cluster client fails rather than waits when they are all busy.
            max_connections=_MAX_CONNECTIONS * 4,
            socket_connect_timeout=_CONNECT_TIMEOUT_SECONDS,
            socket_timeout=_OPERATION_TIMEOUT_SECONDS,
            **t.connection_kwargs(),
            **tls,
        )
        self._register_scripts(client)
        return client

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[redis.asyncio.Redis]:
        client = self._redis()
        try:
            yield client
        except (TypeError, AttributeError, RuntimeError) as exc:
            if not self._cluster:
                raise
            # redis-py's cluster client can trip over a connection another task is closing
            # while a node fails ("'NoneType' object is not callable" from the transport, or
            # "Event loop is closed" from a transport it re-initialises the topology on): the
            # node is away, and the call fails closed like any other (503 store_unavailable).
            raise self._unavailable(exc) from exc
        except (redis.exceptions.RedisError, OSError, *_CLUSTER_ERRORS) as exc:
            if not self._cluster and isinstance(exc, redis.exceptions.ConnectionError | OSError):
                # The server went away: every idle pooled connection is dead too. Dropped now,
                # so the first calls after it is back do not each meet a stale one.
                with contextlib.suppress(Exception):
                    await client.connection_pool.disconnect(inuse_connections=False)
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        problem = f"{type(exc).__name__}: {exc}{self._hint(exc)}"
        if self._target.password:
            # redis-py and the server do not echo passwords; this makes sure of it.
            problem = problem.replace(self._target.password, "***")
        return StoreUnavailable(f"Redis store {self.url}: {problem}")

    def _hint(self, exc: Exception) -> str:
        """What to check, for the errors whose Redis wording does not say."""
        if isinstance(exc, redis.exceptions.AuthenticationError):
            if self._target.password is None:
                return f" (no password given: put it in the store URL or in {PASSWORD_ENV})"
            return " (check the Redis user and password)"
        if isinstance(exc, redis.exceptions.NoPermissionError):
            return " (the Redis ACL user lacks a command or key the store needs; see README)"
        return ""

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        if name in _BATCHED:
            return await self._batched(name, keys, args)
        async with self._guard():
            return await self._scripts[name](keys=keys, args=args)

    async def _batched(self, name: str, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        """Run a hot-path script together with the others asked for in the same event-loop
        turn (and, on the lane, all those asked for while the batch before is out): one
        pipeline (one write, one read on each side) instead of a round trip each.

        On a busy replica many calls are admitted and settled at once; Redis then reads and
        answers them in one go, and most of its CPU per request is that reading and writing.
        Each script is still its own atomic step; a pipeline is not a transaction.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((name, keys, args, future))
        if len(self._pending) == 1 and not self._lane_busy(loop):
            if self._lane is not None and self._lane_batch <= 1:
                # An idle lane whose last batch was one call (a quiet replica: nothing to
                # wait a loop turn for): its driver is started now. On a loop that runs new
                # tasks at once (mitmproxy's eager task factory) it writes this call before we
                # wait, ~25 µs sooner; on any other loop it starts next turn, as before. A
                # busy replica's calls still gather for a turn (fewer reads for Redis).
                self._send_pending()
            else:
                loop.call_soon(self._send_pending)
        return await future

    def _lane_busy(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a batch is on the lane: the calls asked for meanwhile then wait and go
        together, in one write, when its replies are in (`_drive_lane`)."""
        driver = self._lane_driver
        return driver is not None and not driver.done() and driver.get_loop() is loop

    def _send_pending(self) -> None:
        if self._lane is not None:
            if not self._lane_busy(asyncio.get_running_loop()):
                self._lane_driver = asyncio.ensure_future(self._drive_lane())
            return
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _drive_lane(self) -> None:
        """Send the waiting calls as one batch, then those that came while it was out, until
        none wait. One batch is on the lane at a time anyway (it answers in order); sending
        every call that waited in one write, not one write per event-loop turn it came in,
        is fewer reads and replies for Redis and fewer round trips for the calls."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                # An admission its caller gave up on while it waited is not sent: it would
                # reserve for a call nobody forwards or settles. A settlement always is.
                batch = [p for p in batch if not (p[0] == "admit" and p[3].cancelled())]
                self._lane_batch = len(batch)
                failure = await self._send(batch) if batch else None
                if isinstance(failure, StoreUnavailable) and isinstance(
                    failure.__cause__, redis.exceptions.TimeoutError
                ):
                    # Redis stopped answering: the calls that waited behind the batch have
                    # waited its timeouts already and fail with it, as they would have on a
                    # connection of their own (a call fails within the lane's timeouts).
                    stalled, self._pending = self._pending, []
                    for *_, future in stalled:
                        if not future.done():
                            future.set_exception(failure)
        finally:
            self._lane_driver = None
            if self._pending:  # cancelled with calls waiting: they go in a new batch
                asyncio.get_running_loop().call_soon(self._send_pending)

    async def _send(self, batch: list[_Pending]) -> Exception | None:
        """Send ``batch`` and resolve its futures; returns the error that failed it whole."""
        lane = self._lane
        if lane is None and len(batch) == 1:
            await self._send_alone(batch[0])
            return None
        try:
            async with self._guard() as client:
                calls = [
                    ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
                    for name, keys, args, _ in batch
                ]
                if lane is not None:
                    results = await lane.call(calls)
                else:
                    pipe = client.pipeline(transaction=False)
                    for call in calls:
                        pipe.execute_command(*call)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return exc
        for pending, result in zip(batch, results, strict=True):
            future = pending[3]
            if isinstance(result, redis.exceptions.NoScriptError):
                # Redis lost its scripts (a restart): this one did not run. Alone, redis-py
                # loads it again.
                await self._send_alone(pending)
            elif future.done():
                continue
            elif isinstance(result, Exception):  # a RedisError, or a cluster client's own
                future.set_exception(self._unavailable(result))
            else:
                future.set_result(result)
        return None

    async def _send_alone(self, pending: _Pending) -> None:
        name, keys, args, future = pending
        try:
            async with self._guard():
                result = await self._scripts[name](keys=keys, args=args)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not future.done():
                future.set_result(result)

    def _k(self, *parts: str) -> str:
        """A name of the whole store (the key listings, a secret hash's key id)."""
        return self.prefix + ":".join(parts)

    def _kt(self, tag: str, *parts: str) -> str:
        """A name in the budget tree of hash tag ``tag`` (see `_tree`)."""
        return f"{self.prefix}{{{tag}}}" + ":".join(parts) if tag else self._k(*parts)

    def _tree(self, label: str, key_id: str, issuer_id: str | None = None) -> str:
        """The hash tag of the budget tree of a key: its issuer's for a key an issuer minted
        (every label under the issuer and the issuer's own usage with it), else its label's
        (shared by every key of the label) or, without one, of the key alone; ``""`` on one
        server. A label's keys are all in one tree (`create_key` records the label's home).

        A hash of the label picks one of a fixed set of tags, not the label itself: a label is
        the operator's text (braces and all), and the per-bucket keys (audit stream, open
        reservations, label budgets) then stay a fixed, known set.
        """
        if not self._cluster:
            return ""
        name = f"i:{issuer_id}" if issuer_id else f"l:{label}" if label else f"k:{key_id}"
        return self._tags[zlib.crc32(name.encode()) % len(self._tags)]

    async def _label(self, key_id: str) -> str | None:
        """The key's label (it never changes: kept), ``None`` for an unknown key."""
        path = await self._path(key_id)
        return None if path is None else path[0]

    async def _path(self, key_id: str) -> tuple[str, str] | None:
        """The key's label and the issuer that minted it (``""``: none); both never change:
        kept. ``None`` for an unknown key."""
        label = self._labels.get(key_id)
        if label is None:
            async with self._guard() as client:
                if self._cluster:
                    raw = await client.get(self._k("key-label", key_id))
                    if raw is None:
                        return None
                    label, issuer = _split_key_label(_text(raw))
                else:
                    row = await client.hmget(
                        self._k("key", key_id), ["agent_run_label", "issuer_id"]
                    )
                    if row[0] is None:
                        return None
                    label, issuer = _text(row[0]), _text(row[1] or b"")
            self._issuers[key_id] = issuer
            self._labels[key_id] = label
        return label, self._issuers.get(key_id, "")

    async def _key_tree(self, key_id: str) -> str:
        """The hash tag of the key's budget tree (an unknown key's: where it would be)."""
        if not self._cluster:
            return ""
        label, issuer = await self._path(key_id) or ("", "")
        return self._tree(label, key_id, issuer)

    def _res_seen(self, reservation_id: str, tag: str) -> None:
        if self._cluster:
            if len(self._res_tags) > _TTL_MEMORY:
                self._res_tags.clear()
            self._res_tags[reservation_id] = tag

    async def _res_tree(self, reservation_id: str) -> str:
        """The hash tag of a reservation's tree: known when this process made or listed it,
        else looked for in every bucket (one pipeline; a reservation another replica made)."""
        if not self._cluster:
            return ""
        tag = self._res_tags.get(reservation_id)
        if tag is None:
            async with self._guard() as client:
                pipe = client.pipeline(transaction=False)
                for candidate in self._tags:
                    pipe.exists(self._kt(candidate, "res", reservation_id))
                found = await pipe.execute()
            tag = next((t for t, n in zip(self._tags, found, strict=True) if n), self._tags[0])
        return tag

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and load the Lua scripts (they are reloaded on demand after a restart)."""
        if self._target.tls and not self._target.verify and not self._warned_unverified:
            self._warned_unverified = True
            log.warning(
                "keybrake: Redis store %s: TLS certificate verification is off "
                "(ssl_cert_reqs=none): anyone on the network path can pose as Redis and read "
                "the password; give the CA with ssl_ca_certs instead",
                self.url,
            )
        async with self._guard() as client:
            await client.ping()
            for script in self._scripts.values():
                # On a cluster: loaded on every master.
                script.sha = await client.script_load(script.script)
            for tag in self._tags:
                await self._check_version(tag)
            for tag in self._tags:
                await self._ensure_audit_group(client, tag)
            if self._cluster:
                cluster: Any = client
                for node in cluster.get_primaries():
                    await self._check_eviction(client, node)
            else:
                await self._check_eviction(client)

    async def _check_version(self, tag: str) -> None:
        """Refuse a server older than Redis 7.0, on which ``probe.lua`` fails (on a cluster:
        run in every budget-tree bucket, so on every master that holds one).

        Such a server loads the scripts but rejects ``SET … NX GET`` and ``EXPIRE … NX``: its
        first admission would fail, and every vendor call be refused (503) with the cause
        only in the log. Checked by running the forms rather than reading ``INFO``: the ACL
        the README gives allows no ``INFO``, and a fork's version number says less.
        """
        try:
            await self._scripts["probe"](keys=[self._kt(tag, "probe")], args=[])
        except redis.exceptions.ResponseError as e:
            said = next(iter(str(e).strip().splitlines()), "")[:300]
            # What an older server says to those forms; anything else (an ACL refusal, a
            # full or read-only server) is reported as it is.
            if not any(s in said.lower() for s in ("syntax error", "wrong number of arguments")):
                raise
            raise RedisTooOld(
                "this server rejects the Redis 7.0 forms the store's scripts use (SET … NX "
                f"GET, EXPIRE … NX), answering {said!r}: Keybrake needs Redis 7.0 or newer "
                "(or Valkey 7.2 or newer)"
            ) from None

    async def _ensure_audit_group(self, client: redis.asyncio.Redis, tag: str) -> None:
        try:
            await client.xgroup_create(self._kt(tag, "audit"), _AUDIT_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _check_eviction(self, client: redis.asyncio.Redis, node: Any = None) -> None:
        """Refuse a Redis that may evict keys, unless the URL says ``allow_eviction=1``.

        Only ``noeviction`` is safe: ``allkeys-*`` may drop anything, and ``volatile-*``
        drops keys with a TTL, which here are budget state too (a day's usage hash, an
        in-flight idempotency claim, a rate count, an object's owner). An evicted usage hash
        reads as unspent: the cap would no longer hold.
        """
        try:
            if node is None:
                got = await client.config_get("maxmemory-policy")
            else:  # one master of a cluster
                got = await client.config_get("maxmemory-policy", target_nodes=node)
        except redis.exceptions.RedisError:
            # CONFIG is disabled on some managed services, or not granted to our ACL user.
            log.warning(
                "keybrake: Redis store %s: cannot read maxmemory-policy (CONFIG GET refused); "
                "make sure it is 'noeviction'",
                self.url,
            )
            return
        policy = got.get("maxmemory-policy")
        text = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy is None or text == "noeviction":
            return
        if self._target.allow_eviction:
            log.warning(
                "keybrake: Redis maxmemory-policy is %r (allowed by allow_eviction=1): an "
                "evicted budget reads as unspent; use 'noeviction'",
                text,
            )
            return
        raise EvictionNotAllowed(
            f"its maxmemory-policy is {text!r}, which may evict budget state (an evicted "
            "usage hash reads as unspent: the cap would not hold); set it to 'noeviction' "
            "(CONFIG SET maxmemory-policy noeviction, and in redis.conf), or add "
            "allow_eviction=1 to the store URL to start anyway"
        )

    async def close(self) -> None:
        if self._lane is not None:
            await self._lane.close()
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await client.aclose()

    async def ping(self) -> None:
        async with self._guard() as client:
            await client.ping()

    async def clock_skew(self) -> float | None:
        """This process's clock minus the Redis server's ``TIME``, corrected for half the
        round trip. Replicas judge expiry and the UTC day by their own clocks: this is how
        far one of them may disagree with the others."""
        async with self._guard() as client:
            before = time.time()
            seconds, micros = await client.time()
            after = time.time()
        return (before + after) / 2 - (int(seconds) + int(micros) / 1e6)

    # -- vault keys ----------------------------------------------------------------------------
    async def create_key(self, record: KeyRecord) -> None:
        """Insert ``record``; `ValueError` when its ``key_id`` or secret hash already exists."""
        check_label(record.agent_run_label)
        created = epoch_micros(record.created_at)
        await self._claim_home(record.agent_run_label, record.issuer_id)
        if self._cluster:
            inserted = await self._create_key_on_cluster(record)
        else:
            inserted = await self._script(
                "create_key",
                [
                    self._k("key", record.key_id),
                    self._k("secret", record.secret_sha256),
                    self._k("keys"),
                    self._k("keys-expiring"),
                ],
                [
                    record.key_id,
                    str(created),
                    str(epoch_micros(record.expires_at)),
                    *_key_fields(record),
                ],
            )
        if inserted == 0:
            raise ValueError(f"vault key {record.key_id!r} already exists")
        if inserted == -1:
            raise ValueError(f"a vault key with the secret hash of {record.key_id!r} exists")

    async def _claim_home(self, label: str, issuer_id: str | None) -> None:
        """Fix the budget tree of ``label`` by its first key (``label-home:<label>``: the
        issuer id, ``-`` for the operator's), or refuse a key of another tree
        (`LabelTreeConflict`): a label's usage never splits across two trees (two slots)."""
        if not label:
            return
        home_key = self._k("label-home", label)
        mine = issuer_id or "-"
        async with self._guard() as client:
            if await client.set(home_key, mine, nx=True):
                return
            raw = await client.get(home_key)
        home = _text(raw) if raw is not None else mine
        if home != mine:
            raise LabelTreeConflict(label, None if home == "-" else home)

    async def _label_home(self, label: str) -> str | None:
        """The issuer whose tree ``label`` is in (None: the operator's, or no key yet)."""
        async with self._guard() as client:
            raw = await client.get(self._k("label-home", label))
        home = _text(raw) if raw is not None else "-"
        return None if home == "-" else home

    async def _create_key_on_cluster(self, record: KeyRecord) -> int:
        """`create_key` on a cluster, where the key's names are in three slots: its id's
        label record, its secret hash's record, its tree. Claimed in that order (``SET NX``;
        a claim given back when the next is taken), then the record and the listings. A crash
        part way leaves at most a claim without a key record: that key does not exist."""
        label_key = self._k("key-label", record.key_id)
        secret_key = self._k("secret", record.secret_sha256)
        async with self._guard() as client:
            kept = record.agent_run_label
            if record.issuer_id:
                kept = f"!{record.issuer_id}\n{kept}"
            if not await client.set(label_key, kept, nx=True):
                return 0
            if not await client.set(secret_key, record.key_id, nx=True):
                await client.delete(label_key)
                return -1
            tag = self._tree(record.agent_run_label, record.key_id, record.issuer_id)
            await client.hset(self._kt(tag, "key", record.key_id), items=_key_fields(record))
            await client.zadd(self._k("keys"), {record.key_id: epoch_micros(record.created_at)})
            await client.zadd(
                self._k("keys-expiring"), {record.key_id: epoch_micros(record.expires_at)}
            )
        return 1

    async def get_key(self, key_id: str) -> KeyRecord | None:
        tag = await self._key_tree(key_id)
        async with self._guard() as client:
            raw = await client.hgetall(self._kt(tag, "key", key_id))
        return _key_record(raw)

    async def get_key_by_secret_hash(self, secret_sha256: str) -> KeyRecord | None:
        async with self._guard() as client:
            key_id = await client.get(self._k("secret", secret_sha256))
        if key_id is None:
            return None
        return await self.get_key(_text(key_id))

    async def list_keys(self) -> list[KeyRecord]:
        """All keys, newest ``created_at`` first (ties: larger ``key_id`` first)."""
        async with self._guard() as client:
            key_ids = [_text(k) for k in await client.zrevrange(self._k("keys"), 0, -1)]
            if self._cluster:
                pipe = client.pipeline(transaction=False)
                for key_id in key_ids:
                    pipe.get(self._k("key-label", key_id))
                labels = await pipe.execute()
                paths = [_split_key_label(_text(raw or b"")) for raw in labels]
                tags = [
                    self._tree(label, k, issuer)
                    for k, (label, issuer) in zip(key_ids, paths, strict=True)
                ]
            else:
                tags = [""] * len(key_ids)
            pipe = client.pipeline(transaction=False)
            for key_id, tag in zip(key_ids, tags, strict=True):
                pipe.hgetall(self._kt(tag, "key", key_id))
            raws = await pipe.execute()
        return [record for raw in raws if (record := _key_record(raw)) is not None]

    async def revoke_key(self, key_id: str, now: dt.datetime) -> KeyRecord | None:
        tag = await self._key_tree(key_id)
        flat = await self._script(
            "revoke", [self._kt(tag, "key", key_id)], [str(epoch_micros(now))]
        )
        record = _key_record(dict(zip(flat[::2], flat[1::2], strict=True)))
        if record is not None:
            await self.forget_key(key_id)
        return record

    async def suspend_key(self, key_id: str, now: dt.datetime, reason: str) -> KeyRecord | None:
        tag = await self._key_tree(key_id)
        flat = await self._script(
            "suspend", [self._kt(tag, "key", key_id)], ["suspend", str(epoch_micros(now)), reason]
        )
        return _key_record(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def resume_key(self, key_id: str) -> KeyRecord | None:
        tag = await self._key_tree(key_id)
        flat = await self._script("suspend", [self._kt(tag, "key", key_id)], ["resume"])
        return _key_record(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def set_key_caps(
        self,
        key_id: str,
        *,
        daily_cap_micros: int | None = None,
        usd_cap_micros: int | None = None,
        clear_usd_cap: bool = False,
    ) -> KeyRecord | None:
        """See `Store.set_key_caps`: one ``set_caps.lua`` call; ``admit.lua`` reads the caps
        from the same hash in its own step."""
        for name, micros in (("daily_cap_micros", daily_cap_micros), ("usd_cap", usd_cap_micros)):
            if micros is not None:
                check_micros(name, micros)
        usd = "" if usd_cap_micros is None else str(usd_cap_micros)
        if clear_usd_cap and usd_cap_micros is None:
            usd = "-"
        tag = await self._key_tree(key_id)
        flat = await self._script(
            "set_caps",
            [self._kt(tag, "key", key_id)],
            ["" if daily_cap_micros is None else str(daily_cap_micros), usd],
        )
        return _key_record(dict(zip(flat[::2], flat[1::2], strict=True)))

    # -- issuer tokens ---------------------------------------------------------------------------
    def _iss(self, *parts: str) -> str:
        """A name of the issuer records, all under one hash tag (``{iss}``)."""
        return self.prefix + "{iss}" + ":".join(parts)

    async def create_issuer(self, record: IssuerRecord) -> None:
        """Insert ``record``; `ValueError` when its id or token hash already exists.

        The issuer's budget and rate limit are written into the label-budgets hash of its
        budget tree first (``!iss:<id>``), where ``admit.lua`` reads them: an issuer whose
        record exists always has them (a write cut short leaves only an unused field)."""
        if record.budget_daily_micros is not None:
            check_micros("budget_daily_micros", record.budget_daily_micros)
        if record.budget_lifetime_micros is not None:
            check_micros("budget_lifetime_micros", record.budget_lifetime_micros)
        if record.max_requests_per_minute is not None:
            check_rate_limit(record.max_requests_per_minute)
        async with self._guard() as client:
            # HSETNX: an issuer id already taken (refused below) keeps its own limits.
            await client.hsetnx(
                self._kt(self._tree("", "", record.issuer_id), "label-budgets"),
                f"!iss:{record.issuer_id}",
                issuer_limits_field(
                    record.budget_daily_micros,
                    record.budget_lifetime_micros,
                    record.max_requests_per_minute,
                ),
            )
        inserted = await self._script(
            "create_issuer",
            [
                self._iss("issuer", record.issuer_id),
                self._iss("issuer-token", record.token_sha256),
                self._iss("issuers"),
            ],
            [
                record.issuer_id,
                str(epoch_micros(record.created_at)),
                *_issuer_fields(record),
            ],
        )
        if inserted == 0:
            raise ValueError(f"issuer {record.issuer_id!r} already exists")
        if inserted == -1:
            raise ValueError(f"an issuer with the token hash of {record.issuer_id!r} exists")

    async def get_issuer(self, issuer_id: str) -> IssuerRecord | None:
        async with self._guard() as client:
            raw = await client.hgetall(self._iss("issuer", issuer_id))
        return _issuer_record(raw)

    async def get_issuer_by_token_hash(self, token_sha256: str) -> IssuerRecord | None:
        async with self._guard() as client:
            issuer_id = await client.get(self._iss("issuer-token", token_sha256))
            if issuer_id is None:
                return None
            raw = await client.hgetall(self._iss("issuer", _text(issuer_id)))
        return _issuer_record(raw)

    async def list_issuers(self) -> list[IssuerRecord]:
        """All issuer tokens, newest ``created_at`` first (ties: larger id first)."""
        async with self._guard() as client:
            ids = await client.zrevrange(self._iss("issuers"), 0, -1)
            pipe = client.pipeline(transaction=False)
            for issuer_id in ids:
                pipe.hgetall(self._iss("issuer", _text(issuer_id)))
            raws = await pipe.execute()
        return [record for raw in raws if (record := _issuer_record(raw)) is not None]

    async def revoke_issuer(self, issuer_id: str, now: dt.datetime) -> IssuerRecord | None:
        """``revoke.lua`` on the issuer's hash (it keeps the first revocation time)."""
        flat = await self._script(
            "revoke", [self._iss("issuer", issuer_id)], [str(epoch_micros(now))]
        )
        return _issuer_record(dict(zip(flat[::2], flat[1::2], strict=True)))

    # -- vendor freezes ----------------------------------------------------------------------------
    def _freeze_hashes(self) -> list[str]:
        """The hashes ``admit.lua`` reads a freeze from: the label-budgets hash of every budget
        tree (one on a single server; on a Redis Cluster, one per hash tag)."""
        return [self._kt(tag, "label-budgets") for tag in self._tags]

    async def freeze_vendor(self, vendor: str, reason: str, now: dt.datetime) -> VendorFreeze:
        """The freeze in ``frozen-vendors`` (kept first when repeated), then in every hash
        `_freeze_hashes` names: refused from the next admission on, on every replica."""
        async with self._guard() as client:
            await client.hsetnx(self._k("frozen-vendors"), vendor, f"{epoch_micros(now)}\n{reason}")
            stored = await client.hget(self._k("frozen-vendors"), vendor)
            kept = _text(stored) if stored is not None else f"{epoch_micros(now)}\n{reason}"
            since, _, kept_reason = kept.partition("\n")
            # Not a transaction: on a cluster the hashes are in different slots. Each write is
            # idempotent; freezing again repairs a freeze cut short.
            pipe = client.pipeline(transaction=False)
            for name in self._freeze_hashes():
                pipe.hset(name, FROZEN_FIELD + vendor, kept_reason or "frozen")
            await pipe.execute()
        return VendorFreeze(vendor, kept_reason, _moment(since))

    async def unfreeze_vendor(self, vendor: str) -> bool:
        """Lifted in every admission hash first, then dropped from the list (so a cut-short
        unfreeze still lists the vendor: unfreezing again finishes it)."""
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            for name in self._freeze_hashes():
                pipe.hdel(name, FROZEN_FIELD + vendor)
            await pipe.execute()
            gone = await client.hdel(self._k("frozen-vendors"), vendor)
        return bool(gone)

    async def frozen_vendors(self) -> list[VendorFreeze]:
        async with self._guard() as client:
            raw = await client.hgetall(self._k("frozen-vendors"))
        out = []
        for vendor, value in raw.items():
            since, _, reason = _text(value).partition("\n")
            out.append(VendorFreeze(_text(vendor), reason, _moment(since)))
        return sorted(out, key=lambda f: f.vendor)

    # -- request rate --------------------------------------------------------------------------
    async def count_request(self, key_id: str, limit: int, now: dt.datetime) -> RateResult:
        """One ``count_request.lua`` call: check and count in one step for every replica."""
        check_rate_limit(limit)
        bucket = rate_bucket(now)
        tag = await self._key_tree(key_id)
        reply = await self._script(
            "count_request",
            [self._kt(tag, "rate", key_id)],
            [
                str(limit),
                str(bucket),
                str(RATE_BUCKETS),
                str((RATE_BUCKETS + 1) * RATE_BUCKET_MS),
            ],
        )
        if int(reply[0]):
            return RateResult(ok=True)
        counts = {int(b): int(n) for b, n in zip(reply[1::2], reply[2::2], strict=True)}
        return rate_verdict(limit, counts, bucket, now)

    # -- budgets and the reservation ledger ----------------------------------------------------
    async def set_label_budget(self, label: str, daily_cap_micros: int | None) -> None:
        if daily_cap_micros is not None:
            check_micros("daily_cap_micros", daily_cap_micros)
        await self._set_label_fields(
            label, {label: None if daily_cap_micros is None else str(daily_cap_micros)}
        )

    async def _set_label_fields(self, label: str, fields: Mapping[str, str | None]) -> None:
        """Write a label's limits into the label-budgets hash of every budget tree (like a
        freeze, `_freeze_hashes`): whichever tree the label's keys are in reads them in its
        admission step. Not a transaction on a cluster; each write is idempotent."""
        check_label(label)
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            for name in self._freeze_hashes():
                for field, value in fields.items():
                    if value is None:
                        pipe.hdel(name, field)
                    else:
                        pipe.hset(name, field, value)
            await pipe.execute()

    async def get_label_budget(self, label: str) -> int | None:
        return (await self.get_label_limits(label)).daily_cap_micros

    async def set_label_limits(self, limits: LabelBudget) -> None:
        check_label_limits(limits)
        label = limits.label

        def text(value: int | None) -> str | None:
            return None if value is None else str(value)

        await self._set_label_fields(
            label,
            {
                label: text(limits.daily_cap_micros),
                f"!life:{label}": text(limits.lifetime_cap_micros),
                f"!rate:{label}": text(limits.max_requests_per_minute),
            },
        )

    async def get_label_limits(self, label: str) -> LabelBudget:
        async with self._guard() as client:
            row = await client.hmget(
                self._kt(self._tree(label, ""), "label-budgets"),
                [label, f"!life:{label}", f"!rate:{label}"],
            )
        daily, life, rate = (None if v is None else int(v) for v in row)
        return LabelBudget(label, daily, life, rate)

    async def _scope_tree(self, scope: str) -> str:
        """The hash tag of the tree a usage row's scope lives in."""
        if not self._cluster:
            return ""
        kind, _, name = scope.partition(":")
        if kind.startswith("issuer"):
            return self._tree("", "", name)
        if kind.startswith("label"):
            return self._tree(name, "", await self._label_home(name))
        return await self._key_tree(name)

    async def tree_usage(
        self, scopes: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, int]]:
        tags = [await self._scope_tree(scope) for scope, _window in scopes]
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            for (scope, window), tag in zip(scopes, tags, strict=True):
                pipe.hmget(self._usage_key(tag, scope, window), ["spent", "reserved"])
            rows = await pipe.execute()
        return {
            pair: (int(row[0] or 0), int(row[1] or 0))
            for pair, row in zip(scopes, rows, strict=True)
        }

    def _usage_key(self, tag: str, scope: str, window: str) -> str:
        return self._kt(tag, "usage", scope, window)

    async def reserve(
        self,
        key: KeyRecord,
        reservation_id: str,
        estimate_micros: int,
        now: dt.datetime,
    ) -> ReserveResult:
        """Check every capped budget and reserve ``estimate_micros`` in all of them, or none.

        A ``reservation_id`` already in the ledger is never reserved twice: the call changes
        nothing and answers ``ok=True`` with the current budgets, so a retry is harmless.
        """
        check_micros("estimate_micros", estimate_micros)
        day = utc_day(now)
        # The label cap is read inside the script; the plan here only names the hashes.
        plan = usage_plan(key, day, None)
        tag = self._tree(key.agent_run_label, key.key_id, key.issuer_id)
        self._res_seen(reservation_id, tag)
        reply = await self._script(
            "reserve",
            [
                self._kt(tag, "res", reservation_id),
                self._kt(tag, "open-reservations"),
                self._kt(tag, "label-budgets"),
                *(self._usage_key(tag, scope, window) for scope, window, _cap in plan),
            ],
            [
                str(estimate_micros),
                str(key.daily_cap_micros),
                "" if key.usd_cap_micros is None else str(key.usd_cap_micros),
                key.agent_run_label,
                str(epoch_micros(now)),
                str(_DAILY_USAGE_TTL_SECONDS),
                reservation_id,
                key.key_id,
                key.issuer_id or "",
            ],
        )
        status, exceeded_index = int(reply[0]), int(reply[1])
        tree = TreeCaps.parse([_text(v) for v in reply[2]])
        plan = usage_plan(key, day, tree.label_daily, tree)
        states: list[BudgetState] = []
        exceeded: BudgetState | None = None
        for index, (scope, window, cap) in enumerate(plan):
            state = BudgetState(
                scope, window, cap, int(reply[3 + 2 * index]), int(reply[4 + 2 * index])
            )
            if index + 1 == exceeded_index:
                exceeded = state
            if cap is not None:
                states.append(state)
        return ReserveResult(status != 0, reservation_id, tuple(states), exceeded=exceeded)

    async def _finish(
        self, reservation_id: str, state: str, actual_micros: int, tag: str | None = None
    ) -> bool:
        """Run ``finish.lua`` on one reservation.

        The usage hashes a reservation touched are read first because a script must be told
        every key it touches; they never change after `reserve`, and the state check that makes
        finishing happen at most once is inside the script, so the extra read is not a race.
        """
        if tag is None:
            tag = await self._res_tree(reservation_id)
        res_key = self._kt(tag, "res", reservation_id)
        for _attempt in range(3):
            touched, hold = await self._reservation_keys(res_key)
            if not touched:
                self._res_tags.pop(reservation_id, None)
                return False
            finished = await self._script(
                "finish",
                [res_key, self._kt(tag, "open-reservations"), hold or res_key, *touched],
                [
                    state,
                    str(actual_micros),
                    str(int(time.time() * 1000)),
                    str(_DAILY_USAGE_TTL_SECONDS),
                    "0",
                    reservation_id,
                ],
            )
            if int(finished) != -1:  # -1: held after we looked; look again
                self._res_tags.pop(reservation_id, None)
                return bool(finished)
        raise StoreUnavailable(f"reservation {reservation_id} keeps changing; not finished")

    async def _reservation_keys(self, res_key: str) -> tuple[list[str], str | None]:
        """The usage hashes a reservation touched, and its hold set if it is held.

        Read before a script runs because a script must be told every key it touches; the
        usage hashes never change after `reserve`, and each script checks what it was told.
        """
        async with self._guard() as client:
            row = await client.hmget(
                res_key, ["usage", "hold", *(f"usage_{i}" for i in range(1, 7))]
            )
        hold = _text(row[1]) if row[1] is not None else None
        if row[0] is not None:  # see _reservation.lua
            return _text(row[0]).split("\n"), hold
        return [_text(k) for k in row[2:] if k is not None], hold

    async def settle(self, reservation_id: str, actual_micros: int) -> bool:
        check_micros("actual_micros", actual_micros)
        return await self._finish(reservation_id, "settled", actual_micros)

    async def release(self, reservation_id: str) -> bool:
        return await self._finish(reservation_id, "released", 0)

    async def mark_unknown(self, reservation_id: str) -> bool:
        return await self._finish(reservation_id, "unknown", 0)

    async def budgets(self, key: KeyRecord, now: dt.datetime) -> tuple[BudgetState, ...]:
        plan = usage_plan(key, utc_day(now), None)
        tag = self._tree(key.agent_run_label, key.key_id, key.issuer_id)
        label = key.agent_run_label
        fields = [label, f"!life:{label}", f"!rate:{label}", f"!iss:{key.issuer_id or ''}"]
        async with self._guard() as client:
            # MULTI/EXEC: the caps and the usage come from one consistent moment (on a
            # cluster too: they are in one slot).
            pipe = client.pipeline(transaction=True)
            pipe.hmget(self._kt(tag, "label-budgets"), fields)
            for scope, window, _cap in plan:
                pipe.hmget(self._usage_key(tag, scope, window), ["spent", "reserved"])
            limits, *usage = await pipe.execute()
        values = [_text(v) if v is not None else "" for v in limits]
        if not label:
            values[:3] = ["", "", ""]
        issuer = (values[3] + "::").split(":")[:3] if key.issuer_id else ["", "", ""]
        tree = TreeCaps.parse([*values[:3], *issuer])
        plan = usage_plan(key, utc_day(now), tree.label_daily, tree)
        return tuple(
            BudgetState(scope, window, cap, int(spent or 0), int(reserved or 0))
            for (scope, window, cap), (spent, reserved) in zip(plan, usage, strict=True)
            if cap is not None
        )

    async def recover_reservations(self, older_than: dt.datetime) -> int:
        """Mark every open reservation created before ``older_than`` unknown, one script call
        each (each is atomic, so a concurrent settle still wins or loses cleanly)."""
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            for tag in self._tags:  # one bucket on one server; every bucket on a cluster
                pipe.zrangebyscore(
                    self._kt(tag, "open-reservations"), "-inf", f"({epoch_micros(older_than)}"
                )
            found = await pipe.execute()
        count = 0
        for tag, ids in zip(self._tags, found, strict=True):
            for reservation_id in ids:
                count += await self._finish(_text(reservation_id), "unknown", 0, tag)
        return count

    # -- one call, two steps -------------------------------------------------------------------
    async def admit(self, request: AdmissionRequest) -> Admission:
        """See `Store.admit`: one ``admit.lua`` call.

        The usage hashes are named from the key as this process knows it (its id and label
        never change); the caps, the state and everything else are read inside the script.
        """
        r = request
        check_micros("estimate_micros", r.estimate_micros)
        if r.rate_limit is not None:
            check_rate_limit(r.rate_limit)
        claim = r.idempotency
        if claim is not None:
            check_idempotency_times(claim.ttl_seconds, claim.in_flight_seconds)
        label, issuer = await self._path(r.key_id) or ("", "")
        tag = self._tree(label, r.key_id, issuer)
        day = utc_day(r.now)
        fixed, usage_names = self._admit_names.get((r.key_id, day)) or self._name_admission(
            r.key_id, label, issuer, tag, day
        )
        usage: Sequence[str] = ()
        if r.reservation_id is not None:
            self._res_seen(r.reservation_id, tag)
            usage = usage_names
        idem_index = fixed[3]
        reply = await self._script(
            "admit",
            [
                *fixed[:3],
                self._kt(tag, "idm", r.key_id, claim.scope if claim else ""),
                idem_index,
                self._kt(tag, "res", r.reservation_id or ""),
                *fixed[4:],
                *usage,
            ],
            [
                str(epoch_micros(r.now)),
                "" if r.rate_limit is None else str(r.rate_limit),
                str(rate_bucket(r.now)),
                "" if r.max_objects is None else str(r.max_objects),
                claim.body_sha256 if claim else "",
                str(claim.ttl_seconds) if claim else "0",
                str(claim.in_flight_seconds) if claim else "0",
                str(claim.max_entries) if claim else "0",
                r.reservation_id or "",
                str(r.estimate_micros),
                r.key_id,
                label,
                issuer,
                _to_do(
                    r.key_id not in self._key_static,
                    idem_index not in self._ttl_set,
                    *(name not in self._ttl_set for name in usage),
                ),
            ],
        )
        if _text(reply[0]) == "admitted":
            self._ttl_done([idem_index, *usage] if claim else usage)
        status, code, detail, extra = _text(reply[0]), _text(reply[1]), _text(reply[2]), reply[3]
        key = self._admitted_key(r.key_id, reply[4])
        if status == "replay":
            return Admission("replay", key, response=_unpack_response(reply[5]))
        if code == "rate_limited":
            tree = TreeCaps.parse([_text(v) for v in reply[5]])
            limit = {"label": tree.label_rate, "issuer": tree.issuer_rate}.get(detail, r.rate_limit)
            assert limit is not None
            counts = {int(b): int(c) for b, c in zip(extra[::2], extra[1::2], strict=True)}
            verdict = rate_verdict(limit, counts, rate_bucket(r.now), r.now)
            return Admission(
                "refused",
                key,
                code=code,
                detail=detail,
                retry_after_seconds=verdict.retry_after_seconds,
                rate_limit=limit,
            )
        if status == "refused" and code != "cap_exhausted":
            return Admission("refused", key, code=code, detail=detail)
        budgets: list[BudgetState] = []
        exceeded: BudgetState | None = None
        rows: tuple[tuple[str, str], ...] = ()
        if r.reservation_id is not None and key is not None:
            tree = TreeCaps.parse([_text(v) for v in reply[5]])
            plan = usage_plan(key, day, tree.label_daily, tree)
            rows = tuple((scope, window) for scope, window, _ in plan)
            answered = iter(reply[6:])  # spent, reserved of each budget with a cap
            for index, (scope, window, cap) in enumerate(plan):
                if cap is None:
                    continue
                state = BudgetState(scope, window, cap, int(next(answered)), int(next(answered)))
                if code == "cap_exhausted" and index + 1 == int(extra[0]):
                    exceeded = state
                budgets.append(state)
        if status == "refused":
            return Admission("refused", key, code=code, budgets=tuple(budgets), exceeded=exceeded)
        return Admission("admitted", key, budgets=tuple(budgets), ledger_rows=rows)

    def _name_admission(
        self, key_id: str, label: str, issuer: str, tag: str, day: str
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names of admit.lua's KEYS that stay the same for a key all day (in KEYS order,
        the idempotency entry and the reservation left out), and its usage hashes; kept."""
        stub = KeyRecord(key_id, "", "", label, 0, (), EPOCH, EPOCH, issuer_id=issuer or None)
        usage = tuple(
            self._usage_key(tag, scope, window) for scope, window, _ in usage_plan(stub, day, None)
        )
        fixed = (
            self._kt(tag, "key", key_id),
            self._kt(tag, "rate", key_id),
            self._kt(tag, "objs", key_id),
            self._kt(tag, "idem-index", key_id),
            self._kt(tag, "open-reservations"),
            self._kt(tag, "label-budgets"),
            self._kt(tag, "rate", f"label:{label}") if label else self._kt(tag, "rate", key_id),
            self._kt(tag, "rate", f"issuer:{issuer}") if issuer else self._kt(tag, "rate", key_id),
        )
        if len(self._admit_names) > _TTL_MEMORY:
            self._admit_names.clear()
        self._admit_names[(key_id, day)] = (fixed, usage)
        return fixed, usage

    def _ttl_done(self, names: Sequence[str]) -> None:
        if len(self._ttl_set) > _TTL_MEMORY:
            self._ttl_set.clear()
        self._ttl_set.update(names)

    def _admitted_key(self, key_id: str, flat: Sequence[bytes]) -> KeyRecord | None:
        """The key record from admit.lua's answer: every field the first time (kept, but for
        the fields that can change), then only the fields that can change. An answer equal to
        the last one for the key gives the record made of it then (records are immutable)."""
        answer = tuple(flat)
        if (known := self._key_answers.get(key_id, answer)) is not None:
            return known
        fields = {_text(k): _text(v) for k, v in zip(answer[::2], answer[1::2], strict=True)}
        if not fields:
            return None
        if len(self._key_static) > _TTL_MEMORY:  # forgotten in bulk: read whole again
            self._key_static.clear()
            self._key_expiry_ms.clear()
        self._key_expiry_ms[key_id] = int(fields["expires_at"]) // 1000
        static = self._key_static.get(key_id)
        if static is None:
            static = {k: v for k, v in fields.items() if k not in _MUTABLE_KEY_FIELDS}
            self._key_static[key_id] = static
        merged: dict[bytes | str, bytes | str] = {}
        merged.update(static)
        merged.update(fields)
        record = _key_record(merged)
        return None if record is None else self._key_answers.put(key_id, answer, record)

    async def settle_call(self, settlement: Settlement) -> bool:
        """See `Store.settle_call`: one ``settle_call.lua`` call, ``XADD`` to the audit stream
        included."""
        s = settlement
        finish = s.finish if s.reservation_id is not None and s.finish is not None else ""
        tag = await self._key_tree(s.key_id)
        usage = (
            [self._usage_key(tag, scope, window) for scope, window in s.ledger_rows]
            if finish
            else []
        )
        idem, entry = "", b""
        if s.idempotency_scope is not None:
            idem = "abandon"
            if s.idempotency_response is not None:
                if not s.idempotency_sha256:
                    raise ValueError("completing an idempotency claim needs its body hash")
                sha = s.idempotency_sha256
                # The claim as admit.lua wrote it, up to the body hash, and its completed entry.
                idem = f"I{len(sha)}:{sha}"
                entry = f"D{len(sha)}:{sha}".encode() + _pack_response(s.idempotency_response)
        indexes = [self._kt(tag, "objs", s.key_id)] if s.created else []
        if s.remember and (self._cluster or s.remember[0] not in s.created):
            indexes.append(self._kt(tag, "amounts", s.key_id))
        # Their TTL is the key's expiry plus the longest any entry lives (an object's 90 days):
        # set once, by this process, when it knows the key's expiry.
        expiry_ms = self._key_expiry_ms.get(s.key_id)
        ends = max(expiry_ms or 0, int(time.time() * 1000)) + int(OBJECT_TTL.total_seconds()) * 1000
        indexes_expire = str(ends)
        if expiry_ms is not None and all(name in self._ttl_set for name in indexes):
            indexes_expire = ""
        created, claimed = s.created, []
        if self._cluster and created:
            # Owner records are in their own slots: claimed first (the call's answer must find
            # them), indexed by the settling script; the amount goes to the key's hash.
            claimed = await self._own(s.key_id, s.label, s.vendor, created)
            created = ()
        about = 0
        if s.remember and s.remember[0] in created:
            about = 9 + len(usage) + created.index(s.remember[0])
        finished = await self._script(
            "settle_call",
            [
                self._kt(tag, "res", s.reservation_id or ""),
                self._kt(tag, "open-reservations"),
                self._kt(tag, "hold", s.vendor, s.hold[0] if s.hold else ""),
                self._kt(tag, "objs", s.key_id),
                self._kt(tag, "amounts", s.key_id),
                self._kt(tag, "idm", s.key_id, s.idempotency_scope or ""),
                self._kt(tag, "idem-index", s.key_id),
                self._kt(tag, "audit"),
                *usage,
                *(self._kt(tag, "owner", s.vendor, oid) for oid in created),
            ],
            [
                finish,
                str(s.actual_micros),
                str(s.hold[1]) if s.hold else "0",
                s.reservation_id or "",
                s.key_id,
                s.label,
                f"{s.vendor}:{s.remember[0]}" if s.remember else "",
                str(s.remember[1]) if s.remember else "",
                str(about),
                idem,
                str(epoch_micros(s.now) // 1000),
                entry,
                str(len(usage)),
                json.dumps(s.audit, separators=(",", ":")) if s.audit is not None else "",
                indexes_expire,
                *claimed,
            ],
        )
        if expiry_ms is not None:
            self._ttl_done(indexes)
        if s.reservation_id is not None and finish != "held":
            self._res_tags.pop(s.reservation_id, None)
        return bool(finished)

    # -- the audit outbox: a stream read by a consumer group ----------------------------------
    async def append_audit(self, row: dict[str, object]) -> None:
        async with self._guard() as client:
            await client.xadd(self._kt(self._tags[0], "audit"), {"row": json.dumps(row)})

    def _audit_id(self, tag: str, entry_id: object) -> str:
        """A row's id for `audit_ack`: its stream entry id, after its bucket on a cluster."""
        return f"{tag}/{_text(entry_id)}" if tag else _text(entry_id)

    async def audit_batch(self, consumer: str, limit: int) -> list[tuple[str, dict[str, object]]]:
        """This consumer's own unacknowledged rows first (a sink that failed), then rows
        another consumer left unacknowledged for ``audit_claim_idle_ms`` (30 s unless the
        store URL says otherwise: a replica that died), then new ones: one ``audit_read.lua`` step.

        On a cluster each bucket has its stream (a settlement appends to its own tree's, in the
        same script): every stream is read in one pipeline (a round trip per master), up to
        ``limit`` rows from each.
        """
        args = [_AUDIT_GROUP, consumer, str(limit), str(self._audit_claim_idle_ms)]
        streams = [self._kt(tag, "audit") for tag in self._tags]
        if len(streams) == 1:
            replies = [await self._script("audit_read", streams, args)]
        else:
            sha = self._scripts["audit_read"].sha
            async with self._guard() as client:
                pipe = client.pipeline(transaction=False)
                for stream in streams:
                    pipe.execute_command("EVALSHA", sha, 1, stream, *args)
                replies = await pipe.execute(raise_on_error=False)
            for index, reply in enumerate(replies):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    # Redis lost its scripts (a restart): alone, redis-py loads it again.
                    replies[index] = await self._script("audit_read", [streams[index]], args)
                elif isinstance(reply, Exception):
                    raise self._unavailable(reply)
        out: list[tuple[str, dict[str, object]]] = []
        for tag, flat in zip(self._tags, replies, strict=True):
            for entry_id, row in zip(flat[::2], flat[1::2], strict=True):
                out.append((self._audit_id(tag, entry_id), json.loads(row)))
        return out

    async def audit_peek(self, limit: int) -> list[tuple[str, dict[str, object]]]:
        """The oldest entries of the stream (``XRANGE``), claimed by a consumer or not; on a
        cluster up to ``limit`` of each bucket's stream, oldest first."""
        async with self._guard() as client:
            pipe: Any = client.pipeline(transaction=False)  # stream replies are not typed usefully
            for tag in self._tags:
                pipe.xrange(self._kt(tag, "audit"), "-", "+", count=limit)
            streams: list[Any] = await pipe.execute()
        found: list[tuple[str, str, dict[str, object]]] = []
        for tag, entries in zip(self._tags, streams, strict=True):
            found += [
                (_text(i), self._audit_id(tag, i), json.loads(fields[b"row"]))
                for i, fields in entries
            ]
        if self._cluster:
            found.sort(key=lambda item: _entry_order(item[0]))
        return [(audit_id, row) for _, audit_id, row in found[:limit]]

    async def audit_ack(self, ids: Sequence[str]) -> None:
        by_tag: dict[str, list[str]] = {}
        for audit_id in ids:
            tag, _, entry_id = audit_id.rpartition("/")
            by_tag.setdefault(tag, []).append(entry_id)
        for tag, entry_ids in by_tag.items():
            newest = max(entry_ids, key=_entry_order)
            await self._script(
                "audit_ack", [self._kt(tag, "audit")], [_AUDIT_GROUP, newest, *entry_ids]
            )

    async def audit_backlog(self) -> int:
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            for tag in self._tags:
                pipe.xlen(self._kt(tag, "audit"))
            return sum(int(n) for n in await pipe.execute())

    # -- holds ---------------------------------------------------------------------------------
    async def hold(
        self, reservation_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> bool:
        check_micros("amount_micros", amount_micros)
        tag = await self._res_tree(reservation_id)
        res_key = self._kt(tag, "res", reservation_id)
        touched, _ = await self._reservation_keys(res_key)
        if not touched:
            return False
        held = await self._script(
            "hold",
            [
                res_key,
                self._kt(tag, "open-reservations"),
                self._kt(tag, "hold", vendor, object_id),
                *touched,
            ],
            [str(amount_micros), reservation_id],
        )
        return bool(held)

    async def holds(self, vendor: str, object_id: str) -> tuple[Hold, ...]:
        """The open holds on an object, oldest first. On a cluster an object's holds may be in
        any tree (keys of several labels may act on one object): every bucket's hold set is
        read, in one pipeline."""
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            for tag in self._tags:
                pipe.smembers(self._kt(tag, "hold", vendor, object_id))
            members = await pipe.execute()
            ids = sorted(
                (_text(i), tag)
                for tag, found in zip(self._tags, members, strict=True)
                for i in found
            )
            pipe = client.pipeline(transaction=False)
            for reservation_id, tag in ids:
                self._res_seen(reservation_id, tag)
                pipe.hmget(
                    self._kt(tag, "res", reservation_id),
                    ["state", "key_id", "estimate", "created_at"],
                )
            rows = await pipe.execute()
        found = [
            (int(row[3]), Hold(reservation_id, _text(row[1]), int(row[2])))
            for (reservation_id, _tag), row in zip(ids, rows, strict=True)
            if row[0] is not None and _text(row[0]) == "reserved"
        ]
        return tuple(hold for _created, hold in sorted(found, key=lambda item: item[0]))

    async def raise_hold(
        self, reservation_id: str, amount_micros: int, key: KeyRecord
    ) -> ReserveResult:
        check_micros("amount_micros", amount_micros)
        tag = await self._res_tree(reservation_id)
        res_key = self._kt(tag, "res", reservation_id)
        touched, _ = await self._reservation_keys(res_key)
        if not touched:
            return ReserveResult(False, reservation_id, ())
        reply = await self._script(
            "raise_hold",
            [res_key, self._kt(tag, "label-budgets"), *touched],
            [
                str(amount_micros),
                key.agent_run_label,
                str(key.daily_cap_micros),
                "" if key.usd_cap_micros is None else str(key.usd_cap_micros),
                key.issuer_id or "",
            ],
        )
        status, exceeded_index = int(reply[0]), int(reply[1])
        if status == -1:
            return ReserveResult(False, reservation_id, ())
        tree = TreeCaps.parse([_text(v) for v in reply[2]])
        caps = [cap for _s, _w, cap in usage_plan(key, "", tree.label_daily, tree)]
        states: list[BudgetState] = []
        exceeded: BudgetState | None = None
        for index, usage_key in enumerate(touched):
            scope, window = usage_key.removeprefix(self._kt(tag, "usage", "")).rsplit(":", 1)
            state = BudgetState(
                scope, window, caps[index], int(reply[3 + 2 * index]), int(reply[4 + 2 * index])
            )
            if index + 1 == exceeded_index:
                exceeded = state
            if caps[index] is not None:
                states.append(state)
        return ReserveResult(status == 1, reservation_id, tuple(states), exceeded=exceeded)

    # -- objects and remembered amounts -----------------------------------------------------
    async def record_objects(
        self, key: KeyRecord, vendor: str, object_ids: Sequence[str], now: dt.datetime
    ) -> None:
        if not object_ids:
            return
        tag = self._tree(key.agent_run_label, key.key_id, key.issuer_id)
        if self._cluster:
            claimed = await self._own(key.key_id, key.agent_run_label, vendor, object_ids)
            if claimed:
                expires = int(time.time() * 1000) + int(OBJECT_TTL.total_seconds()) * 1000
                index = self._kt(tag, "objs", key.key_id)
                async with self._guard() as client:
                    pipe = client.pipeline(transaction=True)
                    pipe.zadd(index, dict.fromkeys(claimed, expires))
                    pipe.pexpireat(index, expires)
                    await pipe.execute()
            return
        await self._script(
            "record_objects",
            [
                self._kt(tag, "objs", key.key_id),
                *(self._kt(tag, "owner", vendor, oid) for oid in object_ids),
            ],
            [key.key_id, key.agent_run_label, str(int(OBJECT_TTL.total_seconds()))],
        )

    async def _own(
        self, key_id: str, label: str, vendor: str, object_ids: Sequence[str]
    ) -> list[str]:
        """Claim objects for a key on a cluster (``own.lua`` per object, sent with the other
        hot-path scripts of the event-loop turn): the names of the owner records that are the
        key's. The caller indexes them in the key's tree (``objs``); a crash between the two
        leaves a record out of the index: the key's object count is one short, and forgetting
        the key leaves the record to its TTL."""
        ttl = str(int(OBJECT_TTL.total_seconds()))
        names = [self._owner_key(vendor, oid) for oid in object_ids]
        mine = await asyncio.gather(
            *(self._script("own", [name], [key_id, label, ttl]) for name in names)
        )
        return [name for name, ok in zip(names, mine, strict=True) if int(ok)]

    def _owner_key(self, vendor: str, object_id: str) -> str:
        """An object's owner record: on a cluster in its own slot (no tag), found by anyone."""
        return self._k("owner", vendor, object_id)

    async def object_owner(self, vendor: str, object_id: str) -> ObjectOwner | None:
        async with self._guard() as client:
            if self._cluster:
                record, owner, label = (
                    await client.get(self._owner_key(vendor, object_id)),
                    None,
                    None,
                )
            else:
                pipe = client.pipeline(transaction=False)
                pipe.get(self._k("owner", vendor, object_id))
                pipe.hmget(self._k("obj", vendor, object_id), ["key", "label"])  # written before
                record, (owner, label) = await pipe.execute()
        if record is not None:
            owner, _amount, label = _text(record).split("\n", 2)
            return ObjectOwner(owner, label)
        return None if owner is None else ObjectOwner(_text(owner), _text(label or b""))

    async def count_objects(self, key_id: str) -> int:
        index = self._kt(await self._key_tree(key_id), "objs", key_id)
        async with self._guard() as client:
            pipe = client.pipeline(transaction=True)
            pipe.zremrangebyscore(index, "-inf", int(time.time() * 1000))
            pipe.zcard(index)
            _, count = await pipe.execute()
        return int(count)

    async def remember_amount(
        self, key_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> None:
        check_micros("amount_micros", amount_micros)
        amounts = self._kt(await self._key_tree(key_id), "amounts", key_id)
        expires = int(time.time()) + _AMOUNT_TTL_SECONDS
        async with self._guard() as client:
            pipe = client.pipeline(transaction=True)
            pipe.hset(amounts, f"{vendor}:{object_id}", f"{amount_micros}:{expires}")
            # Never shortens the TTL settle_call gave it (the key's expiry and more).
            pipe.expire(amounts, _AMOUNT_TTL_SECONDS, nx=True)
            pipe.expire(amounts, _AMOUNT_TTL_SECONDS, gt=True)
            await pipe.execute()

    async def recall_amount(self, key_id: str, vendor: str, object_id: str) -> int | None:
        # An owner record with this key's amount is in this key's tree.
        tag = await self._key_tree(key_id)
        async with self._guard() as client:
            pipe = client.pipeline(transaction=False)
            pipe.hget(self._kt(tag, "amounts", key_id), f"{vendor}:{object_id}")
            pipe.get(self._kt(tag, "owner", vendor, object_id))  # with the amount it created
            if not self._cluster:
                pipe.get(self._k("amount", key_id, vendor, object_id))  # written before
            value, record, *before = await pipe.execute()
        legacy = before[0] if before else None
        # The newest of what this key remembered: in its hash, or with the object it created.
        found: list[tuple[int, int]] = []
        if value is not None:
            micros, _, expires = _text(value).partition(":")
            found.append((int(expires), int(micros)))
        if record is not None:
            owner, amount, _label = _text(record).split("\n", 2)
            if owner == key_id and amount:
                micros, _, expires = amount.partition(":")
                found.append((int(expires), int(micros)))
        live = [item for item in found if item[0] > time.time()]
        if live:
            return max(live)[1]
        return None if legacy is None or found else int(legacy)

    async def forget_expired_keys(self, now: dt.datetime) -> int:
        async with self._guard() as client:
            expired = await client.zrangebyscore(
                self._k("keys-expiring"), "-inf", epoch_micros(now)
            )
        gone = 0
        for raw in expired:
            key_id = _text(raw)
            gone += await self.forget_key(key_id)
            async with self._guard() as client:
                await client.zrem(self._k("keys-expiring"), key_id)
        return gone

    async def forget_key(self, key_id: str) -> int:
        """Deletes the key's indexed entries and its remembered amounts (found with SCAN on
        the key's own prefix: revocation is rare, never on a call's path)."""
        gone = 0
        tag = await self._key_tree(key_id)
        async with self._guard() as client:
            names: list[str] = []
            for index in (self._kt(tag, "idem-index", key_id), self._kt(tag, "objs", key_id)):
                names += [_text(n) for n in await client.zrange(index, 0, -1)]
                names.append(index)
            amounts = self._kt(tag, "amounts", key_id)
            names.append(amounts)
            if not self._cluster:  # entries of earlier versions (a cluster never had them)
                async for name in client.scan_iter(
                    match=_glob_escape(self._k("amount", key_id, "")) + "*", count=500
                ):
                    names.append(_text(name))
            for start in range(0, len(names), 500):
                gone += int(await client.delete(*names[start : start + 500]))
        return gone

    # -- idempotency cache ---------------------------------------------------------------------
    async def idempotency_begin(
        self,
        key_id: str,
        scope: str,
        body_sha256: str,
        ttl_seconds: int,
        in_flight_seconds: int,
        max_entries: int,
    ) -> IdempotencyBegin:
        """Claim ``scope``; see `Store.idempotency_begin` and ``idempotency_begin.lua``.

        Order of the checks: an expired entry or a stale claim (in flight for more than
        ``in_flight_seconds`` by the Redis server's clock) is replaced (``started``); otherwise
        a different body hash is ``mismatch``; otherwise ``in_flight`` or ``replay``.
        """
        check_idempotency_times(ttl_seconds, in_flight_seconds)
        tag = await self._key_tree(key_id)
        reply = await self._script(
            "idempotency_begin",
            [self._kt(tag, "idm", key_id, scope), self._kt(tag, "idem-index", key_id)],
            [body_sha256, str(ttl_seconds), str(in_flight_seconds), str(max_entries)],
        )
        status = _text(reply[0])
        if status == "replay":
            return IdempotencyBegin("replay", _unpack_response(reply[1]))
        if status == "started":
            return IdempotencyBegin("started")
        if status == "in_flight":
            return IdempotencyBegin("in_flight")
        if status == "full":
            return IdempotencyBegin("full")
        return IdempotencyBegin("mismatch")

    async def idempotency_complete(
        self, key_id: str, scope: str, response: StoredResponse, ttl_seconds: int
    ) -> None:
        """Store ``response`` on the in-flight claim of ``scope``; no-op when there is none
        (abandoned, expired or already complete), since its body hash would be unknown."""
        check_idempotency_times(ttl_seconds, 0)
        tag = await self._key_tree(key_id)
        await self._script(
            "idempotency_finish",
            [self._kt(tag, "idm", key_id, scope), self._kt(tag, "idem-index", key_id)],
            ["complete", str(ttl_seconds), _pack_response(response)],
        )

    async def idempotency_abandon(self, key_id: str, scope: str) -> None:
        """Drop the in-flight claim of ``scope``; a completed response is kept."""
        tag = await self._key_tree(key_id)
        await self._script(
            "idempotency_finish",
            [self._kt(tag, "idm", key_id, scope), self._kt(tag, "idem-index", key_id)],
            ["abandon"],
        )
