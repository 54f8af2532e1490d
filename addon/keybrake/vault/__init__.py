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

from keybrake.core.errors import Refusal
from keybrake.core.keys import hash_vault_key, looks_like_vault_key
from keybrake.core.money import format_usd
from keybrake.store import (
    BudgetState,
    IssuerRecord,
    KeyRecord,
    LabelBudget,
    LabelTreeConflict,
    Store,
    VendorFreeze,
)
from keybrake.vault.issuers import (
    ACTIONS,
    CreateIssuerRequest,
    IssuerScopeError,
    KeySelector,
    check_issue,
    covers,
    issuer_to_json,
    label_under,
    looks_like_issuer_token,
)
from keybrake.vault.keyspec import (
    IssueKeyRequest,
    KeyCapsChange,
    KeySpecError,
    api_time,
    key_to_json,
    parse_label_budget,
)
from keybrake.vault.tree import budget_tree

__all__ = [
    "ACTIONS",
    "CreateIssuerRequest",
    "IssueKeyRequest",
    "IssuerScopeError",
    "KeyCapsChange",
    "KeySelector",
    "KeySpecError",
    "KeyView",
    "Vault",
    "api_time",
    "covers",
    "freeze_to_json",
    "is_vault_key",
    "issuer_to_json",
    "key_to_json",
    "label_under",
    "looks_like_issuer_token",
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


def freeze_to_json(freeze: VendorFreeze) -> dict[str, Any]:
    return {
        "object": "vendor_freeze",
        "vendor": freeze.vendor,
        "reason": freeze.reason,
        "frozen_at": api_time(freeze.frozen_at),
    }


class Vault:
    """The use-cases over one store. ``via`` names the caller in the log lines."""

    def __init__(self, store: Store, *, now: Callable[[], dt.datetime], via: str) -> None:
        self.store = store
        self.now = now
        self.via = via

    # -- keys ------------------------------------------------------------------------------------
    async def issue(
        self, request: IssueKeyRequest, issuer: IssuerRecord | None = None
    ) -> tuple[KeyRecord, str]:
        """Create the key a validated request (`IssueKeyRequest.from_json`) describes; the vault
        key is returned once and never stored (only its hash is). With ``issuer`` (the caller
        is an issuer token) the key must be within its limits (`IssuerScopeError`) and records
        that it minted it."""
        if issuer is not None:
            check_issue(issuer, request)
        record, vault_key = request.new_key(self.now())
        if issuer is not None:
            record = dataclasses.replace(record, issuer_id=issuer.issuer_id)
        try:
            await self.store.create_key(record)
        except LabelTreeConflict as e:
            # An issuer is not told which other issuer holds the label.
            where = "the operator's" if e.home is None else "another issuer token's"
            if issuer is None and e.home is not None:
                where = f"issuer {e.home}'s"
            raise Refusal(
                "label_tree_conflict",
                f"label {record.agent_run_label[:80]!r} already has keys in {where} budget "
                "tree: a label's keys are all minted by one issuer token, or all by the "
                "operator; choose another label",
                extra={"label": record.agent_run_label},
            ) from None
        log.info(
            "keybrake: issued %s for %s label=%r (%s%s)",
            record.key_id,
            record.vendor,
            record.agent_run_label,
            self.via,
            f", issuer {issuer.issuer_id}" if issuer is not None else "",
        )
        return record, vault_key

    async def keys(
        self, limit: int | None = None, issuer: IssuerRecord | None = None
    ) -> list[KeyView]:
        """Every key (the first ``limit``), with its budgets; with ``issuer``, only the keys in
        its scope (`covers`)."""
        now = self.now()
        records = await self.store.list_keys()
        if issuer is not None:
            records = [k for k in records if covers(issuer, k)]
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

    # -- issuer tokens ---------------------------------------------------------------------------
    async def create_issuer(self, request: CreateIssuerRequest) -> tuple[IssuerRecord, str]:
        """Create an issuer token (`CreateIssuerRequest.from_json`); the token is returned
        once and never stored (only its SHA-256 is)."""
        record, token = request.new_issuer(self.now())
        await self.store.create_issuer(record)
        log.info(
            "keybrake: created issuer %s for %s under %r (%s)",
            record.issuer_id,
            ",".join(record.vendors),
            record.label_prefix,
            self.via,
        )
        return record, token

    async def issuers(self) -> list[IssuerRecord]:
        return await self.store.list_issuers()

    async def issuer(self, issuer_id: str) -> IssuerRecord | None:
        return await self.store.get_issuer(issuer_id)

    async def issuer_of_token(self, token: str) -> IssuerRecord | None:
        """The issuer a bearer token is (looked up by its SHA-256); None for anything else."""
        if not looks_like_issuer_token(token):
            return None
        return await self.store.get_issuer_by_token_hash(hash_vault_key(token))

    async def revoke_issuer(
        self, issuer_id: str, *, revoke_keys: bool = False
    ) -> tuple[IssuerRecord | None, list[KeyRecord]]:
        """Revoke an issuer token (its next use is refused); with ``revoke_keys``, every key it
        minted too. Returns the issuer (None if unknown) and the keys revoked now."""
        issuer = await self.store.revoke_issuer(issuer_id, self.now())
        if issuer is None:
            return None, []
        log.info("keybrake: revoked issuer %s (%s)", issuer_id, self.via)
        keys: list[KeyRecord] = []
        if revoke_keys:
            keys = await self.stop_keys(KeySelector(issuer_id=issuer_id), "revoke")
        return issuer, keys

    # -- kill switches ---------------------------------------------------------------------------
    async def select_keys(
        self, selector: KeySelector, action: str, issuer: IssuerRecord | None = None
    ) -> list[KeyRecord]:
        """The keys ``action`` (`ACTIONS`) would change now: selected, in the issuer's scope
        when one asks, and not already in the state the action leaves them in."""
        now = self.now()
        wanted = {
            "revoke": ("active", "suspended"),
            "suspend": ("active",),
            "resume": ("suspended",),
        }[action]
        return [
            k
            for k in await self.store.list_keys()
            if selector.selects(k)
            and (issuer is None or covers(issuer, k))
            and k.state(now) in wanted
        ]

    async def stop_keys(
        self,
        selector: KeySelector,
        action: str,
        *,
        reason: str | None = None,
        dry_run: bool = False,
        issuer: IssuerRecord | None = None,
    ) -> list[KeyRecord]:
        """Revoke, suspend (or resume) every key `select_keys` names; with ``dry_run`` only say
        which. Each change is read by every replica's next admission of that key. A key
        issued while this runs may be missed: run it again, or freeze the vendor."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
        selected = await self.select_keys(selector, action, issuer)
        if dry_run:
            return selected
        done: list[KeyRecord] = []
        for key in selected:
            if action == "revoke":
                changed = await self.store.revoke_key(key.key_id, self.now())
            elif action == "suspend":
                text = "".join(ch for ch in (reason or "kill switch") if ch.isprintable())
                changed = await self.store.suspend_key(key.key_id, self.now(), text[:MAX_REASON])
            else:
                changed = await self.store.resume_key(key.key_id)
            if changed is not None:
                done.append(changed)
        log.info(
            "keybrake: %s %d keys (%s; %s)",
            {"revoke": "revoked", "suspend": "suspended", "resume": "resumed"}[action],
            len(done),
            ", ".join(f"{k}={v}" for k, v in selector.to_json().items() if v is not None),
            self.via,
        )
        return done

    async def freeze(self, vendor: str, reason: str | None) -> VendorFreeze:
        """Refuse every call to ``vendor`` (``503 vendor_frozen``) on every replica until
        `unfreeze`; ``reason`` is shown with every refusal."""
        text = "".join(ch for ch in (reason or "frozen by an operator") if ch.isprintable())
        frozen = await self.store.freeze_vendor(vendor, text[:MAX_REASON], self.now())
        log.warning("keybrake: froze every call to %s (%s)", vendor, self.via)
        return frozen

    async def unfreeze(self, vendor: str) -> bool:
        lifted = await self.store.unfreeze_vendor(vendor)
        if lifted:
            log.warning("keybrake: lifted the freeze of %s (%s)", vendor, self.via)
        return lifted

    async def freezes(self) -> list[VendorFreeze]:
        return await self.store.frozen_vendors()

    # -- the budget tree ---------------------------------------------------------------------------
    async def tree(self, issuer: IssuerRecord | None = None) -> dict[str, Any]:
        """The budget tree (issuer → label → key) with spent, reserved and remaining per node
        (`keybrake.vault.tree.budget_tree`); with ``issuer``, only its own subtree."""
        return await budget_tree(self.store, self.now(), issuer=issuer)

    # -- label budgets ---------------------------------------------------------------------------
    async def set_label_budget(self, label: str, cap: int | LabelBudget | None) -> dict[str, Any]:
        """Set a label node's limits (`parse_label_budget`): a `LabelBudget` sets its daily
        cap, lifetime cap and request-rate limit at once (each None: none); an int (or None)
        sets (or removes) only the daily cap."""
        if isinstance(cap, LabelBudget):
            await self.store.set_label_limits(cap)
        else:
            await self.store.set_label_budget(label, cap)
        log.info("keybrake: set the label budget of %r (%s)", label, self.via)
        return self._budget_json(await self.store.get_label_limits(label))

    async def label_budget(self, label: str) -> dict[str, Any]:
        """What ``GET /vault/budgets/{label}`` answers."""
        return self._budget_json(await self.store.get_label_limits(label))

    def _budget_json(self, limits: LabelBudget) -> dict[str, Any]:
        def usd(micros: int | None) -> str | None:
            return format_usd(micros) if micros is not None else None

        return {
            "object": "label_budget",
            "label": limits.label,
            "daily_usd_cap": usd(limits.daily_cap_micros),
            "usd_cap": usd(limits.lifetime_cap_micros),
            "max_requests_per_minute": limits.max_requests_per_minute,
            "as_of": api_time(self.now()),
        }
