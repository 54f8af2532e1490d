"""Admission and settlement against a model: random interleavings on both backends.

A hypothesis state machine drives `Store.admit` / `Store.settle_call` with idempotency keys,
replays, revocations, restarts (a new store object on the same state, then crash recovery)
and audit pumping over three keys minted by one capped issuer, two of them sharing a capped
label (the budget tree issuer → label → key), and checks after every step that the store
agrees with a plain-Python model: budgets never above a cap, spent and reserved equal to
the model's, a replay only for a completed claim and reserving nothing, a revoked key refused
at once, and every settled call's audit row in the outbox exactly once.
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
    AdmissionRequest,
    IdempotencyClaim,
    IssuerRecord,
    KeyRecord,
    RedisStore,
    Settlement,
    SQLiteStore,
    Store,
    StoredResponse,
)

NOW = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
LABEL_CAP = 6 * USD
ISSUER_CAP = 8 * USD
ISSUER = IssuerRecord(
    issuer_id="iss_m",
    token_sha256="0" * 64,
    name="model",
    vendors=("stripe",),
    label_prefix="",
    allowed_endpoints=(),
    max_daily_cap_micros=10 * USD,
    max_expires_in_seconds=3600,
    created_at=NOW,
    budget_daily_micros=ISSUER_CAP,
)
KEYS = tuple(
    dataclasses.replace(key, issuer_id="iss_m")
    for key in (
        make_key("kb_a", label="shared", daily=5 * USD),
        make_key("kb_b", label="shared", daily=4 * USD),
        make_key("kb_c", label="other", daily=5 * USD),
    )
)
ESTIMATES = st.sampled_from([0, USD, 2 * USD, 3 * USD])
IDEMPOTENCY = st.sampled_from([None, "idem:1", "idem:2"])
RESPONSE = StoredResponse(200, (), b"{}")

Usage = tuple[str, str]


def rows(key: KeyRecord) -> list[tuple[Usage, int | None]]:
    day = "2030-01-01"
    label = key.agent_run_label
    return [
        ((f"key:{key.key_id}", day), key.daily_cap_micros),
        ((f"key-lifetime:{key.key_id}", "lifetime"), None),
        ((f"label:{label}", day), LABEL_CAP if label == "shared" else None),
        ((f"label-lifetime:{label}", "lifetime"), None),
        (("issuer:iss_m", day), ISSUER_CAP),
        (("issuer-lifetime:iss_m", "lifetime"), None),
    ]


@dataclasses.dataclass
class Call:
    key: KeyRecord
    estimate: int
    scope: str | None
    ledger_rows: tuple[tuple[str, str], ...]


class HotPathMachine(RuleBasedStateMachine):
    backend: ClassVar[str]
    url: ClassVar[str] = REDIS_URL  # a Redis backend's

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.tmpdir: pathlib.Path | None = None
        self.prefix = ""
        if self.backend == "sqlite":
            self.tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="keybrake-hot-"))
        else:
            self.prefix = redis_prefix()
        self.store = self.new_store()
        self.spent: dict[Usage, int] = {}
        self.reserved: dict[Usage, int] = {}
        self.open: dict[str, Call] = {}
        # (key id, scope) -> "in_flight" or "done"
        self.claims: dict[tuple[str, str], str] = {}
        self.revoked: set[str] = set()
        self.audited = 0  # rows appended and not yet moved
        self.moved = 0
        self.serial = 0

    def new_store(self) -> Store:
        if self.tmpdir is not None:
            return SQLiteStore(self.tmpdir / "state.db")
        return RedisStore(self.url, prefix=self.prefix)

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    @initialize()
    def open_store(self) -> None:
        self.run(self.store.open())
        self.run(self.store.set_label_budget("shared", LABEL_CAP))
        self.run(self.store.create_issuer(ISSUER))
        for key in KEYS:
            self.run(self.store.create_key(key))

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.runner.close()
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            if self.prefix:
                delete_prefix(self.prefix)

    # -- rules ---------------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS), estimate=ESTIMATES, scope=IDEMPOTENCY)
    def admit(self, key: KeyRecord, estimate: int, scope: str | None) -> None:
        self.serial += 1
        rid = f"res_{self.serial}"
        claim = IdempotencyClaim(scope, "h", 60, 30, 100) if scope else None
        got = self.run(
            self.store.admit(
                AdmissionRequest(
                    key.key_id, NOW, reservation_id=rid, estimate_micros=estimate, idempotency=claim
                )
            )
        )
        if key.key_id in self.revoked:
            assert got.code == "vault_key_revoked", got
            return
        state = self.claims.get((key.key_id, scope)) if scope else None
        if state == "in_flight":
            assert got.code == "idempotency_in_flight", got
            return
        if state == "done":
            assert (got.status, got.response) == ("replay", RESPONSE), got
            return
        fits = all(
            cap is None or self.spent.get(u, 0) + self.reserved.get(u, 0) + estimate <= cap
            for u, cap in rows(key)
        )
        assert (got.status == "admitted") == fits, (got, fits)
        if not fits:
            assert got.code == "cap_exhausted"
            return
        for u, _cap in rows(key):
            self.reserved[u] = self.reserved.get(u, 0) + estimate
        if scope:
            self.claims[(key.key_id, scope)] = "in_flight"
        self.open[rid] = Call(key, estimate, scope, got.ledger_rows)

    @precondition(lambda self: self.open)
    @rule(
        data=st.data(),
        finish=st.sampled_from(["settled", "released", "unknown"]),
        keep=st.booleans(),
    )
    def settle(self, data: st.DataObject, finish: str, keep: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)), label="reservation")
        call = self.open.pop(rid)
        actual = call.estimate // 2 if finish == "settled" else 0
        spent = {"settled": actual, "released": 0, "unknown": call.estimate}[finish]
        done = self.run(
            self.store.settle_call(
                Settlement(
                    call.key.key_id,
                    call.key.agent_run_label,
                    "stripe",
                    NOW,
                    reservation_id=rid,
                    ledger_rows=call.ledger_rows,
                    finish=finish,  # type: ignore[arg-type]
                    actual_micros=actual,
                    idempotency_scope=call.scope,
                    idempotency_response=RESPONSE if keep else None,
                    idempotency_ttl_seconds=60,
                    idempotency_sha256="h",
                    audit={"rid": rid},
                )
            )
        )
        assert done
        for u, _cap in rows(call.key):
            self.reserved[u] -= call.estimate
            self.spent[u] = self.spent.get(u, 0) + spent
        if call.scope and (call.key.key_id, call.scope) in self.claims:  # not if revoked
            if keep:
                self.claims[(call.key.key_id, call.scope)] = "done"
            else:
                del self.claims[(call.key.key_id, call.scope)]
        self.audited += 1

    @rule(key=st.sampled_from(KEYS))
    def revoke(self, key: KeyRecord) -> None:
        self.run(self.store.revoke_key(key.key_id, NOW))
        self.revoked.add(key.key_id)
        # Revocation forgets the key's idempotency entries (money stays).
        self.claims = {k: v for k, v in self.claims.items() if k[0] != key.key_id}

    @rule()
    def restart(self) -> None:
        """Another process (or this one after a crash) on the same state: open reservations
        left behind are counted as spent by crash recovery."""
        self.run(self.store.close())
        self.store = self.new_store()
        self.run(self.store.open())
        recovered = self.run(self.store.recover_reservations(NOW + dt.timedelta(hours=1)))
        assert recovered == len(self.open)
        for call in self.open.values():
            for u, _cap in rows(call.key):
                self.reserved[u] -= call.estimate
                self.spent[u] = self.spent.get(u, 0) + call.estimate
        self.open.clear()

    @rule(limit=st.integers(min_value=1, max_value=4))
    def pump(self, limit: int) -> None:
        batch = self.run(self.store.audit_batch("replica", limit))
        assert len(batch) == min(limit, self.audited)
        self.run(self.store.audit_ack([i for i, _ in batch]))
        self.audited -= len(batch)
        self.moved += len(batch)

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def budgets_match_the_model(self) -> None:
        for key in KEYS:
            usage = self.run(self.store.tree_usage([u for u, _cap in rows(key)]))
            for u, (spent, reserved) in usage.items():
                assert (spent, reserved) == (self.spent.get(u, 0), self.reserved.get(u, 0)), u
            for b in self.run(self.store.budgets(key, NOW)):
                u = (b.scope, b.window)
                assert (b.spent_micros, b.reserved_micros) == (
                    self.spent.get(u, 0),
                    self.reserved.get(u, 0),
                ), b
                assert b.cap_micros is None or b.spent_micros + b.reserved_micros <= b.cap_micros

    @invariant()
    def the_outbox_holds_every_row_not_moved(self) -> None:
        assert self.run(self.store.audit_backlog()) == self.audited


class SQLiteHotPath(HotPathMachine):
    backend = "sqlite"


class RedisHotPath(HotPathMachine):
    backend = "redis"


MODEL_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestSQLiteHotPath = SQLiteHotPath.TestCase
TestSQLiteHotPath.settings = MODEL_SETTINGS


@pytest.mark.redis
class TestRedisHotPath(RedisHotPath.TestCase):  # type: ignore[misc,valid-type]
    settings = MODEL_SETTINGS

    def setUp(self) -> None:
        require_redis()


class ClusterHotPath(HotPathMachine):
    backend = "redis-cluster"


def test_the_hot_path_model_on_a_redis_cluster(redis_cluster: PrivateRedisCluster) -> None:
    ClusterHotPath.url = redis_cluster.url
    run_state_machine_as_test(ClusterHotPath, settings=MODEL_SETTINGS)
