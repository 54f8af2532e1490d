"""Billing flows on `keybrake.integrations.prefect`, run in Prefect's ``prefect_test_harness``.

Run by ``tests/e2e/test_orchestrators.py`` with the Prefect venv's Python (``make
orchestrator-venvs``), against a real ``keybrake run`` in front of the fake Stripe. Its
configuration is the environment: ``KB_ADMIN_URL``, ``KB_ISSUER_TOKEN`` (an issuer token,
never the admin token), ``KB_LABEL_PREFIX``. Standard library, Prefect and the stripe SDK
only; it must not import pytest.

- ``kb_billing``: 3 invoices at $1 under a $5 run key: completed.
- ``kb_billing_capped``: 4 invoices at $1 under a $2 run key, ``retries=3``: two charged,
  two stopped by the cap after one attempt each; the flow fails.
- ``kb_crash``: one charge, then the process is interrupted: crashed.
- ``kb_two_processes``: a second process of one run asks for the key: refused, not issued.
- ``kb_elsewhere``: a block whose prefix the issuer token does not cover: a clear 403.
Each run's key is revoked by the block's flow hooks. The last line of stdout is a JSON summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
from prefect.testing.utilities import prefect_test_harness

from keybrake.client import Forbidden
from keybrake.integrations.prefect import BudgetExhausted, KeybrakeIssuer


def issuer(cap: str, prefix: str | None = None) -> KeybrakeIssuer:
    return KeybrakeIssuer(
        admin_url=os.environ["KB_ADMIN_URL"],
        token=os.environ["KB_ISSUER_TOKEN"],
        label_prefix=os.environ["KB_LABEL_PREFIX"] if prefix is None else prefix,
        vendor="stripe",
        daily_usd_cap=cap,
        usd_cap=cap,
        allowed_endpoints=["POST /v1/payment_intents"],
        expires_in="1h",
    )


FIVE, TWO, ONE = issuer("5"), issuer("2"), issuer("1")
ELSEWHERE = issuer("1", prefix="elsewhere/")
ATTEMPTS: Counter[str] = Counter()  # task attempts per invoice: retries would show here
LOCK = threading.Lock()
RUNS: dict[str, str] = {}  # flow name (kb-billing: Prefect's, from the function's) -> run id
BLOCKS = {
    "kb-billing": FIVE,
    "kb-billing-capped": TWO,
    "kb-crash": ONE,
    "kb-two-processes": ONE,
}


def _charge(block: KeybrakeIssuer, invoice: str) -> str:
    with LOCK:
        ATTEMPTS[invoice] += 1
    with block.spending(invoice) as idempotency_key:
        pi = block.stripe_client(max_network_retries=0).v1.payment_intents.create(
            params={"amount": 100, "currency": "usd", "confirm": True, "payment_method": "pm_x"},
            options={"idempotency_key": idempotency_key},
        )
        return str(pi.id)


def _note_run() -> None:
    from prefect.runtime import flow_run

    RUNS[str(flow_run.flow_name)] = str(flow_run.id)


@task(retries=3, retry_delay_seconds=0, retry_condition_fn=KeybrakeIssuer.retry_condition)
def charge(cap: str, invoice: str) -> str:
    return _charge({"5": FIVE, "2": TWO, "1": ONE}[cap], invoice)


@flow(**FIVE.flow_hooks())
def kb_billing() -> list[str]:
    _note_run()
    return charge.map(unmapped("5"), [f"ok_{i}" for i in range(3)]).result()


@flow(**TWO.flow_hooks())
def kb_billing_capped() -> list[str]:
    _note_run()
    return charge.map(unmapped("2"), [f"capped_{i}" for i in range(4)]).result()


@flow(**ONE.flow_hooks())
def kb_crash() -> None:
    _note_run()
    charge("1", "crash_0")
    raise KeyboardInterrupt  # what Prefect reports as a crash


@flow(**ONE.flow_hooks())
def kb_two_processes() -> str:
    """A task in another process (Dask, Ray) has no key in memory: it must not mint a second
    key for the run (that would double the run's cap)."""
    _note_run()
    ONE.run_key()
    from keybrake.integrations import prefect as integration

    with integration._RUN_KEYS_LOCK:  # what another process's memory looks like
        held = integration._RUN_KEYS.pop(ONE.current_label())
    try:
        ONE.run_key()
    except RuntimeError as e:
        return str(e)
    finally:
        with integration._RUN_KEYS_LOCK:
            integration._RUN_KEYS[ONE.current_label()] = held
    raise AssertionError("a second key was issued for one run")


@flow(**ELSEWHERE.flow_hooks())
def kb_elsewhere() -> str:
    _note_run()
    try:
        ELSEWHERE.run_key()
    except Forbidden as e:
        return f"{e.code} {e.status}: {e.message}"
    raise AssertionError("an issuer token minted outside its prefix")


def _final(fn: Any) -> str:
    state = fn(return_state=True)
    return str(state.type.value)


def _run_all() -> dict[str, Any]:
    out: dict[str, Any] = {"states": {}}
    # The block as users keep it: saved once (the token a secret field), loaded by the flow.
    FIVE.save("kb-billing", overwrite=True)
    loaded = KeybrakeIssuer.load("kb-billing")
    assert loaded.token.get_secret_value() == FIVE.token.get_secret_value()
    assert loaded.spec() == FIVE.spec() and "kbi_" not in repr(loaded)
    out["block_saved"] = True
    out["states"]["kb_billing"] = _final(kb_billing)
    out["states"]["kb_billing_capped"] = _final(kb_billing_capped)
    with contextlib.suppress(KeyboardInterrupt):
        kb_crash()
    out["states"]["kb_crash"] = "CRASHED?"
    out["scope_refusal"] = kb_elsewhere()
    out["second_process"] = kb_two_processes()
    return out


def _stored(run_ids: dict[str, str]) -> dict[str, Any]:
    """What Prefect keeps of the runs: states, parameters, logs (for the secret checks)."""
    import asyncio

    async def read() -> dict[str, Any]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            runs = {n: await client.read_flow_run(i) for n, i in run_ids.items()}
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(run_ids.values())))
            )
        return {
            "states": {n: str(r.state.type.value) for n, r in runs.items()},
            "parameters": {n: r.parameters for n, r in runs.items()},
            "log_lines": len(logs),
            "logs": "\n".join(entry.message for entry in logs),
        }

    return asyncio.run(read())


if __name__ == "__main__":
    # A loaded machine (CI runs two test workers) can take more than the default 30 s.
    with prefect_test_harness(server_startup_timeout=180):
        summary = _run_all()
        stored = _stored(RUNS)
        summary["states"].update(stored["states"])
        summary["stored"] = stored
        summary["labels"] = {n: b.run_label(n, RUNS[n]) for n, b in BLOCKS.items()}
        summary["attempts"] = dict(ATTEMPTS)
        summary["budget_exhausted"] = BudgetExhausted.__name__
        # Every byte Prefect stored (flow and task runs, parameters, states, results, logs):
        # neither the issuer token nor any vault key is among them.
        url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
        database = url.split(":///", 1)[-1]
        stored_bytes = b"".join(
            Path(p).read_bytes() for p in (database, database + "-wal") if os.path.exists(p)
        )
        summary["database_bytes"] = len(stored_bytes)
        summary["database_hits"] = {
            "issuer_token": stored_bytes.count(os.environ["KB_ISSUER_TOKEN"].encode()),
            "vault_key": stored_bytes.count(b"kbv_"),
            "flow_runs": sum(stored_bytes.count(i.encode()) for i in RUNS.values()),
        }
        summary["python"] = sys.version.split()[0]
        print(json.dumps(summary, default=str))
