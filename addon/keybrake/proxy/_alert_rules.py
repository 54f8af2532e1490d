"""Alert rules: the operator's alerts file, thresholds per budget node, and the alerts.

The alerts file (``keybrake_alerts``, ``keybrake run --alerts FILE``) is TOML::

    [thresholds]
    default = [50, 80, 100]                    # percent of a cap (else keybrake_alert_thresholds)
    labels = { "beam/billing/" = [25, 50, 100] }   # by label prefix: the longest wins
    keys = { "key_0123abcd" = [90, 100] }           # one key's nodes

    [[webhooks]]
    name = "ops"
    url = "https://alerts.example.com/keybrake"
    format = "json"                 # json | slack | pagerduty
    secret_env = "KEYBRAKE_WEBHOOK_OPS_SECRET"   # or secret_file = "/run/secrets/…"
    events = ["threshold", "cap_hit"]             # default: every kind

Secrets (the HMAC secret, PagerDuty's routing key) are named by environment variable or
file, never written in the file, and never put in an outbox row, a log line or an answer.

**Which amount a threshold compares: spent, not spent + reserved.** A reservation is the
estimate of a call still in flight (an LLM call reserves its ``max_tokens`` worth); most are
released or settled lower a moment later. A threshold fires once per window and cannot be
taken back, so it compares what is spent (settled, and estimates kept because no answer
came): an 80 % alert means 80 % of the cap is gone. A cap refusal (spent + reserved reached
the cap, the admission's rule) is its own event, ``cap_hit``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from keybrake.store import BudgetState

__all__ = [
    "EVENT_KINDS",
    "FORMATS",
    "NODE_KINDS",
    "AlertConfig",
    "AlertConfigError",
    "Node",
    "Webhook",
    "crossed",
    "load_alert_config",
    "nodes_of",
    "parse_thresholds",
    "threshold_alert",
    "window_end",
]

FORMATS: Final = ("json", "slack", "pagerduty")
EVENT_KINDS: Final = (
    "threshold",
    "cap_hit",
    "key_suspended",
    "key_revoked",
    "issuer_revoked",
    "store_unreachable",
    "audit_behind",
    "test",
)

NODE_KINDS: Final[dict[str, str]] = {
    # A budget's scope prefix (`BudgetState.scope` is "<prefix>:<id>") -> its node kind.
    # A new node of the budget tree plugs in with one line here.
    "key": "key_day",
    "key-lifetime": "key_lifetime",
    "label": "label_day",
    "label-lifetime": "label_lifetime",
    "issuer": "issuer_day",
    "issuer-lifetime": "issuer_lifetime",
}


class AlertConfigError(ValueError):
    """The alerts file or a threshold list is wrong (the message says where)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """One budget node in one window: what thresholds are checked over (see the module)."""

    kind: str  # NODE_KINDS' values
    node_id: str  # the key id, label or issuer id
    window: str  # "YYYY-MM-DD" or "lifetime"
    cap_micros: int
    spent_micros: int


def nodes_of(budgets: Iterable[BudgetState], plus_reserved: bool = False) -> list[Node]:
    """The nodes with a cap among ``budgets`` (scopes of unknown kinds are skipped), with
    what is spent (``plus_reserved``: spent + reserved, an upper bound used as a filter)."""
    out = []
    for b in budgets:
        prefix, _, node_id = b.scope.partition(":")
        kind = NODE_KINDS.get(prefix)
        if kind is None or b.cap_micros is None or b.cap_micros <= 0:
            continue
        amount = b.used_micros if plus_reserved else b.spent_micros
        out.append(Node(kind, node_id, b.window, b.cap_micros, amount))
    return out


def crossed(node: Node, percents: Sequence[int]) -> list[int]:
    """The thresholds ``node`` has reached, exactly (integer arithmetic, no floats)."""
    return [p for p in percents if node.spent_micros * 100 >= node.cap_micros * p]


def window_end(window: str) -> dt.datetime | None:
    """When a window's dedupe may be forgotten: a day after the UTC day ends; None for
    lifetime windows (they fire once ever)."""
    if window == "lifetime":
        return None
    day = dt.datetime.strptime(window, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    return day + dt.timedelta(days=2)


def parse_thresholds(value: object, where: str) -> tuple[int, ...]:
    """Percents 1..1000 (integers), from a list or a comma-separated string; sorted, unique."""
    items: list[object]
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise AlertConfigError(f"{where}: give a list of percents, e.g. [50, 80, 100]")
    out = set()
    for item in items:
        if isinstance(item, bool):
            raise AlertConfigError(f"{where}: {item!r} is not a whole percent")
        try:
            percent = int(item) if isinstance(item, int | str) else None
        except ValueError:
            percent = None
        if percent is None or not 1 <= percent <= 1000:
            raise AlertConfigError(f"{where}: {item!r} is not a whole percent from 1 to 1000")
        out.add(percent)
    return tuple(sorted(out))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class Webhook:
    """One operator-configured receiver. ``secret`` and ``routing_key`` are never shown:
    `public` is what the admin API lists (the URL's path may be a credential: Slack's is)."""

    name: str
    url: str
    format: str
    secret: str = dataclasses.field(default="", repr=False)
    routing_key: str = dataclasses.field(default="", repr=False)
    events: tuple[str, ...] = EVENT_KINDS
    ca_file: str | None = None

    @property
    def shown_url(self) -> str:
        """The URL without its path, query or user info: ``https://host:port/…``."""
        u = urllib.parse.urlsplit(self.url)
        port = f":{u.port}" if u.port else ""
        return f"{u.scheme}://{u.hostname}{port}/…"

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.shown_url,
            "format": self.format,
            "events": list(self.events),
            "signed": bool(self.secret),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class AlertConfig:
    """The thresholds and webhooks in force."""

    default: tuple[int, ...] = (50, 80, 100)
    by_label: tuple[tuple[str, tuple[int, ...]], ...] = ()
    by_key: tuple[tuple[str, tuple[int, ...]], ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    max_attempts: int = 50
    timeout_seconds: float = 5.0
    poll_seconds: float = 1.0
    # The audit outbox is "behind" past this many rows waiting.
    audit_behind_rows: int = 10_000
    # The store is "unreachable" once it has failed this long without a success.
    store_down_seconds: float = 10.0

    def thresholds_for(self, node: Node, label: str | None, key_id: str | None) -> tuple[int, ...]:
        """A key's own thresholds, else its label's (longest prefix), else the default."""
        keys = dict(self.by_key)
        if key_id is not None and node.kind.startswith("key") and key_id in keys:
            return keys[key_id]
        if label:
            best = max((p for p, _ in self.by_label if label.startswith(p)), key=len, default=None)
            if best is not None:
                return dict(self.by_label)[best]
        return self.default

    def public(self) -> dict[str, Any]:
        return {
            "thresholds": {
                "default": list(self.default),
                "labels": {p: list(t) for p, t in self.by_label},
                "keys": {k: list(t) for k, t in self.by_key},
                "compares": "spent",
            },
            "webhooks": [w.public() for w in self.webhooks],
            "retry": {
                "base_seconds": self.retry_base_seconds,
                "max_seconds": self.retry_max_seconds,
                "max_attempts": self.max_attempts,
            },
        }


def _secret(entry: Mapping[str, Any], name: str, where: str, env: Mapping[str, str]) -> str:
    by_env, by_file = entry.get(f"{name}_env"), entry.get(f"{name}_file")
    if name in entry:
        raise AlertConfigError(
            f"{where}: put the {name} in an environment variable ({name}_env) or a file "
            f"({name}_file), never in the alerts file"
        )
    if by_env and by_file:
        raise AlertConfigError(f"{where}: give {name}_env or {name}_file, not both")
    if by_env:
        value = env.get(str(by_env), "").strip()
        if not value:
            raise AlertConfigError(f"{where}: environment variable {by_env} is not set")
        return value
    if by_file:
        try:
            value = Path(str(by_file)).expanduser().read_text().strip()
        except OSError as e:
            raise AlertConfigError(f"{where}: {name}_file {by_file}: {e.strerror}") from None
        if not value:
            raise AlertConfigError(f"{where}: {name}_file {by_file} is empty")
        return value
    return ""


def _webhook(entry: object, index: int, env: Mapping[str, str]) -> Webhook:
    where = f"webhooks[{index}]"
    if not isinstance(entry, dict):
        raise AlertConfigError(f"{where}: a table with name, url and format")
    known = {
        "name", "url", "format", "events", "ca_file",
        "secret_env", "secret_file", "routing_key_env", "routing_key_file",
    }  # fmt: skip
    unknown = set(entry) - known - {"secret", "routing_key"}
    if unknown:
        raise AlertConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise AlertConfigError(f"{where}: name: a short text naming the receiver")
    where = f"webhooks[{index}] ({name})"
    fmt = entry.get("format", "json")
    if fmt not in FORMATS:
        raise AlertConfigError(f"{where}: format must be one of {', '.join(FORMATS)}")
    url = entry.get("url")
    if not isinstance(url, str):
        raise AlertConfigError(f"{where}: url: the receiver's https:// URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise AlertConfigError(f"{where}: url must be an https:// URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise AlertConfigError(
            f"{where}: url must be https:// (plain http only to a loopback receiver)"
        )
    events = entry.get("events", list(EVENT_KINDS))
    if not isinstance(events, list) or not events or set(events) - set(EVENT_KINDS):
        raise AlertConfigError(f"{where}: events: a list of {', '.join(EVENT_KINDS)}")
    if "test" not in events:
        events = [*events, "test"]
    secret = _secret(entry, "secret", where, env)
    if fmt == "json" and not secret:
        raise AlertConfigError(f"{where}: a json webhook is signed: give secret_env or secret_file")
    routing_key = _secret(entry, "routing_key", where, env)
    if fmt == "pagerduty" and not routing_key:
        raise AlertConfigError(f"{where}: pagerduty needs routing_key_env or routing_key_file")
    ca_file = entry.get("ca_file")
    if ca_file is not None and not Path(str(ca_file)).expanduser().is_file():
        raise AlertConfigError(f"{where}: ca_file {ca_file} is not a file")
    return Webhook(
        name=name,
        url=url,
        format=fmt,
        secret=secret,
        routing_key=routing_key,
        events=tuple(str(e) for e in events),
        ca_file=None if ca_file is None else str(Path(str(ca_file)).expanduser()),
    )


def _number(data: Mapping[str, Any], name: str, default: float, low: float) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise AlertConfigError(f"{name}: a number of at least {low}")
    return float(value)


def load_alert_config(
    path: str, default: tuple[int, ...], env: Mapping[str, str] | None = None
) -> AlertConfig:
    """The alerts file at ``path`` ("" for none: thresholds ``default``, no webhooks)."""
    env = os.environ if env is None else env
    if not path:
        return AlertConfig(default=default)
    try:
        data = tomllib.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise AlertConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise AlertConfigError(f"{path}: {e}") from None
    unknown = set(data) - {"thresholds", "webhooks", "delivery", "events"}
    if unknown:
        raise AlertConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    th = data.get("thresholds", {})
    if not isinstance(th, dict) or set(th) - {"default", "labels", "keys"}:
        raise AlertConfigError(f"{path}: [thresholds] takes default, labels and keys")
    if "default" in th:
        default = parse_thresholds(th["default"], "thresholds.default")
    groups = []
    for group in ("labels", "keys"):
        table = th.get(group, {})
        if not isinstance(table, dict):
            raise AlertConfigError(f"thresholds.{group}: a table of name = [percents]")
        groups.append(
            tuple(
                (str(k), parse_thresholds(v, f"thresholds.{group}.{k}")) for k, v in table.items()
            )
        )
    hooks = data.get("webhooks", [])
    if not isinstance(hooks, list):
        raise AlertConfigError(f"{path}: webhooks: an array of tables ([[webhooks]])")
    webhooks = tuple(_webhook(entry, i, env) for i, entry in enumerate(hooks))
    names = [w.name for w in webhooks]
    if len(set(names)) != len(names):
        raise AlertConfigError(f"{path}: webhook names must differ")
    delivery = data.get("delivery", {})
    events = data.get("events", {})
    if not isinstance(delivery, dict) or not isinstance(events, dict):
        raise AlertConfigError(f"{path}: [delivery] and [events] are tables")
    return AlertConfig(
        default=default,
        by_label=groups[0],
        by_key=groups[1],
        webhooks=webhooks,
        retry_base_seconds=_number(delivery, "retry_base_seconds", 2.0, 0.01),
        retry_max_seconds=_number(delivery, "retry_max_seconds", 300.0, 0.01),
        max_attempts=int(_number(delivery, "max_attempts", 50, 1)),
        timeout_seconds=_number(delivery, "timeout_seconds", 5.0, 0.1),
        poll_seconds=_number(delivery, "poll_seconds", 1.0, 0.05),
        audit_behind_rows=int(_number(events, "audit_behind_rows", 10_000, 1)),
        store_down_seconds=_number(events, "store_down_seconds", 10.0, 0.0),
    )


def threshold_alert(
    node: Node, percent: int, label: str | None, vendor: str | None
) -> dict[str, Any]:
    """The alert (without id, time and instance: `keybrake.proxy.alerts` adds them) of
    ``node`` reaching ``percent`` of its cap."""
    from keybrake.core.money import format_usd

    where = "lifetime" if node.window == "lifetime" else f"on {node.window}"
    return {
        "kind": "threshold",
        "severity": "critical" if percent >= 100 else "warning" if percent >= 80 else "info",
        "summary": (
            f"{node.kind} {node.node_id} reached {percent}% of its cap {where}: "
            f"${format_usd(node.spent_micros)} of ${format_usd(node.cap_micros)} spent"
        ),
        "node": {"kind": node.kind, "id": node.node_id, "window": node.window},
        "threshold_percent": percent,
        "cap_micros": node.cap_micros,
        "spent_micros": node.spent_micros,
        "label": label,
        "vendor": vendor,
    }
