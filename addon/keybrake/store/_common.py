"""Helpers both store backends share: time in epoch microseconds, argument checks, and the
budgets a reservation touches."""

from __future__ import annotations

import datetime as dt

from keybrake.store._base import KeyRecord, RateResult

__all__ = [
    "EPOCH",
    "RATE_WINDOW_MS",
    "check_idempotency_times",
    "check_micros",
    "epoch_micros",
    "rate_admits",
    "rate_verdict",
    "rate_window",
    "usage_plan",
]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
RATE_WINDOW_MS = 60_000


def epoch_micros(moment: dt.datetime) -> int:
    """Microseconds since the epoch of an aware datetime (naive ones are refused)."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: the store needs an aware UTC datetime")
    return (moment - EPOCH) // dt.timedelta(microseconds=1)


def check_micros(name: str, value: int) -> None:
    """Money arguments are non-negative ints of micro-USD, never floats or bools."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer of micro-USD, got {value!r}")


def check_idempotency_times(ttl_seconds: int, in_flight_seconds: int) -> None:
    if ttl_seconds < 1 or in_flight_seconds < 0:
        raise ValueError(
            f"ttl_seconds must be >= 1 and in_flight_seconds >= 0, got {ttl_seconds}, "
            f"{in_flight_seconds}"
        )


def usage_plan(
    key: KeyRecord, day: str, label_cap: int | None
) -> list[tuple[str, str, int | None]]:
    """The usage rows a reservation of ``key`` touches, as ``(scope, window, cap)``.

    Lifetime and label usage is tracked even without a cap (cap None), so a label cap set in
    the middle of a day already counts that day's spend. Only rows with a cap are reported.
    """
    plan: list[tuple[str, str, int | None]] = [
        (f"key:{key.key_id}", day, key.daily_cap_micros),
        (f"key-lifetime:{key.key_id}", "lifetime", key.usd_cap_micros),
    ]
    if key.agent_run_label:
        plan.append((f"label:{key.agent_run_label}", day, label_cap))
    return plan


def rate_window(now: dt.datetime) -> tuple[int, int]:
    """``(index, elapsed_ms)``: the minute ``now`` falls in (minutes since the epoch) and how
    far into it ``now`` is."""
    ms = epoch_micros(now) // 1000
    return ms // RATE_WINDOW_MS, ms % RATE_WINDOW_MS


def rate_admits(limit: int, current: int, previous: int, elapsed_ms: int) -> bool:
    """Whether one more request fits: ``previous`` weighted by the part of the previous
    minute the sliding window still covers, plus ``current``, plus this one, is at most
    ``limit``. Integer arithmetic (scaled by the window length): no rounding."""
    w = RATE_WINDOW_MS
    return previous * (w - elapsed_ms) + (current + 1) * w <= limit * w


def rate_verdict(limit: int, current: int, previous: int, elapsed_ms: int) -> RateResult:
    """The refusal for a request that did not fit, with when one would fit again."""
    w = RATE_WINDOW_MS
    if current + 1 > limit:
        wait_ms = w - elapsed_ms  # only a new minute helps
    else:
        # previous * (w - e) <= (limit - current - 1) * w  once e >= this
        room = (limit - current - 1) * w
        wait_ms = max(0, w - room // previous - elapsed_ms) if previous else 0
    return RateResult(ok=False, retry_after_seconds=max(1, -(-wait_ms // 1000)))
