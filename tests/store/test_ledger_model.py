"""The reservation ledger against a model: random interleavings on both backends.

A hypothesis state machine drives reserve / settle / release / mark_unknown / recover and
clock changes across UTC days on three keys (two of them share a capped label) and checks,
after every step, that the store agrees with a plain-Python model of the budgets: never above
a cap (except by what settles above their estimate added), never negative, spent and reserved
equal to the model's, and no reservation finished twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import pathlib
import shutil
import tempfile
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tests._redis import PrivateRedisCluster
from tests.store.conftest import (
    REDIS_URL,
    USD,
    delete_prefix,
    make_key,
    redis_prefix,
    require_redis,
)

from keybrake.store import (
    BudgetState,
    IssuerRecord,
    KeyRecord,
    LabelBudget,
    RedisStore,
    SQLiteStore,
    Store,
    utc_day,
)

LABEL_CAP = 6 * USD
LABEL_LIFETIME_CAP = 10 * USD
ISSUER_CAP = 2_500_000
ISSUER_LIFETIME_CAP = 7 * USD
ISSUER = IssuerRecord(
    issuer_id="iss_l",
    token_sha256="0" * 64,
    name="ledger model",
    vendors=("stripe",),
    label_prefix="",
    allowed_endpoints=(),
    max_daily_cap_micros=10 * USD,
    max_expires_in_seconds=3600,
    created_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    budget_daily_micros=ISSUER_CAP,
    budget_lifetime_micros=ISSUER_LIFETIME_CAP,
)
KEYS = (
    make_key("kb_a", label="shared", daily=5 * USD, usd_cap=9 * USD),
    make_key("kb_b", label="shared", daily=4 * USD),
    dataclasses.replace(make_key("kb_c", daily=3 * USD), issuer_id="iss_l"),
)
ESTIMATES = st.sampled_from([0, 1, 250_000, USD, 1_500_000, 2 * USD, 3 * USD])
START = dt.datetime(2030, 1, 1, 20, tzinfo=dt.UTC)

Usage = tuple[str, str]  # (scope, window)


def touched(key: KeyRecord, day: str) -> list[tuple[Usage, int | None]]:
    """The model's view of a key's budgets: ((scope, window), cap) in `Store.reserve` order."""
    rows: list[tuple[Usage, int | None]] = [
        ((f"key:{key.key_id}", day), key.daily_cap_micros),
        ((f"key-lifetime:{key.key_id}", "lifetime"), key.usd_cap_micros),
    ]
    if key.agent_run_label:
        rows.append(((f"label:{key.agent_run_label}", day), LABEL_CAP))
        rows.append(((f"label-lifetime:{key.agent_run_label}", "lifetime"), LABEL_LIFETIME_CAP))
    if key.issuer_id:
        rows.append(((f"issuer:{key.issuer_id}", day), ISSUER_CAP))
        rows.append(((f"issuer-lifetime:{key.issuer_id}", "lifetime"), ISSUER_LIFETIME_CAP))
    return rows


class LedgerMachine(RuleBasedStateMachine):
    backend: ClassVar[str]
    url: ClassVar[str] = REDIS_URL  # a Redis backend's

    def __init__(self) -> None:
        super().__init__()
        # One event loop per run: redis.asyncio connections belong to the loop that made them.
        self.runner = asyncio.Runner()
        self.tmpdir: pathlib.Path | None = None
        self.prefix = ""
        store: Store
        if self.backend == "sqlite":
            self.tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="keybrake-ledger-"))
            store = SQLiteStore(self.tmpdir / "state.db")
        else:
            self.prefix = redis_prefix()
            store = RedisStore(self.url, prefix=self.prefix)
        self.store = store
        self.now = START
        self.days = {utc_day(START): START}
        self.spent: dict[Usage, int] = {}
        self.reserved: dict[Usage, int] = {}
        self.overage: dict[Usage, int] = {}  # settled above the estimate: may pass the cap
        self.open: dict[str, tuple[int, list[Usage], dt.datetime]] = {}
        self.finished: set[str] = set()
        self.serial = 0

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    @initialize()
    def open_store(self) -> None:
        self.run(self.store.open())
        self.run(self.store.set_label_limits(LabelBudget("shared", LABEL_CAP, LABEL_LIFETIME_CAP)))
        self.run(self.store.create_issuer(ISSUER))

    def teardown(self) -> None:
        try:
            # Earlier days too: a settle after midnight must land in the reservation's day.
            for moment in self.days.values():
                for key in KEYS:
                    self.check_reported(self.run(self.store.budgets(key, moment)))
            self.run(self.store.close())
        finally:
            self.runner.close()
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            if self.prefix:
                delete_prefix(self.prefix)

    # -- rules ---------------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS), estimate=ESTIMATES)
    def reserve(self, key: KeyRecord, estimate: int) -> None:
        self.serial += 1
        reservation_id = f"res_{self.serial}"
        rows = touched(key, utc_day(self.now))
        fits = all(
            cap is None or self.spent.get(u, 0) + self.reserved.get(u, 0) + estimate <= cap
            for u, cap in rows
        )

        result = self.run(self.store.reserve(key, reservation_id, estimate, self.now))

        assert result.ok == fits, (result, rows)
        if fits:
            for u, _cap in rows:
                self.reserved[u] = self.reserved.get(u, 0) + estimate
            self.open[reservation_id] = (estimate, [u for u, _cap in rows], self.now)
        else:
            assert result.exceeded is not None
        self.check_reported(result.budgets)

    def take_open(self, data: st.DataObject) -> tuple[str, int, list[Usage]]:
        reservation_id = data.draw(st.sampled_from(sorted(self.open)), label="reservation")
        estimate, usages, _created = self.open.pop(reservation_id)
        self.finished.add(reservation_id)
        return reservation_id, estimate, usages

    def book(self, usages: list[Usage], estimate: int, spent: int) -> None:
        for u in usages:
            self.reserved[u] -= estimate
            self.spent[u] = self.spent.get(u, 0) + spent
            self.overage[u] = self.overage.get(u, 0) + max(0, spent - estimate)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), halves=st.integers(min_value=0, max_value=3))
    def settle(self, data: st.DataObject, halves: int) -> None:
        reservation_id, estimate, usages = self.take_open(data)
        actual = estimate * halves // 2  # from nothing to 150 % of the estimate
        assert self.run(self.store.settle(reservation_id, actual))
        self.book(usages, estimate, actual)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        reservation_id, estimate, usages = self.take_open(data)
        assert self.run(self.store.release(reservation_id))
        self.book(usages, estimate, 0)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def mark_unknown(self, data: st.DataObject) -> None:
        reservation_id, estimate, usages = self.take_open(data)
        assert self.run(self.store.mark_unknown(reservation_id))
        self.book(usages, estimate, estimate)

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), how=st.sampled_from(["settle", "release", "mark_unknown"]))
    def finish_again(self, data: st.DataObject, how: str) -> None:
        reservation_id = data.draw(st.sampled_from(sorted(self.finished)), label="finished")
        if how == "settle":
            finished = self.store.settle(reservation_id, USD)
        elif how == "release":
            finished = self.store.release(reservation_id)
        else:
            finished = self.store.mark_unknown(reservation_id)
        assert self.run(finished) is False

    @rule()
    def recover(self) -> None:
        older = {rid: v for rid, v in self.open.items() if v[2] < self.now}
        assert self.run(self.store.recover_reservations(self.now)) == len(older)
        for reservation_id, (estimate, usages, _created) in older.items():
            del self.open[reservation_id]
            self.finished.add(reservation_id)
            self.book(usages, estimate, estimate)

    @rule(hours=st.integers(min_value=1, max_value=30))
    def advance_clock(self, hours: int) -> None:
        self.now += dt.timedelta(hours=hours)
        self.days.setdefault(utc_day(self.now), self.now)

    # -- invariants ----------------------------------------------------------------------------
    def check_reported(self, budgets: tuple[BudgetState, ...]) -> None:
        for b in budgets:
            u = (b.scope, b.window)
            assert b.spent_micros >= 0 and b.reserved_micros >= 0, b
            assert (b.spent_micros, b.reserved_micros) == (
                self.spent.get(u, 0),
                self.reserved.get(u, 0),
            ), b
            assert b.cap_micros is not None
            assert b.spent_micros + b.reserved_micros <= b.cap_micros + self.overage.get(u, 0), b

    @invariant()
    def budgets_match_the_model(self) -> None:
        # Today's budgets after every step; earlier days are checked in teardown.
        for key in KEYS:
            self.check_reported(self.run(self.store.budgets(key, self.now)))

    @invariant()
    def every_reservation_finished_at_most_once(self) -> None:
        assert not set(self.open) & self.finished
        assert all(v >= 0 for v in self.reserved.values())


class SQLiteLedger(LedgerMachine):
    backend = "sqlite"


class RedisLedger(LedgerMachine):
    backend = "redis"


LEDGER_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestSQLiteLedger = SQLiteLedger.TestCase
TestSQLiteLedger.settings = LEDGER_SETTINGS


@pytest.mark.redis
class TestRedisLedger(RedisLedger.TestCase):  # type: ignore[misc,valid-type]
    settings = LEDGER_SETTINGS

    def setUp(self) -> None:
        require_redis()


class ClusterLedger(LedgerMachine):
    backend = "redis-cluster"


def test_the_ledger_model_on_a_redis_cluster(redis_cluster: PrivateRedisCluster) -> None:
    ClusterLedger.url = redis_cluster.url
    run_state_machine_as_test(ClusterLedger, settings=LEDGER_SETTINGS)
