"""The Beam helper never carries the vault key in the pipeline: a key source runs on the worker.

The pickled DoFn (as Beam pickles it into the pipeline graph, before and after ``setup()``
ran), the pipeline options and the whole pipeline proto are searched for the vault key; then
the same pipeline charges through a real ``keybrake run``. A key source asked again
(``refresh_seconds``) switches keys between bundles.
"""

from __future__ import annotations

import base64
import bz2
import zlib
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2
from tests.conftest import KeybrakeProcess
from tests.e2e.beam_app import ChargeInvoice, invoices, read_lines, run
from tests.fakes import FakeStripe

from keybrake.core.money import parse_usd
from keybrake.integrations.beam import FromEnv, KeybrakeDoFn, KeybrakeOptions, from_file

pytestmark = pytest.mark.e2e


def unpacked(blob: bytes) -> bytes:
    """Beam's pickled payloads are base64 of bz2 (or zlib) of the pickle: the pickle."""
    raw = base64.b64decode(blob)
    for decompress in (bz2.decompress, zlib.decompress):
        try:
            return decompress(raw)
        except (OSError, ValueError, zlib.error):
            continue
    return raw


def assert_absent(secret: str, where: str, data: bytes) -> None:
    assert secret.encode() not in data, f"the vault key is in {where}"
    # Also its hex and base64 forms, in case something encoded it.
    assert secret.encode().hex().encode() not in data, f"the vault key (hex) is in {where}"
    assert base64.b64encode(secret.encode())[:40] not in data, f"vault key (b64) in {where}"


def spent(kb: KeybrakeProcess, key: dict[str, Any]) -> int:
    return parse_usd(kb.admin("GET", f"/vault/keys/{key['key_id']}").json()["spent_today_usd"])


def test_no_vault_key_in_the_pickled_dofn_the_options_or_the_pipeline(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap="10", agent_run_label="beam/key-source")
    vault_key = key["vault_key"]
    secret_file = tmp_path / "vault-key"
    secret_file.write_text(vault_key + "\n")
    args = [
        f"--keybrake_vault_key_file={secret_file}",
        f"--keybrake_base_url={kb.admin_url}",
        "--keybrake_job_id=key-source-test",
    ]
    options = PipelineOptions(args)
    dofn = ChargeInvoice(options=options)

    # The DoFn as Beam pickles it, and again once setup() built the client with the key.
    assert_absent(vault_key, "the pickled DoFn", unpacked(pickler.dumps(dofn)))
    dofn.setup()
    assert dofn.client is not None
    assert_absent(vault_key, "the pickled DoFn after setup", unpacked(pickler.dumps(dofn)))
    assert pickler.loads(pickler.dumps(dofn)).client is None

    # The options as shown in the job's page, and the pipeline graph a runner is sent.
    shown = repr(options.get_all_options()) + repr(options.display_data())
    assert_absent(vault_key, "the pipeline options", shown.encode())
    p = beam.Pipeline(options=options)
    _ = p | beam.Create(invoices(3)) | beam.ParDo(ChargeInvoice(options=options))
    proto = p.to_runner_api()
    assert_absent(vault_key, "the pipeline proto", proto.SerializeToString())
    payloads = 0
    for transform in proto.components.transforms.values():
        if transform.spec.urn == "beam:transform:pardo:v1":
            pardo = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            assert_absent(vault_key, "a ParDo's DoFn", unpacked(pardo.do_fn.payload))
            payloads += 1
    assert payloads >= 1

    # And the same pipeline spends, with the key read on the worker from the file.
    run(invoices(3), ChargeInvoice(options=options), tmp_path, options)
    assert len(read_lines(tmp_path, "charged")) == 3
    assert fake_stripe.charged_usd_micros() == spent(kb, key) == 3_000_000


def test_a_vault_key_handed_to_the_pipeline_is_refused() -> None:
    with pytest.raises(TypeError, match="key source, not the vault key"):
        ChargeInvoice("kbv_stripe_" + "A" * 43)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--keybrake_vault_key_file"):
        ChargeInvoice(options=KeybrakeOptions(["--keybrake_vault_key=kbv_stripe_x"]))
    assert isinstance(KeybrakeDoFn().key_source, FromEnv)
    env = ChargeInvoice(options=KeybrakeOptions(["--keybrake_vault_key_env=PIPELINE_KEY"]))
    assert repr(env.key_source) == "FromEnv('PIPELINE_KEY')"
    with pytest.raises(ValueError, match=r"\$PIPELINE_KEY is not set"):
        env.setup()


def test_a_refreshed_key_source_switches_keys_between_bundles(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """A streaming job's key per window: the file is rewritten with the next key; the next
    bundle's calls use it, and the first window's key can then be revoked."""
    kb = keybrake_stripe
    first = kb.issue_key(daily_usd_cap="10", agent_run_label="beam/window-1")
    second = kb.issue_key(daily_usd_cap="10", agent_run_label="beam/window-2")
    secret_file = tmp_path / "vault-key"
    secret_file.write_text(first["vault_key"])
    dofn = ChargeInvoice(from_file(secret_file), kb.admin_url, refresh_seconds=0, job_id="windows")
    dofn.setup()
    dofn.start_bundle()
    old_client = dofn.client
    assert len(list(dofn.process({"id": "inv_a", "cents": 100}))) == 1
    secret_file.write_text(second["vault_key"])
    dofn.start_bundle()
    assert dofn.client is not old_client
    assert kb.admin("DELETE", f"/vault/keys/{first['key_id']}").status_code == 200
    assert len(list(dofn.process({"id": "inv_b", "cents": 200}))) == 1
    assert spent(kb, first) == 1_000_000 and spent(kb, second) == 2_000_000
    assert fake_stripe.charged_usd_micros() == 3_000_000
    # Same key again: the client is kept (nothing rebuilt per bundle).
    current = dofn.client
    dofn.start_bundle()
    assert dofn.client is current
