"""Spend summaries and audit queries over the audit sink (SQLite or PostgreSQL).

Used by ``keybrake spend`` / ``keybrake audit`` and by ``GET /vault/spend`` /
``GET /vault/audit``. Spend counts what the ledger counts: settled actual costs of ``ok`` and
``overrun`` calls plus the estimates kept for ``vendor_error``/``unknown`` calls that may have
charged (amounts still held are not spent yet).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, Final, Literal

from keybrake.auditlog.sinks import AuditSink, audit_time
from keybrake.core.money import format_usd
from keybrake.store import Store

__all__ = [
    "GROUPS",
    "OUTCOMES",
    "SPENT_OUTCOMES",
    "SPENT_OUTCOMES_SQL",
    "SPENT_SQL",
    "ReportError",
    "add_caps",
    "audit_rows",
    "format_table",
    "parse_time",
    "recent_problems",
    "refusals_by_code",
    "spend_by_label",
    "spend_summary",
    "totals_since",
]

GROUPS = ("label", "key", "vendor", "hour", "day")
OUTCOMES = ("ok", "held", "overrun", "refused", "replayed", "vendor_error", "unknown")
# Money that moved: what `keybrake.proxy.metrics` counts as spent too. An overrun was charged (its
# actual is booked); a held call's amount has not moved yet (actual 0).
SPENT_OUTCOMES: Final = ("ok", "overrun", "vendor_error", "unknown")
SPENT_OUTCOMES_SQL: Final = "(" + ", ".join(f"'{o}'" for o in SPENT_OUTCOMES) + ")"
SPENT_SQL = (
    f"SUM(CASE WHEN outcome IN {SPENT_OUTCOMES_SQL} "
    "THEN COALESCE(actual_micros, estimate_micros, 0) ELSE 0 END)"
)
"""The audit log's "spent" of a set of rows, in micro-USD: the one definition every report
uses (the ledger's exact figure for a budget is `keybrake.store.BudgetState.used_micros`)."""
_REL = re.compile(r"^(\d{1,6})([mhdw])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReportError(ValueError):
    """A report parameter is invalid (the message names it)."""


def parse_time(value: str, now: dt.datetime, name: str = "since") -> dt.datetime:
    """``24h``/``7d``/``30m`` ago, or an ISO date/time (``2026-11-25``, ``2026-11-25T10:00Z``).

    >>> parse_time("24h", dt.datetime(2026, 11, 25, tzinfo=dt.UTC))
    datetime.datetime(2026, 11, 24, 0, 0, tzinfo=datetime.timezone.utc)
    """
    text = value.strip()
    if m := _REL.match(text):
        try:
            return now - dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:
            raise ReportError(f"{name}: {value!r} reaches before year 1") from None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{name}: {value!r} is not like '24h', '7d' or 2026-11-25") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _where(
    sink: AuditSink,
    *,
    label: str | None = None,
    key_id: str | None = None,
    vendor: str | None = None,
    outcome: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    before_id: int | None = None,
    after_id: int | None = None,
    label_prefix: str | None = None,
    vendors: Sequence[str] | None = None,
) -> tuple[str, list[Any]]:
    p = sink.placeholder
    clauses: list[str] = []
    params: list[Any] = []
    if label_prefix is not None:
        # Segment-wise, as `keybrake.vault.issuers.label_under`: the label itself, or below it.
        base = label_prefix.rstrip("/")
        # Not LIKE: SQLite's is case-insensitive, and "_" would match any character.
        clauses.append(f"(label = {p} OR substr(label, 1, {len(base) + 1:d}) = {p})")
        params += [base, base + "/"]
    if vendors is not None:
        clauses.append(f"vendor IN ({', '.join([p] * len(vendors)) or 'NULL'})")
        params += list(vendors)
    for col, val in (
        ("label", label),
        ("key_id", key_id),
        ("vendor", vendor),
        ("outcome", outcome),
    ):
        if val is not None:
            clauses.append(f"{col} = {p}")
            params.append(val)
    if since is not None:
        clauses.append(f"ts >= {p}")
        params.append(audit_time(since))
    if until is not None:
        clauses.append(f"ts < {p}")
        params.append(audit_time(until))
    if before_id is not None:
        clauses.append(f"id < {p}")
        params.append(before_id)
    if after_id is not None:
        clauses.append(f"id > {p}")
        params.append(after_id)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


_GROUP_EXPR = {
    "label": "label",
    "key": "key_id",
    "vendor": "vendor",
    "hour": "substr(ts, 1, 13)",
    "day": "substr(ts, 1, 10)",
}


def spend_summary(
    sink: AuditSink,
    *,
    group_by: Literal["label", "key", "vendor", "hour", "day"] = "label",
    label: str | None = None,
    key_id: str | None = None,
    vendor: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    label_prefix: str | None = None,
    vendors: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Calls, refusals, replays and dollars spent per group (``label_prefix``/``vendors``:
    only rows of labels under the prefix and of those vendors; an issuer token's view).

    >>> spend_summary(sink, group_by="label", since=parse_time("24h", now))  # doctest: +SKIP
    [{'group': 'dramatiq/nightly-billing', 'calls': 400, 'spent_usd': '300.00', ...}]
    """
    if group_by not in GROUPS:
        raise ReportError(f"group_by must be one of {', '.join(GROUPS)}")
    where, params = _where(
        sink,
        label=label,
        key_id=key_id,
        vendor=vendor,
        since=since,
        until=until,
        label_prefix=label_prefix,
        vendors=vendors,
    )
    expr = _GROUP_EXPR[group_by]
    sql = (
        f"SELECT {expr} AS grp, COUNT(*) AS calls, "  # noqa: S608 (expressions are constants)
        "SUM(CASE WHEN outcome = 'refused' THEN 1 ELSE 0 END) AS refusals, "
        "SUM(CASE WHEN outcome = 'replayed' THEN 1 ELSE 0 END) AS replays, "
        "SUM(CASE WHEN code = 'cap_exhausted' THEN 1 ELSE 0 END) AS cap_hits, "
        f"{SPENT_SQL} AS spent_micros, "
        "MIN(ts) AS first_ts, MAX(ts) AS last_ts "
        f"FROM audit{where} GROUP BY {expr} ORDER BY {expr}"
    )
    out = []
    for row in sink.query(sql, params):
        spent = int(row["spent_micros"] or 0)
        out.append(
            {
                "group_by": group_by,
                "group": row["grp"],
                "calls": int(row["calls"]),
                "refusals": int(row["refusals"] or 0),
                "cap_hits": int(row["cap_hits"] or 0),
                "replays": int(row["replays"] or 0),
                "spent_micros": spent,
                "spent_usd": format_usd(spent),
                "first_at": row["first_ts"],
                "last_at": row["last_ts"],
            }
        )
    return out


def audit_rows(
    sink: AuditSink,
    *,
    label: str | None = None,
    key_id: str | None = None,
    vendor: str | None = None,
    outcome: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 50,
    before_id: int | None = None,
    after_id: int | None = None,
    label_prefix: str | None = None,
    vendors: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Audit rows, newest first (``label_prefix``/``vendors`` as in `spend_summary`); page
    with ``before_id`` = the last row's id. With ``after_id``: the rows written after that
    one, oldest first (``keybrake audit --follow``).
    """
    if outcome is not None and outcome not in OUTCOMES:
        raise ReportError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if not 1 <= limit <= 1000:
        raise ReportError("limit must be between 1 and 1000")
    where, params = _where(
        sink,
        label=label,
        key_id=key_id,
        vendor=vendor,
        outcome=outcome,
        since=since,
        until=until,
        before_id=before_id,
        after_id=after_id,
        label_prefix=label_prefix,
        vendors=vendors,
    )
    order = "DESC" if after_id is None else "ASC"
    sql = f"SELECT * FROM audit{where} ORDER BY id {order} LIMIT {int(limit)}"  # noqa: S608
    return sink.query(sql, params)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table for the CLI: a header line, then one line per row (none: the
    header alone).

    >>> print(format_table([{"calls": 3, "group": "key_1"}], ["calls", "group"]))
    CALLS  GROUP
    3      key_1
    """
    widths = [max([len(c), *(len(str(r.get(c, "") or "")) for r in rows)]) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append(
            "  ".join(
                str(r.get(c, "") or "").ljust(w) for c, w in zip(columns, widths, strict=True)
            )
        )
    return "\n".join(lines)


async def add_caps(rows: list[dict[str, Any]], store: Store, now: dt.datetime) -> None:
    """Add today's cap and remaining dollars from the store to ``key``/``label`` groups."""
    for row in rows:
        cap: int | None = None
        remaining: int | None = None
        if row["group_by"] == "key" and row["group"]:
            key = await store.get_key(row["group"])
            if key is not None:
                budgets = await store.budgets(key, now)
                cap = key.daily_cap_micros
                rems = [b.remaining_micros for b in budgets if b.remaining_micros is not None]
                remaining = min(rems) if rems else None
                row["label"] = key.agent_run_label
                row["vendor"] = key.vendor
                row["status"] = key.state(now)
        elif row["group_by"] == "label" and row["group"]:
            cap = await store.get_label_budget(row["group"])
        row["daily_cap_usd"] = format_usd(cap) if cap is not None else None
        row["remaining_usd"] = format_usd(remaining) if remaining is not None else None


# -- the dashboard's views -------------------------------------------------------------------
def refusals_by_code(
    sink: AuditSink, since: dt.datetime, recent: dt.datetime
) -> list[dict[str, Any]]:
    """Refusals since ``since`` per code, most first: ``n``, ``last_hour`` (since ``recent``),
    ``last_ts``."""
    p = sink.placeholder
    return sink.query(
        f"SELECT code, COUNT(*) AS n, "  # noqa: S608 (constant SQL, values are parameters)
        f"SUM(CASE WHEN ts >= {p} THEN 1 ELSE 0 END) AS last_hour, MAX(ts) AS last_ts "
        f"FROM audit WHERE outcome = 'refused' AND ts >= {p} GROUP BY code ORDER BY n DESC",
        [audit_time(recent), audit_time(since)],
    )


def totals_since(sink: AuditSink, since: dt.datetime) -> dict[str, Any]:
    """``calls``, ``spent`` (micro-USD), ``unknown`` and ``vendor_errors`` since ``since``."""
    rows = sink.query(
        f"SELECT COUNT(*) AS calls, {SPENT_SQL} AS spent, "  # noqa: S608
        "SUM(CASE WHEN outcome = 'unknown' THEN 1 ELSE 0 END) AS unknown, "
        "SUM(CASE WHEN outcome = 'vendor_error' THEN 1 ELSE 0 END) AS vendor_errors "
        f"FROM audit WHERE ts >= {sink.placeholder}",
        [audit_time(since)],
    )
    return rows[0] if rows else {}


def recent_problems(sink: AuditSink, since: dt.datetime, limit: int = 10) -> list[dict[str, Any]]:
    """The newest refused, unknown and vendor-error rows since ``since``."""
    return sink.query(
        "SELECT * FROM audit WHERE outcome IN ('refused', 'unknown', 'vendor_error') "  # noqa: S608
        f"AND ts >= {sink.placeholder} ORDER BY id DESC LIMIT {int(limit)}",
        [audit_time(since)],
    )


def spend_by_label(sink: AuditSink, since: dt.datetime, width: int) -> list[dict[str, Any]]:
    """``spent``, ``calls`` and ``refusals`` per label per time bucket since ``since``; a
    bucket is the first ``width`` characters of the timestamp (13: an hour, 10: a day)."""
    bucket = f"substr(ts, 1, {int(width)})"
    return sink.query(
        f"SELECT label, {bucket} AS bucket, {SPENT_SQL} AS spent, "  # noqa: S608
        "COUNT(*) AS calls, SUM(CASE WHEN outcome = 'refused' THEN 1 ELSE 0 END) AS refusals "
        f"FROM audit WHERE ts >= {sink.placeholder} GROUP BY label, {bucket}",
        [audit_time(since)],
    )
