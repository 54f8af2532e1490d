"""Shared fixtures: fake vendors over real TLS and real ``keybrake run`` proxy processes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests._ports import free_port
from tests._redis import (
    REDIS_ACL_PASSWORD,
    REDIS_ACL_USER,
    REDIS_ADMIN_PASSWORD,
    PrivateRedis,
    RedisTLS,
    keybrake_acl,
)
from tests._secrets import check_proxy_env, scan_texts, scan_tree
from tests.fakes import FakeResend, FakeStripe, FakeTLS, FakeTwilio, FakeVendor, make_fake_ca
from tests.netns import Netns, http_get

ROOT = Path(__file__).resolve().parent.parent
KEYBRAKE = Path(sys.executable).with_name("keybrake")
REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Scan everything the whole run left on disk for real secrets; any hit fails the run.

    Runs once, in the controller (xdist workers' temp dirs live under its base temp dir).
    """
    config = session.config
    if hasattr(config, "workerinput") or not hasattr(config, "_tmp_path_factory"):
        return
    root = config._tmp_path_factory.getbasetemp()
    result = scan_tree(root)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    line = (
        f"secrets scan: {result.files} files, {result.bytes / 1e6:.1f} MB under {root}: "
        f"{len(result.hits)} hit(s)"
    )
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("-", line, red=bool(result.hits), green=not result.hits)
        for hit in result.hits:
            reporter.write_line(f"  {hit}", red=True)
    if result.hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@functools.lru_cache(maxsize=8)
def _client_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


@pytest.fixture(scope="session")
def fake_tls(tmp_path_factory: pytest.TempPathFactory) -> FakeTLS:
    return make_fake_ca(tmp_path_factory.mktemp("fake-ca"))


@pytest.fixture(scope="session")
def keybrake_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Keybrake CA per test session (creating RSA keys is slow)."""
    from keybrake.proxy.ca import ensure_ca

    d = tmp_path_factory.mktemp("keybrake-certs")
    ensure_ca(d)
    return d


@pytest.fixture
def fake_stripe(fake_tls: FakeTLS) -> Iterator[FakeStripe]:
    with FakeStripe(fake_tls) as fake:
        yield fake


@pytest.fixture
def fake_twilio(fake_tls: FakeTLS) -> Iterator[FakeTwilio]:
    with FakeTwilio(fake_tls) as fake:
        yield fake


@pytest.fixture
def fake_resend(fake_tls: FakeTLS) -> Iterator[FakeResend]:
    with FakeResend(fake_tls) as fake:
        yield fake


class _PortTaken(RuntimeError):
    """The proxy could not bind a port that ``free_port`` had found free."""


class KeybrakeProcess:
    """A real ``keybrake run`` subprocess with its own data dir, ports and policies."""

    def __init__(
        self,
        workdir: Path,
        certs: Path,
        fakes: dict[str, FakeVendor],
        tls: FakeTLS,
        store: str = "",
        env: dict[str, str] | None = None,
        policies_src: Path | None = None,
        data_dir: Path | None = None,
        extra_args: list[str] | None = None,
        netns: Netns | None = None,
        run_args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.certs = certs
        self.bundle = certs / "keybrake-ca-bundle.pem"
        self.data_dir = data_dir or workdir / "data"
        self.policies = workdir / "policies"
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.store = store
        # Extra mitmproxy arguments passed after ``--``, e.g. ``["--set", "keybrake_audit=…"]``.
        self.extra_args = list(extra_args or [])
        # Extra ``keybrake run`` flags (before ``--``), e.g. ``["--base-url-listen", …]``.
        self.run_args = list(run_args or [])
        # How the admin listener is reached: https when the run flags give it TLS; ``verify``
        # is what httpx trusts for it (a CA file or an `ssl.SSLContext`).
        with_tls = {"--tls-cert", "--tls-name"} & set(self.run_args)
        self.admin_scheme = "https" if with_tls else "http"
        self.admin_verify: Any = True
        # Run the proxy inside this network namespace (``ip netns exec``); its listeners are
        # then on that namespace's loopback, reached with ``netns.connect``.
        self.netns = netns
        self.log_path = workdir / f"proxy-{uuid.uuid4().hex[:6]}.log"
        self.admin_token = f"kba_test_{uuid.uuid4().hex}"
        self.fakes = fakes
        self._write_policies(policies_src or ROOT / "policies", tls)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in {"https_proxy", "http_proxy", "all_proxy", "no_proxy"}
        }
        self.env.update(
            {
                "KEYBRAKE_ADMIN_TOKEN": self.admin_token,
                "PYTHONUNBUFFERED": "1",
                **self.vendor_env(),
                **(env or {}),
            }
        )
        check_proxy_env({**self.vendor_env(), **(env or {})})  # not the inherited environment
        self.proc: subprocess.Popen[bytes] | None = None

    def vendor_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for fake in self.fakes.values():
            out.update(fake.env())
        return out

    def _write_policies(self, src: Path, tls: FakeTLS) -> None:
        if self.policies.exists():
            shutil.rmtree(self.policies)
        self.policies.mkdir(parents=True)
        for f in sorted(src.glob("*.yaml")):
            data = yaml.safe_load(f.read_text())
            fake = self.fakes.get(data["vendor"])
            if fake is not None:
                data["upstream"] = {"url": fake.url, "ca_file": str(tls.ca_pem)}
            (self.policies / f.name).write_text(yaml.safe_dump(data, sort_keys=False))

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting the Keybrake CA bundle (what workers configure).

        Shared by every caller (parsing the bundle, certifi's roots plus the Keybrake CA,
        costs ~50 ms of CPU): do not modify it; build your own to change ALPN or the like.
        """
        return _client_context(str(self.bundle))

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"{self.admin_scheme}://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30) -> KeybrakeProcess:
        """Start the proxy and wait for ``/healthz``.

        ``free_port`` only finds a port that was free a moment ago: when another process took
        it in between, the proxy exits with "address already in use" and is started again on
        new ports (a restart keeps its ports whenever they are still free).
        """
        for attempt in range(4):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if attempt == 3:
                    raise
                self.proxy_port, self.admin_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> KeybrakeProcess:
        cmd = [
            *(self.netns.exec_prefix() if self.netns is not None else []),
            str(KEYBRAKE),
            "run",
            "--proxy-port",
            str(self.proxy_port),
            "--admin-port",
            str(self.admin_port),
            "--data-dir",
            str(self.data_dir),
            "--policies",
            str(self.policies),
            "--certs-dir",
            str(self.certs),
        ]
        if self.store:
            cmd += ["--store", self.store]
        cmd += self.run_args
        if self.extra_args:
            cmd += ["--", *self.extra_args]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, log = self.proc.returncode, self.log()
                self.stop()
                if "address already in use" in log.rsplit("Loading script", 1)[-1]:
                    raise _PortTaken(log)
                raise RuntimeError(f"keybrake exited {rc}:\n{log}")
            try:
                if self._healthz_status() in (200, 503) and self._proxy_listening():
                    return self
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)  # never leave a half-started proxy behind
        raise RuntimeError(f"keybrake did not start in {timeout}s:\n{self.log()}")

    def _proxy_listening(self) -> bool:
        """The forward proxy's port accepts connections too (mitmproxy opens its listeners one
        by one: the admin listener can answer before the proxy's is open)."""
        if self.netns is not None or "--proxy-listen" in self.run_args:
            return True  # elsewhere: the test probes it itself
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.proxy_port)) == 0

    def _healthz_status(self) -> int:
        if self.netns is not None:
            return http_get(self.netns, "127.0.0.1", self.admin_port, "/healthz", timeout=1)[0]
        return httpx.get(
            f"{self.admin_url}/healthz", timeout=1, verify=self.admin_verify
        ).status_code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- admin API helpers ---------------------------------------------------------------------
    def admin(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token if token is not None else self.admin_token}"}
        return httpx.request(
            method,
            f"{self.admin_url}{path}",
            headers=headers,
            content=json.dumps(body) if body is not None else None,
            timeout=10,
            verify=self.admin_verify,
        )

    def issue_key(self, **fields: Any) -> dict[str, Any]:
        body = {
            "vendor": "stripe",
            "daily_usd_cap": 300,
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "expires_in": "2h",
            "agent_run_label": "test/run",
        }
        body.update(fields)
        r = self.admin("POST", "/vault/keys", body)
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    def count_requests(self, method: str, path: str) -> int:
        """Requests for ``method path`` the proxy logged (mitmdump prints one line each)."""
        needle = f"{method} "
        return sum(
            1
            for line in self.log().splitlines()
            if needle in line and line.rstrip().split("?")[0].endswith(path)
        )


@pytest.fixture
def keybrake_factory(tmp_path: Path, keybrake_certs: Path, fake_tls: FakeTLS) -> Iterator[Any]:
    started: list[KeybrakeProcess] = []

    def make(fakes: dict[str, FakeVendor], start: bool = True, **kw: Any) -> KeybrakeProcess:
        workdir = tmp_path / f"kb{len(started)}"
        workdir.mkdir(exist_ok=True)
        kb = KeybrakeProcess(workdir, keybrake_certs, fakes, fake_tls, **kw)
        started.append(kb)
        return kb.start() if start else kb

    yield make
    for kb in started:
        kb.stop()


@pytest.fixture
def keybrake_stripe(keybrake_factory: Any, fake_stripe: FakeStripe) -> KeybrakeProcess:
    """A proxy on the embedded SQLite store with Stripe pointed at the fake."""
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    return kb


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the real Redis, deleted afterwards."""
    import redis

    prefix = f"kbtest:{uuid.uuid4().hex[:10]}:"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    hits: list[str] = []
    for k in r.scan_iter(f"{prefix}*", count=1000):
        hits += scan_texts(f"redis key {k!r}", [k, *_redis_values(r, k)])
        r.delete(k)
    r.close()
    assert not hits, f"real secrets written to Redis: {hits}"


def _redis_values(r: Any, key: bytes) -> list[bytes]:
    kind = r.type(key)
    if kind == b"string":
        return [r.get(key) or b""]
    if kind == b"hash":
        return [b for kv in r.hgetall(key).items() for b in kv]
    if kind == b"zset":
        return list(r.zrange(key, 0, -1))
    if kind == b"set":
        return list(r.smembers(key))
    if kind == b"list":
        return list(r.lrange(key, 0, -1))
    return [r.dump(key) or b""]


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> RedisTLS:
    """Certificates for TLS Redis: a CA, a server (127.0.0.1, localhost) and a client."""
    return RedisTLS.make(tmp_path_factory.mktemp("redis-tls"))


def _private_redis(directory: Path, tls: RedisTLS | None = None) -> PrivateRedis:
    return PrivateRedis(
        directory,
        password=REDIS_ADMIN_PASSWORD,
        users=[keybrake_acl(REDIS_ACL_USER, REDIS_ACL_PASSWORD, "kbtest:*")],
        tls=tls,
    ).start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A throw-away redis-server of this test's own on a free port (nothing persisted, no
    password), stopped afterwards: for tests that stop, restart or reconfigure Redis."""
    directory = tmp_path / "redis"
    directory.mkdir()
    r = PrivateRedis(directory).start()
    try:
        yield r
    finally:
        r.kill()


@pytest.fixture(scope="session")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A private redis-server with AUTH: the default user has `REDIS_ADMIN_PASSWORD`; the
    ACL user ``keybrake`` (`REDIS_ACL_PASSWORD`) may run only the README's commands, on keys
    ``kbtest:*`` (so use ``?prefix=kbtest:…``)."""
    r = _private_redis(tmp_path_factory.mktemp("acl-redis"))
    try:
        yield r
    finally:
        r.kill()


@pytest.fixture(scope="session")
def tls_redis(
    tmp_path_factory: pytest.TempPathFactory, redis_tls: RedisTLS
) -> Iterator[PrivateRedis]:
    """`acl_redis` over TLS only (``rediss://``), client certificates required."""
    r = _private_redis(tmp_path_factory.mktemp("tls-redis"), redis_tls)
    try:
        yield r
    finally:
        r.kill()


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the real PostgreSQL (dropped afterwards), as an audit URL whose
    connections use it first: the audit sink's ``audit`` table lands there."""
    import psycopg

    schema = f"kbtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    hits: list[str] = []
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            tables = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            ).fetchall()
            for (table,) in tables:
                rows = conn.execute(f'SELECT t::text FROM {schema}."{table}" t').fetchall()
                hits += scan_texts(f"postgres {schema}.{table}", [r[0] for r in rows])
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    assert not hits, f"real secrets written to PostgreSQL: {hits}"


@pytest.fixture
def postgres_audit_url() -> Iterator[str]:
    """An audit URL (``postgresql://…``) with a schema of its own, dropped afterwards."""
    with postgres_schema() as url:
        yield url


def wait_for_rows(
    read: Callable[[], list[dict[str, Any]]],
    want: int,
    *,
    seconds: float = 15,
    done: Callable[[list[dict[str, Any]]], bool] = lambda rows: True,
) -> list[dict[str, Any]]:
    """``read()`` again until it gives at least ``want`` rows (and ``done(rows)`` holds), then
    those rows. Fails after ``seconds`` with the rows' outcomes: audit rows land after the
    answer on some paths, but a test that sees fewer than its calls make must fail, and say
    what it saw, not hand its caller the short list at the deadline."""
    deadline = time.monotonic() + seconds
    while True:
        rows = read()
        if len(rows) >= want and done(rows):
            return rows
        if time.monotonic() > deadline:
            seen = [(r.get("outcome"), r.get("vendor_request_id")) for r in rows]
            raise AssertionError(
                f"{len(rows)} rows after {seconds:g} s, waiting for {want}"
                f"{'' if len(rows) < want else ' and the rows asked for'}: {seen}"
            )
        time.sleep(0.1)


def audit_query(source: Path | str, sql: str = "SELECT * FROM audit ORDER BY id") -> list[Any]:
    """Rows (dicts) of an audit sink as a report reader sees them: ``source`` is the SQLite
    file (``<data dir>/audit.db``) or a ``postgresql://`` URL. Missing table → no rows."""
    if isinstance(source, str) and source.startswith("postgresql://"):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(source, autocommit=True, row_factory=dict_row) as conn:
            exists = conn.execute("SELECT to_regclass('audit') IS NOT NULL AS ok").fetchone()
            if not exists or not exists["ok"]:
                return []
            return list(conn.execute(sql).fetchall())
    import sqlite3

    path = Path(source)
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone():
            return []
        return [dict(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()
