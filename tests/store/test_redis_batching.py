"""Hot-path scripts asked for in the same event-loop turn go to Redis in one pipeline; each
stays its own atomic step. On a private redis-server (``SCRIPT FLUSH`` must not touch the
shared one): the cap holds exactly under a burst, a burst of settlements books every call,
a Redis that lost its scripts is reloaded mid-burst, and an unreachable Redis fails every
call of a burst with `StoreUnavailable`."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from tests._redis import PrivateRedis
from tests.store.conftest import USD, make_key

from keybrake.store import AdmissionRequest, KeyRecord, RedisStore, Settlement, StoreUnavailable

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("batching-redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def batching_store(
    private_redis: PrivateRedis,
) -> AsyncIterator[tuple[RedisStore, list[int]]]:
    store = RedisStore(private_redis.url, prefix=f"b{uuid.uuid4().hex[:8]}:")
    sizes: list[int] = []
    send = store._send

    async def counting(batch: Any) -> Exception | None:
        sizes.append(len(batch))
        return await send(batch)

    store._send = counting  # type: ignore[method-assign]
    await store.open()
    yield store, sizes
    await store.close()


def paid(key_id: str, i: int) -> AdmissionRequest:
    return AdmissionRequest(key_id, NOW, reservation_id=f"res_{i}", estimate_micros=3 * USD)


async def test_a_burst_is_one_pipeline_and_the_cap_holds_exactly(
    batching_store: tuple[RedisStore, list[int]],
) -> None:
    store, sizes = batching_store
    key = make_key("kb_burst", daily=100 * USD, created_at=NOW - dt.timedelta(days=1))
    await store.create_key(key)

    admitted = await asyncio.gather(*(store.admit(paid(key.key_id, i)) for i in range(50)))

    assert max(sizes) > 1  # they went together
    ok = [(i, a) for i, a in enumerate(admitted) if a.status == "admitted"]
    refused = [a for a in admitted if a.status != "admitted"]
    assert len(ok) == 33 and {a.code for a in refused} == {"cap_exhausted"}
    await asyncio.gather(
        *(
            store.settle_call(
                Settlement(key.key_id, "", "stripe", NOW, reservation_id=f"res_{i}",
                           ledger_rows=a.ledger_rows, finish="settled", actual_micros=USD)
            )
            for i, a in ok
        )
    )  # fmt: skip
    (budget,) = await store.budgets(key, NOW)
    assert (budget.spent_micros, budget.reserved_micros) == (33 * USD, 0)


async def test_a_redis_that_lost_its_scripts_is_reloaded_mid_burst(
    batching_store: tuple[RedisStore, list[int]], private_redis: PrivateRedis
) -> None:
    store, sizes = batching_store
    key = make_key("kb_flush", daily=100 * USD, created_at=NOW - dt.timedelta(days=1))
    await store.create_key(key)
    assert private_redis.cli("SCRIPT", "FLUSH").stdout.strip() == "OK"

    admitted = await asyncio.gather(*(store.admit(paid(key.key_id, i)) for i in range(20)))

    assert max(sizes) > 1
    assert [a.status for a in admitted] == ["admitted"] * 20
    (budget,) = await store.budgets(key, NOW)
    assert budget.reserved_micros == 60 * USD  # each once


async def test_every_call_of_a_burst_fails_closed_when_redis_is_away(
    tmp_path: pathlib.Path,
) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    store = RedisStore(server.url, prefix="gone:")
    try:
        await store.open()
        key = make_key("kb_gone", daily=100 * USD, created_at=NOW - dt.timedelta(days=1))
        await store.create_key(key)
        server.kill()

        results = await asyncio.gather(
            *(store.admit(paid(key.key_id, i)) for i in range(10)), return_exceptions=True
        )

        assert all(isinstance(r, StoreUnavailable) for r in results), results
    finally:
        await store.close()
        server.kill()


async def reserved(store: RedisStore, key: KeyRecord) -> int:
    (budget,) = await store.budgets(key, NOW)
    return budget.reserved_micros


async def staggered(store: RedisStore, key_id: str, n: int) -> list[Any]:
    """``n`` admissions, each asked for in an event-loop turn of its own."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.ensure_future(store.admit(paid(key_id, i))))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def held_key(
    store: RedisStore, private_redis: PrivateRedis, key_id: str, ms: int
) -> KeyRecord:
    """A fresh key, then Redis holding every script call (``CLIENT PAUSE … WRITE``: a script
    may write) for ``ms`` milliseconds."""
    key = make_key(key_id, daily=100 * USD, created_at=NOW - dt.timedelta(days=1))
    await store.create_key(key)
    assert private_redis.cli("CLIENT", "PAUSE", str(ms), "WRITE").stdout.strip() == "OK"
    return key


async def test_calls_that_come_while_a_batch_is_out_go_together_next(
    batching_store: tuple[RedisStore, list[int]], private_redis: PrivateRedis
) -> None:
    store, sizes = batching_store
    # Redis holds the first batch while the others are asked for.
    key = await held_key(store, private_redis, "kb_queue", 300)

    admitted = await staggered(store, key.key_id, 10)

    # One write for the first (and any asked for in its turn), one for all that waited: not
    # one per event-loop turn.
    assert len(sizes) == 2 and sum(sizes) == 10, sizes
    assert [a.status for a in admitted] == ["admitted"] * 10
    assert await reserved(store, key) == 30 * USD


async def test_a_quiet_replica_writes_a_lone_call_at_once_and_a_busy_one_gathers_a_turn(
    batching_store: tuple[RedisStore, list[int]],
) -> None:
    store, sizes = batching_store
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # as mitmproxy's loop runs tasks
    try:
        key = make_key("kb_quiet", daily=1000 * USD, created_at=NOW - dt.timedelta(days=1))
        await store.create_key(key)
        # The first call looks up the key's label (kept): a wait of its own.
        assert (await store.admit(paid(key.key_id, 99))).status == "admitted"
        # One call at a time: each is on the lane before its caller first waits (no loop
        # turn spent gathering calls that are not coming).
        for i in range(3):
            task = asyncio.ensure_future(store.admit(paid(key.key_id, i)))
            assert store._lane_busy(loop), "the lone call was not sent at once"
            assert (await task).status == "admitted"
        # A burst after them: the first goes at once, alone; the rest wait for its reply and
        # go together.
        sizes.clear()
        burst = await asyncio.gather(*(store.admit(paid(key.key_id, 10 + i)) for i in range(10)))
        assert sizes == [1, 9] and {a.status for a in burst} == {"admitted"}
        # The lane's last batch held several calls (a busy replica): the calls of a turn
        # gather first and go in one write.
        sizes.clear()
        burst = await asyncio.gather(*(store.admit(paid(key.key_id, 30 + i)) for i in range(10)))
        assert sizes == [10] and {a.status for a in burst} == {"admitted"}
        assert await reserved(store, key) == 24 * 3 * USD
    finally:
        loop.set_task_factory(None)


async def test_calls_waiting_behind_a_redis_that_stopped_answering_fail_within_its_timeout(
    batching_store: tuple[RedisStore, list[int]], private_redis: PrivateRedis
) -> None:
    store, sizes = batching_store
    assert store._lane is not None
    store._lane.timeout = 1.0
    key = await held_key(store, private_redis, "kb_stall", 2500)
    started = asyncio.get_running_loop().time()
    try:
        results = await staggered(store, key.key_id, 10)
    finally:
        elapsed = asyncio.get_running_loop().time() - started
        private_redis.cli("CLIENT", "UNPAUSE")

    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert "TimeoutError" in str(results[-1])
    # Those that waited behind the first batch waited for its timeout only, not for one more
    # of their own (they were never sent).
    assert len(sizes) == 1 and elapsed < 1.7, (sizes, elapsed)


async def test_an_admission_given_up_while_it_waits_for_the_lane_reserves_nothing(
    batching_store: tuple[RedisStore, list[int]], private_redis: PrivateRedis
) -> None:
    store, sizes = batching_store
    # Held until the test lets go (a timed pause could end first on a loaded machine, and the
    # waiting calls would then go out before one of them is given up).
    key = await held_key(store, private_redis, "kb_gaveup", 30_000)
    first = asyncio.ensure_future(store.admit(paid(key.key_id, 0)))
    while not sizes:  # the first batch is out, held by the pause
        await asyncio.sleep(0.01)
    waiting = [asyncio.ensure_future(store.admit(paid(key.key_id, i))) for i in (1, 2)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    assert private_redis.cli("CLIENT", "UNPAUSE").stdout.strip() == "OK"

    assert (await first).status == "admitted"
    assert (await waiting[1]).status == "admitted"
    assert waiting[0].cancelled()
    assert await reserved(store, key) == 6 * USD  # res_0 and res_2, never res_1
    assert sizes == [1, 1]
