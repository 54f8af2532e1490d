"""``keybrake alerts``: what a running proxy alerts on and where, and a test notification.

Alerts are fired and delivered by the proxy (its durable outbox in the store), so these
commands talk to its admin API: ``--admin-url`` (default ``http://127.0.0.1:8081``, the
admin listener of ``keybrake run``) and the admin token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from keybrake.cli._common import (
    AdminTokenFile,
    AdminUrl,
    AsJson,
    DataDir,
    _fail,
    _remote,
)

__all__ = ["alerts_show", "alerts_test"]

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"


def alerts_show(
    data_dir: DataDir = Path(".keybrake"),
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """List the alert thresholds, the webhooks (never their secrets or URL paths), the
    deliveries waiting and the recent ones.

    Example: keybrake alerts show --admin-url http://127.0.0.1:8081
    """
    with _remote(admin_url or DEFAULT_ADMIN_URL, admin_token_file, data_dir) as api:
        data = api.call("GET", "/vault/alerts")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    th = data.get("thresholds", {})
    typer.echo(f"Thresholds (% of each cap, of what is spent): {th.get('default')}")
    for prefix, percents in th.get("labels", {}).items():
        typer.echo(f"  labels under {prefix!r}: {percents}")
    for key_id, percents in th.get("keys", {}).items():
        typer.echo(f"  key {key_id}: {percents}")
    hooks = data.get("webhooks", [])
    typer.echo("Webhooks:" if hooks else "Webhooks: none (set keybrake_alerts)")
    for w in hooks:
        signed = "signed" if w.get("signed") else "unsigned"
        typer.echo(f"  {w['name']:16} {w['format']:9} {signed:8} {w['url']}")
    typer.echo(f"Waiting: {len(data.get('pending', []))}")
    for r in data.get("recent", [])[:20]:
        alert = r.get("alert", {})
        typer.echo(
            f"  {r.get('finished_at', '')}  {r.get('result', ''):9} {r.get('webhook', ''):16} "
            f"{alert.get('kind', '')}: {alert.get('summary', '')}"
        )


def alerts_test(
    data_dir: DataDir = Path(".keybrake"),
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for every webhook's answer (0: do not wait)."),
    ] = 30.0,
) -> None:
    """Send a test alert to every configured webhook (through the proxy's outbox, signed
    and retried like any alert) and report what each answered.

    Example: keybrake alerts test --admin-url http://127.0.0.1:8081
    """
    with _remote(admin_url or DEFAULT_ADMIN_URL, admin_token_file, data_dir) as api:
        sent = api.call("POST", "/vault/alerts/test", body={})
        dedupe, hooks = sent["dedupe_key"], list(sent["webhooks"])
        typer.echo(f"test alert queued for {', '.join(hooks)}")
        if wait <= 0:
            return
        deadline = time.monotonic() + wait
        results: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            data = api.call("GET", "/vault/alerts", {"limit": 200})
            for row in data.get("recent", []):
                if row.get("dedupe") == dedupe:
                    results[row["webhook"]] = row
            pending = [r for r in data.get("pending", []) if r.get("dedupe") == dedupe]
            for row in pending:
                if row.get("error"):
                    results.setdefault(row["webhook"], row)
            if len(results) == len(hooks) and not pending:
                break
            time.sleep(0.5)
    failed = False
    for name in hooks:
        row = results.get(name)
        if row is None:
            typer.echo(f"  {name}: no answer yet")
            failed = True
        elif row.get("result") == "delivered":
            typer.echo(f"  {name}: delivered (HTTP {row.get('status')})")
        else:
            typer.echo(f"  {name}: not delivered ({row.get('error')}); retrying in the background")
            failed = True
    if failed:
        _fail("not every webhook took the test alert", 1)
