"""The ``keybrake`` command line: ``keys issue|list|revoke``, ``ca``, and how ``audit`` and
``spend`` read the audit log.

The key commands work directly on the store; here they share the data dir of a running
``keybrake run``, and a key issued by the CLI is used through that proxy. ``audit`` and
``spend`` first move the rows still in the store's audit outbox to the audit log (a real
SQLite store and ``audit.db`` here; the reports themselves: ``tests/e2e/test_reports.py``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from tests._ports import free_port
from tests.conftest import KEYBRAKE, ROOT, KeybrakeProcess, audit_query
from tests.fakes import FakeStripe
from typer.testing import CliRunner, Result

from keybrake.auditlog.sinks import COLUMNS, SQLiteAuditSink
from keybrake.cli import app
from keybrake.store import SQLiteStore

runner = CliRunner()


def cli(*args: str) -> Result:
    return runner.invoke(app, list(args))


def store_args(kb: KeybrakeProcess) -> list[str]:
    return ["--data-dir", str(kb.data_dir)]


def create_pi(kb: KeybrakeProcess, vault_key: str) -> httpx.Response:
    return httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": f"Bearer {vault_key}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=15,
    )


@pytest.mark.e2e
def test_cli_keys_against_a_running_proxy(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    # Issue with the installed console script, as an operator would.
    proc = subprocess.run(
        [
            str(KEYBRAKE),
            "keys",
            "issue",
            "--vendor",
            "stripe",
            "--daily-usd-cap",
            "300",
            "--allow",
            "POST /v1/payment_intents",
            "--allow",
            "GET /v1/payment_intents/{id}",
            "--expires-in",
            "2h",
            "--label",
            "cli/nightly",
            "--policies",
            str(kb.policies),
            *store_args(kb),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=kb.workdir,
    )
    assert proc.returncode == 0, proc.stderr
    issued: dict[str, Any] = json.loads(proc.stdout)
    assert issued["vault_key"].startswith("kbv_stripe_")
    assert issued["allowed_endpoints"] == [
        "POST /v1/payment_intents",
        "GET /v1/payment_intents/{id}",
    ]
    assert issued["agent_run_label"] == "cli/nightly"

    # The running proxy sees the key at once and swaps in the real secret.
    r = create_pi(kb, issued["vault_key"])
    assert r.status_code == 200, r.text
    assert fake_stripe.ledger[-1].header("Authorization") == f"Bearer {fake_stripe.secret}"
    # The admin API lists it too.
    assert issued["key_id"] in {k["key_id"] for k in kb.admin("GET", "/vault/keys").json()["data"]}

    # A key issued through the admin API shows up in the CLI listing.
    api_key = kb.issue_key(agent_run_label="api/label")
    listed = cli("keys", "list", *store_args(kb), "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert {row["key_id"] for row in rows} == {issued["key_id"], api_key["key_id"]}
    for secret in (issued["vault_key"], api_key["vault_key"]):
        assert secret not in listed.stdout
    mine = next(row for row in rows if row["key_id"] == issued["key_id"])
    assert mine["status"] == "active" and mine["daily_usd_cap"] == "300.00"

    table = cli("keys", "list", *store_args(kb))
    assert table.exit_code == 0
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["KEY_ID", "VENDOR", "STATUS"]
    assert any(line.startswith(issued["key_id"]) and "cli/nightly" in line for line in lines)
    assert "kbv_" not in table.stdout

    # Revoke from the CLI: the very next request through the proxy is refused.
    revoked = cli("keys", "revoke", issued["key_id"], *store_args(kb))
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout.strip() == f"revoked {issued['key_id']}"
    r = create_pi(kb, issued["vault_key"])
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "vault_key_revoked"
    assert kb.admin("GET", f"/vault/keys/{issued['key_id']}").json()["status"] == "revoked"
    again = cli("keys", "revoke", issued["key_id"], *store_args(kb))
    assert again.exit_code == 0  # repeating it is harmless
    unknown = cli("keys", "revoke", "key_0000000000000000", *store_args(kb))
    assert unknown.exit_code == 4
    assert "no vault key 'key_0000000000000000'" in unknown.stderr

    assert len(fake_stripe.ledger) == 1
    log = kb.log()
    assert fake_stripe.secret not in log
    assert issued["vault_key"] not in log


def test_keys_issue_plain_output(tmp_path: Path) -> None:
    result = cli(
        "keys",
        "issue",
        "--vendor",
        "stripe",
        "--daily-usd-cap",
        "12.50",
        "--allow",
        "post /v1//payment_intents/",
        "--label",
        "cli/plain",
        "--policies",
        str(ROOT / "policies"),
        "--data-dir",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()
    assert first.startswith("key_") and " expires " in first
    assert second.startswith("kbv_stripe_")
    rows = json.loads(cli("keys", "list", "--data-dir", str(tmp_path), "--json").stdout)
    assert rows[0]["allowed_endpoints"] == ["POST /v1/payment_intents"]
    assert rows[0]["max_requests_per_minute"] == 1500  # policies/stripe.yaml
    assert rows[0]["daily_usd_cap"] == "12.50"
    assert (tmp_path / "keybrake.db").exists()


def test_keys_issue_names_each_bad_field(tmp_path: Path) -> None:
    result = cli(
        "keys",
        "issue",
        "--vendor",
        "paypal",
        "--daily-usd-cap",
        "-1",
        "--allow",
        "POST /v1/pay*",
        "--expires-in",
        "91d",
        "--label",
        "bad\nlabel",
        "--max-requests-per-minute",
        "0",
        "--policies",
        str(ROOT / "policies"),
        "--data-dir",
        str(tmp_path),
    )
    assert result.exit_code == 2
    for field in (
        "vendor",
        "daily_usd_cap",
        "allowed_endpoints.0",
        "expires_in",
        "agent_run_label",
        "max_requests_per_minute",
    ):
        assert f"{field}: " in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "keybrake.db").exists()


def test_keys_issue_unpriced_endpoint(tmp_path: Path) -> None:
    result = cli(
        "keys",
        "issue",
        "--vendor",
        "stripe",
        "--daily-usd-cap",
        "5",
        "--allow",
        "POST /v1/payment_intents",
        "--allow",
        "POST /v1/unpriced_things",
        "--label",
        "x",
        "--policies",
        str(ROOT / "policies"),
        "--data-dir",
        str(tmp_path),
    )
    assert result.exit_code == 2
    assert "allowed_endpoints.1: POST /v1/unpriced_things has no cost rule" in result.stderr


def test_keys_issue_with_bad_policies_dir(tmp_path: Path) -> None:
    result = cli(
        "keys",
        "issue",
        "--vendor",
        "stripe",
        "--daily-usd-cap",
        "5",
        "--allow",
        "POST /v1/payment_intents",
        "--label",
        "x",
        "--policies",
        str(tmp_path / "none"),
        "--data-dir",
        str(tmp_path),
    )
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_keys_commands_with_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker}/kb.db"
    listed = cli("keys", "list", "--store", url)
    assert listed.exit_code == 3
    assert "store unavailable" in listed.stderr
    revoked = cli("keys", "revoke", "key_0000000000000000", "--store", url)
    assert revoked.exit_code == 3
    issued = cli(
        "keys",
        "issue",
        "--vendor",
        "stripe",
        "--daily-usd-cap",
        "5",
        "--allow",
        "POST /v1/payment_intents",
        "--label",
        "x",
        "--policies",
        str(ROOT / "policies"),
        "--store",
        url,
    )
    assert issued.exit_code == 3
    assert "kbv_" not in issued.output  # a key that was not stored is never shown


def test_keys_list_empty_store(tmp_path: Path) -> None:
    result = cli("keys", "list", "--data-dir", str(tmp_path), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_ca_writes_the_bundle(keybrake_certs: Path) -> None:
    result = cli("ca", "--certs-dir", str(keybrake_certs))
    assert result.exit_code == 0, result.output
    bundle = keybrake_certs / "keybrake-ca-bundle.pem"
    assert f"Bundle: {bundle.resolve()}" in result.stdout
    text = bundle.read_text()
    ca_cert = (keybrake_certs / "mitmproxy-ca-cert.pem").read_text()
    assert text.endswith(ca_cert)
    assert text.startswith(Path(certifi.where()).read_text().rstrip("\n"))
    assert "PRIVATE KEY" not in text
    # The CA is reused, not regenerated, on the second run.
    assert cli("ca", "--certs-dir", str(keybrake_certs)).exit_code == 0
    assert (keybrake_certs / "mitmproxy-ca-cert.pem").read_text() == ca_cert


def test_help_texts() -> None:
    top = cli("--help")
    assert top.exit_code == 0
    for command in ("run", "ca", "check-policy", "keys"):
        assert command in top.stdout
    issue = cli("keys", "issue", "--help")
    assert issue.exit_code == 0
    for option in ("--vendor", "--daily-usd-cap", "--allow", "--expires-in", "--label"):
        assert option in issue.stdout


def test_ca_bundle_survives_concurrent_writers(keybrake_certs: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from keybrake.proxy.ca import ensure_ca

    with ThreadPoolExecutor(8) as pool:
        bundles = list(pool.map(lambda _: ensure_ca(keybrake_certs), range(16)))
    bundle = keybrake_certs / "keybrake-ca-bundle.pem"
    assert set(bundles) == {bundle}
    ca_cert = (keybrake_certs / "mitmproxy-ca-cert.pem").read_text()
    assert bundle.read_text().endswith(ca_cert)
    assert oct(bundle.stat().st_mode & 0o777) == oct(0o644)
    assert not [p.name for p in keybrake_certs.iterdir() if p.name.startswith(".keybrake")]


# -- audit and spend: the outbox first ---------------------------------------------------------
def audit_row(message_id: str, ts: str) -> dict[str, Any]:
    return dict.fromkeys(COLUMNS) | {
        "event_id": uuid.uuid4().hex,
        "ts": ts,
        "key_id": "key_a",
        "label": "cli/test",
        "vendor": "stripe",
        "outcome": "ok",
        "actual_micros": 2_000_000,
        "message_id": message_id,
    }


def outbox(data_dir: Path, *rows: dict[str, Any]) -> int:
    """Append ``rows`` to the outbox of the data dir's SQLite store; the backlog after."""

    async def run() -> int:
        store = SQLiteStore(data_dir / "keybrake.db")
        await store.open()
        try:
            for row in rows:
                await store.append_audit(row)
            return await store.audit_backlog()
        finally:
            await store.close()

    return asyncio.run(run())


def test_audit_and_spend_move_the_outbox_to_the_audit_log_first(tmp_path: Path) -> None:
    data = tmp_path / "data"
    now = "2026-01-01T00:00:00.000000Z"
    sink = SQLiteAuditSink(data / "audit.db")
    sink.write([audit_row("in-the-log", now)])
    sink.close()
    assert outbox(data, audit_row("in-the-outbox", now)) == 1

    shown = cli("audit", "--data-dir", str(data), "--since", "2025-12-31", "--json")
    assert shown.exit_code == 0, shown.output
    assert [r["message_id"] for r in json.loads(shown.stdout)] == ["in-the-outbox", "in-the-log"]
    assert outbox(data) == 0
    assert len(audit_query(data / "audit.db")) == 2

    outbox(data, audit_row("later", now))
    spent = cli("spend", "--data-dir", str(data), "--since", "2025-12-31", "--json")
    assert spent.exit_code == 0, spent.output
    (row,) = json.loads(spent.stdout)
    assert (row["group"], row["calls"], row["spent_micros"]) == ("key_a", 3, 6_000_000)
    assert outbox(data) == 0


def test_audit_and_spend_without_the_store_warn_and_show_the_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sink = SQLiteAuditSink(data / "audit.db")
    sink.write([audit_row("in-the-log", "2026-01-01T00:00:00.000000Z")])
    sink.close()
    down = f"redis://127.0.0.1:{free_port()}/0"
    since = ["--since", "2025-12-31", "--json"]

    shown = cli("audit", "--data-dir", str(data), "--store", down, *since)
    assert shown.exit_code == 0, shown.output
    assert [r["message_id"] for r in json.loads(shown.stdout)] == ["in-the-log"]
    assert "store unavailable" in shown.stderr
    assert "the most recent calls may be missing" in shown.stderr

    spent = cli("spend", "--data-dir", str(data), "--store", down, *since)
    assert spent.exit_code == 0, spent.output
    (row,) = json.loads(spent.stdout)
    assert (row["spent_micros"], row["daily_cap_usd"], row["remaining_usd"]) == (
        2_000_000,
        None,
        None,
    )
    assert "the most recent calls may be missing" in spent.stderr
