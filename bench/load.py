"""A lean HTTP/1.1 load generator for the benchmark: keep-alive clients through a proxy.

Each client opens one TCP connection to the proxy, sends ``CONNECT api.stripe.com:443``,
upgrades the tunnel to TLS (trusting the proxy's CA) and then sends requests one after the
other on that connection, the way a worker with a keep-alive session does. The client does
as little work as possible (pre-built request bytes, ``Content-Length`` framing only) so that
on a small machine the CPU goes to the proxy, not to the load generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

HOST = "api.stripe.com"
FORM = b"amount=100&currency=usd&confirm=true&payment_method=pm_card_visa"


def stripe_request(credential: str, idempotency_key: str | None = None) -> bytes:
    """``POST /v1/payment_intents`` as a Stripe SDK sends it (form body, Bearer auth)."""
    lines = [
        "POST /v1/payment_intents HTTP/1.1",
        f"Host: {HOST}",
        f"Authorization: Bearer {credential}",
        "Content-Type: application/x-www-form-urlencoded",
        "User-Agent: Stripe/v1 PythonBindings/16.1.0",
        "Stripe-Version: 2026-10-28.endive",
        "Accept: */*",
        f"Content-Length: {len(FORM)}",
    ]
    if idempotency_key:
        lines.append(f"Idempotency-Key: {idempotency_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + FORM


RequestFactory = Callable[[int], bytes]


class Connection:
    """One keep-alive HTTPS connection through an HTTP proxy's CONNECT tunnel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, proxy: tuple[str, int] | None, target: tuple[str, int], ctx: ssl.SSLContext
    ) -> Connection:
        if proxy is None:
            reader, writer = await asyncio.open_connection(*target, ssl=ctx, server_hostname=HOST)
            return cls(reader, writer)
        reader, writer = await asyncio.open_connection(*proxy)
        writer.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
        await writer.start_tls(ctx, server_hostname=HOST)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one request; the status code and the raw response head."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        if length:
            await self.reader.readexactly(length)
        return status, head

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@dataclass
class Result:
    requests: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies_ms)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[k]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p99(self) -> float:
        return self.percentile(99)


async def throughput(
    proxy: tuple[str, int] | None,
    target: tuple[str, int],
    ctx: ssl.SSLContext,
    make_request: RequestFactory,
    total: int,
    concurrency: int,
) -> Result:
    """``total`` requests from ``concurrency`` keep-alive clients; connections are opened
    before the clock starts (the benchmark is about per-request cost, not handshakes)."""
    conns = await asyncio.gather(*(Connection.open(proxy, target, ctx) for _ in range(concurrency)))
    counter = itertools.count()
    statuses: Counter[int] = Counter()

    async def worker(conn: Connection) -> None:
        while (i := next(counter)) < total:
            status, _ = await conn.send(make_request(i))
            statuses[status] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in conns))
    return Result(total, elapsed, statuses)


async def latency(
    proxy: tuple[str, int] | None,
    target: tuple[str, int],
    ctx: ssl.SSLContext,
    make_request: RequestFactory,
    total: int,
) -> Result:
    """``total`` sequential requests from one keep-alive client, each timed."""
    conn = await Connection.open(proxy, target, ctx)
    statuses: Counter[int] = Counter()
    times: list[float] = []
    started = time.perf_counter()
    for i in range(total):
        request = make_request(i)
        t0 = time.perf_counter()
        status, _ = await conn.send(request)
        times.append((time.perf_counter() - t0) * 1000)
        statuses[status] += 1
    elapsed = time.perf_counter() - started
    await conn.close()
    return Result(total, elapsed, statuses, times)
