"""Alert webhooks: the bodies (generic JSON, Slack, PagerDuty Events v2), the signature,
and one delivery attempt.

The signature is Stripe's scheme: the header ``Keybrake-Signature: t=<unix seconds>,v1=<hex>``
where ``v1`` is HMAC-SHA256 with the webhook's secret over ``"<t>." + body`` (the raw bytes
sent). A receiver recomputes it, compares in constant time and refuses old ``t`` values
(`verify_signature` is the reference, and what the README shows).

A delivery goes straight from the proxy process to the operator's URL (never through the
forward proxy, so no egress rule changes), ignores ``HTTPS_PROXY`` and the like, follows no
redirects (a receiver cannot send it elsewhere), and never reports the URL's path or the
secret: errors name the webhook and the status or exception type.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import ssl
import time
from typing import Any, Final

import certifi
import httpx

from keybrake.core.money import format_usd
from keybrake.proxy._alert_rules import Webhook

__all__ = [
    "SIGNATURE_HEADER",
    "body_for",
    "send",
    "sign",
    "slack_escape",
    "verify_signature",
]

SIGNATURE_HEADER: Final = "Keybrake-Signature"
_PD_SEVERITY: Final = {"critical": "critical", "warning": "warning", "info": "info"}
_SLACK_ICON: Final = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}


class _HideWebhooks(logging.Filter):
    """Drops httpx's "HTTP Request: POST <url>" lines for webhook URLs (a URL's path may be
    its credential: Slack's is); httpx's lines about vendor calls stay."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(str(a).startswith(u) for a in args for u in self.urls)


_HIDDEN = _HideWebhooks()
logging.getLogger("httpx").addFilter(_HIDDEN)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Keybrake-Signature`` header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance: int = 300, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds.

    >>> h = sign("s3cret", 1_700_000_000, b"{}")
    >>> verify_signature("s3cret", h, b"{}", now=1_700_000_010)
    True
    >>> verify_signature("wrong", h, b"{}", now=1_700_000_010)
    False
    """
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        fields.setdefault(k, []).append(v)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    want = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(want, v) for v in fields.get("v1", []))


def _usd(micros: object) -> str | None:
    return format_usd(micros) if isinstance(micros, int) and not isinstance(micros, bool) else None


def _generic(alert: dict[str, Any], dedupe: str) -> dict[str, Any]:
    return {
        "type": "keybrake.alert",
        "id": alert["alert_id"],
        "dedupe_key": dedupe,
        "kind": alert["kind"],
        "severity": alert["severity"],
        "summary": alert["summary"],
        "at": alert["at"],
        "instance": alert["instance"],
        "node": alert.get("node"),
        "threshold_percent": alert.get("threshold_percent"),
        "cap_usd": _usd(alert.get("cap_micros")),
        "spent_usd": _usd(alert.get("spent_micros")),
        "cap_micros": alert.get("cap_micros"),
        "spent_micros": alert.get("spent_micros"),
        "key_id": alert.get("key_id"),
        "label": alert.get("label"),
        "vendor": alert.get("vendor"),
        "issuer_id": alert.get("issuer_id"),
        "details": alert.get("details") or {},
    }


def slack_escape(text: str) -> str:
    """Slack's control characters escaped (``&``, ``<``, ``>``): text from a request (a
    path in a suspension reason) cannot become ``<!channel>`` or a link.

    >>> slack_escape("<!channel> & <https://x|y>")
    '&lt;!channel&gt; &amp; &lt;https://x|y&gt;'
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack(alert: dict[str, Any]) -> dict[str, Any]:
    icon = _SLACK_ICON.get(alert["severity"], "")
    summary = slack_escape(str(alert["summary"]))
    text = f"{icon} Keybrake {alert['severity']}: {summary}".strip()
    instance = slack_escape(str(alert["instance"]))
    context = [f"kind `{alert['kind']}`", f"instance `{instance}`", alert["at"]]
    for name in ("label", "key_id", "vendor"):
        if alert.get(name):
            context.append(f"{name} `{slack_escape(str(alert[name]))}`")
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": " · ".join(context)}],
            },
        ],
    }


def _pagerduty(alert: dict[str, Any], dedupe: str, routing_key: str) -> dict[str, Any]:
    details = {k: v for k, v in _generic(alert, dedupe).items() if v not in (None, {}, "")}
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedupe[:255],
        "payload": {
            "summary": alert["summary"][:1024],
            "severity": _PD_SEVERITY.get(alert["severity"], "warning"),
            "source": alert["instance"],
            "component": "keybrake",
            "group": alert.get("label") or "",
            "class": alert["kind"],
            "timestamp": alert["at"],
            "custom_details": details,
        },
    }


def body_for(hook: Webhook, alert: dict[str, Any], dedupe: str) -> bytes:
    """The bytes ``hook`` is sent for ``alert``."""
    if hook.format == "slack":
        payload = _slack(alert)
    elif hook.format == "pagerduty":
        payload = _pagerduty(alert, dedupe, hook.routing_key)
    else:
        payload = _generic(alert, dedupe)
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def _tls(hook: Webhook) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    if hook.ca_file:
        context.load_verify_locations(cafile=hook.ca_file)
    return context


async def send(
    hook: Webhook, alert: dict[str, Any], dedupe: str, attempt: int, timeout: float
) -> tuple[bool, int | None, str]:
    """One attempt: ``(delivered, HTTP status or None, what went wrong or "")``. A 2xx
    answer is delivered; anything else (other statuses, a redirect, a timeout) is retried."""
    body = body_for(hook, alert, dedupe)
    _HIDDEN.urls.add(hook.url)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "keybrake-alerts/1",
        "Keybrake-Event-Id": str(alert["alert_id"]),
        "Keybrake-Delivery-Attempt": str(attempt),
    }
    if hook.secret:
        headers[SIGNATURE_HEADER] = sign(hook.secret, int(time.time()), body)
    try:
        # ``timeout`` bounds the whole attempt (httpx's bounds each read and write).
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(
                timeout=timeout, follow_redirects=False, trust_env=False, verify=_tls(hook)
            ) as client,
        ):
            r = await client.post(hook.url, content=body, headers=headers)
    except (httpx.TimeoutException, TimeoutError):
        return False, None, "timed out"
    except (httpx.HTTPError, OSError, ssl.SSLError) as e:
        return False, None, f"{type(e).__name__}"
    if 200 <= r.status_code < 300:
        return True, r.status_code, ""
    return False, r.status_code, f"HTTP {r.status_code}"
