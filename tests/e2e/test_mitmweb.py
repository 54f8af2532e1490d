"""End to end: no real secret in mitmweb (REST, WebSocket, event log) or in flow files.

``keybrake web`` runs mitmweb with the addon. The stripe SDK calls through it (a slow call
keeps a flow in flight, which is when the guard has swapped the real secret in), refusals and
a reset connection included; then everything mitmweb serves and everything ``keybrake run --
-w`` writes is searched for the real secret (and the admin token).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from mitmproxy.io import FlowReader
from tests.conftest import KEYBRAKE, KeybrakeProcess, free_port
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e

WEB_TOKEN = "kbweb-test-password"


class KeybrakeWeb(KeybrakeProcess):
    """``keybrake web`` instead of ``keybrake run``, with a fixed mitmweb password."""

    web_port = 0

    def start(self, timeout: float = 30) -> KeybrakeWeb:
        self.web_port = free_port()
        cmd = [
            str(KEYBRAKE),
            "web",
            "--proxy-port",
            str(self.proxy_port),
            "--admin-port",
            str(self.admin_port),
            "--web-port",
            str(self.web_port),
            "--data-dir",
            str(self.data_dir),
            "--policies",
            str(self.policies),
            "--certs-dir",
            str(self.certs),
            "--",
            "--set",
            f"web_password={WEB_TOKEN}",
            *self.extra_args,
        ]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keybrake web exited {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(f"{self.admin_url}/healthz", timeout=1)
                self.web("GET", "/flows").raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"keybrake web did not start in {timeout}s:\n{self.log()}")

    def web(self, method: str, path: str) -> httpx.Response:
        return httpx.request(
            method,
            f"http://127.0.0.1:{self.web_port}{path}",
            headers={"Authorization": f"Bearer {WEB_TOKEN}"},
            timeout=10,
        )


class Updates:
    """Everything mitmweb pushes on its WebSocket (``/updates``), collected in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[str] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import aiohttp

        headers = {"Authorization": f"Bearer {WEB_TOKEN}"}
        async with aiohttp.ClientSession() as s, s.ws_connect(self.url, headers=headers) as ws:
            self.connected.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                self.messages.append(msg.data)

    def __enter__(self) -> Updates:
        self._thread.start()
        assert self.connected.wait(10), "could not connect to mitmweb's /updates"
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last updates
        self._stop.set()
        self._thread.join(10)


def forbidden(fake: FakeStripe, kb: KeybrakeProcess) -> list[bytes]:
    """What must never be shown: the real secret (raw and as Basic auth), the admin token."""
    basic = base64.b64encode(f"{fake.secret}:".encode())
    return [fake.secret.encode(), basic, kb.admin_token.encode()]


def assert_clean(where: str, data: bytes | str, needles: list[bytes]) -> None:
    blob = data.encode() if isinstance(data, str) else data
    for needle in needles:
        assert needle not in blob, f"{needle[:12]!r}... leaked in {where}"


def calls(kb: KeybrakeProcess, fake: FakeStripe) -> dict[str, Any]:
    """An ok call kept in flight for a second, refusals, and a call whose answer is lost."""
    key = kb.issue_key(
        daily_usd_cap="5",
        agent_run_label="web/inspect",
        allowed_endpoints=["POST /v1/payment_intents", "POST /v1/payment_intents/{id}/confirm"],
    )
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)
    fake.delay_seconds = 1.0
    pi = sc.v1.payment_intents.create(params={"amount": 300, "currency": "usd"})
    fake.delay_seconds = 0
    with pytest.raises(stripe.PermissionError):
        sc.v1.refunds.create(params={"payment_intent": pi.id})
    with pytest.raises(stripe.RateLimitError):
        sc.v1.payment_intents.create(params={"amount": 900, "currency": "usd"})
    fake.reset_connection_next(1)
    with pytest.raises(stripe.APIError):
        sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    # The dashboard's sign-in form carries the admin token in its body.
    r = httpx.post(f"{kb.admin_url}/login", data={"token": kb.admin_token})
    assert r.status_code == 303
    return key


def test_mitmweb_never_shows_a_real_secret(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    fake_tls: Any,
    keybrake_certs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stripe, "ca_bundle_path", str(keybrake_certs / "keybrake-ca-bundle.pem"))
    workdir = tmp_path / "web"
    workdir.mkdir()
    kb = KeybrakeWeb(workdir, keybrake_certs, {"stripe": fake_stripe}, fake_tls).start()
    try:
        needles = forbidden(fake_stripe, kb)
        polls: list[str] = []
        stop = threading.Event()

        def poll() -> None:  # GET /flows while the slow call is in flight, and after
            # A dozen polls at least, however slow mitmweb answers on a loaded machine.
            while not stop.is_set() or len(polls) < 12:
                polls.append(kb.web("GET", "/flows").text)
                time.sleep(0.05)

        with Updates(f"ws://127.0.0.1:{kb.web_port}/updates") as updates:
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            key = calls(kb, fake_stripe)
            stop.set()
            poller.join(30)
        assert all(
            e.header("Authorization") == f"Bearer {fake_stripe.secret}" for e in fake_stripe.ledger
        )

        assert len(polls) > 10 and len(updates.messages) > 10
        for i, text in enumerate(polls):
            assert_clean(f"GET /flows poll {i}", text, [*needles, key["vault_key"].encode()])
        for i, text in enumerate(updates.messages):
            assert_clean(f"WebSocket message {i}", text, [*needles, key["vault_key"].encode()])

        flows = kb.web("GET", "/flows").json()
        vendor = [f for f in flows if f["request"]["path"].startswith("/v1/")]
        assert len(vendor) == 4
        by_comment = {f["comment"]: f for f in vendor}
        kid = key["key_id"]
        # Not confirmed: held, since a browser could still confirm it.
        assert f"keybrake stripe {kid} [web/inspect] held" in by_comment
        refused = by_comment[f"keybrake stripe {kid} [web/inspect] refused: endpoint_not_allowed"]
        assert refused["marked"] == "⛔"
        assert by_comment[f"keybrake stripe {kid} [web/inspect] refused: cap_exhausted"]["marked"]
        # No answer: the estimate stays counted as spent, and the comment says how much.
        lost = by_comment[f"keybrake stripe {kid} [web/inspect] unknown: upstream_failed $1.00"]
        assert lost["marked"].startswith("⚠") and "error" in lost
        for f in vendor:
            headers = {name.lower(): value for name, value in f["request"]["headers"]}
            assert headers["authorization"] == "[redacted by keybrake]"
        for f in flows:
            for part in ("request", "response"):
                if part in f:
                    body = kb.web("GET", f"/flows/{f['id']}/{part}/content.data")
                    assert_clean(f"{part} body of {f['request']['path']}", body.content, needles)

        dump = kb.web("GET", "/flows/dump")
        assert dump.status_code == 200, dump.text[:500]
        assert_clean("mitmweb's flow dump", dump.content, needles)
        dumped = list(FlowReader(io.BytesIO(dump.content)).stream())
        assert len(dumped) == len(flows)
        crumbs = [f.metadata["keybrake"] for f in dumped if "keybrake" in f.metadata]
        assert len(crumbs) == 4 and all(c["key_id"] == kid for c in crumbs)

        assert_clean("mitmweb's event log", kb.web("GET", "/events").text, needles)
    finally:
        kb.stop()
    assert_clean("the process output", kb.log(), needles)


def test_flow_files_never_hold_a_real_secret(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keybrake run -- -w flows`` (mitmdump's save_stream_file), including a call still in
    flight when the proxy stops, when mitmproxy writes the flow as it is."""
    saved = tmp_path / "flows.mitm"
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, extra_args=["-w", str(saved)])
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    needles = forbidden(fake_stripe, kb)
    key = calls(kb, fake_stripe)

    fake_stripe.delay_seconds = 3.0
    sc = stripe.StripeClient(key["vault_key"], proxy=kb.proxy_url, max_network_retries=0)

    def call_in_flight() -> None:
        with contextlib.suppress(stripe.StripeError):  # the proxy stops under it
            sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})

    in_flight = threading.Thread(target=call_in_flight, daemon=True)
    in_flight.start()
    time.sleep(1.0)  # the fake holds the request for 3s: the real secret is in the flow now
    assert kb.stop() is not None
    in_flight.join(10)

    data = saved.read_bytes()
    assert_clean("the -w flow file", data, needles)
    flows = list(FlowReader(io.BytesIO(data)).stream())
    vendor = [f for f in flows if f.request.path.startswith("/v1/")]
    assert len(vendor) >= 4
    for f in vendor:
        assert f.request.headers["authorization"] == "[redacted by keybrake]"
        assert f.metadata["keybrake"]["key_id"] == key["key_id"]
        assert f.comment.startswith(f"keybrake stripe {key['key_id']} [web/inspect]")
    assert_clean("the process output", kb.log(), needles)


def test_an_admitted_vendor_request_is_never_held_by_intercept(
    fake_stripe: FakeStripe, fake_tls: Any, keybrake_certs: Path, tmp_path: Path
) -> None:
    """mitmweb's intercept would hold the request with the real secret in it, editable."""
    workdir = tmp_path / "web"
    workdir.mkdir()
    kb = KeybrakeWeb(
        workdir,
        keybrake_certs,
        {"stripe": fake_stripe},
        fake_tls,
        extra_args=["--set", "intercept=~q & ~u /v1/payment_intents"],
    ).start()
    try:
        key = kb.issue_key()
        r = httpx.post(
            "https://api.stripe.com/v1/payment_intents",
            data={"amount": "100", "currency": "usd"},
            headers={"Authorization": f"Bearer {key['vault_key']}"},
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
            timeout=10,
        )
        assert r.status_code == 200
        assert len(fake_stripe.ledger) == 1
        assert "not holding intercepted stripe request" in kb.log()
    finally:
        kb.stop()
