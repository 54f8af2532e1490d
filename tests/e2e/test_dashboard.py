"""End to end: the dashboard in a real headless Chromium, driven by Playwright.

The browser signs in with the admin token, issues a key with the form, the stripe SDK spends
with it through the proxy, the page's live refresh shows the spend, the revoke button revokes
it and the next SDK call is refused. Chromium is Debian's (`make venv`/CI install it); the
test is skipped only when it is not installed. ``UPDATE_SCREENSHOTS=1`` refreshes
``docs/dashboard.png``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import ROOT, KeybrakeProcess
from tests.fakes import FakeStripe

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed (apt-get install -y chromium; "
            "`make venv` and .ci/run do it)"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    yield pg
    context.close()


def sign_in(page: Any, kb: KeybrakeProcess) -> None:
    page.goto(f"{kb.admin_url}/")
    assert page.url.endswith("/login")
    page.fill("#token", kb.admin_token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{kb.admin_url}/")


def sdk(kb: KeybrakeProcess, vault_key: str) -> stripe.StripeClient:
    return stripe.StripeClient(vault_key, proxy=kb.proxy_url, max_network_retries=0)


def assert_round_ticks(ticks: list[float]) -> None:
    """Axis ticks from 0 in equal steps of 1, 2 or 5 times a power of ten."""
    assert len(ticks) >= 2 and ticks[0] == 0, ticks
    step = ticks[1] - ticks[0]
    for a, b in itertools.pairwise(ticks):
        assert b - a == pytest.approx(step), ticks
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(mantissa == pytest.approx(m) for m in (1, 2, 5)), ticks


def test_sign_in_issue_spend_revoke_in_the_browser(
    page: Any,
    keybrake_stripe: KeybrakeProcess,
    fake_stripe: FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    kb = keybrake_stripe
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    sign_in(page, kb)
    expect(page.locator("#tile-store .big")).to_have_text("up")

    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["keybrake_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["secure"] is False  # plain HTTP on loopback; see the Secure test below
    assert page.evaluate("document.cookie") == ""

    # Issue a key with the form: the vault key is shown once.
    page.click("nav >> text=Keys")
    page.select_option("select[name=vendor]", "stripe")
    page.fill("input[name=label]", "e2e/dashboard")
    page.fill("input[name=daily_usd_cap]", "50")
    page.fill("input[name=expires_in]", "2h")
    page.fill(
        "textarea[name=allowed_endpoints]",
        "POST /v1/payment_intents\nPOST /v1/payment_intents/{id}/confirm",
    )
    page.fill("input[name=max_requests_per_minute]", "30")
    page.click("form.issue button[type=submit]")
    vault_key = page.inner_text("#new-vault-key").strip()
    assert re.fullmatch(r"kbv_stripe_[A-Za-z0-9_-]{43}", vault_key)
    key_id = page.inner_text(".reveal h2 code").strip()
    row = page.locator(f"#key-{key_id}")
    expect(row.locator(".label")).to_have_text("e2e/dashboard")
    expect(row.locator(".status")).to_have_text("active")
    expect(row.locator(".spent")).to_have_text("0.00")
    expect(row.locator(".cap")).to_contain_text("30 req/min")
    assert kb.admin("GET", f"/vault/keys/{key_id}").json()["max_requests_per_minute"] == 30
    page.reload()
    assert page.locator("#new-vault-key").count() == 0  # shown once, never again

    # Spend through the proxy with the SDK; the page refreshes itself (no reload here).
    sc = sdk(kb, vault_key)
    pi = sc.v1.payment_intents.create(params={"amount": 2000, "currency": "usd"})
    sc.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert fake_stripe.charged_usd_micros() == 20_000_000
    expect(row.locator(".spent")).to_have_text("20.00", timeout=15_000)
    expect(row.locator(".remaining")).to_have_text("30.00")

    # Revoke with the button (the page asks first); the next SDK call is refused.
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Revoke").click()
    page.wait_for_url(f"{kb.admin_url}/dashboard/keys")
    expect(page.locator(".flash")).to_contain_text(f"Revoked {key_id}")
    expect(page.locator(f"#key-{key_id} .status")).to_have_text("revoked")
    assert page.locator(f"#key-{key_id} button").count() == 0
    with pytest.raises(stripe.AuthenticationError) as e:
        sc.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert e.value.json_body["error"]["code"] == "vault_key_revoked"
    assert len(fake_stripe.ledger) == 2

    # A second key runs into its cap, so the on-call overview has something to show.
    small = kb.issue_key(
        daily_usd_cap="12",
        agent_run_label="etl/nightly-refunds",
        allowed_endpoints=["POST /v1/payment_intents", "POST /v1/payment_intents/{id}/confirm"],
    )
    small_sc = sdk(kb, small["vault_key"])
    pi2 = small_sc.v1.payment_intents.create(params={"amount": 1100, "currency": "usd"})
    small_sc.v1.payment_intents.confirm(pi2.id, params={"payment_method": "pm_card_visa"})
    with pytest.raises(stripe.RateLimitError) as cap:
        small_sc.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})
    assert cap.value.json_body["error"]["code"] == "cap_exhausted"

    page.click("nav >> text=Overview")
    refusals = page.locator("table.refusals")
    expect(refusals).to_contain_text("vault_key_revoked", timeout=15_000)
    expect(refusals).to_contain_text("cap_exhausted", timeout=15_000)
    expect(page.locator("table.keys")).to_contain_text("etl/nightly-refunds")
    expect(page.locator("#recent-problems")).to_contain_text(key_id)

    page.click("nav >> text=Audit")
    audit = page.locator("#audit-rows")
    expect(audit).to_contain_text(pi.id)  # the vendor object id
    assert fake_stripe.ledger[0].request_id is not None
    expect(audit).to_contain_text(fake_stripe.ledger[0].request_id)

    page.click("nav >> text=Spend")
    expect(page.locator("svg.chart rect").first).to_be_visible()
    expect(page.locator("#spend")).to_contain_text("e2e/dashboard")
    # $20 and $11 spent: the y axis reads $0, $10, $20, ... whatever the peak.
    labels = page.locator("svg.chart text.y-tick").all_text_contents()
    ticks = [float(t.strip("$").replace(",", "")) for t in labels]
    assert_round_ticks(ticks)
    assert ticks[-1] >= 20

    page.click("nav >> text=Overview")
    expect(refusals).to_contain_text("cap_exhausted")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    # The README's picture: refreshed on request (or when missing), so a test run leaves
    # the work tree alone.
    if os.environ.get("UPDATE_SCREENSHOTS") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_login_csrf_origin_and_escaping(
    page: Any, keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    base = kb.admin_url
    # Signed out: every page sends you to the login form; a wrong token is refused.
    r = httpx.get(f"{base}/dashboard/keys", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    r = httpx.post(f"{base}/login", data={"token": "kba_wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers

    # Behind a TLS-terminating proxy the cookie is Secure.
    r = httpx.post(
        f"{base}/login",
        data={"token": kb.admin_token},
        headers={"X-Forwarded-Proto": "https"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    sid = cookie.split(";")[0].split("=", 1)[1]

    key = kb.issue_key()
    jar = {"keybrake_session": sid}
    revoke = f"{base}/dashboard/keys/{key['key_id']}/revoke"
    # No CSRF token, a wrong one, or the right one from another origin: refused.
    assert httpx.post(revoke, cookies=jar, data={}).status_code == 403
    assert httpx.post(revoke, cookies=jar, data={"csrf": "nope"}).status_code == 403
    page_html = httpx.get(f"{base}/dashboard/keys", cookies=jar).text
    token = re.search(r'name="csrf" value="([^"]+)"', page_html)
    assert token is not None
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    r = httpx.post(revoke, cookies=jar, data={"csrf": token.group(1)}, headers=evil)
    assert r.status_code == 403
    assert kb.admin("GET", f"/vault/keys/{key['key_id']}").json()["status"] == "active"
    r = httpx.post(revoke, cookies=jar, data={"csrf": token.group(1)}, follow_redirects=False)
    assert r.status_code == 303
    assert kb.admin("GET", f"/vault/keys/{key['key_id']}").json()["status"] == "revoked"

    # Worker-supplied text (here the actor header) is shown escaped, never run.
    payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": f"Bearer {key['vault_key']}", "X-Keybrake-Actor": payload},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=15,
    )
    assert r.status_code == 401
    sign_in(page, kb)
    page.goto(f"{base}/dashboard/audit?outcome=refused")
    from playwright.sync_api import expect

    expect(page.locator("#audit-rows")).to_contain_text(payload, timeout=10_000)
    assert page.locator("#audit-rows img, #audit-rows script").count() == 0
    assert page.evaluate("window.__xss") is None

    # Signing out ends the session on the server, not only in the browser.
    page.click("header form.logout button")
    page.wait_for_url(f"{base}/login")
    r = httpx.get(f"{base}/dashboard/keys", cookies=jar, follow_redirects=False)
    assert r.status_code == 200  # the other session is still valid
    page.goto(f"{base}/dashboard/keys")
    assert page.url.endswith("/login")


# The refresh this test's proxy is given (keybrake_dashboard_refresh; the default is 5 s): one
# poll of the live regions is at most this long, plus as long again for its time limit.
POLL_MS = 2_000


def test_the_page_says_at_once_when_the_proxy_stops_answering(
    page: Any, keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    from playwright.sync_api import expect

    extra = ["--set", f"keybrake_dashboard_refresh={POLL_MS // 1000}"]
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, extra_args=extra)
    sign_in(page, kb)
    assert page.locator("body").get_attribute("data-refresh-ms") == str(POLL_MS)
    banner = page.locator("#offline")
    live = page.locator("#live-status")
    expect(page.locator("#tile-store .big")).to_have_text("up")
    expect(banner).to_be_hidden()
    expect(live).to_contain_text("live ·", timeout=POLL_MS * 2)

    # Hung (SIGSTOP: connections are accepted, never answered): the poll gives up in time.
    assert kb.proc is not None
    kb.proc.send_signal(signal.SIGSTOP)
    try:
        expect(banner).to_be_visible(timeout=POLL_MS * 3)
        expect(banner).to_contain_text("not answering")
        expect(banner).to_contain_text(f"no answer within {POLL_MS // 1000} s")
        expect(live).to_contain_text("offline")
        # The numbers stay for reference, visibly stale: greyed out, marked as such.
        expect(page.locator("body")).to_have_class(re.compile(r"\boffline\b"))
        overview = page.locator("#overview")
        expect(overview).to_have_attribute("aria-busy", "true")
        assert float(overview.evaluate("e => getComputedStyle(e).opacity")) < 0.7
        assert "grayscale" in overview.evaluate("e => getComputedStyle(e).filter")
    finally:
        kb.proc.send_signal(signal.SIGCONT)
    # Back: the next poll clears it, in place.
    expect(banner).to_be_hidden(timeout=POLL_MS * 3)
    expect(page.locator("body")).not_to_have_class(re.compile(r"\boffline\b"))
    expect(live).to_contain_text("live ·")
    expect(page.locator("#tile-store .big")).to_have_text("up")
    assert page.url == f"{kb.admin_url}/"

    # Dead (connection refused): said at the next poll.
    kb.stop()
    expect(banner).to_be_visible(timeout=POLL_MS * 2)
    expect(banner).to_contain_text("not answering")
    ports = (kb.proxy_port, kb.admin_port)
    kb.start()
    assert (kb.proxy_port, kb.admin_port) == ports
    # A restart signs everyone out (sessions live in memory): the page asks to sign in again.
    page.wait_for_url(f"{kb.admin_url}/login", timeout=POLL_MS * 3)
    sign_in_again = page.locator("#token")
    expect(sign_in_again).to_be_visible()
    page.fill("#token", kb.admin_token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{kb.admin_url}/")
    expect(page.locator("#offline")).to_be_hidden()
    expect(page.locator("#tile-store .big")).to_have_text("up")


def test_revoke_asks_first_and_ids_stay_whole(
    page: Any, keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    from playwright.sync_api import expect

    kb = keybrake_stripe
    keys = [kb.issue_key(agent_run_label=f"e2e/confirm-{i}") for i in range(3)]
    key_id = keys[0]["key_id"]
    r = httpx.post(
        "https://api.stripe.com/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": f"Bearer {keys[1]['vault_key']}"},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=15,
    )
    assert r.status_code == 200, r.text
    page.set_viewport_size({"width": 1000, "height": 900})
    sign_in(page, kb)
    page.goto(f"{kb.admin_url}/dashboard/keys")
    row = page.locator(f"#key-{key_id}")
    revoke = row.locator("button", has_text="Revoke")

    # Dismissed: nothing happens.
    asked: list[str] = []

    def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    revoke.click()
    page.wait_for_timeout(500)
    assert len(asked) == 1 and key_id in asked[0] and "e2e/confirm-0" in asked[0]
    assert kb.admin("GET", f"/vault/keys/{key_id}").json()["status"] == "active"
    expect(row.locator(".status")).to_have_text("active")

    # Accepted: revoked, and a revoked key does not "expire in" anything.
    page.once("dialog", lambda dialog: dialog.accept())
    revoke.click()
    expect(page.locator(".flash")).to_contain_text(f"Revoked {key_id}")
    assert kb.admin("GET", f"/vault/keys/{key_id}").json()["status"] == "revoked"
    expect(row.locator(".status")).to_have_text("revoked")
    expect(row.locator(".expires")).not_to_contain_text("in ")
    expect(page.locator(f"#key-{keys[2]['key_id']} .expires")).to_contain_text("in 1h")

    # Ids are never broken across lines, even on a narrow window.
    def one_line(locator: Any) -> None:
        assert locator.count() > 0
        for i in range(locator.count()):
            element = locator.nth(i)
            height = element.bounding_box()["height"]
            line = float(element.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)"))
            assert height < line * 1.5, (element.inner_text(), height, line)

    one_line(page.locator("table.keys tbody code.id"))
    page.goto(f"{kb.admin_url}/dashboard/audit")
    expect(page.locator("#audit-rows")).to_contain_text(keys[1]["key_id"])
    one_line(page.locator("#audit-rows code.id"))


def test_the_issue_form_has_no_vendor_chosen(
    page: Any, keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    from playwright.sync_api import expect

    kb = keybrake_stripe
    sign_in(page, kb)
    page.goto(f"{kb.admin_url}/dashboard/keys")
    vendor = page.locator("select[name=vendor]")
    expect(vendor).to_have_value("")
    chosen = "s => Array.from(s.options).filter(o => o.value && o.selected).map(o => o.value)"
    assert vendor.evaluate(chosen) == []
    page.fill("input[name=label]", "e2e/no-vendor")
    page.fill("input[name=daily_usd_cap]", "5")
    page.fill("textarea[name=allowed_endpoints]", "POST /v1/payment_intents")

    # The browser will not send it and says why, next to the select.
    page.click("form.issue button[type=submit]")
    assert vendor.evaluate("s => s.validationMessage")
    assert page.url == f"{kb.admin_url}/dashboard/keys"
    assert kb.admin("GET", "/vault/keys").json()["data"] == []

    # Sent anyway (a browser without form checks): the server says it, nothing is issued.
    page.evaluate("document.querySelector('form.issue').noValidate = true")
    page.click("form.issue button[type=submit]")
    error = page.locator("div.error")
    expect(error).to_contain_text("vendor")
    expect(error).to_contain_text("stripe")
    expect(vendor).to_have_value("")
    expect(page.locator("input[name=label]")).to_have_value("e2e/no-vendor")
    assert kb.admin("GET", "/vault/keys").json()["data"] == []
