"""``keybrake spend`` and ``keybrake audit``: reports from the audit log (local, or
through the admin API)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keybrake.cli._common import (
    AdminTokenFile,
    AdminUrl,
    AsJson,
    DataDir,
    StoreUrl,
    _amount,
    _check_data_dir,
    _cli_store_url,
    _dollars,
    _fail,
    _micros,
    _note,
    _open_store,
    _remote,
    _run_vault,
)
from keybrake.core.money import format_usd
from keybrake.proxy.preflight import new_sqlite_file
from keybrake.store import (
    Store,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from keybrake.auditlog.sinks import AuditSink

AuditUrl = Annotated[
    str,
    typer.Option(
        "--audit",
        envvar="KEYBRAKE_AUDIT",
        help="Audit sink: empty for <data dir>/audit.db, or postgresql://...",
    ),
]


def _open_sink(url: str, data_dir: Path) -> AuditSink:
    from keybrake.auditlog.sinks import open_audit_sink

    try:
        return open_audit_sink(url, data_dir)
    except Exception as e:
        _fail(f"cannot open the audit log: {type(e).__name__}: {e}", 3)


def _warn(message: str) -> None:
    typer.echo(f"Warning: {message}; the most recent calls may be missing", err=True)


def _report_sources(store: str, audit: str, data_dir: Path) -> tuple[Store, AuditSink]:
    """The store (not opened yet) and the audit log ``spend`` and ``audit`` read."""
    url = _cli_store_url(store, data_dir)
    if not audit:
        _check_data_dir(data_dir)
    return _open_store(url), _open_sink(audit, data_dir)


async def _read_audit(
    store: Store,
    sink: AuditSink,
    read: Callable[[Store | None], Awaitable[Any]],
    quiet: bool = False,
) -> Any:
    """``await read(store)`` once the rows still in the store's outbox (calls the proxy
    answered and has not moved yet) are in ``sink``. A store that cannot be opened is said
    so on stderr (unless ``quiet``) and ``read`` gets None: what the sink holds is still
    worth showing."""
    from keybrake.auditlog.pump import drain_outbox

    new = new_sqlite_file(store)
    try:
        try:
            await store.open()
        except StoreUnavailable as e:
            if not quiet:
                _warn(f"store unavailable ({e})")
            return await read(None)
        if new is not None:
            _note(f"created a new, empty store: {new}")
        try:
            await drain_outbox(store, sink)
        except StoreUnavailable as e:
            if not quiet:
                _warn(f"store unavailable ({e})")
        except Exception as e:  # the sink refused them: still show what it holds
            if not quiet:
                _warn(f"could not move recent rows to the audit log ({type(e).__name__}: {e})")
        return await read(store)
    finally:
        await store.close()


def spend(
    label: Annotated[str | None, typer.Option(help="Only this agent_run_label.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    vendor: Annotated[str | None, typer.Option(help="Only this vendor.")] = None,
    since: Annotated[str, typer.Option(help="24h, 7d, 30m or an ISO date/time.")] = "24h",
    until: Annotated[str | None, typer.Option(help="End of the window (default: now).")] = None,
    group_by: Annotated[
        str, typer.Option("--group-by", help="label, key, vendor, hour or day.")
    ] = "key",
    tree: Annotated[
        bool,
        typer.Option(
            "--tree",
            help="The budget tree instead (issuer → label → key): spent, reserved and "
            "remaining per node, from the store's ledger.",
        ),
    ] = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    audit: AuditUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Spend per key (or label, vendor, hour, day): calls, refusals, dollars, cap, remaining.

    Rows the proxy has not yet moved from the store to the audit log are moved first.

    Example: keybrake spend --label dramatiq/nightly-billing --since 24h; keybrake spend --tree
    """
    if tree:
        _show_tree(_budget_tree(store, data_dir, admin_url, admin_token_file), as_json)
        return
    from keybrake.auditlog.reports import (
        ReportError,
        add_caps,
        format_table,
        parse_time,
        spend_summary,
    )

    rows: list[dict[str, Any]]
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            rows = api.items(
                "/vault/spend",
                {
                    "label": label,
                    "key": key,
                    "vendor": vendor,
                    "since": since,
                    "until": until,
                    "group_by": group_by,
                },
            )
    else:
        now = dt.datetime.now(dt.UTC)
        try:
            start = parse_time(since, now)
            end = parse_time(until, now, "until") if until else None
        except ReportError as e:
            _fail(str(e), 2)

        async def report(s: Store | None) -> list[dict[str, Any]]:
            rows = spend_summary(
                sink,
                group_by=group_by,  # type: ignore[arg-type]
                label=label,
                key_id=key,
                vendor=vendor,
                since=start,
                until=end,
            )
            try:
                if s is not None:
                    await add_caps(rows, s, now)
                    return rows
            except StoreUnavailable as e:
                _warn(f"store unavailable ({e})")
            for row in rows:  # caps and what remains come from the store
                row["daily_cap_usd"] = row["remaining_usd"] = None
            return rows

        source, sink = _report_sources(store, audit, data_dir)
        try:
            rows = asyncio.run(_read_audit(source, sink, report))
        except ReportError as e:
            _fail(str(e), 2)
        finally:
            sink.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = ["group", "label", "vendor", "calls", "refusals", "cap_hits", "replays", "spent_usd"]
    cols += ["daily_cap_usd", "remaining_usd"]
    if group_by != "key":
        cols = [c for c in cols if c not in ("label", "vendor")]
    money = ("spent_usd", "daily_cap_usd", "remaining_usd")
    shown = [r | {c: _dollars(r.get(c)) for c in money} for r in rows]
    typer.echo(format_table(shown, cols))
    total = sum(int(r["spent_micros"]) for r in rows)
    typer.echo(f"total spent: ${format_usd(total)} in {sum(r['calls'] for r in rows)} calls")


_AUDIT_COLUMNS = ["ts", "key_id", "label", "method", "path", "status", "outcome", "code"]
_AUDIT_COLUMNS += ["cost", "amount", "vendor_request_id", "vendor_object_id", "actor"]
_AUDIT_COLUMNS += ["message_id"]


def _audit_view(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row for people: its cost in dollars, the vendor amount in its currency."""
    return row | {
        "cost": _micros(row.get("actual_micros")),
        "amount": _amount(row.get("amount_minor"), row.get("currency")),
    }


def _audit_line(row: dict[str, Any]) -> str:
    """One audit row on one line, for ``--follow``: every column, ``-`` when empty."""
    view = _audit_view(row)
    return "  ".join(str(view.get(c) or "-") for c in _AUDIT_COLUMNS)


def audit_cmd(
    label: Annotated[str | None, typer.Option(help="Only this agent_run_label.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    vendor: Annotated[str | None, typer.Option(help="Only this vendor.")] = None,
    outcome: Annotated[
        str | None,
        typer.Option(help="ok, held, overrun, refused, replayed, vendor_error or unknown."),
    ] = None,
    since: Annotated[str, typer.Option(help="24h, 7d, 30m or an ISO date/time.")] = "24h",
    until: Annotated[str | None, typer.Option(help="End of the window.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows (newest first).")] = 50,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing new rows as they are written, oldest first (Ctrl-C stops); "
            "with --json, one JSON object per line.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(help="With --follow: seconds between looks for new rows.")
    ] = 1.0,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    audit: AuditUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Recent audit rows, newest first; with --follow, new rows as they come (like tail -f).

    Rows the proxy has not yet moved from the store to the audit log are moved first.

    Example: keybrake audit --label dramatiq/nightly-billing --outcome refused --limit 50

    Example: keybrake audit --follow --key key_123 --admin-url http://10.0.0.5:8081
    """
    from keybrake.auditlog.reports import ReportError, format_table, parse_time
    from keybrake.cli._audit_source import AuditFollower, LocalAuditSource, RemoteAuditSource

    filters = {"label": label, "key": key, "vendor": vendor, "outcome": outcome}
    if follow and until:
        _fail("--follow shows rows as they are written: leave out --until", 2)
    if not 0.05 <= interval <= 3600:
        _fail("--interval: give seconds between 0.05 and 3600", 2)
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            source: Any = RemoteAuditSource(api, filters, since, until)
            if follow:
                _follow(AuditFollower(source, limit), interval, as_json)
                return
            rows = source.newest(limit)
    else:
        now = dt.datetime.now(dt.UTC)
        try:
            start = parse_time(since, now)
            end = parse_time(until, now, "until") if until else None
        except ReportError as e:
            _fail(str(e), 2)
        store_, sink = _report_sources(store, audit, data_dir)
        try:
            source = LocalAuditSource(
                store_, sink, filters, start, end, read=_read_audit, warn=_warn
            )
            if follow:
                _follow(AuditFollower(source, limit), interval, as_json)
                return
            rows = source.newest(limit)
        except ReportError as e:
            _fail(str(e), 2)
        finally:
            sink.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(format_table([_audit_view(r) for r in rows], _AUDIT_COLUMNS))


def _follow(follower: Any, interval: float, as_json: bool) -> None:
    """Print rows as ``follower`` finds them until Ctrl-C or SIGTERM (exit 0, no traceback)."""
    from keybrake.auditlog.reports import ReportError

    stopped: list[int] = []  # a signal handler only appends: nothing it could block on
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stopped.append(signum))
    if not as_json:
        typer.echo("  ".join(c.upper() for c in _AUDIT_COLUMNS))
    try:
        while not stopped:
            for row in follower.poll():
                typer.echo(json.dumps(row) if as_json else _audit_line(row))
            deadline = time.monotonic() + interval
            while not stopped and time.monotonic() < deadline:
                time.sleep(min(0.1, interval))
    except KeyboardInterrupt:
        pass
    except ReportError as e:
        _fail(str(e), 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(0)


def _budget_tree(
    store: str, data_dir: Path, admin_url: str | None, admin_token_file: Path | None
) -> dict[str, Any]:
    """``GET /vault/tree`` of a remote proxy, or the same from the local store."""
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            body: dict[str, Any] = api.call("GET", "/vault/tree")
            return body
    result: dict[str, Any] = _run_vault(store, data_dir, lambda v: v.tree())
    return result


def _node_line(indent: str, name: str, node: dict[str, Any]) -> str:
    """One node of the tree: today's and the lifetime spent/reserved/cap/remaining."""
    parts = []
    for window in ("daily", "lifetime"):
        w = node.get(window)
        if w is None:
            continue
        text = f"{window} {_dollars(w['spent_usd'])} spent"
        if w["reserved_usd"] not in ("0.00", "0"):
            text += f" + {_dollars(w['reserved_usd'])} reserved"
        if w["cap_usd"] is not None:
            text += f" of {_dollars(w['cap_usd'])}, {_dollars(w['remaining_usd'])} left"
        parts.append(text)
    if node.get("max_requests_per_minute"):
        parts.append(f"{node['max_requests_per_minute']}/min")
    return f"{indent}{name}" + (f"  [{'; '.join(parts)}]" if parts else "")


def _show_tree(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    typer.echo(f"budget tree, day {body['day']} (UTC)")
    for root in body["data"]:
        if root["node"] == "operator":
            typer.echo("operator (keys issued with the admin token)")
        else:
            name = f"issuer {root['issuer_id']}" + (
                f" ({root['name']})" if root.get("name") else ""
            )
            typer.echo(_node_line("", name, root))
        for label in root["labels"]:
            indent = "  "
            if label["label"] is not None:
                typer.echo(_node_line("  ", f"label {label['label']}", label))
                indent = "    "
            for key in label["keys"]:
                typer.echo(_node_line(indent, f"key {key['key_id']} ({key['status']})", key))
