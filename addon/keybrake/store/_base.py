"""The `Store` protocol: vault keys, budgets, the reservation ledger and the idempotency cache.

Every backend (embedded SQLite, Redis) implements this one interface and passes one shared
contract test suite (``tests/store/test_contract.py``). All money is integer micro-USD
(1 USD = 1_000_000). Days are UTC calendar days written ``YYYY-MM-DD``; the caller passes the
current time (``now``, an aware UTC ``datetime``) so tests can move the clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Final, Literal, Protocol, runtime_checkable

__all__ = [
    "OBJECT_TTL",
    "Admission",
    "AdmissionRequest",
    "BudgetState",
    "Hold",
    "IdempotencyBegin",
    "IdempotencyClaim",
    "IssuerRecord",
    "KeyRecord",
    "LabelBudget",
    "LabelTreeConflict",
    "ObjectOwner",
    "RateResult",
    "ReserveResult",
    "Settlement",
    "Store",
    "StoreUnavailable",
    "StoredResponse",
    "VendorFreeze",
    "utc_day",
]


OBJECT_TTL: Final = dt.timedelta(days=90)
"""How long the owner of a vendor object is remembered."""


class StoreUnavailable(Exception):
    """The backend could not be reached or failed; callers must fail closed (503)."""


class LabelTreeConflict(ValueError):
    """`Store.create_key`: the key's label already has keys in another budget tree (minted by
    another issuer, or by the operator when this key is an issuer's, or the other way round).

    A label's usage lives in one tree only (its *home*, fixed by its first key), so the issuer
    node above it is always the same one and, on a Redis Cluster, in the same slot.
    ``home`` is the issuer id of the label's tree, ``None`` for the operator's.
    """

    def __init__(self, label: str, home: str | None) -> None:
        where = f"issuer {home}" if home else "the operator (keys issued with the admin token)"
        super().__init__(f"label {label[:80]!r} belongs to the budget tree of {where}")
        self.label = label
        self.home = home


def utc_day(now: dt.datetime) -> str:
    """The UTC calendar day of ``now`` as ``YYYY-MM-DD``: the window of a daily cap."""
    return now.astimezone(dt.UTC).date().isoformat()


@dataclasses.dataclass(frozen=True, slots=True)
class KeyRecord:
    """A vault key as stored: never the secret, only its SHA-256 hex digest."""

    key_id: str
    secret_sha256: str
    vendor: str
    agent_run_label: str
    daily_cap_micros: int
    allowed_endpoints: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime
    usd_cap_micros: int | None = None
    revoked_at: dt.datetime | None = None
    # The vendor account a key is bound to where the vendor puts it in the path (Twilio).
    vendor_account: str | None = None
    # At most this many requests in any minute (None: no request-rate limit).
    max_requests_per_minute: int | None = None
    # Vendor accounts the key may act on through the vendor's account header (Stripe
    # Connect's ``Stripe-Account: acct_…``); empty: none, only the proxy's own account.
    allowed_accounts: tuple[str, ...] = ()
    # Suspended keys are refused (403 key_suspended) until an operator resumes them; the
    # proxy suspends a key by itself when a call cost more than its estimate.
    suspended_at: dt.datetime | None = None
    suspended_reason: str | None = None
    # Whose objects the key may act on besides its own: "none", or "label" (every key with
    # the same agent_run_label; issued so by an operator).
    share_objects: str = "none"
    # The issuer token that minted the key (None: the admin token or the command line).
    issuer_id: str | None = None

    def state(self, now: dt.datetime) -> Literal["active", "revoked", "expired", "suspended"]:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.suspended_at is not None:
            return "suspended"
        return "active"


@dataclasses.dataclass(frozen=True, slots=True)
class IssuerRecord:
    """An issuer token as stored: never the token, only its SHA-256 hex digest.

    With the token as its bearer, a caller of the admin API may issue keys within these
    limits (``vendors``, labels under ``label_prefix``, a subset of ``allowed_endpoints`` per
    vendor, caps and lifetimes at most the ``max_*``), and revoke, read and report on the keys
    under its prefix (see `keybrake.vault.issuers`). ``budget_daily_micros`` and
    ``budget_lifetime_micros`` are the issuer's own budget and ``max_requests_per_minute``
    its request-rate limit: the top node of the budget tree (issuer → label → key) that every
    call of every key it minted reserves against in the one admission step.
    """

    issuer_id: str
    token_sha256: str
    name: str
    vendors: tuple[str, ...]
    label_prefix: str
    # vendor -> endpoint patterns ("POST /v1/payment_intents") a minted key may list.
    allowed_endpoints: tuple[tuple[str, tuple[str, ...]], ...]
    max_daily_cap_micros: int
    max_expires_in_seconds: int
    created_at: dt.datetime
    max_usd_cap_micros: int | None = None
    allowed_accounts: tuple[str, ...] = ()
    budget_daily_micros: int | None = None
    budget_lifetime_micros: int | None = None
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    max_requests_per_minute: int | None = None

    def endpoints_of(self, vendor: str) -> tuple[str, ...]:
        """The endpoint patterns a key of ``vendor`` minted with this token may list."""
        return dict(self.allowed_endpoints).get(vendor, ())

    def state(self, now: dt.datetime) -> Literal["active", "revoked", "expired"]:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclasses.dataclass(frozen=True, slots=True)
class VendorFreeze:
    """A vendor every call to which is refused (``503 vendor_frozen``) until it is lifted."""

    vendor: str
    reason: str
    frozen_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class LabelBudget:
    """The limits of a run label's node of the budget tree, shared by every key with the
    label: a daily cap, a lifetime cap and a request-rate limit (each None: none)."""

    label: str
    daily_cap_micros: int | None = None
    lifetime_cap_micros: int | None = None
    max_requests_per_minute: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.daily_cap_micros is None
            and self.lifetime_cap_micros is None
            and self.max_requests_per_minute is None
        )


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetState:
    """One budget's usage in its window: ``cap`` is None when the budget has no cap."""

    # "key:<key_id>", "key-lifetime:<key_id>", "label:<label>", "label-lifetime:<label>",
    # "issuer:<issuer_id>", "issuer-lifetime:<issuer_id>"
    scope: str
    window: str  # a UTC day "YYYY-MM-DD", or "lifetime"
    cap_micros: int | None
    spent_micros: int
    reserved_micros: int

    @property
    def used_micros(self) -> int:
        """What counts against the cap: spent, plus reserved for calls still in flight. The
        one definition of a budget's "spent" that every report of the ledger shows."""
        return self.spent_micros + self.reserved_micros

    @property
    def remaining_micros(self) -> int | None:
        if self.cap_micros is None:
            return None
        return max(0, self.cap_micros - self.used_micros)

    @property
    def node(self) -> Literal["key", "label", "issuer"]:
        """The node of the budget tree this budget belongs to."""
        kind = self.scope.split(":", 1)[0].removesuffix("-lifetime")
        return "issuer" if kind == "issuer" else "label" if kind == "label" else "key"


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveResult:
    """Outcome of `Store.reserve`: ``ok`` or the first budget that would be exceeded."""

    ok: bool
    reservation_id: str
    budgets: tuple[BudgetState, ...]  # state *after* the step (with the reservation if ok)
    exceeded: BudgetState | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """An open reservation kept for a vendor object that can still move money later, out of
    the proxy's sight (an unconfirmed PaymentIntent, a Checkout session, a trial)."""

    reservation_id: str
    key_id: str
    amount_micros: int


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectOwner:
    """The vault key that created a vendor object through the proxy, and its label."""

    key_id: str
    label: str


@dataclasses.dataclass(frozen=True, slots=True)
class RateResult:
    """Outcome of `Store.count_request`.

    ``ok``: the request was counted. Otherwise nothing was counted and ``retry_after_seconds``
    (>= 1) says when the key's last minute has room again.
    """

    ok: bool
    retry_after_seconds: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class StoredResponse:
    """A vendor response kept for idempotent replay (hop-by-hop headers already removed)."""

    status_code: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class IdempotencyBegin:
    """Outcome of `Store.idempotency_begin`.

    - ``started``: this request owns the key; call `idempotency_complete` or
      `idempotency_abandon` when the vendor answers (or fails).
    - ``replay``: a stored response exists for the same body hash (``response`` set).
    - ``in_flight``: another request with this key has not finished.
    - ``mismatch``: the key was used with a different body hash.
    - ``full``: the vault key keeps as many entries as it may; nothing was claimed.
    """

    status: Literal["started", "replay", "in_flight", "mismatch", "full"]
    response: StoredResponse | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """What `Store.admit` claims for a call with an idempotency key (see `idempotency_begin`)."""

    scope: str
    body_sha256: str
    ttl_seconds: int
    in_flight_seconds: int
    max_entries: int


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """Everything one vendor call needs from the store before it is forwarded."""

    key_id: str
    now: dt.datetime
    # A paid call reserves its estimate over every budget under this id; None: a free call.
    reservation_id: str | None = None
    estimate_micros: int = 0
    rate_limit: int | None = None
    idempotency: IdempotencyClaim | None = None
    # The call creates objects: refused when the key owns this many already.
    max_objects: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """The answer of `Store.admit`.

    - ``admitted``: counted, claimed and reserved as asked; ``key`` is the key as stored now.
    - ``replay``: the idempotency claim found a stored ``response`` (nothing reserved).
    - ``refused``: ``code`` says why (``vault_key_unknown``, ``vault_key_revoked``,
      ``vault_key_expired``, ``key_suspended``, ``vendor_frozen`` (``detail``: the
      reason the operator gave), ``rate_limited`` with
      ``retry_after_seconds`` (``detail``: the node whose limit it is, ``key``, ``label`` or
      ``issuer``; ``rate_limit`` that limit), ``quota_exceeded`` with ``detail`` ``objects`` or
      ``idempotency``, ``idempotency_in_flight``, ``idempotency_mismatch``,
      ``cap_exhausted`` with ``exceeded``). Nothing was claimed or reserved; a refusal after
      the key check has the request counted against the rate limit, as every request is.
    """

    status: Literal["admitted", "replay", "refused"]
    key: KeyRecord | None = None
    code: str | None = None
    detail: str = ""
    budgets: tuple[BudgetState, ...] = ()
    exceeded: BudgetState | None = None
    retry_after_seconds: int = 0
    response: StoredResponse | None = None
    # The usage rows the reservation was made in, as (scope, window): hand them to `settle_call`.
    ledger_rows: tuple[tuple[str, str], ...] = ()
    rate_limit: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """Everything one vendor call changes in the store once it is answered, in one step.

    ``finish`` ends the call's reservation: ``settled`` at ``actual_micros``, ``released``,
    ``unknown`` (the estimate stays spent) or ``held`` (kept for ``hold``: vendor, object,
    amount). ``created`` objects become the key's; ``remember`` keeps an amount for the key;
    the idempotency claim is completed with ``idempotency_response`` or, when that is None,
    abandoned (a completion names the claim's ``idempotency_sha256``, its
    `IdempotencyClaim.body_sha256`: the Redis store completes that claim only); ``audit`` is
    appended to the audit outbox in the same step.
    """

    key_id: str
    label: str
    vendor: str
    now: dt.datetime
    reservation_id: str | None = None
    ledger_rows: tuple[tuple[str, str], ...] = ()
    finish: Literal["settled", "released", "unknown", "held"] | None = None
    actual_micros: int = 0
    hold: tuple[str, int] | None = None
    created: tuple[str, ...] = ()
    remember: tuple[str, int] | None = None
    idempotency_scope: str | None = None
    idempotency_response: StoredResponse | None = None
    idempotency_ttl_seconds: int = 1
    idempotency_sha256: str | None = None
    audit: dict[str, object] | None = None


@runtime_checkable
class Store(Protocol):
    """The state every proxy replica shares. Every method may raise `StoreUnavailable`."""

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect / create tables / load scripts. Idempotent."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the backend answers."""

    async def clock_skew(self) -> float | None:
        """Seconds this process's clock is ahead of the clock replicas share (negative when
        behind), or ``None`` when the store has no clock of its own (SQLite: one host)."""

    # -- vault keys --------------------------------------------------------------------------
    async def create_key(self, record: KeyRecord) -> None:
        """Insert a new key; ``key_id`` and ``secret_sha256`` are unique. The first key of a
        label fixes the label's budget tree (its ``issuer_id``, or the operator's);
        `LabelTreeConflict` when the label's keys are in another tree."""

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def get_key_by_secret_hash(self, secret_sha256: str) -> KeyRecord | None: ...

    async def list_keys(self) -> list[KeyRecord]:
        """All keys, newest first."""

    async def revoke_key(self, key_id: str, now: dt.datetime) -> KeyRecord | None:
        """Mark revoked (keeps the first revocation time when repeated) and `forget_key` what
        the store keeps for it; None if unknown."""

    async def suspend_key(self, key_id: str, now: dt.datetime, reason: str) -> KeyRecord | None:
        """Suspend the key (keeps the first time and reason when repeated); None if unknown.
        Every replica refuses its next request."""

    async def resume_key(self, key_id: str) -> KeyRecord | None:
        """Lift a suspension (harmless when there is none); None if unknown."""

    async def set_key_caps(
        self,
        key_id: str,
        *,
        daily_cap_micros: int | None = None,
        usd_cap_micros: int | None = None,
        clear_usd_cap: bool = False,
    ) -> KeyRecord | None:
        """Change a key's daily cap and/or lifetime cap (None: unchanged; ``clear_usd_cap``
        removes the lifetime cap); None if unknown. One atomic step that every replica's next
        `admit` reads: a cap lowered below what is spent refuses the key's paid calls from
        then on; nothing already spent or reserved moves."""

    # -- issuer tokens ---------------------------------------------------------------------------
    async def create_issuer(self, record: IssuerRecord) -> None:
        """Insert a new issuer token; ``issuer_id`` and ``token_sha256`` are unique
        (`ValueError` otherwise)."""

    async def get_issuer(self, issuer_id: str) -> IssuerRecord | None: ...

    async def get_issuer_by_token_hash(self, token_sha256: str) -> IssuerRecord | None: ...

    async def list_issuers(self) -> list[IssuerRecord]:
        """All issuer tokens, newest first."""

    async def revoke_issuer(self, issuer_id: str, now: dt.datetime) -> IssuerRecord | None:
        """Mark revoked (keeps the first revocation time when repeated); None if unknown. The
        keys it minted are left alone (the vault revokes them when asked)."""

    # -- vendor freezes ----------------------------------------------------------------------------
    async def freeze_vendor(self, vendor: str, reason: str, now: dt.datetime) -> VendorFreeze:
        """Refuse every call to ``vendor`` from the next `admit` on, on every replica (the
        flag is read inside the admission step). Repeated: keeps the first time and reason."""

    async def unfreeze_vendor(self, vendor: str) -> bool:
        """Lift a freeze; False when ``vendor`` was not frozen."""

    async def frozen_vendors(self) -> list[VendorFreeze]:
        """The vendors frozen now, by name."""

    # -- one call, two steps -------------------------------------------------------------------
    async def admit(self, request: AdmissionRequest) -> Admission:
        """In ONE atomic step, everything a call needs before it is forwarded: the key's
        state (revocation and suspension are immediate on every replica), whether its vendor
        is frozen (`freeze_vendor`), the request-rate
        count, the key's object quota, the idempotency claim or replay, and the reservation
        over every budget (with the caps as stored now). See `Admission`."""

    async def settle_call(self, settlement: Settlement) -> bool:
        """In ONE atomic step, everything an answered call changes, its audit row included
        (appended to the audit outbox). Returns whether the reservation was finished now
        (False: unknown, or finished before; the rest is applied all the same)."""

    # -- the audit outbox: rows committed with the ledger, moved to the audit sink ------------
    async def append_audit(self, row: dict[str, object]) -> None:
        """Append one audit row (a refusal, an egress decision) to the outbox."""

    async def audit_batch(self, consumer: str, limit: int) -> list[tuple[str, dict[str, object]]]:
        """Up to ``limit`` rows not yet moved to the sink, as ``(id, row)``, claimed by
        ``consumer`` (a replica). Rows another consumer claimed and left unacknowledged for
        long (a replica that died) are claimed again."""

    async def audit_peek(self, limit: int) -> list[tuple[str, dict[str, object]]]:
        """Up to ``limit`` of the oldest rows in the outbox, as ``(id, row)``, whoever claimed
        them (nothing is claimed). For a read-your-writes flush by any replica: it writes them
        to the sink (which skips rows whose ``event_id`` it has) and acknowledges them."""

    async def audit_ack(self, ids: Sequence[str]) -> None:
        """The rows ``ids`` are committed to the sink: drop them from the outbox (by any
        consumer; ids already dropped are ignored)."""

    async def audit_backlog(self) -> int:
        """Rows in the outbox, claimed or not."""

    # -- request rate --------------------------------------------------------------------------
    async def count_request(self, key_id: str, limit: int, now: dt.datetime) -> RateResult:
        """In ONE atomic step: count a request of ``key_id`` unless that would make more than
        ``limit`` requests in the minute before ``now``. Requests are counted in 5-second
        buckets and the 13 most recent are summed (a minute and up to 5 seconds), so no 60
        seconds ever hold more than ``limit`` admitted requests. Shared by every replica, each
        on its own clock: a replica ``s`` seconds off the others (at most 30, see
        `Runtime.clock_problem`) can shift the minute it sees by ``s``."""

    # -- budgets and the reservation ledger ----------------------------------------------------
    async def set_label_budget(self, label: str, daily_cap_micros: int | None) -> None:
        """Set (or with None, remove) the shared daily cap of every key with this label."""

    async def get_label_budget(self, label: str) -> int | None: ...

    async def set_label_limits(self, limits: LabelBudget) -> None:
        """Set a label node's daily cap, lifetime cap and request-rate limit at once (each
        None: none; all None removes the label's limits). Read by every replica's next
        `admit`; nothing spent or reserved moves."""

    async def get_label_limits(self, label: str) -> LabelBudget:
        """The label node's limits (all None when it has none)."""

    async def tree_usage(
        self, scopes: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, int]]:
        """``(spent, reserved)`` of each usage row ``(scope, window)`` asked for (``(0, 0)``
        for a row never written), for reports of the budget tree. Not one snapshot across
        trees; each row is exact."""

    async def reserve(
        self,
        key: KeyRecord,
        reservation_id: str,
        estimate_micros: int,
        now: dt.datetime,
    ) -> ReserveResult:
        """In ONE atomic step: for every budget of the key (its daily cap for the UTC day of
        ``now``, its lifetime ``usd_cap`` if set, its label's daily cap if set) check
        ``spent + reserved + estimate <= cap``; if all pass, add ``estimate`` to each budget's
        reserved amount and record the reservation (with its day); else change nothing and
        return ``ok=False`` with the first exceeded budget. ``estimate_micros`` >= 0."""

    async def settle(self, reservation_id: str, actual_micros: int) -> bool:
        """Replace the reservation by the actual cost (moved from reserved to spent in the
        budgets of the reservation's day). Returns False (and changes nothing) when the
        reservation is unknown or already finished: a reservation is never counted twice."""

    async def release(self, reservation_id: str) -> bool:
        """Drop the reservation (vendor charged nothing). False when unknown/finished."""

    async def mark_unknown(self, reservation_id: str) -> bool:
        """No vendor answer: keep the estimate as spent (conservative). False when finished."""

    async def budgets(self, key: KeyRecord, now: dt.datetime) -> tuple[BudgetState, ...]:
        """The key's budgets (same order as `reserve`) for the day of ``now``."""

    async def recover_reservations(self, older_than: dt.datetime) -> int:
        """Turn reservations still open and created before ``older_than`` into ``unknown``
        (spent). Run at start so a crashed process's reservations stay counted. Held
        reservations (`hold`) are left alone: they wait for a vendor answer, not for a
        process. Returns count."""

    # -- holds: money a vendor object can still move later ---------------------------------------
    async def hold(
        self, reservation_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> bool:
        """Keep an open reservation for ``object_id`` until a vendor answer about that object
        proves the money moved (`settle`) or cannot move any more (`release`). Its amount
        becomes ``amount_micros`` in the budgets it was reserved in (what the vendor says the
        object can charge; booked without a cap check, since the vendor has accepted it).
        False (nothing changed) when the reservation is not open."""

    async def holds(self, vendor: str, object_id: str) -> tuple[Hold, ...]:
        """The open holds of ``object_id``, oldest first."""

    async def raise_hold(
        self, reservation_id: str, amount_micros: int, key: KeyRecord
    ) -> ReserveResult:
        """In ONE atomic step: raise an open reservation to ``amount_micros`` if every budget
        it was reserved in (on its own day) has room for the difference; otherwise change
        nothing and answer ``ok=False`` with the first budget that would be exceeded. A lower
        amount lowers it. Unknown or finished reservations answer ``ok=False`` with no
        budgets."""

    # -- objects: who created them, and what they are worth to that key ---------------------
    async def record_objects(
        self, key: KeyRecord, vendor: str, object_ids: Sequence[str], now: dt.datetime
    ) -> None:
        """Record ``key`` (and its label) as the owner of vendor objects it created. The first
        owner stays: an object never changes hands. Kept `OBJECT_TTL` (90 days)."""

    async def object_owner(self, vendor: str, object_id: str) -> ObjectOwner | None:
        """Who created ``object_id`` through the proxy; None for objects it never saw made."""

    async def count_objects(self, key_id: str) -> int:
        """How many objects ``key_id`` owns (still remembered): its share of the store."""

    async def remember_amount(
        self, key_id: str, vendor: str, object_id: str, amount_micros: int
    ) -> None:
        """Remember, for ``key_id`` only, the USD cost of a vendor object (a PaymentIntent, a
        price) for 30 days: another key's calls can never change what this key is charged."""

    async def recall_amount(self, key_id: str, vendor: str, object_id: str) -> int | None: ...

    async def forget_expired_keys(self, now: dt.datetime) -> int:
        """`forget_key` for every key expired by ``now`` (run periodically)."""

    async def forget_key(self, key_id: str) -> int:
        """Drop what the store keeps for a key that can make no more calls (revoked or
        expired): its remembered amounts, idempotency entries and object records. The ledger,
        budgets and holds stay (they are money). Returns how many entries went."""

    # -- idempotency cache ---------------------------------------------------------------------
    async def idempotency_begin(
        self,
        key_id: str,
        scope: str,
        body_sha256: str,
        ttl_seconds: int,
        in_flight_seconds: int,
        max_entries: int,
    ) -> IdempotencyBegin:
        """Atomically claim ``scope`` (e.g. ``"idem:<idempotency key>"``) for ``key_id``. A
        claim left in flight longer than ``in_flight_seconds`` (a crashed request) may be taken
        over. A new claim when the key already keeps ``max_entries`` live entries is refused
        (``full``): one key cannot fill the store that every key shares."""

    async def idempotency_complete(
        self, key_id: str, scope: str, response: StoredResponse, ttl_seconds: int
    ) -> None:
        """Store the response for replay for ``ttl_seconds``."""

    async def idempotency_abandon(self, key_id: str, scope: str) -> None:
        """Forget an in-flight claim (the response is not to be replayed)."""
