"""Seed 2 end to end: Apache Beam's DirectRunner charging through Keybrake's base URL.

`KeybrakeDoFn` subclasses (``tests/e2e/beam_app.py``) hold only the vault key; the proxy is
a real ``keybrake run`` in front of the fake Stripe.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from tests.conftest import KeybrakeProcess, wait_for_rows
from tests.e2e.beam_app import ChargeInvoice, FlakyChargeInvoice, invoices, read_lines, run
from tests.fakes import FakeStripe

from keybrake.core.money import format_usd, parse_usd
from keybrake.integrations.beam import KeybrakeDoFn, KeybrakeOptions, from_file

pytestmark = pytest.mark.e2e


def spent_micros(kb: KeybrakeProcess, key: dict[str, Any]) -> int:
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return parse_usd(detail["spent_today_usd"])


def audit(kb: KeybrakeProcess, key: dict[str, Any], expected: int) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        url = f"/vault/audit?key={key['key_id']}&limit=1000"
        rows: list[dict[str, Any]] = kb.admin("GET", url).json()["data"]
        return rows

    return wait_for_rows(read, expected)


def counter(result: Any, name: str) -> int:
    found = result.metrics().query()["counters"]
    return sum(c.committed for c in found if c.key.metric.name == name)


def key_file(tmp_path: Path, vault_key: str) -> Path:
    """The vault key as a mounted secret: a file only the workers read."""
    path = tmp_path / "vault-key"
    path.write_text(vault_key + "\n")
    path.chmod(0o600)
    return path


def test_options_and_idempotency_keys() -> None:
    opts = KeybrakeOptions(
        [
            "--keybrake_vault_key_file=/run/secrets/kb",
            "--keybrake_base_url=http://127.0.0.1:9",
            "--keybrake_job_id=nightly-2026-11-25",
        ]
    )
    fn = ChargeInvoice(options=opts)
    assert repr(fn.key_source) == "FromFile('/run/secrets/kb')"
    assert fn.idempotency_key({"id": "inv_7"}) == "nightly-2026-11-25:inv_7"
    assert KeybrakeDoFn().element_id(("cus_1", 5)) == "cus_1"
    assert KeybrakeDoFn().element_id({"id": 3}) == "3"
    assert KeybrakeDoFn().element_id("x") == KeybrakeDoFn().element_id("x")
    # Without a job id, each pipeline gets its own (fixed when the DoFn is built).
    assert KeybrakeDoFn().job_id != KeybrakeDoFn().job_id
    job = PipelineOptions(["--job_name=billing-run-9"])
    assert ChargeInvoice(options=job).job_id == "billing-run-9"


def test_1000_invoices_stop_cleanly_at_the_500_dollar_cap(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="500", agent_run_label="beam/invoices")
    options = PipelineOptions(
        [
            "--direct_num_workers=2",
            "--direct_running_mode=multi_threading",
            f"--keybrake_vault_key_file={key_file(tmp_path, key['vault_key'])}",
            f"--keybrake_base_url={kb.admin_url}",
            f"--keybrake_job_id=invoices-{uuid.uuid4().hex[:8]}",
        ]
    )
    started = time.monotonic()
    result = run(invoices(1000), ChargeInvoice(options=options), tmp_path, options)
    elapsed = time.monotonic() - started

    charged = fake_stripe.charged_usd_micros()
    assert 499_000_000 <= charged <= 500_000_000
    done = read_lines(tmp_path, "charged")
    stopped = read_lines(tmp_path, "stopped")
    assert len(done) * 1_000_000 == charged
    assert len(done) + len(stopped) == 1000  # every invoice is charged or handed back
    assert {line.split()[0] for line in done}.isdisjoint(stopped)
    assert counter(result, "budget_exhausted") == len(stopped)
    assert counter(result, "calls") == len(done)
    # A clean stop: each worker learns of the cap once, then stops calling.
    rows = audit(kb, key, len(done) + 1)
    refusals = [r for r in rows if r["code"] == "cap_exhausted"]
    assert 1 <= len(refusals) <= 4, len(refusals)
    assert len(rows) == len(done) + len(refusals)
    assert {r["actor"] for r in rows} == {"ChargeInvoice"}
    charges = [e for e in fake_stripe.ledger if e.amount_charged_minor]
    assert len({e.idempotency_key for e in charges}) == len(charges)
    assert spent_micros(kb, key) == charged
    assert elapsed < 90


def test_a_bundle_retried_after_a_failure_charges_nothing_twice(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """The bundle-based DirectRunner retries a failed bundle (as Dataflow does): the elements
    charged before the failure are sent again with the same idempotency keys, Keybrake
    replays the first answers, and replays cost nothing."""
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="100", agent_run_label="beam/retry")
    marker = tmp_path / "failed-once"
    dofn = FlakyChargeInvoice(
        from_file(key_file(tmp_path, key["vault_key"])),
        kb.admin_url,
        job_id=f"retry-{uuid.uuid4().hex[:8]}",
        fail_after=7,
        marker=str(marker),
    )
    run(invoices(40), dofn, tmp_path, PipelineOptions([]), runner=BundleBasedDirectRunner())

    assert marker.exists()  # the failure happened, after 7 charges in its bundle
    done = read_lines(tmp_path, "charged")
    assert sorted(line.split()[0] for line in done) == [f"inv_{i:04d}" for i in range(40)]
    charges = [e for e in fake_stripe.ledger if e.amount_charged_minor]
    assert len(charges) == 40 == len({e.idempotency_key for e in charges})
    assert fake_stripe.charged_usd_micros() == 40_000_000
    rows = audit(kb, key, 47)
    replays = [r for r in rows if r["outcome"] == "replayed"]
    assert len(replays) == 7 and all(r["actual_micros"] in (0, None) for r in replays)
    assert spent_micros(kb, key) == fake_stripe.charged_usd_micros()
    assert format_usd(spent_micros(kb, key)) == "40.00"


def test_rerunning_a_job_with_the_same_job_id_charges_nothing_twice(
    keybrake_stripe: KeybrakeProcess,
    fake_stripe: FakeStripe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="10", agent_run_label="beam/rerun")
    # The worker's environment supplies the key and the base URL (nothing in the options).
    monkeypatch.setenv("KEYBRAKE_VAULT_KEY", key["vault_key"])
    monkeypatch.setenv("KEYBRAKE_BASE_URL", kb.admin_url)
    job = f"rerun-{uuid.uuid4().hex[:8]}"
    for attempt in ("first", "again"):
        out = tmp_path / attempt
        out.mkdir()
        run(invoices(5), ChargeInvoice(job_id=job), out, PipelineOptions([]))
        assert len(read_lines(out, "charged")) == 5
    assert fake_stripe.charged_usd_micros() == 5_000_000
    assert spent_micros(kb, key) == 5_000_000
