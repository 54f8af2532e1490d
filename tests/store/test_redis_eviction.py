"""Opening the Redis store warns when Redis may evict keys (evicted spend reads as unspent)."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import uuid

import pytest

from keybrake.store import RedisStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_eviction_policy_warning(
    policy: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--maxmemory-policy",
            policy,
        ],
        check=True,
    )
    try:
        for _ in range(50):
            if (
                subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], capture_output=True
                ).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix=f"t{uuid.uuid4().hex[:6]}:")
        with caplog.at_level(logging.WARNING, logger="keybrake"):
            await store.open()
        await store.close()
        assert ("maxmemory-policy" in caplog.text) is warned
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
