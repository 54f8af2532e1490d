"""Alerts, from the attacker's side: a worker holding a vault key (or a pipeline driver
holding an issuer token) who has read the code.

- Webhook URLs come from the operator's alerts file only: no admin route takes one, an
  issuer token cannot even read the alert settings, a vault key opens nothing, and a
  configured webhook opens no egress for workers.
- A receiver cannot send the proxy elsewhere: a redirect is not followed.
- Secrets are never in the alerts file (refused there), in an error, in the admin API.
- One label cannot pre-empt another node's alert through a crafted dedupe key, and text
  that reaches a Slack message cannot ping a channel.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import KEYBRAKE, KeybrakeProcess
from tests.e2e.test_alerts import SECRET, alerts_file, json_hook, proxy
from tests.fakes import FakeStripe
from tests.fakes.receiver import WebhookReceiver

from keybrake.proxy._alert_rules import AlertConfigError, Webhook, load_alert_config
from keybrake.proxy._alert_webhooks import body_for, slack_escape
from keybrake.proxy.alerts import _part

pytestmark = pytest.mark.e2e


def test_no_route_takes_a_webhook_and_an_issuer_token_cannot_read_the_alerts(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    with WebhookReceiver() as rx:
        kb = proxy(
            keybrake_factory, {"stripe": fake_stripe}, alerts_file(tmp_path, json_hook(rx.url))
        )
        for method, path in (
            ("PUT", "/vault/alerts"),
            ("POST", "/vault/alerts"),
            ("PATCH", "/vault/alerts"),
            ("DELETE", "/vault/alerts"),
            ("GET", "/vault/alerts/test"),
        ):
            r = kb.admin(method, path, {"url": "http://127.0.0.1:1/x", "format": "json"})
            assert r.status_code == 405, (method, path, r.text)
        for path in ("/vault/alerts/webhooks", "/vault/alerts/ops"):
            assert kb.admin("POST", path, {"url": "http://127.0.0.1:1/"}).status_code == 404
        r = kb.admin(
            "POST",
            "/vault/issuers",
            {
                "vendors": ["stripe"],
                "label_prefix": f"beam/{uuid.uuid4().hex[:6]}/",
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "max_daily_usd_cap": "5",
            },
        )
        token = r.json()["token"]
        vault_key = kb.issue_key()["vault_key"]
        for method, path in (("GET", "/vault/alerts"), ("POST", "/vault/alerts/test")):
            r = kb.admin(method, path, {}, token=token)
            assert r.status_code == 403 and r.json()["error"]["code"] == "issuer_scope"
            assert kb.admin(method, path, {}, token=vault_key).status_code == 401
        # A configured webhook opens no egress: a worker cannot reach it through the proxy.
        via_proxy = httpx.post(f"{rx.url}/hook", content=b"{}", proxy=kb.proxy_url, timeout=10)
        assert via_proxy.status_code == 403
        assert via_proxy.json()["error"]["code"] == "egress_denied"
        time.sleep(0.5)
        assert rx.all() == []  # nothing refused above sent anything


def test_a_redirecting_receiver_does_not_send_the_proxy_elsewhere(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    with WebhookReceiver() as target, WebhookReceiver() as rx:
        rx.mode, rx.redirect_to = "redirect", f"{target.url}/stolen"
        kb = proxy(
            keybrake_factory, {"stripe": fake_stripe}, alerts_file(tmp_path, json_hook(rx.url))
        )
        assert kb.admin("POST", "/vault/alerts/test", {}).status_code == 202
        rx.wait_for(lambda: len(rx.all()) >= 2)
        assert target.all() == []
        pending = kb.admin("GET", "/vault/alerts").json()["pending"]
        assert [p["error"] for p in pending] == ["HTTP 307"]  # not delivered: retried


def test_the_alerts_file_refuses_secrets_and_plain_http_to_other_hosts(tmp_path: Path) -> None:
    def load(text: str) -> Any:
        path = tmp_path / f"{uuid.uuid4().hex}.toml"
        path.write_text(text)
        return load_alert_config(str(path), (50,), env={"S": SECRET})

    hook = '[[webhooks]]\nname = "x"\nformat = "json"\n'
    with pytest.raises(AlertConfigError, match="never in the alerts file") as e:
        load(hook + f'url = "https://a.example/"\nsecret = "{SECRET}"\n')
    assert SECRET not in str(e.value)
    with pytest.raises(AlertConfigError, match="https"):
        load(hook + 'url = "http://10.1.2.3/hook"\nsecret_env = "S"\n')
    with pytest.raises(AlertConfigError, match="signed"):
        load(hook + 'url = "https://a.example/"\n')
    with pytest.raises(AlertConfigError, match="not set"):
        load(hook + 'url = "https://a.example/"\nsecret_env = "NOT_THERE"\n')
    ok = load(hook + 'url = "https://a.example/p/T0/SECRETPATH"\nsecret_env = "S"\n')
    assert SECRET not in repr(ok) and "SECRETPATH" not in str(ok.public())


def test_a_bad_alerts_file_stops_the_proxy_with_one_line_and_no_secret(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    path = alerts_file(
        tmp_path, f'[[webhooks]]\nname = "x"\nurl = "https://a.example/"\nsecret = "{SECRET}"\n'
    )
    kb: KeybrakeProcess = proxy(keybrake_factory, {"stripe": fake_stripe}, path, start=False)
    with pytest.raises(RuntimeError, match="never in the alerts file") as e:
        kb.start(timeout=20)
    assert SECRET not in str(e.value)


def test_one_label_cannot_take_another_nodes_dedupe_key() -> None:
    # Labels may hold ':'; without escaping, label "a:2026-01-01:50" (window w, 50 %) and
    # label "a" ... would be able to share "threshold:label_day:a:2026-01-01:50:…".
    victim = f"threshold:label_day:{_part('a')}:2026-01-01:50"
    crafted = f"threshold:label_day:{_part('a:2026-01-01')}:50"
    assert victim != crafted and ":" not in _part("a:2026-01-01")
    assert _part("beam/billing/run 1@x+y=z.-_") == "beam/billing/run 1@x+y=z.-_"


def test_text_in_a_slack_message_cannot_ping_a_channel_or_link() -> None:
    hook = Webhook(name="s", url="https://hooks.example/x", format="slack")
    alert = {
        "alert_id": "a1",
        "kind": "key_suspended",
        "severity": "critical",
        "summary": "estimate overrun: POST /v1/x/<!channel>|<https://evil.example|click>",
        "at": "2026-01-01T00:00:00Z",
        "instance": "h:1",
        "label": "l",
    }
    body = body_for(hook, alert, "d").decode()
    assert "<!channel>" not in body and "<https://evil" not in body
    assert slack_escape("a<b>&") == "a&lt;b&gt;&amp;"


def test_keybrake_run_names_a_bad_alerts_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(f'[[webhooks]]\nname = "x"\nurl = "https://a.example/"\nsecret = "{SECRET}"\n')
    run = subprocess.run(
        [str(KEYBRAKE), "run", "--alerts", str(path), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KEYBRAKE_ADMIN_TOKEN": "kba_" + "x" * 40},
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "Error: alerts: webhooks[0] (x): put the secret in an environment variable "
        "(secret_env) or a file (secret_file), never in the alerts file"
    ]
    assert SECRET not in run.stdout + run.stderr
