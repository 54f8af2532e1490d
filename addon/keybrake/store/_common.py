"""Helpers both store backends share: time in epoch microseconds, argument checks, the
budgets a reservation touches, and the request-rate arithmetic."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

from keybrake.store._base import KeyRecord, LabelBudget, RateResult

__all__ = [
    "EPOCH",
    "FROZEN_FIELD",
    "RATE_BUCKETS",
    "RATE_BUCKET_MS",
    "KeyMemo",
    "TreeCaps",
    "check_idempotency_times",
    "check_label",
    "check_label_limits",
    "check_micros",
    "check_rate_limit",
    "epoch_micros",
    "issuer_limits_field",
    "rate_bucket",
    "rate_verdict",
    "usage_plan",
]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Request rate: counted per key in 5-second buckets; a request looks at the 13 most recent
# (the current one and the twelve before it: a minute and up to 5 seconds).
RATE_BUCKET_MS = 5_000
RATE_BUCKETS = 13


class KeyMemo:
    """The key record last made of each key's stored form (the fields a Redis admission
    answered, an SQLite ``keys`` row): the same form again gives that record (records are
    immutable) rather than one decoded again on every call; any change to the form makes a
    new one. Forgotten in bulk past ``most`` keys, which only costs decoding some again."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._seen: dict[str, tuple[tuple[object, ...], KeyRecord]] = {}

    def get(self, key_id: str, form: tuple[object, ...]) -> KeyRecord | None:
        seen = self._seen.get(key_id)
        return seen[1] if seen is not None and seen[0] == form else None

    def put(self, key_id: str, form: tuple[object, ...], record: KeyRecord) -> KeyRecord:
        if len(self._seen) > self.most:
            self._seen.clear()
        self._seen[key_id] = (form, record)
        return record


def epoch_micros(moment: dt.datetime) -> int:
    """Microseconds since the epoch of an aware datetime (naive ones are refused)."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: the store needs an aware UTC datetime")
    return (moment - EPOCH) // dt.timedelta(microseconds=1)


FROZEN_FIELD = "!frozen:"
"""Redis: the field ``!frozen:<vendor>`` of the label-budgets hash marks a frozen vendor (a
label never starts with ``!``, see `check_label`): admit.lua reads it from a hash it already
reads, so a freeze costs no key, no round trip and no slot of its own."""


def check_label(label: str) -> None:
    """A key's label is never a reserved field of the label-budgets hash (`FROZEN_FIELD`)."""
    if label.startswith("!"):
        raise ValueError(f"a label must not start with '!', got {label[:40]!r}")


def check_micros(name: str, value: int) -> None:
    """Money arguments are non-negative ints of micro-USD, never floats or bools."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer of micro-USD, got {value!r}")


def check_rate_limit(limit: int) -> None:
    """A request-rate limit is a positive int of requests, never a float or a bool."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")


def check_label_limits(limits: LabelBudget) -> None:
    """A label's caps are micro-USD and its rate limit a positive count (each may be None)."""
    for name in ("daily_cap_micros", "lifetime_cap_micros"):
        value = getattr(limits, name)
        if value is not None:
            check_micros(name, value)
    if limits.max_requests_per_minute is not None:
        check_rate_limit(limits.max_requests_per_minute)


def check_idempotency_times(ttl_seconds: int, in_flight_seconds: int) -> None:
    if ttl_seconds < 1 or in_flight_seconds < 0:
        raise ValueError(
            f"ttl_seconds must be >= 1 and in_flight_seconds >= 0, got {ttl_seconds}, "
            f"{in_flight_seconds}"
        )


def usage_plan(
    key: KeyRecord,
    day: str,
    label_cap: int | None,
    tree: TreeCaps | None = None,
) -> list[tuple[str, str, int | None]]:
    """The usage rows a reservation of ``key`` touches, as ``(scope, window, cap)``: every node
    on the key's path of the budget tree, in this order: the key (day, lifetime), its label
    (day, lifetime; only with a label), its issuer (day, lifetime; only for a key an issuer
    minted). ``label_cap`` is the label's daily cap, ``tree`` the other nodes' caps.

    Usage is tracked even without a cap (cap None), so a cap set in the middle of a day
    already counts that day's spend. Only rows with a cap are reported.
    """
    t = tree or TreeCaps()
    plan: list[tuple[str, str, int | None]] = [
        (f"key:{key.key_id}", day, key.daily_cap_micros),
        (f"key-lifetime:{key.key_id}", "lifetime", key.usd_cap_micros),
    ]
    if key.agent_run_label:
        plan.append((f"label:{key.agent_run_label}", day, label_cap))
        plan.append((f"label-lifetime:{key.agent_run_label}", "lifetime", t.label_lifetime))
    if key.issuer_id:
        plan.append((f"issuer:{key.issuer_id}", day, t.issuer_daily))
        plan.append((f"issuer-lifetime:{key.issuer_id}", "lifetime", t.issuer_lifetime))
    return plan


@dataclasses.dataclass(frozen=True, slots=True)
class TreeCaps:
    """The caps and request-rate limits of the nodes above a key, read in one store step."""

    label_daily: int | None = None
    label_lifetime: int | None = None
    label_rate: int | None = None
    issuer_daily: int | None = None
    issuer_lifetime: int | None = None
    issuer_rate: int | None = None

    @classmethod
    def parse(cls, values: Sequence[str]) -> TreeCaps:
        """From the six decimal strings (``''``: none) the Lua scripts answer, in field order."""
        nums = [int(v) if v else None for v in values]
        return cls(*nums)


def issuer_limits_field(daily: int | None, lifetime: int | None, rate: int | None) -> str:
    """Redis: the value of an issuer's ``!iss:<id>`` field in a label-budgets hash."""
    return ":".join("" if v is None else str(v) for v in (daily, lifetime, rate))


def rate_bucket(now: dt.datetime) -> int:
    """The 5-second bucket ``now`` falls in (buckets since the epoch)."""
    return epoch_micros(now) // 1000 // RATE_BUCKET_MS


def rate_verdict(
    limit: int, counts: Mapping[int, int], bucket: int, now: dt.datetime
) -> RateResult:
    """Whether one more request fits, given the key's counts per bucket (those that can
    still count: the last `RATE_BUCKETS`); when it does not, how long until it does.

    The buckets counted cover the whole minute before ``now`` and a little more (up to one
    bucket): a request is admitted only when everything in them, plus itself, is at most
    ``limit``. So no 60 seconds ever hold more than ``limit`` requests, and under constant
    pressure about ``limit`` pass per 65 seconds.
    """
    oldest = bucket - RATE_BUCKETS + 1
    live = sorted((b, n) for b, n in counts.items() if b >= oldest)
    total = sum(n for _, n in live)
    if total + 1 <= limit:
        return RateResult(ok=True)
    # Room appears as the oldest buckets stop counting: bucket b stops once the current
    # bucket is b + RATE_BUCKETS.
    excess = total + 1 - limit
    freed = 0
    free_at = bucket + RATE_BUCKETS
    for b, n in live:
        freed += n
        if freed >= excess:
            free_at = b + RATE_BUCKETS
            break
    wait_ms = free_at * RATE_BUCKET_MS - epoch_micros(now) // 1000
    return RateResult(ok=False, retry_after_seconds=max(1, -(-wait_ms // 1000)))
