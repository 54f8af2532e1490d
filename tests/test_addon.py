"""Tier-2 tests: the real Core, AdminApi and VaultGuard addons in ``taddons.context()``.

The addons run with the shipped ``policies/``, a real SQLite store in a temporary data dir and
flows built with ``tflow``/``tutils``. Hooks are awaited directly (not through mitmproxy's
``safecall``) so any exception a hook raised would fail the test.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib.util
import json
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, flow, hooks, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils
from tests.conftest import ROOT

from keybrake.core.keys import generate_vault_key, hash_vault_key
from keybrake.proxy.calls import CallState, call_of
from keybrake.proxy.core import Core, Runtime
from keybrake.proxy.credentials import REDACTED
from keybrake.proxy.egress import Egress, VendorPin
from keybrake.proxy.guard import VaultGuard
from keybrake.store import KeyRecord, Store
from keybrake.web.admin import AdminApi

POLICIES = ROOT / "policies"
SECRET = "sk_test_addonSecret0123456789abcdef"
ADMIN_TOKEN = "kba_addon_test_token"
ADMIN_MODE = "reverse:http://127.0.0.1:1@8081"
ALLOW = [
    "POST /v1/payment_intents",
    "POST /v1/payment_intents/{id}/confirm",
    "GET /v1/payment_intents/{id}",
]
FORM = "application/x-www-form-urlencoded"


@dataclass
class Proxy:
    """The three Keybrake addons loaded in one taddons context."""

    tctx: taddons.context
    runtime: Runtime
    core: Core
    admin: AdminApi
    guard: VaultGuard
    data_dir: Path

    async def send(self, f: http.HTTPFlow) -> http.HTTPFlow:
        """The request hook of every Keybrake addon, in chain order."""
        for addon in (self.core, self.admin, self.guard):
            await self.tctx.master.addons.invoke_addon(addon, HttpRequestHook(f))
        return f

    async def respond(self, f: http.HTTPFlow, resp: http.Response) -> http.HTTPFlow:
        f.response = resp
        for event in (HttpResponseHeadersHook(f), HttpResponseHook(f)):
            for addon in (self.core, self.admin, self.guard):
                await self.tctx.master.addons.invoke_addon(addon, event)
        return f

    async def fail(self, f: http.HTTPFlow, message: str) -> http.HTTPFlow:
        f.error = flow.Error(message)
        for addon in (self.core, self.admin, self.guard):
            await self.tctx.master.addons.invoke_addon(addon, HttpErrorHook(f))
        return f

    async def admin_call(
        self, method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN
    ) -> http.Response:
        f = await self.send(admin_flow(method, path, body, token))
        assert f.response is not None
        return f.response

    async def issue(self, **fields: Any) -> dict[str, Any]:
        body = {
            "vendor": "stripe",
            "daily_usd_cap": 300,
            "allowed_endpoints": ALLOW,
            "expires_in": "2h",
            "agent_run_label": "addon/test",
            **fields,
        }
        r = await self.admin_call("POST", "/vault/keys", body)
        assert r.status_code == 201, r.text
        data: dict[str, Any] = json.loads(r.content or b"")
        return data

    async def store(self) -> Store:
        return await self.runtime.open_store()


def vendor_flow(
    method: str = "POST",
    path: str = "/v1/payment_intents",
    *,
    auth: str | list[str] | None = None,
    body: bytes = b"amount=100&currency=usd",
    host: str = "api.stripe.com",
    host_header: str | None = None,
    sni: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> http.HTTPFlow:
    """A forward-proxy flow as mitmproxy hands it over after decrypting the CONNECT tunnel."""
    headers: list[tuple[bytes, bytes]] = [(b"Host", (host_header or host).encode())]
    for a in [auth] if isinstance(auth, str) else auth or []:
        headers.append((b"Authorization", a.encode("utf-8", "surrogateescape")))
    headers.append((b"Content-Type", FORM.encode()))
    for k, v in extra or []:
        headers.append((k.encode(), v.encode()))
    req = tutils.treq(
        method=method.encode(),
        scheme=b"https",
        host=host,
        port=443,
        path=path.encode("utf-8", "surrogateescape"),
        headers=http.Headers(headers),
        content=body,
    )
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse("regular")
    f.client_conn.sni = sni or host
    return f


def bearer(key: str) -> str:
    return f"Bearer {key}"


def admin_flow(
    method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN
) -> http.HTTPFlow:
    headers = [(b"Host", b"127.0.0.1:8081"), (b"Content-Type", b"application/json")]
    if token is not None:
        headers.append((b"Authorization", f"Bearer {token}".encode()))
    content = (
        b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    )
    req = tutils.treq(
        method=method.encode(),
        scheme=b"http",
        host="127.0.0.1",
        port=1,
        path=path.encode(),
        headers=http.Headers(headers),
        content=content,
    )
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = ProxyMode.parse(ADMIN_MODE)
    f.client_conn.sni = None
    return f


def refusal(f: http.HTTPFlow, status: int, code: str) -> dict[str, Any]:
    """Assert the error contract (DESIGN §3) and return the error object."""
    r = f.response
    assert r is not None, "expected a refusal, the flow would have been forwarded"
    body = json.loads(r.content or b"")
    assert (r.status_code, body["error"]["code"]) == (status, code), body
    assert body["error"]["type"] == "keybrake_error"
    assert body["error"]["message"]
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["X-Keybrake-Error"] == code
    assert r.headers["Stripe-Should-Retry"] == "false"
    assert r.headers["x-should-retry"] == "false"
    assert "Retry-After" not in r.headers
    assert SECRET not in r.text
    # Nothing the flow still carries shows a credential.
    assert SECRET not in str(f.request.headers)
    if "authorization" in f.request.headers:
        assert f.request.headers["authorization"] == REDACTED
    error: dict[str, Any] = body["error"]
    return error


def forwarded(f: http.HTTPFlow) -> CallState:
    assert f.response is None, f.response and f.response.text
    call = call_of(f)
    assert isinstance(call, CallState) and call.outcome == "forwarded"
    return call


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("STRIPE_SECRET_KEY", SECRET)
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", ADMIN_TOKEN)
    for name in ("KEYBRAKE_DATA_DIR", "KEYBRAKE_POLICIES_DIR", "KEYBRAKE_STORE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def make_context(tmp_path: Path) -> tuple[taddons.context, Runtime, Core, AdminApi, VaultGuard]:
    runtime = Runtime()
    core, admin, guard = Core(runtime), AdminApi(runtime), VaultGuard(runtime)
    tctx = taddons.context(core, admin, guard)
    return tctx, runtime, core, admin, guard


def configure(tctx: taddons.context, core: Core, tmp_path: Path, **opts: Any) -> None:
    options = {
        "keybrake_data_dir": str(tmp_path / "data"),
        "keybrake_policies": str(POLICIES),
        "keybrake_store": f"sqlite:///{tmp_path / 'data' / 'keybrake.db'}",
        # These flows are driven hook by hook and never finish: do not wait for them.
        "keybrake_shutdown_grace": 0.0,
        **opts,
    }
    tctx.configure(core, **options)


@pytest.fixture
async def proxy(tmp_path: Path, env: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    tctx, runtime, core, admin, guard = make_context(tmp_path)
    with tctx:
        configure(tctx, core, tmp_path)
        yield Proxy(tctx, runtime, core, admin, guard, tmp_path / "data")
        await core.done()


# -- loading and configuration -----------------------------------------------------------------
def test_addon_script_exposes_the_core_addons_in_order() -> None:
    spec = importlib.util.spec_from_file_location(
        "keybrake_addon_script", ROOT / "addon" / "keybrake" / "addon.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Core first (options, policies, store), then egress (it answers CONNECTs before anything
    # else sees them), the admin API, then the guard; later addons (audit, ...) come after the
    # guard so they see its decision.
    assert [type(a) for a in module.addons[:5]] == [Core, Egress, AdminApi, VaultGuard, VendorPin]
    assert len({id(a.runtime) for a in module.addons}) == 1


async def test_options_are_registered_with_help(proxy: Proxy) -> None:
    opts = proxy.tctx.options
    for name in (
        "keybrake_data_dir",
        "keybrake_policies",
        "keybrake_store",
        "keybrake_intercept_only_vendors",
    ):
        assert name in opts
        assert opts._options[name].help


async def test_configure_loads_policies_secrets_and_store(proxy: Proxy) -> None:
    rt = proxy.runtime
    assert rt.policies is not None and "stripe" in rt.policies.vendors
    assert set(rt.policies.vendors) == {f.stem for f in POLICIES.glob("*.yaml")}
    assert rt.secrets["stripe"].secret == SECRET
    assert rt.secrets["stripe"].missing == ()
    assert SECRET not in repr(rt.secrets["stripe"])
    assert rt.admin_token == ADMIN_TOKEN
    assert rt.store_url == f"sqlite:///{proxy.data_dir / 'keybrake.db'}"
    await (await proxy.store()).ping()


@pytest.mark.parametrize(
    ("bad_yaml", "field"),
    [
        ("vendor: stripe\nhosts: [api.stripe.com\n", "not valid YAML"),
        ("vendor: stripe\ncolour: blue\n", "colour"),
    ],
)
async def test_configure_with_invalid_policy_names_the_file(
    tmp_path: Path, env: pytest.MonkeyPatch, bad_yaml: str, field: str
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "stripe.yaml").write_text(bad_yaml)
    tctx, _, core, _, _ = make_context(tmp_path)
    with tctx, pytest.raises(exceptions.OptionsError) as e:
        configure(tctx, core, tmp_path, keybrake_policies=str(policies))
    assert str(policies / "stripe.yaml") in str(e.value)
    assert field in str(e.value)


async def test_configure_with_missing_policies_dir(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    tctx, _, core, _, _ = make_context(tmp_path)
    with tctx, pytest.raises(exceptions.OptionsError, match="does not exist"):
        configure(tctx, core, tmp_path, keybrake_policies=str(tmp_path / "nope"))


async def test_configure_with_bad_store_url(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    tctx, _, core, _, _ = make_context(tmp_path)
    with tctx, pytest.raises(exceptions.OptionsError, match="keybrake_store"):
        configure(tctx, core, tmp_path, keybrake_store="postgres://nope")


async def test_reconfigure_with_bad_policy_keeps_the_old_one(proxy: Proxy, tmp_path: Path) -> None:
    before = proxy.runtime.policies
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "stripe.yaml").write_text("vendor: stripe\n")
    with pytest.raises(exceptions.OptionsError, match=str(bad / "stripe.yaml")):
        proxy.tctx.configure(proxy.core, keybrake_policies=str(bad))
    # mitmproxy rolls the option back and reconfigures with the previous directory.
    assert proxy.tctx.options.keybrake_policies == str(POLICIES)
    after = proxy.runtime.policies
    assert before is not None and after is not None
    assert after.vendors == before.vendors


async def test_admin_token_file_is_created_0600(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    env.delenv("KEYBRAKE_ADMIN_TOKEN")
    tctx, runtime, core, _, _ = make_context(tmp_path)
    with tctx:
        configure(tctx, core, tmp_path)
        token_file = tmp_path / "data" / "admin-token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert runtime.admin_token == token_file.read_text().strip()
        assert runtime.admin_token.startswith("kba_") and len(runtime.admin_token) > 40
        await core.done()


async def test_missing_secret_env_is_logged_not_fatal(
    tmp_path: Path, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env.delenv("STRIPE_SECRET_KEY")
    tctx, runtime, core, _, _ = make_context(tmp_path)
    with tctx:
        configure(tctx, core, tmp_path)
        assert runtime.secrets["stripe"].missing == ("STRIPE_SECRET_KEY",)
        assert "STRIPE_SECRET_KEY" in caplog.text
        await core.done()


async def test_running_sets_allow_hosts_to_vendor_hosts(proxy: Proxy) -> None:
    proxy.tctx.options.update(mode=["regular@8080", ADMIN_MODE])
    await proxy.tctx.master.addons.invoke_addon(proxy.core, hooks.RunningHook())
    allow = list(proxy.tctx.options.allow_hosts)
    assert proxy.runtime.policies is not None
    vendor_hosts = proxy.runtime.policies.allow_hosts_regexes()
    assert r"^api\.stripe\.com(:\d+)?$" in vendor_hosts
    # Only vendor hosts and the admin listener's own placeholder upstream are decrypted.
    assert allow == [*vendor_hosts, r"^127\.0\.0\.1:1$"]


# -- request hook: routing ---------------------------------------------------------------------
async def test_non_vendor_flow_is_untouched(proxy: Proxy) -> None:
    f = vendor_flow(
        path="/v1//anything/../x",
        host="example.com",
        auth=bearer("sk_live_abc"),
        extra=[("X-Keybrake-Actor", "me")],
    )
    before = f.request.copy()
    await proxy.send(f)
    assert f.response is None
    assert "keybrake" not in f.metadata
    assert f.request.headers == before.headers
    assert f.request.path == before.path
    assert f.request.host == "example.com"


async def test_flows_that_are_not_live_or_answered_are_ignored(proxy: Proxy) -> None:
    dead = vendor_flow(auth=bearer("kbv_stripe_" + "A" * 43))
    dead.live = False
    await proxy.send(dead)
    assert dead.response is None and "keybrake" not in dead.metadata
    answered = vendor_flow(auth=bearer("kbv_stripe_" + "A" * 43))
    answered.response = http.Response.make(204)
    await proxy.send(answered)
    assert answered.response.status_code == 204 and "keybrake" not in answered.metadata


async def test_sni_naming_a_vendor_host_is_refused(proxy: Proxy) -> None:
    f = vendor_flow(host="203.0.113.7", host_header="203.0.113.7", sni="api.stripe.com")
    await proxy.send(f)
    refusal(f, 403, "host_mismatch")


async def test_host_header_naming_another_host_is_refused(proxy: Proxy) -> None:
    key = await proxy.issue()
    f = vendor_flow(auth=bearer(key["vault_key"]), host_header="evil.example")
    await proxy.send(f)
    refusal(f, 403, "host_mismatch")


# -- request hook: credentials and key state ---------------------------------------------------
async def test_unknown_vault_key_is_401(proxy: Proxy) -> None:
    f = await proxy.send(vendor_flow(auth=bearer("kbv_stripe_" + "A" * 43)))
    error = refusal(f, 401, "vault_key_unknown")
    assert "kbv_stripe_" not in error["message"]
    assert call_of(f).outcome == "refused"
    assert call_of(f).code == "vault_key_unknown"


@pytest.mark.parametrize(
    ("auth", "status", "code"),
    [
        (None, 401, "vault_key_missing"),
        ("Bearer not-a-vault-key", 401, "vault_key_unknown"),
        ("Bearer ", 401, "vault_key_unknown"),
        ("Token kbv_stripe_" + "A" * 43, 401, "vault_key_unknown"),
        ("Basic %%%notbase64", 401, "vault_key_unknown"),
        ("Basic " + base64.b64encode(b"no-colon").decode(), 401, "vault_key_unknown"),
        ("Basic " + base64.b64encode(b"\xff\xfe:").decode(), 401, "vault_key_unknown"),
        ("Bearer kbv_stripe_\udcff\udcfe", 401, "vault_key_unknown"),  # undecodable bytes
        ("Basic k\udcffbv", 401, "vault_key_unknown"),
        (["Bearer a", "Bearer b"], 403, "credential_ambiguous"),
        (f"Bearer {SECRET}", 403, "raw_secret_refused"),
        ("Basic " + base64.b64encode(f"{SECRET}:".encode()).decode(), 403, "raw_secret_refused"),
        ("Bearer sk_live_" + "x" * 24, 403, "raw_secret_refused"),
        ("Bearer rk_test_" + "x" * 24, 403, "raw_secret_refused"),
    ],
)
async def test_bad_credentials(
    proxy: Proxy, auth: str | list[str] | None, status: int, code: str
) -> None:
    f = await proxy.send(vendor_flow(auth=auth))
    refusal(f, status, code)


async def test_a_read_keeps_its_query_string_and_a_paid_call_may_not_have_one(
    proxy: Proxy,
) -> None:
    # "*": any intent, whoever made it (pi_1 was not made through the proxy).
    key = await proxy.issue(
        allowed_endpoints=["POST /v1/payment_intents", "GET /v1/payment_intents/*"]
    )
    f = vendor_flow("GET", "/v1/payment_intents/pi_1?expand[]=latest_charge", body=b"")
    f.request.headers["Authorization"] = bearer(key["vault_key"])
    await proxy.send(f)
    forwarded(f)
    assert f.request.path == "/v1/payment_intents/pi_1?expand[]=latest_charge"
    f = vendor_flow(path="/v1/payment_intents?amount=999999", auth=bearer(key["vault_key"]))
    await proxy.send(f)
    refusal(f, 403, "unpriced_parameter")


async def test_valid_key_swaps_secret_strips_headers_and_canonicalises_path(
    proxy: Proxy,
) -> None:
    key = await proxy.issue()
    f = vendor_flow(
        path="/v1//payment_intents/;x=1",
        auth=bearer(key["vault_key"]),
        extra=[("X-Keybrake-Actor", "nightly"), ("x-keybrake-anything", "1"), ("X-Other", "kept")],
    )
    await proxy.send(f)
    call = forwarded(f)
    req = f.request
    assert req.headers["Authorization"] == f"Bearer {SECRET}"
    assert req.headers.get_all("Authorization") == [f"Bearer {SECRET}"]
    assert not [h for h in req.headers if h.lower().startswith("x-keybrake")]
    assert req.headers["X-Other"] == "kept"
    assert req.path == "/v1/payment_intents"
    assert (req.scheme, req.host, req.port) == ("https", "api.stripe.com", 443)
    assert key["vault_key"] not in str(req.headers)
    assert call.key_id == key["key_id"] and call.label == "addon/test"
    assert call.estimate is not None and call.estimate.micros == 1_000_000

    # The vendor answers; the response hook settles and redacts the real secret.
    resp = http.Response.make(
        200,
        json.dumps(
            {
                "id": "pi_123",
                "object": "payment_intent",
                "amount": 100,
                "currency": "usd",
                "status": "requires_payment_method",
            }
        ).encode(),
        {"Content-Type": "application/json", "Request-Id": "req_abc"},
    )
    await proxy.respond(f, resp)
    assert req.headers["Authorization"] == REDACTED
    assert f.response is not None
    # Not confirmed: a browser can still confirm it with its client_secret, so its amount
    # stays counted (held) until an answer shows it succeeded or was canceled.
    assert f.response.headers["X-Keybrake-Spent-Usd"] == "1.00"
    assert f.response.headers["X-Keybrake-Remaining-Usd"] == "299.00"
    assert call_of(f).outcome == "held"


@pytest.mark.parametrize(("scheme", "port"), [("http", 80), ("http", 443)])
async def test_real_secret_never_leaves_in_cleartext(proxy: Proxy, scheme: str, port: int) -> None:
    """``curl -x proxy http://api.stripe.com/...``: plain HTTP through the forward proxy."""
    key = await proxy.issue()
    f = vendor_flow(auth=bearer(key["vault_key"]))
    f.request.scheme, f.request.port = scheme, port
    await proxy.send(f)
    if f.response is None:  # forwarded: only over TLS
        assert f.request.scheme == "https"
    else:
        assert SECRET not in str(f.request.headers)


@pytest.mark.parametrize(
    ("scheme", "port", "host_header"),
    [
        ("https", 443, "api.stripe.com"),
        ("http", 80, "api.stripe.com"),
        ("https", 443, "api.stripe.com:443"),
    ],
)
async def test_destination_and_host_header_as_mitmproxy_setters_leave_them(
    proxy: Proxy, scheme: str, port: int, host_header: str
) -> None:
    """The swap sets scheme, host and port without mitmproxy's setters (each rewrites the
    Host header); the request leaves exactly as those setters would have left it."""
    key = await proxy.issue()
    f = vendor_flow(auth=bearer(key["vault_key"]), host_header=host_header)
    f.request.scheme, f.request.port = scheme, port
    expected = f.request.copy()
    expected.scheme, expected.port = "https", 443
    await proxy.send(f)
    forwarded(f)
    req = f.request
    assert (req.scheme, req.host, req.port) == ("https", "api.stripe.com", 443)
    assert req.headers.get_all("Host") == expected.headers.get_all("Host") == ["api.stripe.com"]
    assert req.authority == ""


async def test_basic_auth_form_gets_basic_secret(proxy: Proxy) -> None:
    key = await proxy.issue()
    f = vendor_flow(auth="Basic " + base64.b64encode(f"{key['vault_key']}:".encode()).decode())
    await proxy.send(f)
    forwarded(f)
    raw = base64.b64decode(f.request.headers["Authorization"].removeprefix("Basic "))
    assert raw == f"{SECRET}:".encode()


async def test_lowercase_method_is_checked_as_upper(proxy: Proxy) -> None:
    key = await proxy.issue()
    f = await proxy.send(vendor_flow(method="post", auth=bearer(key["vault_key"])))
    forwarded(f)
    g = await proxy.send(
        vendor_flow(method="get", path="/v1/refunds", auth=bearer(key["vault_key"]))
    )
    refusal(g, 403, "endpoint_not_allowed")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/v1/refunds", 403, "endpoint_not_allowed"),
        ("POST", "/v1/payment_intents/../refunds", 403, "endpoint_not_allowed"),
        ("POST", "/v1/payment_intents/%2e%2e/refunds", 403, "endpoint_not_allowed"),
        ("POST", "/V1/Payment_Intents", 403, "endpoint_not_allowed"),
        ("POST", "/v1/payment_intents/pi_1/capture", 403, "endpoint_not_allowed"),
        ("GET", "/v1/payment_intents", 403, "endpoint_not_allowed"),
        ("DELETE", "/v1/payment_intents/pi_1", 403, "endpoint_not_allowed"),
        ("POST", "/v1/payment_intents%2F..%2Frefunds", 403, "path_rejected"),
        ("POST", "/../v1/payment_intents", 403, "path_rejected"),
        ("POST", "/v1/payment_intents%00", 403, "path_rejected"),
        ("POST", "/v1/payment_%D1%96ntents", 403, "path_rejected"),
        ("POST", "/v1/" + "a" * 5000, 403, "path_rejected"),
        ("POST", "/v1/payment_intents?key=kbv_stripe_x", 403, "vault_key_in_query"),
        ("PO ST", "/v1/payment_intents", 403, "path_rejected"),
    ],
)
async def test_disallowed_endpoints_are_refused(
    proxy: Proxy, method: str, path: str, status: int, code: str
) -> None:
    key = await proxy.issue()
    f = await proxy.send(vendor_flow(method=method, path=path, auth=bearer(key["vault_key"])))
    refusal(f, status, code)
    assert f.request.headers["Authorization"] == REDACTED


async def test_revoked_key_is_401(proxy: Proxy) -> None:
    key = await proxy.issue()
    r = await proxy.admin_call("DELETE", f"/vault/keys/{key['key_id']}")
    assert r.status_code == 200
    f = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    error = refusal(f, 401, "vault_key_revoked")
    assert key["key_id"] in error["message"]


async def _store_key(proxy: Proxy, **fields: Any) -> str:
    """Put a key straight into the store, bypassing the issue-time checks."""
    now = proxy.runtime.now()
    vendor = fields.pop("vendor", "stripe")
    vault_key = generate_vault_key(vendor)
    record = KeyRecord(
        key_id=fields.pop("key_id", "key_" + hash_vault_key(vault_key)[:16]),
        secret_sha256=hash_vault_key(vault_key),
        vendor=vendor,
        agent_run_label="addon/test",
        daily_cap_micros=fields.pop("daily_cap_micros", 300_000_000),
        allowed_endpoints=tuple(fields.pop("allowed_endpoints", ALLOW)),
        created_at=fields.pop("created_at", now),
        expires_at=fields.pop("expires_at", now + dt.timedelta(hours=1)),
    )
    assert not fields
    await (await proxy.store()).create_key(record)
    return vault_key


async def test_expired_key_is_401(proxy: Proxy) -> None:
    past = proxy.runtime.now() - dt.timedelta(hours=2)
    vault_key = await _store_key(proxy, created_at=past, expires_at=past + dt.timedelta(minutes=30))
    f = await proxy.send(vendor_flow(auth=bearer(vault_key)))
    refusal(f, 401, "vault_key_expired")


async def test_key_of_another_vendor_is_refused(proxy: Proxy) -> None:
    vault_key = await _store_key(proxy, vendor="twilio")
    f = await proxy.send(vendor_flow(auth=bearer(vault_key)))
    refusal(f, 403, "vendor_mismatch")


async def test_allowed_but_unpriced_endpoint_is_refused(proxy: Proxy) -> None:
    vault_key = await _store_key(proxy, allowed_endpoints=["POST /v1/unpriced_things"])
    f = await proxy.send(vendor_flow(path="/v1/unpriced_things", auth=bearer(vault_key)))
    refusal(f, 403, "unpriced_endpoint")


async def test_cap_exhausted_is_429_with_cap_hit(proxy: Proxy) -> None:
    key = await proxy.issue(daily_usd_cap="2")
    f = await proxy.send(
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=500&currency=usd")
    )
    error = refusal(f, 429, "cap_exhausted")
    assert f.response is not None and f.response.headers["X-Keybrake-Cap-Hit"] == "true"
    assert error["needed_usd"] == "5.00"


async def test_unknown_currency_is_refused(proxy: Proxy) -> None:
    key = await proxy.issue()
    f = await proxy.send(vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=5&currency=xyz"))
    refusal(f, 403, "unknown_currency")


async def test_missing_secret_env_refuses_503(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    env.delenv("STRIPE_SECRET_KEY")
    tctx, runtime, core, admin, guard = make_context(tmp_path)
    with tctx:
        configure(tctx, core, tmp_path)
        p = Proxy(tctx, runtime, core, admin, guard, tmp_path / "data")
        key = await p.issue()
        f = await p.send(vendor_flow(auth=bearer(key["vault_key"])))
        error = refusal(f, 503, "secret_unavailable")
        assert "STRIPE_SECRET_KEY" in error["message"]
        await core.done()


# -- failures inside the proxy: 503, never forwarded -------------------------------------------
async def test_store_unavailable_from_the_start_is_503(
    tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    tctx, runtime, core, admin, guard = make_context(tmp_path)
    with tctx:
        configure(tctx, core, tmp_path, keybrake_store=f"sqlite:///{blocker}/kb.db")
        p = Proxy(tctx, runtime, core, admin, guard, tmp_path / "data")
        await tctx.master.addons.invoke_addon(core, hooks.RunningHook())  # logs, never raises
        f = await p.send(vendor_flow(auth=bearer("kbv_stripe_" + "A" * 43)))
        refusal(f, 503, "store_unavailable")
        assert call_of(f).reservation_id is None
        health = await p.admin_call("GET", "/readyz", token=None)
        assert health.status_code == 503
        issue = await p.admin_call(
            "POST",
            "/vault/keys",
            {
                "vendor": "stripe",
                "daily_usd_cap": 5,
                "allowed_endpoints": ALLOW,
                "agent_run_label": "x",
            },
        )
        assert issue.status_code == 503
        assert json.loads(issue.content or b"")["error"]["code"] == "store_unavailable"
        await core.done()


async def _break_store(proxy: Proxy) -> None:
    """Close the SQLite store and replace its file with garbage: every call now fails."""
    store = await proxy.store()
    await store.close()
    db = proxy.data_dir / "keybrake.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)


async def test_store_failing_mid_run_is_503_and_never_forwarded(proxy: Proxy) -> None:
    key = await proxy.issue()
    ok = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    forwarded(ok)
    await _break_store(proxy)
    f = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    refusal(f, 503, "store_unavailable")
    assert f.request.headers["Authorization"] == REDACTED
    # The response and error hooks of the earlier, forwarded flow cannot settle: logged, kept.
    await proxy.respond(ok, http.Response.make(200, b'{"id": "pi_1"}'))
    assert ok.request.headers["Authorization"] == REDACTED
    other = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    refusal(other, 503, "store_unavailable")
    await proxy.fail(other, "connection reset")


async def test_vendor_error_releases_and_no_response_keeps_the_reservation(proxy: Proxy) -> None:
    key = await proxy.issue(daily_usd_cap="10")
    declined = await proxy.send(
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=300&currency=usd")
    )
    forwarded(declined)
    await proxy.respond(declined, http.Response.make(402, b'{"error": {"type": "card_error"}}'))
    assert call_of(declined).outcome == "vendor_error"
    lost = await proxy.send(
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=400&currency=usd")
    )
    forwarded(lost)
    await proxy.fail(lost, "connection reset by peer")
    assert call_of(lost).outcome == "unknown"
    assert lost.request.headers["Authorization"] == REDACTED
    detail = json.loads((await proxy.admin_call("GET", f"/vault/keys/{key['key_id']}")).content)
    assert detail["spent_today_usd"] == "4.00"  # the 402 released, the lost call counted
    assert detail["remaining_usd"] == "6.00"


async def test_never_sent_is_released_and_answered_retry_safe(proxy: Proxy) -> None:
    """The server connection never opened (mitmproxy left the flow's own, unopened one):
    nothing was sent, so the reservation goes back and the answer says a retry is safe."""
    key = await proxy.issue(daily_usd_cap="10")
    f = await proxy.send(
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=400&currency=usd")
    )
    forwarded(f)
    f.server_conn.timestamp_tcp_setup = f.server_conn.timestamp_tls_setup = None
    await proxy.fail(f, "[Errno 111] Connect call failed ('127.0.0.1', 9)")
    call = call_of(f)
    assert (call.outcome, call.code, call.status, call.actual_micros) == (
        "refused",
        "upstream_unreachable",
        502,
        0,
    )
    assert call.note.startswith("never sent ([Errno 111]")
    assert f.response is not None and f.response.status_code == 502
    body = json.loads(f.response.content or b"")
    assert body["error"]["code"] == "upstream_unreachable"
    assert "127.0.0.1" not in body["error"]["message"]  # the upstream is the operator's business
    assert f.response.headers["Stripe-Should-Retry"] == "true"
    assert f.response.headers["X-Should-Retry"] == "true"
    detail = json.loads((await proxy.admin_call("GET", f"/vault/keys/{key['key_id']}")).content)
    assert detail["spent_today_usd"] == "0.00"
    # A TCP connection whose TLS handshake failed sent nothing either.
    tls = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    tls.server_conn.timestamp_tls_setup = None
    await proxy.fail(tls, "TLS handshake failed: certificate verify failed")
    assert (call_of(tls).outcome, call_of(tls).code) == ("refused", "upstream_unreachable")


async def test_sent_but_unanswered_is_counted_and_answered_upstream_failed(proxy: Proxy) -> None:
    key = await proxy.issue(daily_usd_cap="10")
    f = await proxy.send(
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=400&currency=usd")
    )
    forwarded(f)
    await proxy.fail(f, "Server closed connection.")
    call = call_of(f)
    assert (call.outcome, call.code, call.status) == ("unknown", "upstream_failed", 502)
    assert call.note == "no vendor response (Server closed connection.): estimate kept as spent"
    refusal_body = json.loads(f.response.content or b"") if f.response else {}
    assert refusal_body["error"]["code"] == "upstream_failed"
    assert f.response is not None and f.response.headers["Stripe-Should-Retry"] == "false"
    detail = json.loads((await proxy.admin_call("GET", f"/vault/keys/{key['key_id']}")).content)
    assert detail["spent_today_usd"] == "4.00"


async def test_a_worker_that_left_gets_no_answer_and_its_call_is_judged_the_same(
    proxy: Proxy,
) -> None:
    key = await proxy.issue(daily_usd_cap="10")
    before = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    before.server_conn.timestamp_tcp_setup = None
    before.client_conn.state = ConnectionState.CAN_WRITE  # the worker closed its side
    await proxy.fail(before, "Client disconnected.")
    assert (call_of(before).outcome, call_of(before).code) == ("refused", "client_closed")
    assert before.response is None
    after = await proxy.send(vendor_flow(auth=bearer(key["vault_key"])))
    after.client_conn.state = ConnectionState.CLOSED
    await proxy.fail(after, "Client disconnected.")
    assert (call_of(after).outcome, call_of(after).code) == ("unknown", "client_closed")
    assert after.response is None
    detail = json.loads((await proxy.admin_call("GET", f"/vault/keys/{key['key_id']}")).content)
    assert detail["spent_today_usd"] == "1.00"  # only the call that was sent


async def test_hooks_never_raise_on_odd_flows(proxy: Proxy) -> None:
    key = await proxy.issue()
    odd = [
        vendor_flow(auth=bearer(key["vault_key"]), body=b"\xff\xfe\x00garbage"),
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=1&amount=2&currency=usd"),
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=-5&currency=usd"),
        vendor_flow(auth=bearer(key["vault_key"]), body=b"amount=1e99&currency=usd"),
        vendor_flow(auth=bearer(key["vault_key"]), path="*"),
        vendor_flow(auth=bearer(key["vault_key"]), path="https://api.stripe.com/v1/x"),
        vendor_flow(auth=bearer(key["vault_key"]), path="/v1/\udcff"),
        vendor_flow(auth=bearer(key["vault_key"]), host="API.STRIPE.COM."),
        vendor_flow(auth="Bearer " + "k" * 100_000),
        admin_flow("POST", "/vault/keys", b"\xff" * 10),
        admin_flow("POST", "/vault/keys", b"[" * 100_000),
        admin_flow("GET", "/vault/keys/%ff%fe"),
        admin_flow("PATCH", "/vault/keys"),
    ]
    for f in odd:
        await proxy.send(f)
        assert f.response is not None or call_of(f).outcome == "forwarded"
        if f.response is not None and f.response.status_code >= 500:
            assert f.response.status_code == 503
        await proxy.respond(f, f.response or http.Response.make(500, b"vendor down"))
        await proxy.fail(f, "late error")
        assert SECRET not in str(f.request.headers)


# -- base-URL mode (reverse listener) ----------------------------------------------------------
async def test_base_url_mode_routes_to_the_vendor(proxy: Proxy) -> None:
    key = await proxy.issue()
    f = admin_flow("POST", "/stripe/v1//payment_intents/", token=None)
    f.request.headers["Authorization"] = bearer(key["vault_key"])
    f.request.headers["Content-Type"] = FORM
    f.request.content = b"amount=100&currency=usd"
    await proxy.send(f)
    forwarded(f)
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "api.stripe.com", 443)
    assert f.request.path == "/v1/payment_intents"
    assert f.request.headers["Authorization"] == f"Bearer {SECRET}"
    assert "keybrake_admin" not in f.metadata


async def test_base_url_mode_refuses_like_the_forward_proxy(proxy: Proxy) -> None:
    f = admin_flow("POST", "/stripe/v1/payment_intents", token=None)
    f.request.headers["Authorization"] = bearer("kbv_stripe_" + "B" * 43)
    await proxy.send(f)
    refusal(f, 401, "vault_key_unknown")


# -- admin API on the reverse listener ---------------------------------------------------------
async def test_admin_api_in_process(proxy: Proxy) -> None:
    health = await proxy.admin_call("GET", "/healthz", token=None)
    assert health.status_code == 200 and json.loads(health.content or b"")["status"] == "ok"
    for token in (None, "wrong", ""):
        r = await proxy.admin_call("GET", "/vault/keys", token=token)
        assert r.status_code == 401
        assert json.loads(r.content or b"")["error"]["code"] == "admin_token_invalid"
    f = admin_flow("GET", "/vault/keys")
    f.request.headers["Authorization"] = f"Basic {ADMIN_TOKEN}"
    await proxy.send(f)
    assert f.response is not None and f.response.status_code == 401
    assert (await proxy.admin_call("GET", "/nope")).status_code == 404
    key = await proxy.issue()
    listing = await proxy.admin_call("GET", "/vault/keys")
    text = listing.text or ""
    assert key["key_id"] in text
    assert key["vault_key"] not in text
    assert hash_vault_key(key["vault_key"]) not in text
    # The admin token does not linger in the flow.
    g = admin_flow("GET", "/vault/keys")
    await proxy.send(g)
    assert g.request.headers["Authorization"] == REDACTED


async def test_admin_token_with_undecodable_bytes_is_401(proxy: Proxy) -> None:
    f = admin_flow("GET", "/vault/keys", token=None)
    f.request.headers["Authorization"] = "Bearer \udcff"
    await proxy.send(f)
    assert f.response is not None and f.response.status_code == 401


async def test_an_option_that_rewrites_calls_is_rejected_and_rolled_back(proxy: Proxy) -> None:
    # What mitmweb's options editor does: set an option on the running proxy. With
    # map_remote a call already carrying the real secret would go to another host.
    from mitmproxy.addons.mapremote import MapRemote

    proxy.tctx.master.addons.add(MapRemote())  # registers the map_remote option
    with pytest.raises(exceptions.OptionsError, match="map_remote"):
        proxy.tctx.options.update(map_remote=["|https://api.stripe.com/|https://127.0.0.1:9/"])
    assert proxy.tctx.options.map_remote == []


async def test_anthropic_key_header_is_swapped_then_redacted(
    tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    """x-api-key carries the vault key in and the real key out: redacted like Authorization
    once the answer is in (mitmweb and flow files show flows after that)."""
    from tests.fakes.anthropic import DEFAULT_API_KEY as ANTHROPIC_KEY

    env.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    tctx, runtime, core, admin, guard = make_context(tmp_path)
    with tctx:
        configure(tctx, core, tmp_path)
        proxy = Proxy(tctx, runtime, core, admin, guard, tmp_path / "data")
        key = await proxy.issue(vendor="anthropic", allowed_endpoints=["POST /v1/messages"])
        body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": []}
        f = vendor_flow(
            path="/v1/messages",
            host="api.anthropic.com",
            body=json.dumps(body).encode(),
            extra=[("x-api-key", key["vault_key"]), ("anthropic-version", "2023-06-01")],
        )
        f.request.headers["Content-Type"] = "application/json"
        await proxy.send(f)
        forwarded(f)
        assert f.request.headers["x-api-key"] == ANTHROPIC_KEY
        assert "authorization" not in f.request.headers
        usage = {"input_tokens": 5, "output_tokens": 3}
        answer = {"id": "msg_1", "type": "message", "model": "claude-haiku-4-5", "usage": usage}
        await proxy.respond(
            f,
            http.Response.make(
                200, json.dumps(answer).encode(), {"Content-Type": "application/json"}
            ),
        )
        assert f.request.headers["x-api-key"] == REDACTED
        call = call_of(f)
        assert call is not None and call.outcome == "ok"
        assert call.actual_micros == -(-(5 * 1_000_000 + 3 * 5_000_000) // 10**6) == 20
        await core.done()
