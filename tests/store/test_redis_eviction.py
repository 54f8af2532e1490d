"""Opening the Redis store warns when Redis may evict keys (evicted spend reads as unspent)."""

from __future__ import annotations

import logging
import pathlib
import uuid

import pytest
from tests.store.conftest import free_port, start_redis, stop_redis

from keybrake.store import RedisStore


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_eviction_policy_warning(
    policy: str, warned: bool, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    start_redis(port, tmp_path, "--maxmemory-policy", policy)
    try:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix=f"t{uuid.uuid4().hex[:6]}:")
        with caplog.at_level(logging.WARNING, logger="keybrake"):
            await store.open()
        await store.close()
        assert ("maxmemory-policy" in caplog.text) is warned
    finally:
        stop_redis(port)
