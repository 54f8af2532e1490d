"""A worker's text in a store command is data, never a command of its own.

The Redis store's hot path writes its commands itself (`keybrake.store._lane`): every
argument is a length-prefixed RESP bulk string. An attacker who controls text that reaches a
script call (an idempotency key, a label, a body's field) and writes a whole RESP command
into it must get that text stored as is, and no other command run.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from tests.conftest import REDIS_URL

from keybrake.store._lane import ScriptLane
from keybrake.store._redis_url import parse_redis_url

pytestmark = pytest.mark.redis


async def test_a_resp_command_inside_an_argument_is_stored_as_text() -> None:
    victim, carrier = f"kbtest-victim:{uuid.uuid4().hex}", f"kbtest-carrier:{uuid.uuid4().hex}"
    sync = redis.Redis.from_url(REDIS_URL)
    sync.set(victim, "still here")
    injected = f"x\r\n*2\r\n$3\r\nDEL\r\n${len(victim)}\r\n{victim}\r\n"
    lane = ScriptLane(parse_redis_url(REDIS_URL), None)
    try:
        replies = await lane.call([("SET", carrier, injected), ("GET", carrier)])
        assert replies == [b"OK", injected.encode()]  # two commands, two replies, in order
        assert sync.get(victim) == b"still here"
        # A byte-level attempt: a NUL and a lone CR/LF inside the value change nothing.
        raw = b"\x00\r\n$-1\r\n:1\r\n"
        assert await lane.call([("SET", carrier, raw), ("GET", carrier)]) == [b"OK", raw]
        assert sync.get(victim) == b"still here"
    finally:
        await lane.close()
        sync.delete(victim, carrier)
        sync.close()
