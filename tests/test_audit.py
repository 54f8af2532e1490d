"""The `AuditTrail` addon in ``taddons.context()`` with the real `Core`: rows of calls nothing
settled go to the store's outbox, its `AuditPump` moves them to the sink, and readers flush.

A real SQLite store and ``audit.db`` in a temporary data dir; a store that is down is a Redis
store on a port nothing listens on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow
from tests._ports import free_port
from tests.conftest import ROOT, audit_query

from keybrake.proxy.audit import AuditTrail
from keybrake.proxy.calls import CallState, track
from keybrake.proxy.core import Core, Runtime
from keybrake.store import RedisStore


@dataclass
class Trail:
    tctx: taddons.context
    runtime: Runtime
    core: Core
    trail: AuditTrail
    data_dir: Path

    def rows(self) -> list[dict[str, Any]]:
        return audit_query(self.data_dir / "audit.db")


@pytest.fixture
async def trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Trail]:
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", "kba_audit_test_token_0123456789abcdef")
    for name in ("KEYBRAKE_DATA_DIR", "KEYBRAKE_POLICIES_DIR", "KEYBRAKE_STORE", "KEYBRAKE_AUDIT"):
        monkeypatch.delenv(name, raising=False)
    runtime = Runtime()
    core, audit = Core(runtime), AuditTrail(runtime)
    with taddons.context(core, audit) as tctx:
        data = tmp_path / "data"
        tctx.configure(
            core,
            keybrake_data_dir=str(data),
            keybrake_policies=str(ROOT / "policies"),
            keybrake_store=f"sqlite:///{data / 'keybrake.db'}",
            keybrake_shutdown_grace=0.0,
        )
        await audit.running()
        yield Trail(tctx, runtime, core, audit, data)
        await core.done()
        await audit.done()


def refused_call(message_id: str) -> CallState:
    call = CallState(vendor="stripe", method="POST", path="/v1/payment_intents")
    call.key_id, call.label, call.outcome, call.code = "key_a", "audit/test", "refused", "x"
    call.status, call.message_id = 403, message_id
    return call


async def test_a_call_nothing_settled_is_in_the_sink_after_a_flush(trail: Trail) -> None:
    flow = tflow.tflow(resp=True)
    call = track(flow, refused_call("m1"))
    trail.runtime.inflight.add(flow)

    await trail.trail.response(flow)

    assert call.audited and flow not in trail.runtime.inflight
    store = await trail.runtime.open_store()
    sink = await trail.runtime.flushed_audit_sink()
    assert sink is not None and await store.audit_backlog() == 0
    (row,) = trail.rows()
    assert (row["message_id"], row["outcome"], row["code"]) == ("m1", "refused", "x")
    assert len(row["event_id"]) == 32
    await trail.trail.error(flow)  # audited once: a second hook adds nothing
    await trail.runtime.flushed_audit_sink()
    assert len(trail.rows()) == 1


async def test_flows_without_a_call_are_not_audited(trail: Trail) -> None:
    plain = tflow.tflow(resp=True)
    plain.metadata["keybrake"] = {"vendor": "stripe", "outcome": "ok"}  # a breadcrumb only
    await trail.trail.response(plain)
    await trail.runtime.flushed_audit_sink()
    assert trail.rows() == []


async def test_a_call_record_kept_in_the_flow_metadata_is_audited_too(trail: Trail) -> None:
    """Until every addon keeps its call with `keybrake.proxy.calls.track`."""
    flow = tflow.tflow(resp=True)
    flow.metadata["keybrake"] = refused_call("m5")
    await trail.trail.response(flow)
    await trail.runtime.flushed_audit_sink()
    assert [r["message_id"] for r in trail.rows()] == ["m5"]


async def test_a_row_the_store_refused_is_kept_until_it_is_back(trail: Trail) -> None:
    rt = trail.runtime
    store = await rt.open_store()
    rt.store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="kbtest:down:")
    flow = tflow.tflow(resp=True)
    track(flow, refused_call("m2"))
    rt.inflight.add(flow)

    await trail.trail.response(flow)  # never raises

    assert flow not in rt.inflight
    assert rt.audit_pump is not None and rt.audit_pump.depth >= 1
    assert await store.audit_backlog() == 0
    down, rt.store = rt.store, store  # the store is back
    await down.close()
    assert await rt.audit_pump.flush()
    assert [r["message_id"] for r in trail.rows()] == ["m2"]


async def test_shutdown_moves_the_outbox_to_the_sink(trail: Trail) -> None:
    flow = tflow.tflow(err=True)
    track(flow, refused_call("m3"))
    await trail.trail.error(flow)
    await trail.core.done()  # closes the pump before the store
    assert [r["message_id"] for r in trail.rows()] == ["m3"]


async def test_a_new_sink_takes_over(trail: Trail, tmp_path: Path) -> None:
    first = trail.runtime.audit_pump
    other = tmp_path / "other" / "audit.db"
    trail.tctx.configure(trail.trail, keybrake_audit=f"sqlite:///{other}")
    assert trail.runtime.audit_pump is not first and trail.runtime.audit_pump is not None
    flow = tflow.tflow(resp=True)
    track(flow, refused_call("m4"))
    await trail.trail.response(flow)
    await trail.runtime.flushed_audit_sink()
    assert [r["message_id"] for r in audit_query(other)] == ["m4"]
    assert trail.rows() == []
