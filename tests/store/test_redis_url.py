"""Redis store URLs (``_redis_url.py``): parsing, redaction, and AUTH/ACL/TLS against private
redis-servers on loopback. The password must never show in a message, a log line or a repr."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
import traceback
import uuid
from collections.abc import Iterator

import pytest
from tests._redis import (
    KEYBRAKE_ACL_COMMANDS,
    KEYBRAKE_CLUSTER_ACL_COMMANDS,
    REDIS_ACL_PASSWORD,
    REDIS_ACL_USER,
    REDIS_ADMIN_PASSWORD,
    PrivateRedis,
    PrivateRedisCluster,
    RedisTLS,
    keybrake_acl,
)
from tests.store.conftest import USD, make_key

from keybrake.store import (
    PASSWORD_ENV,
    AdmissionRequest,
    RedisStore,
    Settlement,
    StoreUnavailable,
    open_store,
    redact_url,
    split_password,
)
from keybrake.store._redis_url import parse_redis_url

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
SECRET = "s3cret-Pa55"


def prefix() -> str:
    return f"kbtest:{uuid.uuid4().hex[:12]}:"


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://10.0.0.5", dict(host="10.0.0.5", port=6379, db=0, tls=False)),
        ("redis://:pw@h:6380/3", dict(host="h", port=6380, db=3, username=None, password="pw")),
        ("redis://kb:p%40ss%2Fw@h/0", dict(username="kb", password="p@ss/w")),
        ("redis://kb:p@ss@h/0", dict(username="kb", password="p@ss", host="h")),
        ("redis://[::1]:7000/1", dict(host="::1", port=7000, db=1)),
        ("redis://h/0?prefix=kb-prod:", dict(prefix="kb-prod:", url="redis://h/0")),
        ("rediss://h/0", dict(tls=True, verify=True, ca_certs=None)),
        ("rediss://h/0?ssl_cert_reqs=none", dict(tls=True, verify=False)),
        ("rediss://h/0?ssl_cert_reqs=REQUIRED", dict(verify=True)),
        ("rediss://u:pw@h/0?prefix=p:", dict(url="rediss://u:***@h/0", prefix="p:")),
        (
            "redis+cluster://kb:pw@10.0.0.5:7000,10.0.0.6,[::1]:7002/?prefix=p:",
            dict(
                cluster=True,
                nodes=(("10.0.0.5", 7000), ("10.0.0.6", 6379), ("::1", 7002)),
                host="10.0.0.5",
                port=7000,
                db=0,
                username="kb",
                password="pw",
                prefix="p:",
                url="redis+cluster://kb:***@10.0.0.5:7000,10.0.0.6,[::1]:7002/",
            ),
        ),
        ("redis+cluster://h:7000", dict(cluster=True, nodes=(("h", 7000),), tls=False)),
        ("rediss+cluster://h:7000/0?ssl_cert_reqs=none", dict(cluster=True, tls=True)),
        ("redis://h:7000", dict(cluster=False, nodes=())),
        ("redis://h/0", dict(audit_claim_idle_ms=30_000)),
        (
            "redis://h/0?audit_claim_idle_ms=5000&prefix=p:",
            dict(audit_claim_idle_ms=5000, url="redis://h/0?audit_claim_idle_ms=5000"),
        ),
    ],
)
def test_parse(url: str, expected: dict[str, object]) -> None:
    target = parse_redis_url(url)
    assert {name: getattr(target, name) for name in expected} == expected


def test_parse_tls_files(tmp_path: pathlib.Path) -> None:
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("")
    url = (
        f"rediss://h:6380/0?ssl_ca_certs={tmp_path}/ca.pem&ssl_certfile={tmp_path}/c.pem"
        f"&ssl_keyfile={tmp_path}/c.key&prefix=p:"
    )
    target = parse_redis_url(url)
    assert (target.ca_certs, target.certfile, target.keyfile) == (
        f"{tmp_path}/ca.pem",
        f"{tmp_path}/c.pem",
        f"{tmp_path}/c.key",
    )
    assert target.url == (
        f"rediss://h:6380/0?ssl_ca_certs={tmp_path}/ca.pem&ssl_certfile={tmp_path}/c.pem"
        f"&ssl_keyfile={tmp_path}/c.key"
    )


def test_password_sources() -> None:
    assert parse_redis_url("redis://h/0", password="env").password == "env"
    assert parse_redis_url("redis://:url@h/0", password="env").password == "url"  # URL wins
    assert parse_redis_url("redis://kb@h/0", password="env").username == "kb"
    assert parse_redis_url("redis://h/0", password="").password is None
    assert SECRET not in repr(parse_redis_url(f"redis://kb:{SECRET}@h/0"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"redis://h:6379/0?password={SECRET}", "unknown option 'password'"),
        (f"redis://h:6379/0?health_check_interval=5&x={SECRET}", "unknown option"),
        (f"redis://:{SECRET}@h/0?ssl_ca_certs=/etc/ssl/ca.pem", "need TLS: write rediss://"),
        (f"rediss://:{SECRET}@h/0?ssl_cert_reqs=optional", r"'required' \(default\) or 'none'"),
        (f"rediss://:{SECRET}@h/0?ssl_ca_certs=/nonexistent/ca.pem", "no such file"),
        (f"redis://:{SECRET}@h/zero", "database number"),
        (f"redis://:{SECRET}@h:port/0", "port must be a number"),
        (f"redis://:{SECRET}@/0", "name the Redis host"),
        (f"redis://:{SECRET[:4]}/{SECRET[4:]}@h:6379/0", "percent-encode"),
        ("redis://kb@h/0", f"no password: put it in the URL .* or in the {PASSWORD_ENV}"),
        (f"postgres://u:{SECRET}@h/db", "unsupported scheme"),
        (f"sqlite://u:{SECRET}@h/state.db", "has no host"),
        (f"redis+cluster://:{SECRET}@h:7000/1", "a Redis Cluster has database 0 only"),
        (f"redis+cluster://:{SECRET}@h:7000,h:x/0", "each node's port must be a number"),
        (f"redis+cluster://:{SECRET}@h:7000,/0", "name the cluster's nodes"),
        (f"redis+cluster://:{SECRET}@h:7000/0?prefix=kb:{{x}}:", r"may not contain \{ or \}"),
        (f"redis+cluster://:{SECRET}@h/0?ssl_ca_certs=/etc/ssl/ca.pem", "need TLS"),
        (f"redis://:{SECRET}@h/0?audit_claim_idle_ms=999", "from 1000 to 86400000"),
        (f"redis://:{SECRET}@h/0?audit_claim_idle_ms=86400001", "milliseconds from 1000"),
        (f"redis://:{SECRET}@h/0?audit_claim_idle_ms=5s", "whole number of milliseconds"),
        (f"redis://:{SECRET}@h/0?audit_claim_idle_ms=-5000", "whole number of milliseconds"),
    ],
)
def test_bad_urls_are_named_without_the_password(
    url: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ValueError, match=message) as e:
        open_store(url)
    assert "store URL" in str(e.value)
    for part in (SECRET, SECRET[:4], SECRET[4:]):
        assert part not in str(e.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"rediss://kb:{SECRET}@h:6380/0?prefix=p:", "rediss://kb:***@h:6380/0?prefix=p:"),
        ("redis://kb@h/0", "redis://kb@h/0"),
        (f"redis://:ab/{SECRET}@h/0", "redis://:***@h/0"),  # malformed: hides more, not less
        (f"redis://h/0?password={SECRET}&prefix=p:", "redis://h/0?password=***&prefix=p:"),
        ("sqlite:///data/kb.db", "sqlite:///data/kb.db"),
        (f"redis+cluster://kb:{SECRET}@h:1,h:2/0", "redis+cluster://kb:***@h:1,h:2/0"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "without", "password"),
    [
        ("redis://h:6379/0", "redis://h:6379/0", None),
        (f"redis://:{SECRET}@h:6379/0?prefix=p:", "redis://h:6379/0?prefix=p:", SECRET),
        ("rediss://kb:a%40b@[::1]:6380/0", "rediss://kb@[::1]:6380/0", "a@b"),
        ("sqlite:///x.db", "sqlite:///x.db", None),
        (f"redis+cluster://kb:{SECRET}@h:1,h:2/0", "redis+cluster://kb@h:1,h:2/0", SECRET),
        (f"rediss+cluster://:{SECRET}@h:1/0", "rediss+cluster://h:1/0", SECRET),
    ],
)
def test_split_password(url: str, without: str, password: str | None) -> None:
    assert split_password(url) == (without, password)


# -- AUTH and ACL against a private redis-server ------------------------------------------------


async def reserve_and_settle(store: RedisStore) -> None:
    """The smallest whole use of a store: open, create a key, reserve, settle, read back."""
    key = make_key(f"kb_{uuid.uuid4().hex[:8]}", daily=5 * USD)
    await store.open()
    try:
        await store.create_key(key)
        assert (await store.reserve(key, f"res_{key.key_id}", 2 * USD, NOON)).ok
        assert await store.settle(f"res_{key.key_id}", USD)
        (daily,) = await store.budgets(key, NOON)
        assert (daily.spent_micros, daily.reserved_micros) == (USD, 0)
    finally:
        await store.close()


def assert_no_password(text: str) -> None:
    for password in (REDIS_ACL_PASSWORD, REDIS_ADMIN_PASSWORD, SECRET):
        assert password not in text


async def test_acl_user_in_the_url(acl_redis: PrivateRedis) -> None:
    url = f"redis://{REDIS_ACL_USER}:{REDIS_ACL_PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    store = open_store(f"{url}?prefix={prefix()}")
    assert_no_password(repr(store) + store.url)
    assert isinstance(store, RedisStore)
    await reserve_and_settle(store)


async def test_default_user_password_in_the_url(acl_redis: PrivateRedis) -> None:
    store = open_store(f"redis://:{REDIS_ADMIN_PASSWORD}@127.0.0.1:{acl_redis.port}/0")
    assert isinstance(store, RedisStore)
    await reserve_and_settle(store)


async def test_password_from_the_environment(
    acl_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, REDIS_ACL_PASSWORD)
    store = open_store(f"redis://{REDIS_ACL_USER}@127.0.0.1:{acl_redis.port}/0?prefix={prefix()}")
    assert isinstance(store, RedisStore)
    await reserve_and_settle(store)


async def fails_closed(store: RedisStore, caplog: pytest.LogCaptureFixture) -> str:
    """Every store step refuses with `StoreUnavailable`; the message and the whole chained
    traceback, and anything logged meanwhile, are free of the password."""
    key = make_key("kb_never")
    with caplog.at_level(logging.DEBUG):
        for step in (store.open(), store.ping(), store.reserve(key, "res_x", USD, NOON)):
            with pytest.raises(StoreUnavailable) as e:
                await step
    await store.close()
    text = "".join(traceback.format_exception(e.value))
    assert_no_password(text + caplog.text + repr(store))
    return str(e.value)


@pytest.mark.parametrize(
    ("userinfo", "problem"),
    [
        (f"{REDIS_ACL_USER}:{SECRET}@", "check the Redis user and password"),  # ACL user
        (f":{SECRET}@", "invalid username-password pair"),  # default user
        ("", f"no password given: put it in the store URL or in {PASSWORD_ENV}"),
        (f"nobody:{REDIS_ACL_PASSWORD}@", "AuthenticationError"),  # no such user
    ],
)
async def test_wrong_or_missing_password_fails_closed(
    userinfo: str,
    problem: str,
    acl_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    store = open_store(f"redis://{userinfo}127.0.0.1:{acl_redis.port}/0?prefix={prefix()}")
    assert isinstance(store, RedisStore)
    message = await fails_closed(store, caplog)
    assert problem in message
    assert f"127.0.0.1:{acl_redis.port}" in message


async def test_acl_user_may_not_touch_other_keys(acl_redis: PrivateRedis) -> None:
    """The README's ACL: only keys under the prefix (here ``kbtest:*``)."""
    url = f"redis://{REDIS_ACL_USER}:{REDIS_ACL_PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    store = open_store(f"{url}?prefix=elsewhere:")
    assert isinstance(store, RedisStore)
    # open() creates the audit stream's consumer group under the prefix: refused at start,
    # with the same clear message, rather than at the first vendor call.
    with pytest.raises(StoreUnavailable, match=r"NoPermissionError: .* see README"):
        await store.open()
    with pytest.raises(StoreUnavailable, match=r"NoPermissionError: .* see README"):
        await store.get_key("kb_a")
    await store.close()


# -- TLS -------------------------------------------------------------------------------------


def tls_url(server: PrivateRedis, query: str) -> str:
    return f"rediss://{REDIS_ACL_USER}:{REDIS_ACL_PASSWORD}@127.0.0.1:{server.port}/0?{query}"


async def test_tls_with_client_certificate(tls_redis: PrivateRedis, redis_tls: RedisTLS) -> None:
    store = open_store(f"{tls_url(tls_redis, redis_tls.query())}&prefix={prefix()}")
    assert isinstance(store, RedisStore)
    assert_no_password(repr(store))
    await reserve_and_settle(store)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> RedisTLS:
    """Certificates of a CA the TLS servers do not know."""
    return RedisTLS.make(tmp_path_factory.mktemp("other-ca"))


async def test_tls_untrusted_server_fails_closed(
    tls_redis: PrivateRedis,
    redis_tls: RedisTLS,
    other_ca: RedisTLS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = open_store(tls_url(tls_redis, redis_tls.query(ca_pem=other_ca.ca_pem)))
    assert isinstance(store, RedisStore)
    assert "CERTIFICATE_VERIFY_FAILED" in await fails_closed(store, caplog)


async def test_tls_without_client_certificate_fails_closed(
    tls_redis: PrivateRedis, redis_tls: RedisTLS, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tls_url(tls_redis, redis_tls.query(client_cert=False)))
    assert isinstance(store, RedisStore)
    await fails_closed(store, caplog)


@pytest.fixture
def misnamed_tls_redis(tmp_path: pathlib.Path) -> Iterator[tuple[PrivateRedis, RedisTLS]]:
    """A TLS redis-server whose certificate names redis.internal, not 127.0.0.1."""
    certs = RedisTLS.make(tmp_path / "certs", server_names=("redis.internal",))
    server = PrivateRedis(tmp_path / "redis", tls=certs, tls_auth_clients="no")
    try:
        yield server.start(), certs
    finally:
        server.kill()


async def test_tls_checks_the_host_name(
    misnamed_tls_redis: tuple[PrivateRedis, RedisTLS], caplog: pytest.LogCaptureFixture
) -> None:
    server, certs = misnamed_tls_redis
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certs.ca_pem}&prefix={prefix()}"
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert "127.0.0.1" in await fails_closed(store, caplog)  # "IP address mismatch"


async def test_tls_unverified_only_when_asked_and_warned(
    misnamed_tls_redis: tuple[PrivateRedis, RedisTLS], caplog: pytest.LogCaptureFixture
) -> None:
    server, _certs = misnamed_tls_redis
    store = open_store(f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=none&prefix={prefix()}")
    assert isinstance(store, RedisStore)
    with caplog.at_level(logging.WARNING, logger="keybrake"):
        await reserve_and_settle(store)
        await store.open()
        await store.close()
    warnings = [r.getMessage() for r in caplog.records if "verification is off" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # once per store, not once per reconnect


def test_tls_files_that_do_not_load_are_named(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot load its TLS files"):
        open_store(f"rediss://:{SECRET}@127.0.0.1:6380/0?ssl_ca_certs={bad}")


def test_readme_gives_the_tested_acl() -> None:
    """The README's ``ACL SETUSER`` line is the one `acl_redis` runs the contract under."""
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    assert f"resetchannels {KEYBRAKE_ACL_COMMANDS}\n" in readme
    assert f"`{KEYBRAKE_CLUSTER_ACL_COMMANDS}`" in readme


async def test_acl_user_on_a_cluster(tmp_path: pathlib.Path) -> None:
    """The README's ACL plus `KEYBRAKE_CLUSTER_ACL_COMMANDS` on a Redis Cluster: admission,
    settlement, the outbox and the listings run; nothing but ``CONFIG GET`` is refused."""
    acl = keybrake_acl(REDIS_ACL_USER, REDIS_ACL_PASSWORD, "kbtest:*")
    cluster = PrivateRedisCluster(
        tmp_path / "cluster",
        replicas=0,
        password=REDIS_ADMIN_PASSWORD,
        users=[f"{acl} {KEYBRAKE_CLUSTER_ACL_COMMANDS}"],
    ).start()
    try:
        url = cluster.url.replace("://", f"://{REDIS_ACL_USER}:{REDIS_ACL_PASSWORD}@")
        store = open_store(f"{url}?prefix={prefix()}")
        await store.open()
        try:
            key = make_key("kb_a", label="team-1", daily=10 * USD)
            await store.create_key(key)
            admitted = await store.admit(
                AdmissionRequest("kb_a", NOON, reservation_id="res_1", estimate_micros=USD)
            )
            assert admitted.status == "admitted"
            settled = Settlement(
                "kb_a", "team-1", "stripe", NOON, reservation_id="res_1",
                ledger_rows=admitted.ledger_rows, finish="settled", actual_micros=USD,
                created=("pi_1",), audit={"n": 1},
            )  # fmt: skip
            assert await store.settle_call(settled)
            assert await store.object_owner("stripe", "pi_1") is not None
            assert [row for _, row in await store.audit_batch("c1", 10)] == [{"n": 1}]
            assert [k.key_id for k in await store.list_keys()] == ["kb_a"]
            assert await store.revoke_key("kb_a", NOON) is not None
        finally:
            await store.close()
        for node in cluster.nodes:
            refused = node.cli("ACL", "LOG").stdout.split()
            objects = {refused[i + 1] for i, w in enumerate(refused) if w == "object"}
            assert objects <= {"config|get"}, objects
    finally:
        cluster.kill()


async def test_tls_on_a_cluster(tmp_path: pathlib.Path, redis_tls: RedisTLS) -> None:
    """``rediss+cluster://``: every node, the cluster bus included, speaks TLS only; the
    store verifies each node against ``ssl_ca_certs`` and shows its client certificate."""
    cluster = PrivateRedisCluster(tmp_path / "cluster", replicas=0, tls=redis_tls).start()
    try:
        store = open_store(f"{cluster.url}?{redis_tls.query()}&prefix={prefix()}")
        await store.open()
        try:
            await store.create_key(make_key("kb_a", label="team-1"))
            admitted = await store.admit(
                AdmissionRequest("kb_a", NOON, reservation_id="res_1", estimate_micros=USD)
            )
            assert admitted.status == "admitted"
        finally:
            await store.close()
        other_ca = RedisTLS.make(tmp_path / "other-ca")
        untrusted = open_store(f"{cluster.url}?{redis_tls.query(ca_pem=other_ca.ca_pem)}")
        with pytest.raises(StoreUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await untrusted.open()
        await untrusted.close()
    finally:
        cluster.kill()
