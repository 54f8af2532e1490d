"""Unit tests of `keybrake.auditlog.reports`: time parsing, spend summaries and audit queries.

The summaries run on real sinks (a temporary SQLite ``audit.db`` and a schema of its own on
the real PostgreSQL): the SQL must mean the same on both.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import postgres_schema

from keybrake.auditlog.reports import (
    ReportError,
    add_caps,
    audit_rows,
    format_table,
    parse_time,
    spend_summary,
)
from keybrake.auditlog.sinks import COLUMNS, AuditSink, PostgresAuditSink, SQLiteAuditSink
from keybrake.store import KeyRecord, SQLiteStore

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
USD = 1_000_000


# -- parse_time ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - dt.timedelta(hours=24)),
        ("7d", NOW - dt.timedelta(days=7)),
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("2w", NOW - dt.timedelta(weeks=2)),
        ("0h", NOW),
        (" 1d ", NOW - dt.timedelta(days=1)),
        ("2026-11-20", dt.datetime(2026, 11, 20, tzinfo=dt.UTC)),
        ("2026-11-25T10:00Z", dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)),
        ("2026-11-25T10:00:00", dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)),
        ("2026-11-25T12:00:00+02:00", dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)),
    ],
)
def test_parse_time_accepts_relative_and_iso(text: str, expected: dt.datetime) -> None:
    got = parse_time(text, NOW)
    assert got == expected
    assert got.tzinfo is not None


@pytest.mark.parametrize(
    "text", ["yesterday", "", "24", "1y", "-1h", "1.5h", "1234567h", "h", "2026-13-01", "24 h"]
)
def test_parse_time_rejects_other_text_naming_the_parameter(text: str) -> None:
    with pytest.raises(ReportError, match=r"^until: "):
        parse_time(text, NOW, "until")
    with pytest.raises(ReportError, match=r"^since: "):
        parse_time(text, NOW)


@pytest.mark.parametrize("text", ["999999d", "999999w"])
def test_parse_time_out_of_range_is_a_report_error(text: str) -> None:
    with pytest.raises(ReportError, match="since"):
        parse_time(text, NOW)


# -- sinks with known rows -----------------------------------------------------------------------
def row(
    minutes_ago: float,
    outcome: str,
    *,
    key_id: str | None = "key_a",
    label: str | None = "billing/nightly",
    vendor: str = "stripe",
    code: str | None = None,
    estimate: int | None = None,
    actual: int | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    ts = (NOW - dt.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    r: dict[str, Any] = dict.fromkeys(COLUMNS)
    r.update(
        ts=ts,
        key_id=key_id,
        label=label,
        vendor=vendor,
        method="POST",
        path="/v1/payment_intents",
        status={"ok": 200, "refused": 403, "replayed": 200}.get(outcome, 500),
        outcome=outcome,
        code=code,
        estimate_micros=estimate,
        actual_micros=actual,
        vendor_request_id=rid,
        instance="test:1",
    )
    return r


ROWS = [  # in the order a proxy writes them: oldest first
    # two days ago: outside 24h
    row(2 * 24 * 60, "ok", estimate=7 * USD, actual=7 * USD, rid="req_old"),
    # key_a, label billing/nightly, within the last 2 hours
    row(100, "ok", estimate=12 * USD, actual=12 * USD, rid="req_1"),
    row(90, "ok", estimate=5 * USD, actual=0, rid="req_2"),  # authorised only
    row(80, "replayed", estimate=12 * USD, actual=0),
    row(70, "refused", code="endpoint_not_allowed"),
    row(60, "refused", code="cap_exhausted", estimate=50 * USD),
    row(50, "vendor_error", estimate=3 * USD, actual=0, rid="req_3"),  # 402: nothing charged
    row(40, "vendor_error", estimate=4 * USD, actual=4 * USD, rid="req_4"),  # 500: kept
    row(30, "unknown", estimate=2 * USD, actual=None),  # reset: the estimate counts
    # key_b, same label; key_c, another label and vendor
    row(20, "ok", key_id="key_b", estimate=USD, actual=USD, rid="req_5"),
    row(10, "ok", key_id="key_c", label="notify/sms", vendor="twilio", estimate=8300, actual=8300),
    # an unknown key: no key, no label
    row(5, "refused", key_id=None, label=None, code="vault_key_unknown"),
]
A_SPENT = 12 * USD + 0 + 0 + 4 * USD + 2 * USD  # ok + vendor_error(500) + unknown


@pytest.fixture(params=["sqlite", "postgresql"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditSink]:
    if request.param == "sqlite":
        s: AuditSink = SQLiteAuditSink(tmp_path / "audit.db")
        s.write(ROWS)
        yield s
        s.close()
        return
    with postgres_schema() as url:
        s = PostgresAuditSink(url)
        s.write(ROWS)
        yield s
        s.close()


def groups(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {r["group"]: r for r in rows}


def test_spend_by_key_counts_what_the_ledger_counts(sink: AuditSink) -> None:
    out = groups(spend_summary(sink, group_by="key", since=parse_time("24h", NOW)))
    assert set(out) == {"key_a", "key_b", "key_c", None}
    a = out["key_a"]
    assert a["spent_micros"] == A_SPENT and a["spent_usd"] == "18.00"
    assert (a["calls"], a["refusals"], a["cap_hits"], a["replays"]) == (8, 2, 1, 1)
    assert a["group_by"] == "key"
    assert a["first_at"] < a["last_at"]
    assert a["first_at"].startswith("2026-11-25T10:20")
    assert out["key_b"]["spent_micros"] == USD
    assert out["key_c"]["spent_usd"] == "0.0083"
    assert out[None] | {"first_at": None, "last_at": None} == {
        "group_by": "key",
        "group": None,
        "calls": 1,
        "refusals": 1,
        "cap_hits": 0,
        "replays": 0,
        "spent_micros": 0,
        "spent_usd": "0.00",
        "first_at": None,
        "last_at": None,
    }


def test_an_overrun_is_spent_and_a_hold_is_not_yet(tmp_path: Path) -> None:
    """As the ledger (and `keybrake.proxy.metrics`) count them: an overrun's actual was charged;
    a held call's amount can still be charged, so it is not spent yet."""
    sink = SQLiteAuditSink(tmp_path / "audit.db")
    sink.write(
        [
            row(30, "overrun", estimate=2 * USD, actual=5 * USD),
            row(20, "held", estimate=3 * USD, actual=0),
            row(10, "overrun", estimate=USD, actual=0),  # a hold raised past its estimate
        ]
    )
    try:
        (a,) = spend_summary(sink, group_by="key", since=parse_time("24h", NOW))
        assert (a["calls"], a["spent_micros"]) == (3, 5 * USD)
        assert len(audit_rows(sink, outcome="overrun", since=parse_time("24h", NOW))) == 2
        assert len(audit_rows(sink, outcome="held", since=parse_time("24h", NOW))) == 1
    finally:
        sink.close()


def test_spend_groups_and_filters(sink: AuditSink) -> None:
    since = parse_time("24h", NOW)
    by_label = groups(spend_summary(sink, group_by="label", since=since))
    assert by_label["billing/nightly"]["spent_micros"] == A_SPENT + USD
    assert by_label["notify/sms"]["spent_micros"] == 8300
    by_vendor = groups(spend_summary(sink, group_by="vendor", since=since))
    assert by_vendor["stripe"]["spent_micros"] == A_SPENT + USD
    assert by_vendor["stripe"]["calls"] == 10
    assert by_vendor["twilio"]["calls"] == 1
    by_hour = spend_summary(sink, group_by="hour", since=since)
    assert [g["group"] for g in by_hour] == ["2026-11-25T10", "2026-11-25T11"]
    assert sum(g["spent_micros"] for g in by_hour) == A_SPENT + USD + 8300
    by_day = spend_summary(sink, group_by="day")  # no window: everything
    assert [(g["group"], g["spent_micros"]) for g in by_day] == [
        ("2026-11-23", 7 * USD),
        ("2026-11-25", A_SPENT + USD + 8300),
    ]
    only = spend_summary(sink, group_by="key", label="billing/nightly", since=since)
    assert [g["group"] for g in only] == ["key_a", "key_b"]
    assert [g["group"] for g in spend_summary(sink, group_by="key", vendor="twilio")] == ["key_c"]
    assert spend_summary(sink, group_by="label", key_id="key_b")[0]["calls"] == 1
    assert spend_summary(sink, label="nobody") == []


def test_spend_window_is_since_inclusive_until_exclusive(sink: AuditSink) -> None:
    at_100 = NOW - dt.timedelta(minutes=100)  # the first key_a row, exactly
    assert spend_summary(sink, key_id="key_a", since=at_100, until=at_100) == []
    (first,) = spend_summary(
        sink, group_by="key", key_id="key_a", since=at_100, until=at_100 + dt.timedelta(minutes=1)
    )
    assert first["calls"] == 1 and first["spent_micros"] == 12 * USD
    assert spend_summary(sink, since=NOW) == []


def test_spend_rejects_unknown_group(sink: AuditSink) -> None:
    with pytest.raises(ReportError, match="group_by"):
        spend_summary(sink, group_by="month")  # type: ignore[arg-type]


def test_audit_rows_newest_first_with_paging(sink: AuditSink) -> None:
    first = audit_rows(sink, limit=5)
    assert [r["vendor_request_id"] for r in first][:2] == [None, None]  # unknown key, sms
    assert len(first) == 5
    ids = [r["id"] for r in first]
    assert ids == sorted(ids, reverse=True)
    rest = audit_rows(sink, limit=1000, before_id=ids[-1])
    assert len(first) + len(rest) == len(ROWS)
    assert max(r["id"] for r in rest) < ids[-1]
    refused = audit_rows(sink, outcome="refused", label="billing/nightly")
    assert [r["code"] for r in refused] == ["cap_exhausted", "endpoint_not_allowed"]
    recent = audit_rows(sink, since=parse_time("24h", NOW), key_id="key_a")
    assert len(recent) == 8
    old = audit_rows(sink, until=parse_time("1d", NOW))
    assert [r["vendor_request_id"] for r in old] == ["req_old"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"outcome": "maybe"}, "outcome"), ({"limit": 0}, "limit"), ({"limit": 1001}, "limit")],
)
def test_audit_rows_rejects_bad_parameters(sink: AuditSink, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ReportError, match=match):
        audit_rows(sink, **kw)


def test_format_table() -> None:
    text = format_table(
        [{"group": "key_a", "calls": 3, "cap": None}, {"group": "k", "calls": 12}],
        ["group", "calls", "cap"],
    )
    lines = text.splitlines()
    assert lines[0].split() == ["GROUP", "CALLS", "CAP"]
    assert lines[1].split() == ["key_a", "3"]
    assert lines[2].startswith("k      12")


# -- add_caps with the real store ------------------------------------------------------------
async def test_add_caps_reads_caps_and_remaining_from_the_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "keybrake.db")
    await store.open()
    try:
        key = KeyRecord(
            key_id="key_a",
            secret_sha256=hashlib.sha256(b"key_a").hexdigest(),
            vendor="stripe",
            agent_run_label="billing/nightly",
            daily_cap_micros=30 * USD,
            allowed_endpoints=("POST /v1/payment_intents",),
            created_at=NOW - dt.timedelta(hours=1),
            expires_at=NOW + dt.timedelta(hours=1),
        )
        await store.create_key(key)
        await store.set_label_budget("billing/nightly", 100 * USD)
        assert (await store.reserve(key, "res_1", 12 * USD, NOW)).ok
        assert await store.settle("res_1", 12 * USD)
        sink = SQLiteAuditSink(tmp_path / "audit.db")
        sink.write(ROWS)
        rows = spend_summary(sink, group_by="key", since=parse_time("24h", NOW))
        rows += spend_summary(sink, group_by="label", since=parse_time("24h", NOW))
        await add_caps(rows, store, NOW)
        by = {(r["group_by"], r["group"]): r for r in rows}
        a = by[("key", "key_a")]
        assert (a["daily_cap_usd"], a["remaining_usd"]) == ("30.00", "18.00")
        assert (a["label"], a["vendor"], a["status"]) == ("billing/nightly", "stripe", "active")
        assert by[("key", "key_b")]["daily_cap_usd"] is None  # not in this store
        assert by[("key", None)]["remaining_usd"] is None
        assert by[("label", "billing/nightly")]["daily_cap_usd"] == "100.00"
        assert by[("label", "notify/sms")]["daily_cap_usd"] is None
        sink.close()
    finally:
        await store.close()
