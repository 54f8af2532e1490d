"""Two billing DAGs on `keybrake.integrations.airflow`, and their runner (``dag.test()``).

Run by ``tests/e2e/test_orchestrators.py`` with the Airflow venv's Python (``make
orchestrator-venvs``), against a real ``keybrake run`` in front of the fake Stripe. Its whole
configuration is the environment: ``AIRFLOW_HOME`` (a fresh one, migrated), the DAGs folder
holding a copy of this file, the connection ``AIRFLOW_CONN_KEYBRAKE_DEFAULT`` (the issuer
token as its password; never the admin token) and ``KB_*`` test settings. Standard library,
Airflow and the stripe SDK only; it must not import pytest.

- ``kb_billing``: 3 invoices at $1 under a $5 run key: the run succeeds.
- ``kb_billing_capped``: 4 invoices at $1 under a $2 run key, ``retries=3``: two are charged,
  the other two hit the cap and fail at once (one try each), the run fails.
- ``kb_billing_callbacks``: 1 invoice under a $1 key, no teardown task: the DAG's
  ``on_success_callback`` revokes the key.
The first two end with the teardown task that revokes the run's key. The last line of stdout
is a JSON summary; the pytest side checks it against the proxy's audit and the fake's ledger.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

from airflow.sdk import DAG, task

from keybrake.integrations.airflow import KeybrakeHook, KeybrakeRunKey, RunKeySpec

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
PI = "POST /v1/payment_intents"


def billing_dag(dag_id: str, cap: str, invoices: int, teardown: bool = True) -> DAG:
    run_key = KeybrakeRunKey(
        vendor="stripe", daily_usd_cap=cap, usd_cap=cap, allowed_endpoints=[PI], expires_in="1h"
    )
    # Without the teardown task: the DAG's own callbacks revoke the run's key.
    callbacks: dict[str, Any] = (
        {}
        if teardown
        else {
            "on_success_callback": run_key.revoke_callback,
            "on_failure_callback": run_key.revoke_callback,
        }
    )
    with DAG(dag_id, schedule=None, start_date=START, catchup=False, **callbacks) as dag:
        key = run_key.issue_task()

        @task
        def invoice_list() -> list[dict[str, Any]]:
            return [{"id": f"inv_{i}", "cents": 100} for i in range(invoices)]

        @task(retries=3, retry_delay=dt.timedelta(seconds=0))
        def charge(invoice: dict[str, Any], key: dict[str, str]) -> str:
            with run_key.spending(invoice["id"]) as idempotency_key:
                client = run_key.stripe_client(key, max_network_retries=0)
                pi = client.v1.payment_intents.create(
                    params={
                        "amount": invoice["cents"],
                        "currency": "usd",
                        "confirm": True,
                        "payment_method": "pm_x",
                    },
                    options={"idempotency_key": idempotency_key},
                )
                return str(pi.id)

        charged = charge.partial(key=key).expand(invoice=invoice_list())
        if teardown:
            charged >> run_key.revoke_task(key)
    return dag


billing = billing_dag("kb_billing", cap="5", invoices=3)
billing_capped = billing_dag("kb_billing_capped", cap="2", invoices=4)
billing_callbacks = billing_dag("kb_billing_callbacks", cap="1", invoices=1, teardown=False)


def _run(dag: DAG) -> dict[str, Any]:
    dag_run = dag.test()
    tis = {}
    for ti in dag_run.get_task_instances():
        name = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tis[name] = {"state": str(ti.state), "try_number": ti.try_number}
    label = KeybrakeHook().run_label(dag.dag_id, dag_run.run_id)
    return {"run_id": dag_run.run_id, "state": str(dag_run.state), "label": label, "tasks": tis}


def _scope_refusal() -> str:
    """The issuer token may not mint outside its prefix: the helper says so, no retries."""
    from airflow.sdk.exceptions import AirflowFailException

    elsewhere = KeybrakeRunKey(
        RunKeySpec(vendor="stripe", daily_usd_cap="1", allowed_endpoints=[PI]),
        conn_id="keybrake_elsewhere",
    )
    ti = SimpleNamespace(dag_id="kb_billing", run_id="manual__x", task_id="t", map_index=-1)
    try:
        elsewhere.issue({"ti": ti})
    except AirflowFailException as e:
        return str(e)
    raise AssertionError("an issuer token minted outside its prefix")


def _seal_checks() -> dict[str, str]:
    """What a reader of XCom can do with a sealed key: nothing without the issuer token, and
    a run's sealed key opens in that run only."""
    from keybrake.client import IssuedKey

    hook = KeybrakeHook()
    label = hook.run_label("kb_billing", "manual__a")
    key = IssuedKey.from_json(
        {
            "key_id": "key_test",
            "vendor": "stripe",
            "agent_run_label": label,
            "daily_usd_cap": "1",
            "status": "active",
            "vault_key": "not-a-real-key-but-secret",
        }
    )
    sealed = hook.seal(key)
    assert "not-a-real-key" not in json.dumps(sealed)
    assert hook.unseal(sealed, label) == "not-a-real-key-but-secret"
    out = {}
    tampered = dict(sealed, sealed=sealed["sealed"][:-6] + "AAAAAA")
    moved = dict(sealed, label=hook.run_label("kb_billing", "manual__b"))
    for name, attempt in (
        ("other_run", lambda: hook.unseal(sealed, hook.run_label("kb_billing", "manual__b"))),
        ("relabelled", lambda: hook.unseal(moved, moved["label"])),
        ("tampered", lambda: hook.unseal(tampered, label)),
        ("other_token", lambda: KeybrakeHook("keybrake_other_token").unseal(sealed, label)),
    ):
        try:
            attempt()
        except ValueError as e:
            out[name] = str(e)
        else:
            raise AssertionError(f"unsealed: {name}")
    return out


if __name__ == "__main__":
    summary = {
        "scope_refusal": _scope_refusal(),
        "seal_refusals": _seal_checks(),
        "billing": _run(billing),
        "billing_capped": _run(billing_capped),
        "billing_callbacks": _run(billing_callbacks),
        "python": sys.version.split()[0],
        "airflow_home": os.environ["AIRFLOW_HOME"],
    }
    print(json.dumps(summary))
