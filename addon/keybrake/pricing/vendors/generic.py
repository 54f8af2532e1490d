"""Counters any vendor YAML can use, so simple per-unit pricing needs no code.

``list_items`` counts the items of the body fields the rule names (``fields: [to, cc]``):
a list counts its items, a lone value counts one. ``integer_fields`` adds up integer fields
(``fields: [n]``, images per call); a missing field is refused rather than assumed.

>>> from keybrake.pricing.model import Body, Registry
>>> from keybrake.core.policy import PerUnitCost
>>> rule = PerUnitCost(kind="per_unit", counter="list_items", fields=("to", "cc"))
>>> count_list_items(Body("json", {"to": ["a", "b"], "cc": "c"}), rule)
3
"""

from __future__ import annotations

from keybrake.core.errors import Refusal
from keybrake.core.policy import PerUnitCost
from keybrake.pricing.model import Body, Registry

__all__ = ["count_integer_fields", "count_list_items"]


def _fields(rule: PerUnitCost) -> tuple[str, ...]:
    if not rule.fields:
        raise Refusal(
            "unpriced_endpoint",
            f"counter {rule.counter!r} needs 'fields' in the policy naming what to count",
        )
    return rule.fields


def count_list_items(body: Body, rule: PerUnitCost) -> int:
    """Items across ``rule.fields``; empty strings and nulls count nothing."""
    return sum(
        1 for name in _fields(rule) for item in body.get_list(name) if item not in ("", None)
    )


def count_integer_fields(body: Body, rule: PerUnitCost) -> int:
    """The sum of the non-negative integer fields ``rule.fields``; a missing one refuses.

    >>> rule = PerUnitCost(kind="per_unit", counter="integer_fields", fields=("n",))
    >>> count_integer_fields(Body("json", {"n": 3}), rule)
    3
    """
    total = 0
    for name in _fields(rule):
        value = body.get_int(name)
        if value is None:
            raise ValueError(f"{name} is missing: it sets the number of billed units")
        total += value
    return total


def register(registry: Registry) -> None:
    """Put this module's pricing code into ``registry`` under the names policy YAML uses."""
    registry.counters["list_items"] = count_list_items
    registry.counters["integer_fields"] = count_integer_fields
