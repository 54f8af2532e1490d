"""The worker side's end-to-end checks, run by every Python the worker distribution supports.

``tests/e2e/test_worker_matrix.py`` (on 3.12) starts a real ``keybrake run`` in front of the
fake Stripe, then runs this file with each matrix interpreter, from a fresh venv holding the
built ``keybrake`` wheel (no proxy packages), ``dramatiq[redis]``, the stripe SDK and, where
PyPI has it for that Python, ``apache-beam``. It needs nothing but the standard library and
those packages (no pytest), and must run on Python 3.9::

    KB_ADMIN_URL=http://127.0.0.1:8081 KB_ADMIN_TOKEN=kba_... KB_REDIS_URL=redis://... \\
        KB_NAMESPACE=kbtest-matrix-... python tests/matrix/worker_checks.py client dramatiq beam

Each check raises on the first wrong answer; the last line of stdout is a JSON summary the
3.12 side compares with the fake vendor's ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ["KB_ADMIN_URL"]
TOKEN = os.environ["KB_ADMIN_TOKEN"]
REDIS_URL = os.environ.get("KB_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("KB_NAMESPACE", f"kbtest-matrix-{uuid.uuid4().hex[:8]}")
RUN = uuid.uuid4().hex[:8]
T = TypeVar("T")

# What the 3.12 side checks against the fake Stripe: each check's key, cap and charges.
DRAMATIQ_CAP, DRAMATIQ_MESSAGES = 5, 8  # $1 each: 5 charged, 3 stopped by the cap
BEAM_CAP, BEAM_INVOICES = 12, 30  # $1 each: 12 charged, 18 handed back


def eventually(fn: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {value!r}")
        time.sleep(0.2)


def expect_error(kind: type, fn: Callable[[], Any]) -> Any:
    try:
        fn()
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}")


def issue(kb: Any, cap: Any, label: str) -> Any:
    return kb.issue_key(
        vendor="stripe",
        daily_usd_cap=cap,
        allowed_endpoints=["POST /v1/payment_intents"],
        expires_in="2h",
        agent_run_label=label,
    )


# -- keybrake.client ----------------------------------------------------------------------------


def check_client() -> dict[str, Any]:
    from keybrake.client import (
        AsyncKeybrakeClient,
        InvalidRequest,
        KeybrakeClient,
        KeybrakeError,
        NotFound,
        TransportError,
        Unauthorized,
    )

    label = f"matrix/client-{RUN}"
    with KeybrakeClient(ADMIN_URL, TOKEN) as kb:
        assert kb.health()["status"] == "ok"
        key = issue(kb, "12.5", label)
        assert key.vault_key.startswith("kbv_stripe_") and key.vault_key not in repr(key)
        assert key.daily_usd_cap == Decimal("12.50")
        assert key.allowed_endpoints == ("POST /v1/payment_intents",)
        got = kb.get_key(key.key_id)
        assert got.spent_today_usd == Decimal(0) and got.remaining_usd == Decimal("12.50")
        assert key.key_id in [k.key_id for k in kb.list_keys()]
        assert kb.set_label_budget(label, 500).daily_usd_cap == Decimal("500.00")
        assert kb.set_label_budget(label, None).daily_usd_cap is None
        assert kb.revoke_key(key.key_id).status == "revoked"

        missing = expect_error(NotFound, lambda: kb.get_key("key_does_not_exist"))
        assert (missing.code, missing.status) == ("not_found", 404)
        bad = expect_error(
            InvalidRequest,
            lambda: kb.issue_key(
                vendor="nope",
                daily_usd_cap=0,
                allowed_endpoints=["POST /v1/payment_intents"],
                agent_run_label=label,
            ),
        )
        assert bad.status == 422 and set(bad.fields) >= {"vendor", "daily_usd_cap"}
        expect_error(TypeError, lambda: issue(kb, 0.1, label))  # never floats
    with KeybrakeClient(ADMIN_URL, "kba_wrong") as wrong:
        denied = expect_error(Unauthorized, wrong.list_keys)
        assert denied.code == "admin_token_invalid" and isinstance(denied, KeybrakeError)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with KeybrakeClient(f"http://127.0.0.1:{closed}", "x", timeout=2) as down:
        unreachable = expect_error(TransportError, down.list_keys)
        assert unreachable.code == "connection_error" and unreachable.status is None

    async def round_trip() -> None:
        async with AsyncKeybrakeClient(ADMIN_URL, TOKEN) as akb:
            assert (await akb.health())["status"] == "ok"
            k = await akb.issue_key(
                vendor="stripe",
                daily_usd_cap=3,
                allowed_endpoints=["POST /v1/payment_intents"],
                agent_run_label=f"{label}-async",
            )
            assert (await akb.get_key(k.key_id)).remaining_usd == Decimal("3.00")
            assert (await akb.revoke_key(k.key_id)).status == "revoked"
            try:
                await akb.get_key("key_nope")
            except NotFound as e:
                assert e.code == "not_found"
            else:
                raise AssertionError("expected NotFound")
            assert [x async for x in akb.iter_audit(label=f"{label}-async")] == []

    asyncio.run(round_trip())
    return {"revoked_key": key.key_id}


# -- Dramatiq -----------------------------------------------------------------------------------


def check_dramatiq() -> dict[str, Any]:
    import redis

    from keybrake.client import KeybrakeClient

    label = f"matrix/dramatiq-{RUN}"
    with KeybrakeClient(ADMIN_URL, TOKEN) as kb:
        key = issue(kb, DRAMATIQ_CAP, label)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),  # the worker module; keybrake itself comes from the wheel
        "PYTHONUNBUFFERED": "1",
        "KEYBRAKE_VAULT_KEY": key.vault_key,
        "KEYBRAKE_BASE_URL": ADMIN_URL,
        "KB_DRAMATIQ_REDIS_URL": REDIS_URL,
        "KB_DRAMATIQ_NAMESPACE": NAMESPACE,
    }
    os.environ.update(KB_DRAMATIQ_REDIS_URL=REDIS_URL, KB_DRAMATIQ_NAMESPACE=NAMESPACE)
    sys.path.insert(0, str(ROOT))
    from tests.e2e import dramatiq_app

    log = Path(tempfile.mkdtemp()) / "dramatiq.log"
    dramatiq_cli = Path(sys.executable).with_name("dramatiq")
    with log.open("wb") as out:
        workers = subprocess.Popen(
            [str(dramatiq_cli), "tests.e2e.dramatiq_app", "--processes", "1", "--threads", "2"],
            cwd=str(ROOT),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    r = redis.Redis.from_url(REDIS_URL)

    def attempts() -> list[dict[str, Any]]:
        return [json.loads(x) for x in r.lrange(dramatiq_app.OUTCOMES, 0, -1)]

    try:
        sent = [
            dramatiq_app.charge_customer.send(f"cus_{RUN}_{i}", 100).message_id
            for i in range(DRAMATIQ_MESSAGES)
        ]
        eventually(attempts, lambda a: len(a) >= DRAMATIQ_MESSAGES, 60, "every message")
        time.sleep(1.5)  # past the actor's max_backoff (0.4 s): a retry would show by now
        entries = attempts()
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace"))
        raise
    finally:
        workers.send_signal(signal.SIGTERM)
        try:
            workers.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
            workers.wait(5)
        for k in r.scan_iter(f"{NAMESPACE}*", count=1000):
            r.delete(k)
        r.close()

    per_message = Counter(e["id"] for e in entries)
    assert sorted(per_message) == sorted(sent), entries
    assert set(per_message.values()) == {1}, f"a message ran twice (retried): {entries}"
    outcomes = Counter(e["outcome"] for e in entries)
    assert outcomes == {"ok": DRAMATIQ_CAP, "BudgetExhausted": DRAMATIQ_MESSAGES - DRAMATIQ_CAP}, (
        outcomes
    )
    with KeybrakeClient(ADMIN_URL, TOKEN) as kb:
        assert kb.get_key(key.key_id).spent_today_usd == Decimal(DRAMATIQ_CAP)
        rows = eventually(
            lambda: kb.audit(key_id=key.key_id, limit=100),
            lambda rows: len(rows) >= DRAMATIQ_MESSAGES,
            15,
            "the audit rows",
        )
    codes = Counter(row.code for row in rows if row.outcome == "refused")
    assert codes == {"cap_exhausted": DRAMATIQ_MESSAGES - DRAMATIQ_CAP}, codes
    return {"key_id": key.key_id, "charged": DRAMATIQ_CAP, "outcomes": dict(outcomes)}


# -- Apache Beam --------------------------------------------------------------------------------


def check_beam() -> dict[str, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions

    from keybrake.client import KeybrakeClient

    sys.path.insert(0, str(ROOT))
    from tests.e2e.beam_app import ChargeInvoice, invoices, read_lines, run

    label = f"matrix/beam-{RUN}"
    with KeybrakeClient(ADMIN_URL, TOKEN) as kb:
        key = issue(kb, BEAM_CAP, label)
    out = Path(tempfile.mkdtemp())
    secret = out / "vault-key"  # a mounted secret: the key is never in the options
    secret.write_text(key.vault_key)
    options = PipelineOptions(
        [
            "--direct_num_workers=2",
            "--direct_running_mode=multi_threading",
            f"--keybrake_vault_key_file={secret}",
            f"--keybrake_base_url={ADMIN_URL}",
            f"--keybrake_job_id=matrix-{RUN}",
        ]
    )
    run(invoices(BEAM_INVOICES), ChargeInvoice(options=options), out, options)
    done = read_lines(out, "charged")
    stopped = read_lines(out, "stopped")
    assert len(done) == BEAM_CAP, done
    assert len(done) + len(stopped) == BEAM_INVOICES  # each charged or handed back
    assert {line.split()[0] for line in done}.isdisjoint(stopped)
    with KeybrakeClient(ADMIN_URL, TOKEN) as kb:
        assert kb.get_key(key.key_id).spent_today_usd == Decimal(BEAM_CAP)
    return {"key_id": key.key_id, "charged": len(done), "stopped": len(stopped)}


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "client": check_client,
    "dramatiq": check_dramatiq,
    "beam": check_beam,
}


def main(names: list[str]) -> None:
    import keybrake.client

    installed = Path(keybrake.client.__file__).resolve()
    assert ROOT / "addon" not in installed.parents, f"keybrake from the tree: {installed}"
    summary: dict[str, Any] = {"python": platform.python_version(), "keybrake": str(installed)}
    for name in names:
        started = time.monotonic()
        summary[name] = CHECKS[name]()
        summary[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"{name}: ok ({summary[name]['seconds']} s)", flush=True)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CHECKS))
