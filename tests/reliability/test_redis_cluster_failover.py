"""A Redis Cluster master killed under load: the proxy on a private 3-master cluster with a
replica per master (`PrivateRedisCluster`), clients charging through several vault keys whose
budget trees span the masters, and ``kill -9`` of the master serving one key's tree.

While the replica takes over, calls of that tree are refused ``503 store_unavailable`` (never
another error, never let through); every other answer is a charge or ``429 cap_exhausted``;
no key is charged past its cap, before, during or after; and once the replica serves the
slots, the key works again on the same budget, up to its cap.

Without replicas, the documented restart path: the killed master started again as it was
(its AOF, its cluster config file) serves its budgets as they were.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests._redis import PrivateRedisCluster
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.reliability.conftest import (
    USD,
    ChargeLoad,
    charge,
    code_of,
    key_detail,
    usd_micros,
    wait_for,
)
from tests.store.conftest import make_key

from keybrake.store import Admission, AdmissionRequest, KeyRecord, Settlement, StoreUnavailable
from keybrake.store.redis import RedisStore

KEYS = 6
CAP_USD = 12
PREFIX = "kbfail:"


def _answer(index: int, r: httpx.Response) -> tuple[int, int, str, float]:
    """``(key index, status, code, monotonic time)`` of one charge."""
    return index, r.status_code, "" if r.status_code == 200 else code_of(r), time.monotonic()


def two_per_key(
    kb: KeybrakeProcess, vault_keys: list[str]
) -> ChargeLoad[tuple[int, int, str, float]]:
    """Two client threads per vault key sending $1 charges until stopped."""
    return ChargeLoad(kb, vault_keys, 2 * len(vault_keys), _answer, pause=0.02, pause_after_loss=0)


NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def paid(key: KeyRecord, rid: str, micros: int) -> AdmissionRequest:
    return AdmissionRequest(key.key_id, NOON, reservation_id=rid, estimate_micros=micros)


def settled(key: KeyRecord, rid: str, admitted: Admission, micros: int) -> Settlement:
    return Settlement(
        key.key_id, key.agent_run_label, "stripe", NOON, reservation_id=rid,
        ledger_rows=admitted.ledger_rows, finish="settled", actual_micros=micros,
    )  # fmt: skip


@pytest.mark.e2e
def test_a_master_killed_under_load_refuses_503_and_the_caps_hold(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    cluster = PrivateRedisCluster(tmp_path / "cluster", masters=3, replicas=1).start()
    try:
        url = f"{cluster.url}?prefix={PREFIX}"
        kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=url)
        keys = [
            kb.issue_key(daily_usd_cap=CAP_USD, agent_run_label=f"failover/{i}")
            for i in range(KEYS)
        ]
        # Which master serves each key's tree (the store's own hash tags).
        trees = RedisStore(url)
        masters = [
            cluster.master_of(trees._kt(trees._tree(f"failover/{i}", k["key_id"]), "x")).port
            for i, k in enumerate(keys)
        ]
        assert len(set(masters)) >= 2, "the keys' trees should span masters"
        victim = cluster.master_of(trees._kt(trees._tree("failover/0", keys[0]["key_id"]), "x"))

        load = two_per_key(kb, [k["vault_key"] for k in keys]).start()
        try:
            wait_for(lambda: load.count() >= 4 * KEYS, 60, "load on every key")
            killed_at = time.monotonic()
            cluster.kill_node(victim)
            # Until a replica serves the victim's slots again, then a while more.
            wait_for(lambda: len(cluster.masters()) == 3, 30, "a replica to take over")
            cluster.wait_ok()
            back_at = time.monotonic()
            # The victim's key spends the rest of its budget on the new master, then is
            # refused at its cap.
            wait_for(
                lambda: any(i == 0 and status == 429 for i, status, *_ in list(load.answers)),
                60,
                "the victim's key to reach its cap after the failover",
            )
        finally:
            load.join()

        answers = load.answers
        kinds = Counter((status, code) for _, status, code, _ in answers)
        print("answers:", dict(kinds), "failover took", round(back_at - killed_at, 2), "s")
        assert set(kinds) <= {(200, ""), (429, "cap_exhausted"), (503, "store_unavailable")}, kinds
        assert load.lost == 0, "a call got no answer"
        # Refusals for the store happen only between the kill and the cluster being whole
        # again (plus the few calls in flight then).
        unavailable = [t for _, status, _, t in answers if status == 503]
        assert unavailable, "no call met the failover"
        assert all(killed_at <= t <= back_at + 5 for t in unavailable), (
            killed_at,
            back_at,
            unavailable,
        )
        # The caps hold: no key got more $1 charges than its cap, and the store agrees.
        charged = Counter(i for i, status, _, _ in answers if status == 200)
        assert all(n <= CAP_USD for n in charged.values()), charged
        for i, key in enumerate(keys):
            detail = key_detail(kb, key["key_id"])
            spent = usd_micros(detail["spent_today_usd"])
            assert charged[i] * USD <= spent <= CAP_USD * USD, (i, charged[i], detail)
        # The victim's key went on spending its budget on the new master, whatever the timing:
        # it had room when its master died, its whole cap is booked now, and the store still
        # answers for it (a cap refusal, not 503). On a quick machine it reaches its cap within
        # a second of the failover, so "an answer after the failover" is not the test.
        before_kill = sum(
            1 for i, status, _, t in answers if i == 0 and status == 200 and t < killed_at
        )
        assert before_kill < CAP_USD, "the victim's key was at its cap before its master died"
        victim = key_detail(kb, keys[0]["key_id"])
        assert usd_micros(victim["spent_today_usd"]) == CAP_USD * USD, victim
        assert charged[0] > before_kill, (before_kill, charged[0])
        again = charge(kb, keys[0]["vault_key"], 100, timeout=15)
        assert (again.status_code, code_of(again)) == (429, "cap_exhausted")
        after = [status for i, status, _, t in answers if i == 0 and t > back_at + 1]
        assert set(after) <= {200, 429}, after
        assert fake_stripe.charged_usd_micros() <= KEYS * CAP_USD * USD
    finally:
        cluster.kill()


async def test_a_master_without_replica_restarted_from_its_aof_keeps_its_budgets(
    tmp_path: Path,
) -> None:
    """The restart path of a cluster without replicas (README): a master killed with
    ``kill -9`` and started again as it was (same port, cluster config file and AOF) serves
    its slots again with every budget as it was; meanwhile its trees' calls fail closed and
    the other masters' go on (``cluster-require-full-coverage no``)."""
    cluster = PrivateRedisCluster(
        tmp_path / "cluster",
        replicas=0,
        config=["appendonly yes", "appendfsync always", "cluster-require-full-coverage no"],
    ).start()
    try:
        store = RedisStore(cluster.url, prefix=PREFIX)
        await store.open()
        labels = [f"restart/{i}" for i in range(32)]
        by_master: dict[int, str] = {}
        for label in labels:
            by_master.setdefault(
                cluster.master_of(store._kt(store._tree(label, ""), "x")).port, label
            )
        (down_port, down_label), (_, up_label) = list(by_master.items())[:2]
        down_key = make_key("kb_down", label=down_label, daily=10 * USD)
        up_key = make_key("kb_up", label=up_label, daily=10 * USD)
        for key in (down_key, up_key):
            await store.create_key(key)
            admitted = await store.admit(paid(key, f"res_{key.key_id}_1", 3 * USD))
            assert admitted.status == "admitted"
            await store.settle_call(settled(key, f"res_{key.key_id}_1", admitted, 3 * USD))

        victim = next(n for n in cluster.nodes if n.port == down_port)
        cluster.kill_node(victim)
        with pytest.raises(StoreUnavailable):
            await store.admit(paid(down_key, "res_down_2", USD))
        assert (await store.admit(paid(up_key, "res_up_2", USD))).status == "admitted"

        victim.start()
        cluster.wait_ok()
        assert [b.spent_micros for b in await store.budgets(down_key, NOON)] == [3 * USD]
        assert (await store.admit(paid(down_key, "res_down_3", 7 * USD))).status == "admitted"
        refused = await store.admit(paid(down_key, "res_down_4", 1))
        assert (refused.status, refused.code) == ("refused", "cap_exhausted")
        await store.close()
    finally:
        cluster.kill()
