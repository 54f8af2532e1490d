"""Shared set-up for the attacker's-eye tests: one fake Stripe and real ``keybrake run``
processes per module, on the embedded SQLite store and on the real Redis (each test issues
its own keys, so tests of one module share the processes without sharing budgets)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import stripe
from tests.conftest import REDIS_URL, KeybrakeProcess, audit_query, wait_for_rows
from tests.fakes import FakeStripe, FakeTLS

STORES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(scope="module")
def stripe_fake(fake_tls: FakeTLS) -> Iterator[FakeStripe]:
    with FakeStripe(fake_tls) as fake:
        yield fake


@pytest.fixture(scope="module")
def _proxies(
    tmp_path_factory: pytest.TempPathFactory,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    stripe_fake: FakeStripe,
) -> Iterator[dict[str, KeybrakeProcess]]:
    """Started on first use: a module whose tests need only SQLite never starts the other."""
    started: dict[str, KeybrakeProcess] = {}
    prefix = f"kbtest:{uuid.uuid4().hex[:10]}:"
    yield started
    for proc in started.values():
        proc.stop()
    client = redis.Redis.from_url(REDIS_URL)
    for k in client.scan_iter(f"{prefix}*", count=1000):
        client.delete(k)
    client.close()


def start_proxy(
    proxies: dict[str, KeybrakeProcess],
    backend: str,
    tmp_path_factory: pytest.TempPathFactory,
    certs: Path,
    tls: FakeTLS,
    fake: FakeStripe,
) -> KeybrakeProcess:
    if backend not in proxies:
        store = "" if backend == "sqlite" else f"{REDIS_URL}?prefix=kbtest:{uuid.uuid4().hex}:"
        workdir = tmp_path_factory.mktemp(f"kb-security-{backend}")
        proxies[backend] = KeybrakeProcess(
            workdir, certs, {"stripe": fake}, tls, store=store
        ).start()
    return proxies[backend]


@pytest.fixture(params=STORES)
def kb(
    request: pytest.FixtureRequest,
    _proxies: dict[str, KeybrakeProcess],
    tmp_path_factory: pytest.TempPathFactory,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    stripe_fake: FakeStripe,
) -> KeybrakeProcess:
    """The module's proxy on each store (SQLite, then the real Redis)."""
    stripe_fake.reset()
    return start_proxy(
        _proxies, request.param, tmp_path_factory, keybrake_certs, fake_tls, stripe_fake
    )


@pytest.fixture
def kb_sqlite(
    _proxies: dict[str, KeybrakeProcess],
    tmp_path_factory: pytest.TempPathFactory,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    stripe_fake: FakeStripe,
) -> KeybrakeProcess:
    """The module's proxy on the embedded store, for tests where the store does not matter."""
    stripe_fake.reset()
    return start_proxy(_proxies, "sqlite", tmp_path_factory, keybrake_certs, fake_tls, stripe_fake)


def sdk(kb: KeybrakeProcess, key: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real stripe SDK as a worker configures it: the vault key, the proxy, its CA."""
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    return stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)


def raw_post(
    kb: KeybrakeProcess,
    key: dict[str, Any],
    path: str,
    content: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> httpx.Response:
    """A hand-made request to api.stripe.com through the forward proxy (what an attacker who
    does not use the SDK sends)."""
    return httpx.request(
        method,
        f"https://api.stripe.com{path}",
        content=content,
        headers={"Authorization": f"Bearer {key['vault_key']}", **(headers or {})},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def key_detail(kb: KeybrakeProcess, key: dict[str, Any]) -> dict[str, Any]:
    r = kb.admin("GET", f"/vault/keys/{key['key_id']}")
    assert r.status_code == 200, r.text
    detail: dict[str, Any] = r.json()
    return detail


def counted_usd(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    """Today's spend of the key including what is reserved or held."""
    return str(key_detail(kb, key)["spent_today_usd"])


def audit_rows(kb: KeybrakeProcess, key: dict[str, Any], want: int) -> list[dict[str, Any]]:
    """The key's audit rows, oldest first, once at least ``want`` are written (fails after 15 s
    with fewer: a test that asks for more rows than its calls make is wrong)."""
    sql = f"SELECT * FROM audit WHERE key_id = '{key['key_id']}' ORDER BY id"
    return wait_for_rows(lambda: audit_query(kb.data_dir / "audit.db", sql), want)
