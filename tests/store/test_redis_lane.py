"""The Redis store's script lane (`keybrake.store._lane`) sends byte for byte what redis-py
would send, and reads replies as redis-py's client returns them.

The lane packs the hot path's ``EVALSHA`` calls itself (redis-py's packer copies its buffer
once per argument) and parses replies with hiredis; these compare both with redis-py on the
arguments the store sends, and run a lane against the real server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
from tests._ports import free_port
from tests.conftest import REDIS_URL

from keybrake.store._lane import ScriptLane, pack
from keybrake.store._redis_url import RedisTarget, parse_redis_url

CASES: list[tuple[Any, ...]] = [
    ("PING",),
    ("EVALSHA", "a" * 40, 2, "kb:{t1}key:key_1", "kb:{t1}rate:key_1", "", "0", -5, 10**18),
    ("SET", "k", "ünïcødé ✓ \r\n$*", "EX", 60),
    ("XADD", "kb:audit", "*", "row", b'{"a": 1}' + bytes(range(256))),
    # Over redis-py's buffer cutoff (6,000 bytes): redis-py sends these in several chunks.
    ("EVALSHA", "b" * 40, 1, "kb:k", "x" * 7000, b"y" * 70_000, "z"),
    ("HMGET", "kb:{t1}key:key_1", *(f"field_{i}" for i in range(64))),
]


@pytest.mark.parametrize("args", CASES, ids=[str(i) for i in range(len(CASES))])
def test_the_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    assert pack(args) == b"".join(redis.asyncio.Connection().pack_command(*args))


def _target(**changes: Any) -> RedisTarget:
    return dataclasses.replace(parse_redis_url(REDIS_URL), **changes)


@pytest.mark.redis
async def test_replies_are_what_redis_py_returns() -> None:
    key = f"kbtest-lane:{uuid.uuid4().hex}"
    script = "redis.call('SET', KEYS[1], ARGV[1]); return {1, false, ARGV[1], {'x', -2}}"
    sync = redis.Redis.from_url(REDIS_URL)
    sha = sync.script_load(script)
    lane = ScriptLane(_target(), None)
    try:
        replies = await lane.call(
            [
                ("EVALSHA", sha, 1, key, "ünï"),
                ("EVALSHA", "0" * 40, 0),  # a script Redis does not have
                ("GET", key),
                ("EVALSHA", sha, 1, key, b"\x00\xff"),
            ]
        )
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        theirs = await client.evalsha(sha, 1, key, "ünï")
        await client.aclose()
        assert replies[0] == theirs == [1, None, "ünï".encode(), [b"x", -2]]
        assert isinstance(replies[1], redis.exceptions.NoScriptError)
        assert replies[2] == "ünï".encode()  # the commands after an error still ran, in order
        assert replies[3][2] == b"\x00\xff"
    finally:
        await lane.close()
        sync.delete(key)
        sync.close()


@pytest.mark.redis
async def test_a_wrong_password_is_an_authentication_error() -> None:
    lane = ScriptLane(_target(username="kbtest-nobody", password="wrong"), None)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await lane.call([("PING",)])
    finally:
        await lane.close()


async def test_a_refused_connection_raises_and_the_next_call_connects_again() -> None:
    lane = ScriptLane(RedisTarget("redis://127.0.0.1", "127.0.0.1", free_port()), None)
    for _ in range(2):
        with pytest.raises(OSError):
            await lane.call([("PING",)])
    await lane.close()


async def test_a_server_that_does_not_answer_times_out_and_the_lane_recovers() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = RedisTarget("redis://127.0.0.1", "127.0.0.1", port)
    lane = ScriptLane(target, None, connect_timeout=0.5, timeout=0.3)
    try:
        with pytest.raises(redis.exceptions.TimeoutError, match="no answer"):
            await lane.call([("PING",)])
        assert len(held) == 1
        # The connection in doubt was dropped: the next call opens a new one.
        with pytest.raises(redis.exceptions.TimeoutError):
            await lane.call([("PING",)])
        assert len(held) == 2
    finally:
        await lane.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


def test_the_password_is_not_in_the_lanes_repr() -> None:
    target = dataclasses.replace(parse_redis_url(REDIS_URL), password="s3cret-store-password")
    lane = ScriptLane(target, None)
    assert "s3cret-store-password" not in repr(lane.target) + repr(vars(lane))
