"""End to end: a real ``keybrake run`` on a Redis that wants a password (ACL user) and TLS.

The password works from the store URL and from ``KEYBRAKE_STORE_PASSWORD``, and never shows
in the proxy's log (start banner included), ``/readyz``, the dashboard or, when given by
environment, the process's arguments. A wrong or missing password, or a Redis certificate
from an unknown CA, fails closed: ``503 store_unavailable``, nothing reaches the vendor.
The private redis-servers (`acl_redis`, `tls_redis`) come from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests._redis import (
    REDIS_ACL_PASSWORD,
    REDIS_ACL_USER,
    REDIS_ADMIN_PASSWORD,
    PrivateRedis,
    RedisTLS,
)
from tests.conftest import KEYBRAKE, ROOT, KeybrakeProcess
from tests.fakes import FakeStripe

from keybrake.store import PASSWORD_ENV

pytestmark = pytest.mark.e2e

WRONG_PASSWORD = "kb-wrong-" + "9b1c7e44d2"
PASSWORDS = (REDIS_ACL_PASSWORD, REDIS_ADMIN_PASSWORD, WRONG_PASSWORD)


def prefix() -> str:
    return f"kbtest:{uuid.uuid4().hex[:12]}:"


def acl_url(server: PrivateRedis, password: str | None = None, query: str = "") -> str:
    """``redis[s]://keybrake[:password]@127.0.0.1:port/0?prefix=…[&query]``."""
    userinfo = REDIS_ACL_USER if password is None else f"{REDIS_ACL_USER}:{password}"
    scheme = "rediss" if server.tls else "redis"
    url = f"{scheme}://{userinfo}@127.0.0.1:{server.port}/0?prefix={prefix()}"
    return f"{url}&{query}" if query else url


def assert_no_password(where: str, text: str) -> None:
    for password in PASSWORDS:
        assert password not in text, f"a Redis password in {where}"


def sdk(kb: KeybrakeProcess, vault_key: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    return stripe.StripeClient(vault_key, proxy=kb.proxy_url, max_network_retries=0)


def dashboard_html(kb: KeybrakeProcess) -> str:
    """The dashboard's front page, with its store tile (and the store's error when it is
    down), after signing in with the admin token through the login form."""
    with httpx.Client(base_url=kb.admin_url, timeout=10, follow_redirects=True) as client:
        signed_in = client.post("/login", data={"token": kb.admin_token})
        assert signed_in.status_code == 200, signed_in.text
        page = client.get("/")
        assert page.status_code == 200, page.text
        assert 'id="tile-store"' in page.text
        return page.text


def process_arguments(pid: int) -> str:
    """What ``ps`` shows of a process (every user on the host may look)."""
    ps = subprocess.run(
        ["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=True
    )
    return ps.stdout + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def issue_key(kb: KeybrakeProcess, store: str, password: str) -> str:
    """A vault key written straight into the store with ``keybrake keys issue`` (the proxy
    under test may not be able to reach the store at all)."""
    proc = subprocess.run(
        [
            str(KEYBRAKE),
            *("keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "5"),
            *("--allow", "POST /v1/payment_intents", "--label", "security/store-credentials"),
            *("--policies", str(kb.policies), "--store", store, "--json"),
        ],
        env={**os.environ, PASSWORD_ENV: password},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_password("keybrake keys issue output", proc.stdout + proc.stderr)
    return str(json.loads(proc.stdout)["vault_key"])


def pay(kb: KeybrakeProcess, vault_key: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    return sdk(kb, vault_key, monkeypatch).v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "confirm": True,
            "payment_method": "pm_card_visa",
        }
    )


def assert_refused_as_store_unavailable(
    kb: KeybrakeProcess, fake_stripe: FakeStripe, vault_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(stripe.StripeError) as e:
        pay(kb, vault_key, monkeypatch)
    assert e.value.http_status == 503
    body: Any = e.value.json_body
    assert body["error"]["code"] == "store_unavailable"
    assert fake_stripe.ledger == []  # nothing reached the vendor
    health = httpx.get(f"{kb.admin_url}/readyz", timeout=10)
    assert health.status_code == 503
    assert_no_password("/readyz", health.text)


# -- the password works and stays secret ----------------------------------------------------------


def test_tls_and_acl_password_from_environment(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    tls_redis: PrivateRedis,
    redis_tls: RedisTLS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = acl_url(tls_redis, query=redis_tls.query())
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=store, env={PASSWORD_ENV: REDIS_ACL_PASSWORD}
    )
    key = kb.issue_key(daily_usd_cap=50)
    pi = pay(kb, key["vault_key"], monkeypatch)
    assert pi.status == "succeeded"
    assert len(fake_stripe.ledger) == 1

    health = httpx.get(f"{kb.admin_url}/readyz", timeout=10)
    assert health.status_code == 200, health.text
    html = dashboard_html(kb)
    assert f"rediss 127.0.0.1:{tls_redis.port}/0" in html  # the store is shown, its secret not
    assert kb.proc is not None
    arguments = process_arguments(kb.proc.pid)
    assert "--store rediss://keybrake@127.0.0.1" in arguments
    log = kb.log()
    assert f"(password: from {PASSWORD_ENV})" in log  # the start banner
    for where, text in [
        ("/readyz", health.text),
        ("the dashboard", html),
        ("the process arguments", arguments),
        ("the proxy log", log),
    ]:
        assert_no_password(where, text)


def test_password_in_the_url_is_kept_out_of_logs_and_pages(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    acl_redis: PrivateRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        store=acl_url(acl_redis, REDIS_ACL_PASSWORD),
        # mitmproxy's own debug logging too, and its option dump on request.
        extra_args=["--set", "termlog_verbosity=debug"],
    )
    key = kb.issue_key(daily_usd_cap=50)
    assert pay(kb, key["vault_key"], monkeypatch).status == "succeeded"
    assert len(fake_stripe.ledger) == 1
    health = httpx.get(f"{kb.admin_url}/readyz", timeout=10)
    assert health.status_code == 200
    log = kb.log()
    assert "Store: redis://keybrake@127.0.0.1" in log
    assert "(password: from the store URL)" in log
    assert_no_password("the proxy log", log)
    assert_no_password("/readyz", health.text)
    assert_no_password("the dashboard", dashboard_html(kb))


# -- fail closed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["wrong", "missing"])
def test_wrong_or_missing_password_fails_closed(
    given: str,
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    acl_redis: PrivateRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    good = acl_url(acl_redis)
    bad = good.replace(f"{REDIS_ACL_USER}@", f"{REDIS_ACL_USER}:{WRONG_PASSWORD}@")
    if given == "missing":
        bad = good.replace(f"{REDIS_ACL_USER}@", "")
    # Started anyway (as a supervisor would): `keybrake run` otherwise stops at start.
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=bad, env={"KEYBRAKE_WAIT_FOR_STORE": "1"}, start=False
    )
    vault_key = issue_key(kb, good, REDIS_ACL_PASSWORD)  # the key exists in Redis
    kb.start()
    assert_refused_as_store_unavailable(kb, fake_stripe, vault_key, monkeypatch)
    html = dashboard_html(kb)
    assert "AuthenticationError" in html  # the down store's error, as on the tile
    assert_no_password("the dashboard", html)
    log = kb.log()
    assert "store unavailable" in log
    assert "AuthenticationError" in log
    expected = "check the Redis user and password" if given == "wrong" else "no password given"
    assert expected in log
    assert_no_password("the proxy log", log)


def test_tls_with_an_untrusted_certificate_fails_closed(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    tls_redis: PrivateRedis,
    redis_tls: RedisTLS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = RedisTLS.make(tmp_path / "other-ca")
    good = acl_url(tls_redis, query=redis_tls.query())
    untrusting = good.replace(str(redis_tls.ca_pem), str(other.ca_pem))
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe},
        store=untrusting,
        env={PASSWORD_ENV: REDIS_ACL_PASSWORD, "KEYBRAKE_WAIT_FOR_STORE": "1"},
        start=False,
    )
    vault_key = issue_key(kb, good, REDIS_ACL_PASSWORD)
    kb.start()
    assert_refused_as_store_unavailable(kb, fake_stripe, vault_key, monkeypatch)
    log = kb.log()
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert_no_password("the proxy log", log)


def test_mitmproxy_options_never_hold_the_password(
    keybrake_certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keybrake run`` hands the password over by environment: the ``keybrake_store``
    option (value and default), which mitmweb shows and ``--options`` dumps, has none."""
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    env = {**os.environ, "KEYBRAKE_STORE": f"redis://keybrake:{REDIS_ACL_PASSWORD}@127.0.0.1:1/0"}
    dump = subprocess.run(
        [
            str(KEYBRAKE),
            *("run", "--data-dir", str(tmp_path / "data"), "--certs-dir", str(keybrake_certs)),
            *("--policies", str(ROOT / "policies"), "--", "--options"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert dump.returncode == 0, dump.stderr
    assert "keybrake_store: redis://keybrake@127.0.0.1:1/0" in dump.stdout
    assert_no_password("mitmdump --options", dump.stdout + dump.stderr)
