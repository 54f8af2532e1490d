"""``keybrake budgets set|show`` with a label node's three limits and ``keybrake spend --tree``
on the local store (the same through ``--admin-url``: tests/e2e/test_budget_tree.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT
from typer.testing import CliRunner, Result

from keybrake.cli import app

runner = CliRunner()
PI = "POST /v1/payment_intents"


def cli(tmp_path: Path, *args: str) -> Result:
    return runner.invoke(app, [*args, "--data-dir", str(tmp_path / "data")])


def test_label_limits_and_the_tree_on_the_local_store(tmp_path: Path) -> None:
    label = "dramatiq/nightly"
    policies = ["--policies", str(ROOT / "policies")]
    issued = cli(
        tmp_path, "keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "10", "--allow", PI,
        "--label", label, *policies,
    )  # fmt: skip
    assert issued.exit_code == 0, issued.output
    both = cli(
        tmp_path, "budgets", "set", label, "--daily-usd-cap", "5", "--usd-cap", "50",
        "--max-requests-per-minute", "600",
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    assert both.output.strip() == (
        f"{label}: daily cap $5.00, lifetime cap $50.00, 600 requests per minute (shared)"
    )
    shown = json.loads(cli(tmp_path, "budgets", "show", label, "--json").stdout)
    assert (shown["daily_usd_cap"], shown["usd_cap"], shown["max_requests_per_minute"]) == (
        "5.00",
        "50.00",
        600,
    )
    tree = cli(tmp_path, "spend", "--tree")
    assert tree.exit_code == 0, tree.output
    lines = tree.output.splitlines()
    assert lines[1] == "operator (keys issued with the admin token)"
    assert lines[2].startswith(f"  label {label}  [daily $0.00 spent of $5.00, $5.00 left;")
    assert "600/min" in lines[2] and lines[3].startswith("    key ")
    data = json.loads(cli(tmp_path, "spend", "--tree", "--json").stdout)
    assert data["data"][0]["labels"][0]["lifetime"]["cap_usd"] == "50.00"
    # --remove clears every limit; a limit and --remove together is a mistake.
    assert cli(tmp_path, "budgets", "set", label, "--remove").exit_code == 0
    assert "no label cap" in cli(tmp_path, "budgets", "show", label).output
    assert cli(tmp_path, "budgets", "set", label, "--remove", "--usd-cap", "1").exit_code == 2
