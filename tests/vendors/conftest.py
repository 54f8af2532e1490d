"""Helpers for pricing calls with the shipped vendor policies (no proxy, no store)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import pytest

from keybrake.core.errors import Refusal
from keybrake.core.paths import normalize_path
from keybrake.core.policy import PolicySet, load_policies
from keybrake.pricing import MEDIA_TYPES, Estimate, check_parameters, estimate_cost, parse_body

ROOT = Path(__file__).resolve().parents[2]

Price = Callable[..., Awaitable[Estimate]]


@pytest.fixture(scope="session")
def shipped() -> PolicySet:
    return load_policies(ROOT / "policies")


async def price_call(
    policies: PolicySet,
    vendor: str,
    method: str,
    target: str,
    raw: bytes = b"",
    *,
    content_type: str = "",
    known: Mapping[str, int] | None = None,
) -> Estimate:
    """Price a call the way the guard does: match the endpoint, parse the body, estimate."""
    policy = policies.vendors[vendor]
    segments = normalize_path(target).segments
    for endpoint in policy.endpoints:
        params = endpoint.pattern.match(method, segments)
        if params is not None:
            break
    else:
        raise AssertionError(f"{method} {target} matches no {vendor} endpoint")
    remembered = dict(known or {})

    async def recall(object_id: str) -> int | None:
        return remembered.get(object_id)

    accepted = endpoint.body_types(policy)
    # No content type given: the one the vendor's SDK sends for this endpoint.
    media = content_type or next(m for m, kind in MEDIA_TYPES.items() if kind == accepted[0])
    body = parse_body(accepted, [media], raw)
    estimate = await estimate_cost(policy, endpoint, body, params, recall)
    check_parameters(endpoint, body)
    return estimate


async def refusal_of(policies: PolicySet, *args: object, **kw: object) -> Refusal:
    with pytest.raises(Refusal) as e:
        await price_call(policies, *args, **kw)  # type: ignore[arg-type]
    return e.value
