"""``keybrake issuers``, the kill switches (``keys revoke-all|suspend-all|resume-all``) and
``keybrake freeze|unfreeze|frozen``: on the local store, and with ``--admin-url`` through a
real proxy (with the admin token, and with an issuer token as the bearer)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from tests.conftest import ROOT, KeybrakeProcess
from tests.fakes import FakeStripe
from typer.testing import CliRunner, Result

from keybrake.cli import app

runner = CliRunner()
PI = "POST /v1/payment_intents"


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, list(args), env=env)


def local(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data")]


def test_local_issuers_kill_switch_and_freeze(tmp_path: Path) -> None:
    policies = ["--policies", str(ROOT / "policies")]
    created = cli(
        "issuers", "create", "--vendor", "stripe", "--label-prefix", "beam/billing",
        "--allow", PI, "--max-daily-usd-cap", "300", "--max-expires-in", "2h",
        "--name", "beam billing driver", *policies, *local(tmp_path), "--json",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    issuer = json.loads(created.stdout)
    assert issuer["label_prefix"] == "beam/billing/" and issuer["token"].startswith("kbi_")

    listed = cli("issuers", "list", *local(tmp_path))
    assert issuer["issuer_id"] in listed.output and "beam billing driver" in listed.output
    assert issuer["token"] not in listed.output

    for label in ("beam/billing/run-1", "beam/billing/run-2", "beam/billing-evil/run"):
        issued = cli(
            "keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "10", "--allow", PI,
            "--label", label, *policies, *local(tmp_path),
        )  # fmt: skip
        assert issued.exit_code == 0, issued.output

    dry = cli(
        "keys", "revoke-all", "--label-prefix", "beam/billing/", "--dry-run", *local(tmp_path)
    )
    assert dry.exit_code == 0 and "would revoke 2 keys" in dry.output
    assert "beam/billing-evil/run" not in dry.output
    suspended = cli(
        "keys", "suspend-all", "--label-prefix", "beam/billing", "--reason", "runaway",
        *local(tmp_path),
    )  # fmt: skip
    assert "suspended 2 keys" in suspended.output
    assert "resumed 2 keys" in cli("keys", "resume-all", "--label-prefix", "beam/billing/",
                                   *local(tmp_path)).output  # fmt: skip
    assert "revoked 2 keys" in cli("keys", "revoke-all", "--label-prefix", "beam/billing/",
                                   *local(tmp_path)).output  # fmt: skip
    refused = cli("keys", "revoke-all", *local(tmp_path))
    assert refused.exit_code == 2 and "label_prefix, issuer_id, or both" in refused.output

    revoked = cli("issuers", "revoke", issuer["issuer_id"], "--revoke-keys", *local(tmp_path))
    assert revoked.exit_code == 0 and f"revoked {issuer['issuer_id']}" in revoked.output
    assert "revoked" in cli("issuers", "list", *local(tmp_path)).output
    assert cli("issuers", "revoke", "iss_00", *local(tmp_path)).exit_code == 4

    assert (
        cli("freeze", "stripe", "--reason", "compromised", *policies, *local(tmp_path)).exit_code
        == 0
    )
    assert "compromised" in cli("frozen", *local(tmp_path)).output
    assert cli("freeze", "nope", *policies, *local(tmp_path)).exit_code == 4
    assert "lifted the freeze of stripe" in cli("unfreeze", "stripe", *local(tmp_path)).output
    assert "No vendor is frozen" in cli("frozen", *local(tmp_path)).output


def test_issuer_limits_are_named_at_creation(tmp_path: Path) -> None:
    bad = cli(
        "issuers", "create", "--vendor", "stripe", "--label-prefix", "beam/../x",
        "--allow", "POST /v1/refunds_nope", "--max-daily-usd-cap", "0",
        "--policies", str(ROOT / "policies"), *local(tmp_path),
    )  # fmt: skip
    assert bad.exit_code == 2
    for field in ("label_prefix", "allowed_endpoints.stripe.0", "max_daily_usd_cap"):
        assert field in bad.output


@pytest.mark.e2e
def test_remote_issuer_token_as_the_bearer(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    kb = keybrake_stripe
    admin = {"KEYBRAKE_ADMIN_URL": kb.admin_url, "KEYBRAKE_ADMIN_TOKEN": kb.admin_token}
    created = cli(
        "issuers", "create", "--vendor", "stripe", "--label-prefix", "beam/billing/",
        "--allow", PI, "--max-daily-usd-cap", "300", "--json", env=admin,
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    token = json.loads(created.stdout)["token"]
    token_file = tmp_path / "issuer-token"
    token_file.write_text(token)
    driver = {"KEYBRAKE_ADMIN_URL": kb.admin_url, "KEYBRAKE_ADMIN_TOKEN_FILE": str(token_file)}

    issued = cli(
        "keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "10", "--allow", PI,
        "--label", "beam/billing/run-1", "--json", env=driver,
    )  # fmt: skip
    assert issued.exit_code == 0, issued.output
    key = json.loads(issued.stdout)
    outside = cli(
        "keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "301", "--allow", PI,
        "--label", "beam/billing/run-1", env=driver,
    )  # fmt: skip
    assert outside.exit_code == 2 and "issuer_scope" in outside.output
    assert "daily_usd_cap" in outside.output
    assert key["key_id"] in cli("keys", "list", env=driver).output
    no_freeze = cli("freeze", "stripe", env=driver)
    assert no_freeze.exit_code == 2 and "issuer_scope" in no_freeze.output

    dry = cli("keys", "revoke-all", "--label-prefix", "beam/billing/", "--dry-run", env=driver)
    assert "would revoke 1 keys" in dry.output
    assert cli("freeze", "stripe", "--reason", "drill", env=admin).exit_code == 0
    r = httpx.post(
        f"{kb.admin_url}/stripe/v1/payment_intents",
        headers={"Authorization": f"Bearer {key['vault_key']}"},
        data={"amount": "100", "currency": "usd"},
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "vendor_frozen"
    assert "stripe" in cli("frozen", env=admin).output
    assert "lifted" in cli("unfreeze", "stripe", env=admin).output
    assert "revoked 1 keys" in cli("keys", "revoke-all", "--label-prefix", "beam/billing/",
                                   env=driver).output  # fmt: skip
    for out in (dry.output, created.output):
        assert kb.admin_token not in out
