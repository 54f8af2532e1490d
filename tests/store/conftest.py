"""Fixtures for the store contract: the same tests against SQLite (tmp_path) and real Redis."""

from __future__ import annotations

import datetime as dt
import hashlib
import pathlib
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis

from keybrake.store import KeyRecord, RedisStore, SQLiteStore, Store

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


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "redis":
        require_redis()
    return name


@pytest.fixture
def make_store(backend: str, tmp_path: pathlib.Path) -> Iterator[StoreFactory]:
    """New store objects on the same state (a file, or a Redis prefix): a "restarted" store."""
    prefix = redis_prefix()
    path = tmp_path / "state.db"

    def factory() -> Store:
        if backend == "sqlite":
            return SQLiteStore(path)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(port: int, workdir: pathlib.Path, *extra: str) -> None:
    """A private redis-server on ``port`` (nothing persisted); ``extra`` are more flags."""
    subprocess.run(
        [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--dir", str(workdir),
            "--pidfile", str(workdir / f"redis-{port}.pid"),
            "--logfile", str(workdir / f"redis-{port}.log"),
            *extra,
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ping = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
        if ping.stdout.strip() == b"PONG":
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


def stop_redis(port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
