"""Opening the Redis store warns when Redis may evict keys (evicted spend reads as unspent)."""

from __future__ import annotations

import logging
import pathlib
import uuid

import pytest
from tests._redis import PrivateRedis

from keybrake.store import RedisStore


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_eviction_policy_warning(
    policy: str, warned: bool, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server = PrivateRedis(tmp_path, config=[f"maxmemory-policy {policy}"])
    try:
        redis_server.start()
        store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:6]}:")
        with caplog.at_level(logging.WARNING, logger="keybrake"):
            await store.open()
        await store.close()
        assert ("maxmemory-policy" in caplog.text) is warned
    finally:
        redis_server.kill()
