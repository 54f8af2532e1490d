"""The Redis store refuses, at start, a server older than Redis 7.0: the scripts use
``SET … NX GET`` and ``EXPIRE … NX``, which an older server rejects as syntax errors, so its
first admission would fail and every vendor call be refused with the cause only in the log.

No Redis older than 7.0 is installed here, so `OldRedis` stands in for one on a loopback port:
it answers the connection's setup and ``SCRIPT LOAD`` as any Redis does, and runs a script's
``SET`` the way Redis 6.2 parses it (``NX`` with ``GET`` is a syntax error). The store must
stop there, before it creates anything on the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from keybrake.store import RedisStore, StoreUnavailable


class OldRedis:
    """A RESP server on 127.0.0.1 that behaves like Redis 6.2 for what the store sends at open;
    ``commands`` records every command (name and arguments, decoded)."""

    def __init__(self) -> None:
        # The probe's answer: Redis 6.2's to a script whose SET has both NX and GET.
        self.probe_error = (
            "ERR Error running script (call to f_{sha}): @user_script:7: "
            "@user_script: 7: ERR syntax error"
        )
        self.commands: list[list[str]] = []
        self.scripts: dict[str, str] = {}
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                assert line.startswith(b"*"), line
                args = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2].decode())
                self.commands.append(args)
                writer.write(self._answer(args))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def _answer(self, args: list[str]) -> bytes:
        name = args[0].upper()
        if name == "PING":
            return b"+PONG\r\n"
        if name == "CLIENT":
            return b"+OK\r\n"
        if name == "SCRIPT" and args[1].upper() == "LOAD":
            sha = hashlib.sha1(args[2].encode()).hexdigest()  # Redis names a script by its SHA-1
            self.scripts[sha] = args[2]
            return f"${len(sha)}\r\n{sha}\r\n".encode()
        if name == "EVALSHA":
            source = self.scripts.get(args[1], "")
            if "'NX', 'PX', '60000', 'GET'" in source:
                return f"-{self.probe_error.format(sha=args[1])}\r\n".encode()
            return b"-ERR this stand-in runs only the version probe\r\n"
        return f"-ERR unknown command '{args[0]}'\r\n".encode()


@pytest.fixture
async def old_redis() -> AsyncIterator[OldRedis]:
    server = OldRedis()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_redis_older_than_7_is_refused_at_open(old_redis: OldRedis) -> None:
    store = RedisStore(f"redis://127.0.0.1:{old_redis.port}/0", prefix=f"t{uuid.uuid4().hex[:6]}:")

    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    await store.close()

    message = str(refused.value)
    assert "RedisTooOld" in message and "Redis 7.0 or newer" in message, message
    assert "ERR syntax error" in message, message  # what the server said
    names = [c[0].upper() for c in old_redis.commands]
    assert "EVALSHA" in names
    # Stopped at the probe: no audit stream or group was created, nothing else was run.
    assert names[names.index("EVALSHA") + 1 :] == [], names
    assert "XGROUP" not in names


async def test_another_refusal_of_the_probe_is_reported_as_it_is(old_redis: OldRedis) -> None:
    """A full (or read-only) server refuses the probe too: that is said as the server said
    it, never taken for an old version."""
    old_redis.probe_error = "OOM command not allowed when used memory > 'maxmemory'."
    store = RedisStore(f"redis://127.0.0.1:{old_redis.port}/0", prefix=f"t{uuid.uuid4().hex[:6]}:")

    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    await store.close()

    message = str(refused.value)
    assert "command not allowed when used memory" in message, message  # redis-py: OutOfMemoryError
    assert "RedisTooOld" not in message and "Redis 7.0 or newer" not in message, message


async def test_redis_7_passes_the_probe_and_keeps_nothing_of_it() -> None:
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    store = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
    await store.open()
    await store.close()
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
    try:
        left = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if left:
            await client.delete(*left)
        assert not [k for k in left if b"probe" in k], left
    finally:
        await client.aclose()
