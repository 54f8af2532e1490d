"""Airflow and Prefect, each with its own local runner, against a real ``keybrake run``.

Airflow (``dag.test()``) and Prefect (``prefect_test_harness``) bring dependency sets of their
own, so each lives in its own venv (``make orchestrator-venvs``: ``.venv/orchestrators/<name>``,
built with ``keybrake[<name>]`` from this tree; nothing here reaches an index). The test starts
the proxy in front of the fake Stripe, creates an **issuer token** for the prefix
``pipelines/`` with the admin token, and runs ``tests/orchestrators/<script>`` with that venv's
Python holding only the issuer token. Then it checks, against the proxy and the fake vendor:
each run's key was issued under the prefix by that issuer, spent exactly what its tasks
charged (the audit rows carry the run's label and the task as actor), stopped at its cap
without retries, and was revoked however the run ended; and neither the issuer token nor a
vault key is in what the orchestrator stored (database, XCom, logs, parameters, output).

A missing venv is a skip with its reason, or a failure where ``KEYBRAKE_WORKER_MATRIX=required``
(``.ci/run``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from tests.conftest import ROOT, KeybrakeProcess
from tests.fakes import FakeStripe

# Each runs an orchestrator in a process of its own: ~25 s on a quiet machine, minutes on a
# loaded one (its own server or database, its own imports).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

VENVS = ROOT / ".venv" / "orchestrators"
SCRIPTS = ROOT / "tests" / "orchestrators"
REQUIRED = os.environ.get("KEYBRAKE_WORKER_MATRIX") == "required"
PI = "POST /v1/payment_intents"
PREFIX = "pipelines/"


def orchestrator_python(name: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not (VENVS / name / ".done").exists() or not python.exists():
        reason = f"no {name} venv: run `make orchestrator-venvs` (the README's `make test` does)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def create_issuer(kb: KeybrakeProcess) -> dict[str, Any]:
    r = kb.admin(
        "POST",
        "/vault/issuers",
        {
            "name": "orchestrator driver",
            "vendors": ["stripe"],
            "label_prefix": PREFIX,
            "allowed_endpoints": [PI],
            "max_daily_usd_cap": "10",
            "max_usd_cap": "10",
            "max_expires_in": "2h",
        },
    )
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


def run_script(
    python: Path, script: Path, env: dict[str, str], cwd: Path, timeout: float = 480
) -> tuple[dict[str, Any], str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYBRAKE_", "PYTHON", "AIRFLOW", "PREFECT"))
    }
    done = subprocess.run(
        [str(python), str(script)],
        cwd=cwd,
        env={**clean, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"{script.name} exited {done.returncode}:\n{output[-6000:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary, output


def keys_of(kb: KeybrakeProcess, label: str) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = kb.admin("GET", "/vault/keys").json()["data"]
    return [k for k in keys if k["agent_run_label"] == label]


def audit_of(kb: KeybrakeProcess, label: str) -> list[dict[str, Any]]:
    r = kb.admin("GET", f"/vault/audit?{urlencode({'label': label, 'limit': 100})}")
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["data"]
    return rows


def check_run(
    kb: KeybrakeProcess,
    issuer: dict[str, Any],
    label: str,
    charged: int,
    cap_hits: int,
    actor: str,
) -> None:
    """One run: its one key, under the prefix, from the issuer, revoked; its audit rows."""
    assert label.startswith(PREFIX)
    (key,) = keys_of(kb, label)
    assert key["issuer_id"] == issuer["issuer_id"]
    assert key["status"] == "revoked", key
    rows = audit_of(kb, label)
    ok = [r for r in rows if r["outcome"] == "ok"]
    capped = [r for r in rows if r["code"] == "cap_exhausted"]
    assert (len(ok), len(capped)) == (charged, cap_hits), rows
    assert len(rows) == charged + cap_hits, rows  # no retries: one row per attempt
    assert {r["actor"] for r in rows} == {actor}
    assert len({r["idempotency_key"] for r in ok}) == charged
    spent = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert spent["spent_today_usd"] in (f"{charged}.00", f"{charged}")


def no_secrets(where: str, text: str | bytes, *secrets: str) -> None:
    blob = text if isinstance(text, bytes) else text.encode()
    # Booleans, so that a failure never prints the secret it found.
    leaked = [s.encode() in blob for s in secrets]
    assert not any(leaked), f"{where} holds a secret"
    has_key = b"kbv_stripe_" in blob
    assert not has_key, f"{where} holds a vault key"


def test_keybrake_imports_without_the_orchestrators() -> None:
    """This venv has neither: the worker side imports, the integrations say what to install."""
    code = (
        "import importlib, importlib.util as u\n"
        "assert u.find_spec('airflow') is None and u.find_spec('prefect') is None\n"
        "import keybrake.client, keybrake.integrations, keybrake.integrations._runkeys\n"
        "for name in ('airflow', 'prefect'):\n"
        "    try:\n"
        "        importlib.import_module('keybrake.integrations.' + name)\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert "pip install 'keybrake[airflow]'" in lines[0]
    assert "pip install 'keybrake[prefect]'" in lines[1]


def test_airflow_dag_runs_get_a_key_each_and_revoke_it(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    python = orchestrator_python("airflow")
    kb = keybrake_stripe
    issuer = create_issuer(kb)
    token = issuer["token"]
    home, dags = tmp_path / "airflow", tmp_path / "dags"
    dags.mkdir()
    shutil.copy(SCRIPTS / "airflow_dags.py", dags / "airflow_dags.py")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_KEYBRAKE_DEFAULT": json.dumps(
            {
                "conn_type": "http",
                "host": kb.admin_url,
                "password": token,
                "extra": {"label_prefix": PREFIX},
            }
        ),
        "AIRFLOW_CONN_KEYBRAKE_ELSEWHERE": json.dumps(
            {
                "conn_type": "http",
                "host": kb.admin_url,
                "password": token,
                "extra": {"label_prefix": "elsewhere/"},
            }
        ),
        "AIRFLOW_CONN_KEYBRAKE_OTHER_TOKEN": json.dumps(
            {"conn_type": "http", "host": kb.admin_url, "password": "kbi_another_issuer"}
        ),
    }
    migrate = subprocess.run(
        [str(python.with_name("airflow")), "db", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    summary, output = run_script(python, dags / "airflow_dags.py", env, tmp_path)

    # The issuer token may not mint outside its prefix: the task fails, saying why.
    refusal = summary["scope_refusal"]
    assert "issuer_scope" in refusal and "elsewhere/airflow/kb_billing/manual__x" in refusal
    assert "agent_run_label" in refusal

    # A sealed key opens for its own run and issuer token only, and not once tampered with.
    seals = summary["seal_refusals"]
    assert set(seals) == {"other_run", "relabelled", "tampered", "other_token"}
    assert "belongs to another run" in seals["other_run"]
    for attempt in ("relabelled", "tampered", "other_token"):
        assert seals[attempt].startswith("cannot unseal the run key"), seals

    ok, capped = summary["billing"], summary["billing_capped"]
    assert ok["state"] == "success", ok
    assert capped["state"] == "failed", capped
    assert ok["label"] == f"{PREFIX}airflow/kb_billing/{ok['run_id']}"
    # Each task tried once: the cap stops mapped tasks at once, their retries unused.
    charges = {k: v for k, v in capped["tasks"].items() if k.startswith("charge[")}
    assert sorted(v["state"] for v in charges.values()) == ["failed"] * 2 + ["success"] * 2
    assert {v["try_number"] for v in charges.values()} == {1}, charges
    for run in (ok, capped):
        assert run["tasks"]["keybrake_revoke_run_key"]["state"] == "success", run
    check_run(kb, issuer, ok["label"], 3, 0, "kb_billing.charge")
    check_run(kb, issuer, capped["label"], 2, 2, "kb_billing_capped.charge")
    # Without a teardown task, the DAG's on_success_callback revoked the run's key.
    callbacks = summary["billing_callbacks"]
    assert callbacks["state"] == "success" and "keybrake_revoke_run_key" not in callbacks["tasks"]
    check_run(kb, issuer, callbacks["label"], 1, 0, "kb_billing_callbacks.charge")
    assert fake_stripe.charged_usd_micros() == 6_000_000
    assert len(fake_stripe.ledger) == 6

    # Airflow keeps the sealed key in XCom, never the key; the token and keys are nowhere.
    database = (home / "airflow.db").read_bytes()
    assert b'"sealed"' in database  # the XCom is there, and sealed
    no_secrets("the Airflow database", database, token)
    no_secrets("the DAG runs' output", output, token)
    for path in home.rglob("*"):
        if path.is_file():
            no_secrets(str(path), path.read_bytes(), token)
    assert token not in kb.log()


def test_prefect_flow_runs_get_a_key_each_and_revoke_it(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    python = orchestrator_python("prefect")
    kb = keybrake_stripe
    issuer = create_issuer(kb)
    token = issuer["token"]
    env = {
        "KB_ADMIN_URL": kb.admin_url,
        "KB_ISSUER_TOKEN": token,
        "KB_LABEL_PREFIX": PREFIX,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    summary, output = run_script(python, SCRIPTS / "prefect_flows.py", env, tmp_path)

    refusal = summary["scope_refusal"]
    assert refusal.startswith("issuer_scope 403: the issuer token may not issue the run key")
    assert "'elsewhere/prefect/kb-elsewhere/" in refusal and "agent_run_label" in refusal
    assert summary["block_saved"] is True
    states = summary["states"]
    assert states["kb-billing"] == "COMPLETED"
    assert states["kb-billing-capped"] == "FAILED"
    assert states["kb-crash"] == "CRASHED"
    # One attempt per invoice: cap hits are not retried (retry_condition_fn).
    assert set(summary["attempts"].values()) == {1}, summary["attempts"]
    assert len(summary["attempts"]) == 3 + 4 + 1

    labels = summary["labels"]
    assert labels["kb-billing"].startswith(f"{PREFIX}prefect/kb-billing/")
    check_run(kb, issuer, labels["kb-billing"], 3, 0, "kb-billing.charge")
    check_run(kb, issuer, labels["kb-billing-capped"], 2, 2, "kb-billing-capped.charge")
    check_run(kb, issuer, labels["kb-crash"], 1, 0, "kb-crash.charge")
    assert fake_stripe.charged_usd_micros() == 6_000_000
    # A second process of one run is refused a key instead of doubling the run's cap.
    assert "was issued in another process" in summary["second_process"]
    (only,) = keys_of(kb, labels["kb-two-processes"])
    assert only["status"] == "revoked"
    assert not [k for k in kb.admin("GET", "/vault/keys").json()["data"] if "elsewhere" in k]

    # Prefect stored the runs (their ids are in its database) and the saved block (its secret
    # field encrypted at rest) but no token and no key in clear.
    hits = summary["database_hits"]
    assert hits["flow_runs"] > 0 and summary["database_bytes"] > 0
    assert (hits["issuer_token"], hits["vault_key"]) == (0, 0), hits
    stored = summary["stored"]
    assert stored["log_lines"] > 0
    no_secrets("flow run parameters and logs", json.dumps(stored), token)
    no_secrets("the flow runs' output", output, token)
    assert token not in kb.log()
