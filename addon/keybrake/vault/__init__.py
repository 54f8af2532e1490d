"""The vault key use-cases: issue, look up, revoke, suspend, resume, change caps, label budgets.

One implementation, called by the admin API (`keybrake.web.admin`), the dashboard
(`keybrake.web.dashboard`) and the command line on a local store (`keybrake.cli`; with
``--admin-url`` the command line calls the admin API, which calls this). Each caller parses
its input with `keybrake.vault.keyspec` (one set of rules, `KeySpecError` naming each bad
field), calls a use-case, and turns what comes back into its own answer: JSON, a page, a line
of text.

>>> vault = Vault(store, now=lambda: dt.datetime.now(dt.UTC), via="cli")  # doctest: +SKIP
>>> request = IssueKeyRequest.from_json({"vendor": "stripe", ...}, policies)  # doctest: +SKIP
>>> record, vault_key = await vault.issue(request)  # doctest: +SKIP
>>> [view.to_json(now) for view in await vault.keys()]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from keybrake.core.keys import hash_vault_key, looks_like_vault_key
from keybrake.core.money import format_usd
from keybrake.store import BudgetState, KeyRecord, Store
from keybrake.vault.keyspec import (
    IssueKeyRequest,
    KeyCapsChange,
    KeySpecError,
    api_time,
    key_to_json,
    parse_label_budget,
)

__all__ = [
    "IssueKeyRequest",
    "KeyCapsChange",
    "KeySpecError",
    "KeyView",
    "Vault",
    "api_time",
    "is_vault_key",
    "key_to_json",
    "parse_label_budget",
]

log = logging.getLogger("keybrake")

MAX_REASON = 200
"""Longest suspension reason kept (it is shown with every refusal of the key)."""


def is_vault_key(value: str) -> bool:
    """True when ``value`` is a vault key rather than a key id (``key_...``)."""
    return value.startswith("kbv_") or looks_like_vault_key(value)


@dataclasses.dataclass(frozen=True, slots=True)
class KeyView:
    """A key with its budgets as the ledger holds them now (key first, then its label's)."""

    key: KeyRecord
    budgets: tuple[BudgetState, ...]

    @property
    def spent_today_micros(self) -> int:
        """What the key has spent today, reservations of calls in flight included: the
        ledger's figure, exact (the audit log's sums are reports, not the budget)."""
        own = self.budgets[0] if self.budgets else None
        return own.used_micros if own else 0

    @property
    def remaining_micros(self) -> int | None:
        """The room left under the tightest of its budgets (None: no cap applies)."""
        left = [b.remaining_micros for b in self.budgets if b.remaining_micros is not None]
        return min(left) if left else None

    @property
    def used(self) -> float:
        """The largest fraction of any of its caps in use (0.0 when none is capped)."""
        return max(
            (b.used_micros / b.cap_micros for b in self.budgets if b.cap_micros),
            default=0.0,
        )

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        return key_to_json(self.key, now, self.budgets)


class Vault:
    """The use-cases over one store. ``via`` names the caller in the log lines."""

    def __init__(self, store: Store, *, now: Callable[[], dt.datetime], via: str) -> None:
        self.store = store
        self.now = now
        self.via = via

    # -- keys ------------------------------------------------------------------------------------
    async def issue(self, request: IssueKeyRequest) -> tuple[KeyRecord, str]:
        """Create the key a validated request (`IssueKeyRequest.from_json`) describes; the vault
        key is returned once and never stored (only its hash is)."""
        record, vault_key = request.new_key(self.now())
        await self.store.create_key(record)
        log.info(
            "keybrake: issued %s for %s label=%r (%s)",
            record.key_id,
            record.vendor,
            record.agent_run_label,
            self.via,
        )
        return record, vault_key

    async def keys(self, limit: int | None = None) -> list[KeyView]:
        """Every key (the first ``limit``), with its budgets."""
        now = self.now()
        records = await self.store.list_keys()
        return [KeyView(k, await self.store.budgets(k, now)) for k in records[:limit]]

    async def key(self, key_id: str) -> KeyView | None:
        found = await self.store.get_key(key_id)
        return (
            None if found is None else KeyView(found, await self.store.budgets(found, self.now()))
        )

    async def find(self, key: str) -> KeyRecord | None:
        """The key an argument names: a key id, or a vault key (looked up by its hash)."""
        if is_vault_key(key):
            return await self.store.get_key_by_secret_hash(hash_vault_key(key))
        return await self.store.get_key(key)

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoke: the next request with the key is refused on every replica."""
        key = await self.store.revoke_key(key_id, self.now())
        if key is not None:
            log.info("keybrake: revoked %s (%s)", key.key_id, self.via)
        return key

    async def suspend(self, key_id: str, reason: str | None) -> KeyRecord | None:
        """Suspend until resumed; ``reason`` (printable, at most `MAX_REASON` characters) is
        shown with every refusal."""
        text = "".join(ch for ch in (reason or "by operator") if ch.isprintable())[:MAX_REASON]
        key = await self.store.suspend_key(key_id, self.now(), text)
        if key is not None:
            log.info("keybrake: suspended %s (%s)", key.key_id, self.via)
        return key

    async def resume(self, key_id: str) -> KeyRecord | None:
        key = await self.store.resume_key(key_id)
        if key is not None:
            log.info("keybrake: resumed %s (%s)", key.key_id, self.via)
        return key

    async def set_caps(self, key_id: str, change: KeyCapsChange) -> KeyView | None:
        """New caps, read by every replica's next admission; nothing spent or reserved moves."""
        key = await self.store.set_key_caps(
            key_id,
            daily_cap_micros=change.daily_cap_micros,
            usd_cap_micros=change.usd_cap_micros,
            clear_usd_cap=change.clear_usd_cap,
        )
        if key is None:
            return None
        log.info("keybrake: changed the caps of %s (%s)", key_id, self.via)
        return KeyView(key, await self.store.budgets(key, self.now()))

    # -- label budgets ---------------------------------------------------------------------------
    async def set_label_budget(self, label: str, cap: int | None) -> dict[str, Any]:
        """Set (or, with None, remove) a label's shared daily cap (`parse_label_budget`)."""
        await self.store.set_label_budget(label, cap)
        log.info("keybrake: set the label budget of %r (%s)", label, self.via)
        return self._budget_json(label, cap)

    async def label_budget(self, label: str) -> dict[str, Any]:
        """What ``GET /vault/budgets/{label}`` answers."""
        return self._budget_json(label, await self.store.get_label_budget(label))

    def _budget_json(self, label: str, cap: int | None) -> dict[str, Any]:
        return {
            "object": "label_budget",
            "label": label,
            "daily_usd_cap": format_usd(cap) if cap is not None else None,
            "as_of": api_time(self.now()),
        }
