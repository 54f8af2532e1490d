"""Listeners an operator can place, through real ``keybrake run`` processes.

``--proxy-listen``, ``--base-url-listen`` and ``--admin-listen`` put the forward proxy, the
base-URL routes and the admin API on listeners of their own; a route asked of the wrong
listener is ``404 not_found`` (JSON); ``/healthz`` and ``/readyz`` answer on both, with no
token and no secret. An admin listener on a network address over plain HTTP is refused at
start unless ``--insecure-admin``, which is then warned about at every start.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import KEYBRAKE, KeybrakeProcess, free_port
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e


def refusal(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["X-Keybrake-Error"] == code
    assert r.json()["error"]["code"] == code


def data_args(tmp_path: Path, certs: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "d"), "--certs-dir", str(certs)]


def split(keybrake_factory: Any, fake_stripe: FakeStripe, **kw: Any) -> tuple[KeybrakeProcess, int]:
    base_port = free_port()
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        run_args=["--base-url-listen", f"127.0.0.1:{base_port}", *kw.pop("run_args", [])],
        **kw,
    )
    return kb, base_port


def test_admin_and_base_url_routes_on_their_own_listeners(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb, base_port = split(keybrake_factory, fake_stripe)
    base = f"http://127.0.0.1:{base_port}"
    key = kb.issue_key(daily_usd_cap="5")
    auth = {"Authorization": f"Bearer {kb.admin_token}"}

    # The base-URL listener spends through /stripe/…, and serves nothing of the admin side.
    client = stripe.StripeClient(key["vault_key"], base_addresses={"api": f"{base}/stripe"})
    pi = client.v1.payment_intents.create(
        params={"amount": 300, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}
    )
    assert pi.status == "succeeded"
    assert fake_stripe.charged_usd_micros() == 3_000_000
    for method, path in (
        ("GET", "/vault/keys"),
        ("POST", "/vault/keys"),
        ("POST", "/vault/revoke"),
        ("GET", "/metrics"),
        ("GET", "/"),
        ("GET", "/login"),
        ("GET", "/dashboard/keys"),
        ("GET", "/static/dashboard.css"),
    ):
        refusal(httpx.request(method, f"{base}{path}", headers=auth, timeout=10), 404, "not_found")

    # The admin listener serves no vendor route: nothing reaches the vendor from it.
    before = len(fake_stripe.ledger)
    r = httpx.post(
        f"{kb.admin_url}/stripe/v1/payment_intents",
        auth=(key["vault_key"], ""),
        data={"amount": "100", "currency": "usd"},
        timeout=10,
    )
    refusal(r, 404, "not_found")
    assert len(fake_stripe.ledger) == before
    assert kb.admin("GET", "/vault/keys").status_code == 200
    assert httpx.get(f"{kb.admin_url}/metrics", timeout=10).status_code == 200

    # Probes answer on both, without a token, and say nothing secret.
    for url in (kb.admin_url, base):
        for path in ("/healthz", "/readyz"):
            r = httpx.get(f"{url}{path}", timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "ok"
            for secret in (kb.admin_token, key["vault_key"], fake_stripe.secret):
                assert secret not in r.text
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    assert ready["checks"] == {"store": "ok", "policies": "ok", "audit": "ok", "clock": "ok"}
    assert key["vault_key"] not in kb.log() and kb.admin_token not in kb.log()


def test_proxy_listen_and_admin_listen_win_over_the_shorthand(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    proxy_port, admin_port = free_port(), free_port()
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        start=False,
        run_args=[
            "--proxy-listen",
            f"127.0.0.1:{proxy_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
        ],
    )
    kb.admin_port = admin_port  # what the probe reaches; --admin-port is overridden
    kb.start()
    assert kb.admin("GET", "/vault/keys").status_code == 200
    # Combined listener (no --base-url-listen): the base-URL routes are on the admin one.
    key = kb.issue_key(daily_usd_cap="5")
    r = httpx.post(
        f"http://127.0.0.1:{admin_port}/stripe/v1/payment_intents",
        auth=(key["vault_key"], ""),
        data={"amount": "100", "currency": "usd", "confirm": "true", "payment_method": "pm_x"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    # The forward proxy is where --proxy-listen put it (an egress refusal proves it answers).
    r = httpx.get("http://example.invalid/", proxy=f"http://127.0.0.1:{proxy_port}", timeout=10)
    refusal(r, 403, "egress_denied")
    assert f"forward proxy on 127.0.0.1:{proxy_port}" in kb.log()


def test_readyz_says_what_is_wrong_and_healthz_stays_up(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    """A store that cannot be reached: the process is up (``/healthz`` 200) but not ready
    (``/readyz`` 503 naming the store, without its password)."""
    dead = free_port()
    password = "readyz-Secret-Pw-81"
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        store=f"redis://:{password}@127.0.0.1:{dead}/0",
        run_args=["--wait-for-store"],
    )
    assert httpx.get(f"{kb.admin_url}/healthz", timeout=10).status_code == 200
    r = httpx.get(f"{kb.admin_url}/readyz", timeout=10)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["store"] != "ok" and str(dead) in body["checks"]["store"]
    assert body["checks"]["policies"] == "ok"
    assert password not in r.text and password not in kb.log()


def test_readyz_names_an_audit_log_that_cannot_be_written(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    """Another process holds the audit log's write lock: calls could not be audited, so the
    replica is not ready (``/readyz`` 503 naming the audit log) until the lock is gone."""
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    assert httpx.get(f"{kb.admin_url}/readyz", timeout=10).status_code == 200
    holder = sqlite3.connect(kb.data_dir / "audit.db", timeout=1, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        r = httpx.get(f"{kb.admin_url}/readyz", timeout=30)
        assert r.status_code == 503, r.text
        checks = r.json()["checks"]
        assert checks["audit"] != "ok" and checks["store"] == "ok", checks
        assert httpx.get(f"{kb.admin_url}/healthz", timeout=10).status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert httpx.get(f"{kb.admin_url}/readyz", timeout=30).status_code == 200


@pytest.mark.parametrize("flag", ["--admin-listen", "--listen-host"])
def test_admin_on_a_network_address_over_plain_http_is_refused(
    tmp_path: Path, keybrake_certs: Path, flag: str
) -> None:
    value = f"0.0.0.0:{free_port()}" if flag == "--admin-listen" else "0.0.0.0"
    run = subprocess.run(
        [str(KEYBRAKE), "run", flag, value, *data_args(tmp_path, keybrake_certs)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("Error: the admin listener 0.0.0.0:")
    assert "--insecure-admin" in run.stderr and "Traceback" not in run.stderr


def test_insecure_admin_starts_and_warns_at_every_start(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    admin_port = free_port()
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        start=False,
        run_args=["--admin-listen", f"0.0.0.0:{admin_port}", "--insecure-admin"],
    )
    kb.admin_port = admin_port
    for _ in range(2):
        kb.start()
        assert kb.admin("GET", "/vault/keys").status_code == 200
        kb.stop()
    log = kb.log()
    # The command line warns, and so does the addon (it would in `mitmdump -s` too).
    assert log.count("Warning: --insecure-admin: the admin listener 0.0.0.0:") == 2
    assert log.count("is not loopback and serves plain HTTP (--insecure-admin)") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base-url-listen", "8443"], "--base-url-listen: '8443': give host:port"),
        (["--admin-listen", "127.0.0.1:99999"], "--admin-listen: '127.0.0.1:99999': the port"),
        (["--proxy-listen", "::1:8080"], "--proxy-listen: '::1:8080': put an IPv6 address"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_bad_listener_flags_are_one_line(
    tmp_path: Path, keybrake_certs: Path, args: list[str], message: str
) -> None:
    run = subprocess.run(
        [str(KEYBRAKE), "run", *args, *data_args(tmp_path, keybrake_certs)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith(f"Error: {message}")
