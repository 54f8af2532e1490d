"""The addon works as a plain mitmproxy script, without ``keybrake run``.

``mitmdump -s addon/keybrake/addon.py`` with both listeners and Keybrake's options given as
``--set``: issue a key on the admin listener, then the unmodified stripe SDK creates a
PaymentIntent through the forward listener.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import ROOT, KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS

pytestmark = pytest.mark.e2e

MITMDUMP = Path(sys.executable).with_name("mitmdump")
SCRIPT = ROOT / "addon" / "keybrake" / "addon.py"


@pytest.fixture
def script_proxy(
    tmp_path: Path, keybrake_certs: Path, fake_tls: FakeTLS, fake_stripe: FakeStripe
) -> Iterator[KeybrakeProcess]:
    # KeybrakeProcess prepares the ports, the env and the policies (upstream -> the fake);
    # the process itself is started here as a bare mitmdump.
    kb = KeybrakeProcess(tmp_path, keybrake_certs, {"stripe": fake_stripe}, fake_tls)
    cmd = [
        str(MITMDUMP),
        "-s",
        str(SCRIPT),
        "--mode",
        f"regular@127.0.0.1:{kb.proxy_port}",
        "--mode",
        f"reverse:http://127.0.0.1:1@127.0.0.1:{kb.admin_port}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        f"confdir={keybrake_certs}",
        "--set",
        f"keybrake_data_dir={kb.data_dir}",
        "--set",
        f"keybrake_policies={kb.policies}",
    ]
    kb._log = kb.log_path.open("ab")
    kb.proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=kb.env, stdout=kb._log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while True:
        assert kb.proc.poll() is None, f"mitmdump exited:\n{kb.log()}"
        assert time.monotonic() < deadline, f"mitmdump did not start:\n{kb.log()}"
        try:
            if httpx.get(f"{kb.admin_url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield kb
    kb.stop()


def test_mitmdump_script_issue_key_and_stripe_create(
    script_proxy: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = script_proxy
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    key: dict[str, Any] = kb.issue_key(daily_usd_cap="25")
    assert key["vault_key"].startswith("kbv_stripe_")

    client = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    pi = client.v1.payment_intents.create(params={"amount": 1234, "currency": "usd"})
    assert pi.id.startswith("pi_") and pi.amount == 1234

    [entry] = fake_stripe.ledger
    assert entry.method == "POST" and entry.path == "/v1/payment_intents"
    assert entry.header("Authorization") == f"Bearer {fake_stripe.secret}"

    with pytest.raises(stripe.PermissionError) as e:
        client.v1.refunds.create(params={"payment_intent": pi.id})
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "endpoint_not_allowed"
    assert len(fake_stripe.ledger) == 1

    # The data dir option was honoured: the store lives there, the key is listed.
    assert (kb.data_dir / "keybrake.db").exists()
    listed = kb.admin("GET", "/vault/keys").json()["data"]
    assert [k["key_id"] for k in listed] == [key["key_id"]]
    log = kb.log()
    assert "Loading script" in log and str(SCRIPT) in log
    assert fake_stripe.secret not in log


def test_mitmdump_script_refuses_bad_policy_at_start(
    tmp_path: Path, keybrake_certs: Path, fake_tls: FakeTLS, fake_stripe: FakeStripe
) -> None:
    kb = KeybrakeProcess(tmp_path, keybrake_certs, {"stripe": fake_stripe}, fake_tls)
    bad = kb.policies / "stripe.yaml"
    bad.write_text(bad.read_text().replace("secret_env: STRIPE_SECRET_KEY", "secret_env: bad-name"))
    result = subprocess.run(
        [
            str(MITMDUMP),
            "-s",
            str(SCRIPT),
            "--mode",
            f"regular@127.0.0.1:{kb.proxy_port}",
            "--set",
            f"confdir={keybrake_certs}",
            "--set",
            f"keybrake_data_dir={kb.data_dir}",
            "--set",
            f"keybrake_policies={kb.policies}",
        ],
        cwd=tmp_path,
        env=kb.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(rf"{re.escape(str(bad))}:\d+: auth.secret_env: ", output), output


def test_mitmdump_script_bounds_buffered_bodies_without_a_body_size_limit(
    script_proxy: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    """No ``body_size_limit`` was given: the addon sets one, so a declared 20 MB upload is
    refused from its headers alone, before a byte of the body is read or buffered."""
    from tests.reliability.test_hostile import raw_request, tunnel

    kb = script_proxy
    vk = kb.issue_key()["vault_key"]
    sock = tunnel(kb)
    head = raw_request(vk, body=b"").replace(b"Content-Length: 0", b"Content-Length: 20000000")
    sock.sendall(head + b"a" * 1000)  # headers and a first kilobyte, never the rest
    sock.settimeout(10)
    data = sock.recv(65536)
    sock.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:300]
    assert fake_stripe.ledger == []


def test_mitmdump_script_refuses_stream_large_bodies_at_start(
    tmp_path: Path, keybrake_certs: Path, fake_tls: FakeTLS, fake_stripe: FakeStripe
) -> None:
    """Streamed request bodies would reach the vendor before any check: not allowed."""
    kb = KeybrakeProcess(tmp_path, keybrake_certs, {"stripe": fake_stripe}, fake_tls)
    result = subprocess.run(
        [
            str(MITMDUMP),
            "-s",
            str(SCRIPT),
            "--mode",
            f"regular@127.0.0.1:{kb.proxy_port}",
            "--set",
            f"confdir={keybrake_certs}",
            "--set",
            f"keybrake_data_dir={kb.data_dir}",
            "--set",
            f"keybrake_policies={kb.policies}",
            "--set",
            "stream_large_bodies=1k",
        ],
        cwd=tmp_path,
        env=kb.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "stream_large_bodies cannot be used with Keybrake" in output
