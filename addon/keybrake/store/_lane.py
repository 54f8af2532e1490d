"""`ScriptLane`: one pipelined connection for the Redis store's hot-path script calls.

Every vendor call makes two script calls (``admit.lua``, ``settle_call.lua``). Through
redis-py's client each one takes a pooled connection, packs its ~40 arguments, writes, reads
and parses the reply and gives the connection back, through several layers of generic
machinery (retries, events, observability): about 0.3 ms of the proxy's CPU per script call,
more than all of Keybrake's Python checks together (``bench/hooks.py``). The lane sends the
calls a replica has ready in one write on one connection it keeps open and reads their
replies in order with hiredis, the parser redis-py uses too.

Only ``EVALSHA`` of scripts the store registered goes this way; everything else (loading a
script Redis lost, the store's other commands, Redis Cluster) stays on redis-py. Failure is
the same as redis-py's: a refused connection, a reset or a reply that does not come within
the operation timeout raises (`ConnectionError`, `TimeoutError`, redis-py's
`AuthenticationError`), the connection is dropped, and the store turns that into
`StoreUnavailable`: the calls of that batch fail closed, the next batch connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis.exceptions
from redis._parsers.base import BaseParser

from keybrake.store._redis_url import RedisTarget

__all__ = ["ScriptLane", "pack"]

Arg = str | bytes | int


def pack(args: Sequence[Arg]) -> bytes:
    """``args`` as one RESP command (an array of bulk strings), as redis-py sends it (``str``
    as UTF-8, ``int`` in decimal). hiredis packs it in C: a script call's ~35 arguments in
    about 2 µs, a quarter of the time a Python loop takes."""
    packed: bytes = hiredis.pack_command(  # its stub types the tuple as one item
        cast(Any, args if isinstance(args, tuple) else tuple(args))
    )
    return packed


def _error(reply: hiredis.ReplyError) -> redis.exceptions.RedisError:
    """An error reply as the exception redis-py's own parser makes of it (``NOSCRIPT`` ->
    `NoScriptError`, ``WRONGPASS`` -> `AuthenticationError`, ``READONLY``, ``OOM``, ...)."""
    # redis-py's parser is untyped; it always returns a RedisError subclass instance.
    error: redis.exceptions.RedisError = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return error


class ScriptLane:
    """Batches of commands on one connection, one batch at a time, replies in order.

    `call` writes a whole batch, then reads one reply per command (the next batch waits for
    those: a replica's calls that come meanwhile form it); an error reply of one
    command is returned in its place as a redis-py exception (the others still ran), and
    anything that leaves the connection in doubt (I/O error, timeout, cancellation) closes
    it and raises. Opened lazily, on the running event loop; a lane used from another event
    loop (a new ``asyncio.run``) connects again there.

    ``target`` is a single server (its ``tls`` is done with ``tls``, the store's one context);
    ``connect_timeout`` bounds the connection and its login, ``timeout`` each batch's answer.

    Example::

        lane = ScriptLane(parse_redis_url("redis://127.0.0.1:6379/0"), None)
        replies = await lane.call([("EVALSHA", sha, 1, "key", "arg"), ("PING",)])
        await lane.close()
    """

    def __init__(
        self,
        target: RedisTarget,
        tls: ssl.SSLContext | None,
        *,
        connect_timeout: float = 2.0,
        timeout: float = 2.0,
    ) -> None:
        self.target = target
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()

    async def call(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """The replies of ``commands``, sent together, in order."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A lock and a connection belong to the event loop that made them.
            self._drop()
            self._lock, self._loop = asyncio.Lock(), loop
        # Waiting for the batch before this one counts: a call fails within the connect and
        # operation timeouts, however many batches queue behind a Redis that stopped answering.
        try:
            async with asyncio.timeout(self.connect_timeout + self.timeout), self._lock:
                try:
                    if self._writer is None:
                        await self._connect()
                    async with asyncio.timeout(self.timeout):
                        return await self._exchange(commands)
                except BaseException:
                    self._drop()
                    raise
        except TimeoutError as e:
            where = f"{self.target.host}:{self.target.port}"
            raise redis.exceptions.TimeoutError(f"no answer from {where} in time") from e

    async def close(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(OSError, RuntimeError):
                await writer.wait_closed()

    async def _connect(self) -> None:
        t = self.target
        async with asyncio.timeout(self.connect_timeout):
            self._reader, self._writer = await asyncio.open_connection(
                t.host, t.port, ssl=self.tls, server_hostname=t.host if self.tls else None
            )
        self._parser = hiredis.Reader()
        login: list[Sequence[Arg]] = []
        if t.password is not None:
            login.append(("AUTH", t.username, t.password) if t.username else ("AUTH", t.password))
        if t.db:
            login.append(("SELECT", t.db))
        if login:
            async with asyncio.timeout(self.timeout):
                replies = await self._exchange(login)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

    async def _exchange(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(b"".join(pack(c) for c in commands))
        await self._writer.drain()
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = self._parser.gets()
            if reply is False:
                data = await self._reader.read(65536)
                if not data:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                self._parser.feed(data)
                continue
            replies.append(_error(reply) if isinstance(reply, hiredis.ReplyError) else reply)
        return replies

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            # RuntimeError: its event loop is closed, nothing is left to close.
            with contextlib.suppress(RuntimeError):
                writer.close()
