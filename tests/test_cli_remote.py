"""The command line a user expects: ``--admin-url`` (the same output as the local store),
key caps and label budgets, vault keys never echoed, money in dollars, ``-h``/``--version``/
completion, examples in every help, and ``keybrake audit --follow``.

Every command runs as the installed ``keybrake`` console script, against a real proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KEYBRAKE, ROOT, KeybrakeProcess, free_port
from tests.fakes import FakeStripe

from keybrake.cli._common import _amount

# Every output of every command run here: none may hold a vault key, except `keys issue`'s.
OUTPUTS: list[str] = []
VAULT_KEY = re.compile(r"kbv_[a-z]+_[A-Za-z0-9_-]{20,}")


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    proc = subprocess.run(
        [str(KEYBRAKE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=cwd,
    )
    if args[:2] != ("keys", "issue"):
        OUTPUTS.append(proc.stdout + proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(autouse=True)
def no_vault_key_in_outputs() -> Iterator[None]:
    OUTPUTS.clear()
    yield
    for out in OUTPUTS:
        assert not VAULT_KEY.search(out), out


def remote(kb: KeybrakeProcess) -> tuple[list[str], dict[str, str]]:
    return ["--admin-url", kb.admin_url], {"KEYBRAKE_ADMIN_TOKEN": kb.admin_token}


def local(kb: KeybrakeProcess) -> tuple[list[str], dict[str, str]]:
    return ["--data-dir", str(kb.data_dir)], {}


def both(kb: KeybrakeProcess, *args: str) -> tuple[str, str]:
    """The stdout of ``args`` run against the store, then through the admin API."""
    outs = []
    for where in (local, remote):
        flags, env = where(kb)
        proc = run(*args, *flags, env=env)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    return outs[0], outs[1]


def create_pi(kb: KeybrakeProcess, vault_key: str, amount: int = 100) -> httpx.Response:
    return httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": str(amount), "currency": "usd"},
        headers={"Authorization": f"Bearer {vault_key}", "X-Keybrake-Message-Id": "m"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=15,
    )


@pytest.mark.e2e
def test_remote_commands_print_what_the_local_ones_print(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    flags, env = remote(kb)
    issued = run(
        "keys",
        "issue",
        "--vendor",
        "stripe",
        "--daily-usd-cap",
        "300",
        "--allow",
        "POST /v1/payment_intents",
        "--label",
        "cli/remote",
        "--json",
        *flags,
        env=env,
    )
    assert issued.returncode == 0, issued.stderr
    key = json.loads(issued.stdout)
    assert key["vault_key"].startswith("kbv_stripe_")
    assert create_pi(kb, key["vault_key"], 1250).status_code == 200

    for args in (
        ("keys", "list", "--json"),
        ("keys", "list"),
        ("spend", "--json"),
        ("spend",),
        ("spend", "--group-by", "label"),
        ("audit", "--json"),
        ("audit",),
    ):
        mine, theirs = both(kb, *args)
        assert mine == theirs, args
    listed = both(kb, "keys", "list")[0]
    assert "$300.00" in listed and "$12.50" in listed  # the held PaymentIntent counts
    audited = json.loads(both(kb, "audit", "--json")[0])
    assert audited[0]["amount_minor"] == 1250  # --json keeps exact integers
    assert "$12.50" in both(kb, "audit")[0]  # the table shows dollars
    assert "12500000" not in both(kb, "audit")[0]

    # Label budgets and caps: the same answers both ways (but for the time of the answer).
    for where in (local, remote):
        f, e = where(kb)
        put = run("budgets", "set", "cli/remote", "--daily-usd-cap", "500", "--json", *f, env=e)
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["daily_usd_cap"] == "500.00"
        shown = run("budgets", "show", "cli/remote", *f, env=e)
        assert shown.stdout.strip() == "cli/remote: daily cap $500.00 (shared)"
    assert kb.admin("GET", "/vault/budgets/cli%2Fremote").json()["daily_usd_cap"] == "500.00"


@pytest.mark.e2e
def test_set_cap_is_read_by_the_next_call_and_revoke_by_vault_key(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="50")
    assert create_pi(kb, key["vault_key"], 2000).status_code == 200  # $20 held

    # Lowered below what is held: refused from now on.
    flags, env = remote(kb)
    lowered = run("keys", "set-cap", key["key_id"], "--daily-usd-cap", "10", *flags, env=env)
    assert lowered.returncode == 0, lowered.stderr
    assert lowered.stdout.startswith(f"{key['key_id']}: daily cap $10.00, lifetime cap none")
    assert "no room left" in lowered.stderr
    refused = create_pi(kb, key["vault_key"], 100)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "cap_exhausted"
    # Raised again, locally this time, with a lifetime cap: admitted.
    raised = run(
        "keys", "set-cap", key["key_id"], "--daily-usd-cap", "100", "--usd-cap", "40",
        "--json", *local(kb)[0],
    )  # fmt: skip
    assert raised.returncode == 0, raised.stderr
    body = json.loads(raised.stdout)
    assert (body["daily_usd_cap"], body["usd_cap"]) == ("100.00", "40.00")
    assert create_pi(kb, key["vault_key"], 100).status_code == 200
    bad = run("keys", "set-cap", key["key_id"], "--daily-usd-cap", "-3", *flags, env=env)
    assert bad.returncode == 2 and "daily_usd_cap" in bad.stderr

    # Revoked by the vault key itself, through the API: only the key id is printed.
    revoked = run("keys", "revoke", key["vault_key"], *flags, env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"revoked {key['key_id']}"
    assert create_pi(kb, key["vault_key"]).json()["error"]["code"] == "vault_key_revoked"
    other = kb.issue_key()
    gone = run("keys", "revoke", other["vault_key"], *local(kb)[0])
    assert gone.stdout.strip() == f"revoked {other['key_id']}"
    for where in (local, remote):
        f, e = where(kb)
        unknown = run("keys", "revoke", "kbv_stripe_" + "x" * 43, *f, env=e)
        assert unknown.returncode == 4
        assert unknown.stderr.strip() == "Error: no vault key matches the vault key given"
        suspended = run("keys", "suspend", "key_0000000000000000", *f, env=e)
        assert suspended.returncode == 4
        assert "no vault key 'key_0000000000000000'" in suspended.stderr


@pytest.mark.e2e
def test_admin_api_errors_are_one_line(keybrake_stripe: KeybrakeProcess, tmp_path: Path) -> None:
    kb = keybrake_stripe
    wrong = run("keys", "list", "--admin-url", kb.admin_url, env={"KEYBRAKE_ADMIN_TOKEN": "kba_no"})
    assert wrong.returncode == 2
    assert wrong.stderr.count("\n") == 1 and "refused the admin token (401" in wrong.stderr
    token = tmp_path / "token"
    token.write_text(kb.admin_token + "\n")
    by_file = run("spend", "--admin-url", kb.admin_url, "--admin-token-file", str(token), "--json")
    assert by_file.returncode == 0, by_file.stderr
    down = f"http://127.0.0.1:{free_port()}"
    refused = run("audit", "--admin-url", down, env={"KEYBRAKE_ADMIN_TOKEN": "kba_x"})
    assert refused.returncode == 3
    assert refused.stderr.startswith("Error: cannot reach the admin API") and (
        refused.stderr.count("\n") == 1
    )
    none = run("keys", "list", "--admin-url", kb.admin_url, "--data-dir", str(tmp_path / "e"))
    assert none.returncode == 2 and "--admin-token-file" in none.stderr


def _commands(prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    import typer

    from keybrake.cli import app

    group: Any = typer.main.get_command(app)
    for name in prefix:
        group = group.commands[name]
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands((*prefix, name))


def test_every_help_has_an_example_and_no_markup() -> None:
    from typer.testing import CliRunner

    from keybrake.cli import app

    commands = [*_commands()]
    assert ("keys", "set-cap") in commands and ("budgets", "set") in commands
    # The console script itself once; every command's help in process (the same Typer app:
    # one process per command took ~25 s of the suite).
    top = run("-h")
    assert top.returncode == 0 and "Example" in top.stdout and "``" not in top.stdout
    runner = CliRunner()
    for command in commands:
        shown = runner.invoke(app, [*command, "-h"], terminal_width=100)
        assert shown.exit_code == 0, (command, shown.output)
        assert "Example" in shown.output, command
        assert "``" not in shown.output, command
    for command in (("keys", "list"), ("spend",), ("audit",), ("budgets", "set")):
        assert "--admin-url" in runner.invoke(app, [*command, "--help"]).output


def test_version_and_completion() -> None:
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("keybrake ")
    completion = run("--show-completion", "bash")
    assert completion.returncode == 0
    assert "_keybrake_completion" in completion.stdout and "complete " in completion.stdout


@pytest.mark.parametrize(
    ("minor", "currency", "shown"),
    [(1200, "usd", "$12.00"), (1200, "eur", "12.00 EUR"), (1000, "jpy", "1000 JPY")],
)
def test_vendor_amounts_in_their_currency(minor: int, currency: str, shown: str) -> None:
    assert _amount(minor, currency) == shown


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The lines ``proc`` prints, as they come (read by a thread: no buffer hides one)."""
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
    return lines


def _take(lines: queue.Queue[str], want: int, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    out: list[str] = []
    with contextlib.suppress(queue.Empty):
        while len(out) < want:
            out.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["remote", "local"])
def test_audit_follow_streams_new_rows(
    where: str,
    keybrake_stripe: KeybrakeProcess,
    fake_stripe: FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="50", agent_run_label="follow/me")
    other = kb.issue_key(agent_run_label="not/me")
    assert create_pi(kb, key["vault_key"], 100).status_code == 200  # before: shown first
    flags, env = remote(kb) if where == "remote" else local(kb)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    follow = ["audit", "-f", "--json", "--interval", "0.2", "--label", "follow/me", *flags]
    proc = subprocess.Popen(
        [str(KEYBRAKE), *follow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, **env},
        # Ctrl-C as from a terminal: a suite started in the background of a shell without job
        # control has SIGINT ignored, and a child would inherit that (seen in CI).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = _lines(proc)
        first = _take(lines, 1)
        assert [json.loads(x)["amount_minor"] for x in first] == [100]

        monkeypatch.setattr(stripe, "proxy", kb.proxy_url)
        monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
        monkeypatch.setattr(stripe, "default_http_client", None)
        stripe.PaymentIntent.create(amount=700, currency="usd", api_key=key["vault_key"])
        stripe.PaymentIntent.create(amount=800, currency="usd", api_key=other["vault_key"])
        stripe.PaymentIntent.create(amount=900, currency="usd", api_key=key["vault_key"])
        rows = [json.loads(x) for x in _take(lines, 2)]
        assert [r["amount_minor"] for r in rows] == [700, 900]  # the label's, in order
        assert rows[0]["id"] < rows[1]["id"]
    finally:
        proc.send_signal(signal.SIGINT if where == "remote" else signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # Say what the command had printed and how SIGINT stood in this process (it was
            # ignored, inherited from the shell that started the suite), then end it.
            mask = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(
                f"still running 20 s after the signal (SIGINT here: "
                f"{signal.getsignal(signal.SIGINT)}, blocked {mask}); stderr:\n{err}"
            ) from None
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err and not VAULT_KEY.search(err)
    assert _take(lines, 1, timeout=1) == []  # nothing more: the other label's row never


def test_follow_refuses_until(tmp_path: Path) -> None:
    proc = run("audit", "--follow", "--until", "1h", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "--until" in proc.stderr


def test_local_output_of_an_empty_store(tmp_path: Path) -> None:
    proc = run("keys", "list", "--data-dir", str(tmp_path), cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("No vault keys in ")
