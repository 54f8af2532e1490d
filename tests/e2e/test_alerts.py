"""Alerts that arrive: thresholds crossed by real Stripe SDK calls through the real proxy,
delivered to a real local receiver (HTTPS or HTTP) that fails, times out and recovers.

- each threshold is delivered exactly once across a receiver outage and a ``kill -9`` restart;
- two replicas on one Redis crossing the same threshold deliver it once;
- the signature verifies with the secret and not with another; Slack and PagerDuty bodies
  have their documented shapes; ``keybrake alerts test`` reports each webhook's answer;
- the secrets never appear in the proxy's log, the admin API's answers or the outbox rows;
- events: a revoked key, an estimate overrun (the key suspended), an unreachable store.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sqlite3
import subprocess
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import stripe
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests._redis import PrivateRedis
from tests.conftest import KEYBRAKE, REDIS_URL, ROOT, KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS, FakeTwilio
from tests.fakes.receiver import Received, WebhookReceiver

from keybrake.proxy._alert_webhooks import SIGNATURE_HEADER, verify_signature

pytestmark = pytest.mark.e2e

SECRET = "whsec_test_" + "k3y" * 8
ROUTING_KEY = "pdrk_test_" + "r0ut" * 6
THRESHOLD_50 = "[thresholds]\ndefault = [50]\n"
FAST = """
[delivery]
retry_base_seconds = 0.2
retry_max_seconds = 1.0
timeout_seconds = 1.0
poll_seconds = 0.1
"""


def alerts_file(tmp: Path, hooks: str, extra: str = "") -> Path:
    path = tmp / f"alerts-{time.monotonic_ns()}.toml"
    path.write_text(FAST + textwrap.dedent(extra) + textwrap.dedent(hooks))
    return path


def json_hook(url: str, ca: Path | None = None, name: str = "ops") -> str:
    ca_line = f'ca_file = "{ca}"\n' if ca else ""
    return f"""
[[webhooks]]
name = "{name}"
url = "{url}"
format = "json"
secret_env = "KB_TEST_WEBHOOK_SECRET"
{ca_line}"""


def proxy(factory: Any, fakes: dict[str, Any], alerts: Path, **kw: Any) -> KeybrakeProcess:
    env = {"KB_TEST_WEBHOOK_SECRET": SECRET, "KB_TEST_ROUTING_KEY": ROUTING_KEY}
    kb: KeybrakeProcess = factory(
        fakes, env=env, extra_args=["--set", f"keybrake_alerts={alerts}"], **kw
    )
    return kb


def pay(kb: KeybrakeProcess, vault_key: str, cents: int) -> Any:
    """A confirmed USD PaymentIntent through the proxy, with the real Stripe SDK."""
    client = stripe.StripeClient(vault_key, proxy=kb.proxy_url, max_network_retries=0)
    return client.v1.payment_intents.create(
        params={
            "amount": cents,
            "currency": "usd",
            "confirm": True,
            "payment_method": "pm_card_visa",
        }
    )


@pytest.fixture(autouse=True)
def _stripe_trusts_keybrake(monkeypatch: pytest.MonkeyPatch, keybrake_certs: Path) -> None:
    monkeypatch.setattr(stripe, "ca_bundle_path", str(keybrake_certs / "keybrake-ca-bundle.pem"))
    monkeypatch.setattr(stripe, "default_http_client", None)


def thresholds(received: list[Received]) -> Counter[tuple[str, str, int]]:
    """(node kind, node id, percent) of the threshold alerts accepted."""
    out: Counter[tuple[str, str, int]] = Counter()
    for r in received:
        body = r.json()
        if body["kind"] == "threshold":
            out[(body["node"]["kind"], body["node"]["id"], body["threshold_percent"])] += 1
    return out


def test_each_threshold_arrives_once_across_a_receiver_outage_and_a_kill_9(
    keybrake_factory: Any, fake_stripe: FakeStripe, fake_tls: FakeTLS, tmp_path: Path
) -> None:
    with WebhookReceiver(tls=fake_tls, hang_seconds=3) as rx:
        path = alerts_file(tmp_path, json_hook(f"{rx.url}/hook", fake_tls.ca_pem))
        kb = proxy(keybrake_factory, {"stripe": fake_stripe}, path)
        key = kb.issue_key(daily_usd_cap="10")
        kid, vk = key["key_id"], key["vault_key"]

        # 60 %: the 50 % threshold fires while the receiver answers 500.
        rx.mode = "fail"
        pay(kb, vk, 600)
        rx.wait_for(lambda: len(rx.all()) >= 2)
        assert not rx.accepted()
        kb.stop(signal.SIGKILL)

        # Restarted on the same store: the queued delivery is still there and arrives.
        rx.mode = "ok"
        kb.start()
        rx.wait_for(lambda: thresholds(rx.accepted()) == {("key_day", kid, 50): 1})

        # 85 %: 80 % fires while the receiver hangs past the sender's timeout, then recovers.
        rx.mode = "timeout"
        pay(kb, vk, 250)
        rx.wait_for(lambda: any(r.status == 0 for r in rx.all()), timeout=20)
        rx.mode = "ok"
        rx.wait_for(lambda: ("key_day", kid, 80) in thresholds(rx.accepted()))

        # 100 %: exactly the cap. Then a refused call: cap_hit, once however many refusals.
        pay(kb, vk, 150)
        for _ in range(3):
            with pytest.raises(stripe.StripeError):
                pay(kb, vk, 100)
        rx.wait_for(lambda: ("key_day", kid, 100) in thresholds(rx.accepted()))
        rx.wait_for(lambda: any(r.json()["kind"] == "cap_hit" for r in rx.accepted()))
        time.sleep(1.5)  # anything sent twice would have arrived by now

        got = thresholds(rx.accepted())
        assert got == {("key_day", kid, 50): 1, ("key_day", kid, 80): 1, ("key_day", kid, 100): 1}
        assert sum(r.json()["kind"] == "cap_hit" for r in rx.accepted()) == 1
        ids = [r.headers["Keybrake-Event-Id"] for r in rx.accepted()]
        assert len(ids) == len(set(ids))
        for r in rx.all():
            assert verify_signature(SECRET, r.headers[SIGNATURE_HEADER], r.body)
        body = next(r.json() for r in rx.accepted() if r.json().get("threshold_percent") == 80)
        assert body["spent_usd"] == "8.50" and body["cap_usd"] == "10.00"
        assert body["spent_micros"] == 8_500_000 and body["severity"] == "warning"

        # The admin API lists the deliveries, without the secret or the URL's path.
        listing = kb.admin("GET", "/vault/alerts")
        assert listing.status_code == 200
        data = listing.json()
        assert data["webhooks"] == [
            {
                "name": "ops",
                "url": f"{rx.url}/…",
                "format": "json",
                "events": data["webhooks"][0]["events"],
                "signed": True,
            }
        ]
        assert {r["result"] for r in data["recent"]} == {"delivered"}
        assert SECRET not in listing.text and "/hook" not in listing.text
        kb.stop()
    assert SECRET not in kb.log()
    db = sqlite3.connect(kb.data_dir / "keybrake.db")
    stored = db.execute("SELECT row FROM alert_log UNION ALL SELECT row FROM alert_outbox")
    text = "\n".join(r for (r,) in stored)
    assert "threshold" in text and SECRET not in text and "/hook" not in text


def test_two_replicas_on_redis_crossing_one_threshold_deliver_it_once(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str, tmp_path: Path
) -> None:
    with WebhookReceiver() as rx:
        path = alerts_file(tmp_path, json_hook(f"{rx.url}/hook"), "[thresholds]\ndefault = [30]\n")
        store = f"{REDIS_URL}?prefix={redis_prefix}"
        a = proxy(keybrake_factory, {"stripe": fake_stripe}, path, store=store)
        b = proxy(keybrake_factory, {"stripe": fake_stripe}, path, store=store)
        key = a.issue_key(daily_usd_cap="20")
        vk = key["vault_key"]
        # Eight $1 payments at once through both replicas: each replica's checks see the
        # 30 % crossed (from the 6th dollar on) and both try to fire it.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: pay((a, b)[i % 2], vk, 100), range(8)))
        rx.wait_for(lambda: len(rx.accepted()) >= 1)
        time.sleep(2)
        assert thresholds(rx.accepted()) == {("key_day", key["key_id"], 30): 1}
        assert len(rx.all()) == 1
        fired = 0.0
        for kb in (a, b):
            text = httpx.get(f"{kb.admin_url}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                if family.name == "keybrake_alerts_fired":
                    fired += sum(s.value for s in family.samples if s.name.endswith("_total"))
        assert fired == 1  # one replica was first; the other's attempt was deduplicated
    # The outbox lives in the store (one hash tag), and holds no secret.
    r = redis.Redis.from_url(REDIS_URL)
    names = [k.decode() for k in r.scan_iter(f"{redis_prefix}{{alerts}}*")]
    assert any(n.endswith(":log") or n.endswith("log") for n in names)
    logged = r.zrange(f"{redis_prefix}{{alerts}}log", 0, -1)
    assert len(logged) == 1
    for raw in logged:
        assert SECRET.encode() not in raw
    r.close()


def test_slack_and_pagerduty_bodies_and_the_cli_test_alert(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    with WebhookReceiver() as rx:
        hooks = (
            json_hook(f"{rx.url}/generic")
            + f"""
[[webhooks]]
name = "slack"
url = "{rx.url}/slack/T000/B000/XXXX"
format = "slack"

[[webhooks]]
name = "pager"
url = "{rx.url}/pd"
format = "pagerduty"
routing_key_env = "KB_TEST_ROUTING_KEY"
"""
        )
        kb = proxy(keybrake_factory, {"stripe": fake_stripe}, alerts_file(tmp_path, hooks))
        out = subprocess.run(
            [str(KEYBRAKE), "alerts", "test", "--admin-url", kb.admin_url, "--wait", "20"],
            env={**kb.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        for name in ("ops", "slack", "pager"):
            assert f"{name}: delivered (HTTP 200)" in out.stdout
        by_path = {r.path.split("/")[1]: r for r in rx.accepted()}
        assert set(by_path) == {"generic", "slack", "pd"}

        generic = by_path["generic"]
        assert verify_signature(SECRET, generic.headers[SIGNATURE_HEADER], generic.body)
        assert not verify_signature(
            "not-the-secret", generic.headers[SIGNATURE_HEADER], generic.body
        )
        assert not verify_signature(SECRET, generic.headers[SIGNATURE_HEADER], generic.body + b" ")
        assert generic.json()["type"] == "keybrake.alert" and generic.json()["kind"] == "test"

        slack = by_path["slack"].json()
        assert isinstance(slack["text"], str) and "test alert" in slack["text"]
        assert slack["blocks"][0]["type"] == "section"
        assert slack["blocks"][0]["text"]["type"] == "mrkdwn"
        assert SIGNATURE_HEADER not in by_path["slack"].headers  # no secret configured

        pd = by_path["pd"].json()
        assert set(pd) == {"routing_key", "event_action", "dedup_key", "payload"}
        assert pd["routing_key"] == ROUTING_KEY and pd["event_action"] == "trigger"
        assert pd["dedup_key"].startswith("test:")
        assert pd["payload"]["severity"] in ("critical", "error", "warning", "info")
        assert pd["payload"]["summary"] and pd["payload"]["source"]

        shown = kb.admin("GET", "/vault/alerts").text
        for secret in (SECRET, ROUTING_KEY, "T000/B000/XXXX"):
            assert secret not in shown
            assert secret not in kb.log()
            assert secret not in out.stdout + out.stderr
        rows = json.dumps(kb.admin("GET", "/vault/alerts").json()["recent"])
        assert ROUTING_KEY not in rows and SECRET not in rows


def test_a_revoked_key_is_an_alert(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    with WebhookReceiver() as rx:
        kb = proxy(
            keybrake_factory, {"stripe": fake_stripe}, alerts_file(tmp_path, json_hook(rx.url))
        )
        key = kb.issue_key()
        assert kb.admin("DELETE", f"/vault/keys/{key['key_id']}").status_code == 200
        assert kb.admin("DELETE", f"/vault/keys/{key['key_id']}").status_code == 200
        rx.wait_for(lambda: len(rx.accepted()) >= 1)
        time.sleep(0.5)
        bodies = [r.json() for r in rx.accepted()]
        assert [(b["kind"], b["key_id"]) for b in bodies] == [("key_revoked", key["key_id"])]

        # A kill switch is one alert for the action, not one per key; a dry run is none.
        stopped = [kb.issue_key(agent_run_label=f"bulk/run/{i}")["key_id"] for i in range(3)]
        selection = {"label_prefix": "bulk/run/"}
        assert kb.admin("POST", "/vault/bulk/revoke?dry_run=1", selection).status_code == 200
        assert kb.admin("POST", "/vault/bulk/revoke", selection).json()["count"] == 3
        rx.wait_for(lambda: len(rx.accepted()) >= 2)
        time.sleep(0.5)
        (bulk,) = [r.json() for r in rx.accepted()][1:]
        assert bulk["kind"] == "key_revoked" and bulk["details"]["bulk"] is True
        assert sorted(bulk["details"]["key_ids"]) == sorted(stopped)
        assert bulk["details"]["count"] == 3


def test_an_estimate_overrun_alerts_that_the_key_is_suspended(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    # A policy that prices a PaymentIntent at a flat $1: a $40 charge overruns it.
    policy = yaml.safe_load((ROOT / "policies" / "stripe.yaml").read_text())
    for endpoint in policy["endpoints"]:
        if endpoint["match"] == "POST /v1/payment_intents":
            endpoint["cost"] = {"kind": "fixed_usd", "usd": 1}
    src = tmp_path / "underpriced"
    src.mkdir()
    (src / "stripe.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    with WebhookReceiver() as rx:
        hooks = alerts_file(tmp_path, json_hook(rx.url), "[thresholds]\ndefault = [100]\n")
        kb = proxy(keybrake_factory, {"stripe": fake_stripe}, hooks, policies_src=src)
        key = kb.issue_key(daily_usd_cap="100")
        pay(kb, key["vault_key"], 4000)
        rx.wait_for(lambda: any(r.json()["kind"] == "key_suspended" for r in rx.accepted()))
        (body,) = [r.json() for r in rx.accepted() if r.json()["kind"] == "key_suspended"]
        assert body["key_id"] == key["key_id"] and body["severity"] == "critical"
        assert "overrun" in body["summary"] and body["label"] == "test/run"


def test_an_unreachable_store_is_an_alert_sent_from_memory(
    keybrake_factory: Any, fake_stripe: FakeStripe, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    with WebhookReceiver() as rx:
        extra = "[events]\nstore_down_seconds = 1\n"
        kb = proxy(
            keybrake_factory,
            {"stripe": fake_stripe},
            alerts_file(tmp_path, json_hook(rx.url), extra),
            store=private_redis.url,
        )
        key = kb.issue_key()
        private_redis.kill()
        with pytest.raises(stripe.StripeError):
            pay(kb, key["vault_key"], 100)
        rx.wait_for(lambda: any(r.json()["kind"] == "store_unreachable" for r in rx.accepted()))
        time.sleep(1.5)  # once per outage, not once per failed store step
        got = [r.json() for r in rx.accepted() if r.json()["kind"] == "store_unreachable"]
        assert len(got) == 1 and got[0]["severity"] == "critical"
        assert verify_signature(
            SECRET, rx.accepted()[0].headers[SIGNATURE_HEADER], rx.accepted()[0].body
        )


def test_a_threshold_reached_when_a_held_message_is_priced_later_arrives(
    keybrake_factory: Any, fake_twilio: FakeTwilio, tmp_path: Path
) -> None:
    """Twilio prices a message after sending it: the call is held at its estimate (not
    spent) and settled by the proxy's own follow-up read, off any call. The key's budgets
    are read again after the follow-up reads, so the threshold arrives without another call."""
    with WebhookReceiver() as rx:
        kb: KeybrakeProcess = keybrake_factory(
            {"twilio": fake_twilio},
            env={"KB_TEST_WEBHOOK_SECRET": SECRET},
            extra_args=[
                "--set",
                f"keybrake_alerts={alerts_file(tmp_path, json_hook(rx.url), THRESHOLD_50)}",
                "--set",
                "keybrake_followup_delays=0.3,1",
            ],
        )
        path = f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
        key = kb.issue_key(
            vendor="twilio", daily_usd_cap="0.01", allowed_endpoints=[f"POST {path}"]
        )
        r = httpx.post(
            f"https://api.twilio.com{path}",
            data={"To": "+14155550123", "From": "+15017122661", "Body": "hello"},
            auth=(fake_twilio.account_sid, key["vault_key"]),
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
        )
        assert r.status_code == 201 and r.json()["price"] is None
        time.sleep(1)
        assert rx.all() == []  # held, not spent: no threshold yet
        fake_twilio.deliver()  # priced now ($0.0079 of the $0.01 cap)
        rx.wait_for(lambda: len(rx.accepted()) >= 1, timeout=20)
        (body,) = [r.json() for r in rx.accepted()]
        assert body["kind"] == "threshold" and body["threshold_percent"] == 50
        assert body["spent_micros"] == fake_twilio.charged_usd_micros()
