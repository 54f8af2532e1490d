"""The Redis store refuses a Redis that may evict keys (evicted spend reads as unspent), unless
the store URL says ``allow_eviction=1``. Each case runs on a private, short-lived redis-server
whose ``maxmemory-policy`` is set with ``CONFIG SET`` (the shared server is never touched)."""

from __future__ import annotations

import logging
import pathlib
import uuid
from collections.abc import Iterator

import pytest
from tests._redis import PrivateRedis

from keybrake.store import RedisStore, StoreUnavailable, open_store

UNSAFE = [
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
]


@pytest.fixture(scope="module")
def evicting_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("evicting-redis"), config=["maxmemory 64mb"])
    server.start()
    try:
        yield server
    finally:
        server.kill()


def set_policy(server: PrivateRedis, policy: str) -> None:
    assert server.cli("CONFIG", "SET", "maxmemory-policy", policy).stdout.strip() == "OK"


@pytest.mark.parametrize("policy", UNSAFE)
async def test_a_redis_that_may_evict_is_refused(evicting_redis: PrivateRedis, policy: str) -> None:
    set_policy(evicting_redis, policy)
    store = RedisStore(evicting_redis.url, prefix=f"t{uuid.uuid4().hex[:6]}:")

    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    await store.close()

    message = str(refused.value)
    assert f"maxmemory-policy is {policy!r}" in message
    assert "noeviction" in message and "allow_eviction=1" in message


async def test_allow_eviction_starts_anyway_and_says_so(
    evicting_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    set_policy(evicting_redis, "volatile-lru")
    store = open_store(f"{evicting_redis.url}?allow_eviction=1&prefix=t{uuid.uuid4().hex[:6]}:")
    with caplog.at_level(logging.WARNING, logger="keybrake"):
        await store.open()
    await store.ping()
    await store.close()
    assert "maxmemory-policy is 'volatile-lru'" in caplog.text


async def test_noeviction_opens_without_a_word(
    evicting_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    set_policy(evicting_redis, "noeviction")
    store = RedisStore(evicting_redis.url, prefix=f"t{uuid.uuid4().hex[:6]}:")
    with caplog.at_level(logging.WARNING, logger="keybrake"):
        await store.open()
    await store.close()
    assert "maxmemory-policy" not in caplog.text


@pytest.mark.parametrize(("policy", "refused"), [("allkeys-lru", True), ("noeviction", False)])
async def test_the_policy_from_the_config_file_counts_too(
    policy: str, refused: bool, tmp_path: pathlib.Path
) -> None:
    server = PrivateRedis(tmp_path, config=[f"maxmemory-policy {policy}"])
    try:
        server.start()
        store = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:6]}:")
        if refused:
            with pytest.raises(StoreUnavailable, match="maxmemory-policy"):
                await store.open()
        else:
            await store.open()
        await store.close()
    finally:
        server.kill()


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_allow_eviction_takes_1_or_0(value: str) -> None:
    with pytest.raises(ValueError, match="allow_eviction is 1 or 0"):
        open_store(f"redis://127.0.0.1:6379/0?allow_eviction={value}")
