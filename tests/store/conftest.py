"""Fixtures for the store contract: the same tests against SQLite (tmp_path) and real Redis:
the shared one on 127.0.0.1:6379, private ones with AUTH as an ACL user (``redis-acl``)
and with TLS, a client certificate and the password from the environment (``redis-tls``), and
a private Redis Cluster of three masters on loopback (``redis-cluster``, ``redis+cluster://``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
from tests._redis import (
    REDIS_ACL_PASSWORD,
    REDIS_ACL_USER,
    PrivateRedis,
    PrivateRedisCluster,
    RedisTLS,
)

from keybrake.store import (
    PASSWORD_ENV,
    AdmissionRequest,
    KeyRecord,
    RedisStore,
    Settlement,
    SQLiteStore,
    Store,
    open_store,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
USD = 1_000_000

StoreFactory = Callable[[], Store]


def redis_prefix() -> str:
    """A key prefix no other test (or xdist worker) uses."""
    return f"kbtest:{uuid.uuid4().hex}:"


def delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def require_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}); start it with "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' "
            "--appendonly no`"
        )
    finally:
        client.close()


def make_key(
    key_id: str = "kb_key1",
    *,
    label: str = "",
    daily: int = 10 * USD,
    usd_cap: int | None = None,
    created_at: dt.datetime = dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    vendor: str = "stripe",
) -> KeyRecord:
    """A vault key record; its secret hash is derived from ``key_id`` so it is unique too."""
    return KeyRecord(
        key_id=key_id,
        secret_sha256=hashlib.sha256(key_id.encode()).hexdigest(),
        vendor=vendor,
        agent_run_label=label,
        daily_cap_micros=daily,
        allowed_endpoints=("POST /v1/payment_intents", "GET /v1/charges/{id}"),
        created_at=created_at,
        expires_at=created_at + dt.timedelta(days=30),
        usd_cap_micros=usd_cap,
    )


async def paid_call(
    store: Store,
    key_id: str,
    label: str,
    reservation_id: str,
    at: dt.datetime,
    *,
    estimate: int,
    actual: int,
    finish: str = "settled",
) -> bool:
    """One paid call's two store steps, as the proxy makes them: the admission (asserted
    admitted), then the settlement that finishes its reservation as ``finish`` with its audit
    row. Returns what `Store.settle_call` answered (True: finished now)."""
    admitted = await store.admit(
        AdmissionRequest(key_id, at, reservation_id=reservation_id, estimate_micros=estimate)
    )
    assert admitted.status == "admitted", admitted
    return await store.settle_call(
        Settlement(
            key_id,
            label,
            "stripe",
            at,
            reservation_id=reservation_id,
            ledger_rows=admitted.ledger_rows,
            finish=finish,  # type: ignore[arg-type]
            actual_micros=actual,
            audit={"event_id": f"ev_{reservation_id}", "key_id": key_id, "outcome": "ok"},
        )
    )


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        "redis-acl",
        "redis-tls",
        "redis-cluster",
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "redis":
        require_redis()
    return name


def private_store_url(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The store URL of a private Redis backend, opened the way an operator would."""
    if backend == "redis-cluster":
        cluster: PrivateRedisCluster = request.getfixturevalue("redis_cluster")
        return f"{cluster.url}?"
    if backend == "redis-acl":
        acl: PrivateRedis = request.getfixturevalue("acl_redis")
        return f"redis://{REDIS_ACL_USER}:{REDIS_ACL_PASSWORD}@127.0.0.1:{acl.port}/0?"
    tls: PrivateRedis = request.getfixturevalue("tls_redis")
    certs: RedisTLS = request.getfixturevalue("redis_tls")
    monkeypatch.setenv(PASSWORD_ENV, REDIS_ACL_PASSWORD)
    return f"rediss://{REDIS_ACL_USER}@127.0.0.1:{tls.port}/0?{certs.query()}&"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    """A private Redis Cluster: three masters, no replicas (the failover tests start their
    own, with replicas), shared by the tests of one worker; each test has its own prefix."""
    cluster = PrivateRedisCluster(tmp_path_factory.mktemp("redis-cluster"), replicas=0)
    try:
        yield cluster.start()
    finally:
        cluster.kill()


@pytest.fixture
def make_store(
    backend: str,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[StoreFactory]:
    """New store objects on the same state (a file, or a Redis prefix): a "restarted" store."""
    prefix = redis_prefix()
    path = tmp_path / "state.db"
    url = private_store_url(backend, request, monkeypatch) if backend.startswith("redis-") else ""

    def factory() -> Store:
        if backend == "sqlite":
            return SQLiteStore(path)
        if url:
            return open_store(f"{url}prefix={prefix}")
        return RedisStore(REDIS_URL, prefix=prefix)

    yield factory
    if backend == "redis":
        delete_prefix(prefix)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    """A `RedisStore` on the shared server under a prefix of its own, deleted afterwards."""
    require_redis()
    prefix = redis_prefix()
    store = RedisStore(REDIS_URL, prefix=prefix)
    await store.open()
    yield store
    await store.close()
    delete_prefix(prefix)
