"""The budget tree as a report: issuer → run label → key, with spent, reserved and remaining
per node, from the store's ledger (the same rows admission reserves against).

Keys issued with the admin token (or the command line) hang under a root node ``operator``;
keys an issuer token minted under that issuer. An issuer token sees only its own subtree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from keybrake.core.money import format_usd
from keybrake.store import IssuerRecord, KeyRecord, LabelBudget, Store, utc_day

__all__ = ["budget_tree"]


def _usd(micros: int | None) -> str | None:
    return None if micros is None else format_usd(micros)


def _window(cap: int | None, usage: tuple[int, int]) -> dict[str, Any]:
    """One budget of a node: its cap, spent, reserved and what remains (None: no cap)."""
    spent, reserved = usage
    remaining = None if cap is None else max(0, cap - spent - reserved)
    return {
        "cap_usd": _usd(cap),
        "spent_usd": format_usd(spent),
        "reserved_usd": format_usd(reserved),
        "remaining_usd": _usd(remaining),
    }


async def budget_tree(
    store: Store,
    now: dt.datetime,
    *,
    issuer: IssuerRecord | None = None,
    keys: Sequence[KeyRecord] | None = None,
) -> dict[str, Any]:
    """The budget tree of today (UTC) and of all time, as the admin API answers it
    (``GET /vault/tree``). With ``issuer``, only that issuer's subtree."""
    day = utc_day(now)
    records = list(keys) if keys is not None else await store.list_keys()
    if issuer is not None:
        records = [k for k in records if k.issuer_id == issuer.issuer_id]
    issuers: dict[str, IssuerRecord | None] = {}
    if issuer is not None:
        issuers[issuer.issuer_id] = issuer
    else:
        for found in await store.list_issuers():
            issuers[found.issuer_id] = found
    # root id ("" for the operator) -> label -> keys
    grouped: dict[str, dict[str, list[KeyRecord]]] = {}
    if issuer is not None:
        grouped[issuer.issuer_id] = {}
    for key in records:
        grouped.setdefault(key.issuer_id or "", {}).setdefault(key.agent_run_label, []).append(key)
    rows: list[tuple[str, str]] = []
    for root, labels in grouped.items():
        if root:
            rows += [(f"issuer:{root}", day), (f"issuer-lifetime:{root}", "lifetime")]
        for label, label_keys in labels.items():
            if label:
                rows += [(f"label:{label}", day), (f"label-lifetime:{label}", "lifetime")]
            for key in label_keys:
                rows += [(f"key:{key.key_id}", day), (f"key-lifetime:{key.key_id}", "lifetime")]
    usage = await store.tree_usage(rows)
    limits: dict[str, LabelBudget] = {}
    for labels in grouped.values():
        for label in labels:
            if label:
                limits[label] = await store.get_label_limits(label)

    def key_node(key: KeyRecord) -> dict[str, Any]:
        return {
            "node": "key",
            "key_id": key.key_id,
            "vendor": key.vendor,
            "status": key.state(now),
            "max_requests_per_minute": key.max_requests_per_minute,
            "daily": _window(key.daily_cap_micros, usage[(f"key:{key.key_id}", day)]),
            "lifetime": _window(
                key.usd_cap_micros, usage[(f"key-lifetime:{key.key_id}", "lifetime")]
            ),
        }

    def label_node(label: str, label_keys: list[KeyRecord]) -> dict[str, Any]:
        keys_json = [key_node(k) for k in label_keys]
        if not label:
            return {"node": "label", "label": None, "keys": keys_json}
        lim = limits[label]
        return {
            "node": "label",
            "label": label,
            "max_requests_per_minute": lim.max_requests_per_minute,
            "daily": _window(lim.daily_cap_micros, usage[(f"label:{label}", day)]),
            "lifetime": _window(
                lim.lifetime_cap_micros, usage[(f"label-lifetime:{label}", "lifetime")]
            ),
            "keys": keys_json,
        }

    data: list[dict[str, Any]] = []
    for root in sorted(grouped, key=lambda r: (r != "", r)):
        labels_json = [label_node(lb, ks) for lb, ks in sorted(grouped[root].items())]
        if not root:
            data.append({"node": "operator", "issuer_id": None, "labels": labels_json})
            continue
        record = issuers.get(root)
        data.append(
            {
                "node": "issuer",
                "issuer_id": root,
                "name": record.name if record else None,
                "label_prefix": record.label_prefix if record else None,
                "max_requests_per_minute": record.max_requests_per_minute if record else None,
                "daily": _window(
                    record.budget_daily_micros if record else None,
                    usage[(f"issuer:{root}", day)],
                ),
                "lifetime": _window(
                    record.budget_lifetime_micros if record else None,
                    usage[(f"issuer-lifetime:{root}", "lifetime")],
                ),
                "labels": labels_json,
            }
        )
    return {"object": "budget_tree", "day": day, "data": data}
