"""Generic counters (keybrake.pricing.vendors.generic) that YAML-only vendors can name."""

from __future__ import annotations

from typing import Any

import pytest

from keybrake.core.errors import Refusal
from keybrake.core.policy import PerUnitCost
from keybrake.pricing import Body
from keybrake.pricing.vendors.generic import count_integer_fields, count_list_items


def rule(counter: str, *fields: str) -> PerUnitCost:
    return PerUnitCost(kind="per_unit", counter=counter, fields=fields)


@pytest.mark.parametrize(
    ("data", "fields", "count"),
    [
        ({"to": ["a", "b"], "cc": "c"}, ("to", "cc"), 3),
        ({"to": ["a", "", None]}, ("to",), 1),
        ({"to": "a"}, ("to",), 1),
        ({"to": []}, ("to",), 0),
        ({}, ("to",), 0),
        ({"images": [{"url": "x"}, {"url": "y"}]}, ("images",), 2),
    ],
)
def test_list_items(data: dict[str, Any], fields: tuple[str, ...], count: int) -> None:
    assert count_list_items(Body("json", data), rule("list_items", *fields)) == count


@pytest.mark.parametrize(
    ("data", "fields", "count"),
    [
        ({"n": 3}, ("n",), 3),
        ({"n": "3"}, ("n",), 3),
        ({"n": 2, "m": 5}, ("n", "m"), 7),
        ({"n": 0}, ("n",), 0),
    ],
)
def test_integer_fields(data: dict[str, Any], fields: tuple[str, ...], count: int) -> None:
    assert count_integer_fields(Body("json", data), rule("integer_fields", *fields)) == count


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "n is missing"),
        ({"n": -1}, "negative"),
        ({"n": 1.5}, "integer"),
        ({"n": "x"}, "integer"),
    ],
)
def test_integer_fields_refuse_what_they_cannot_count(data: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        count_integer_fields(Body("json", data), rule("integer_fields", "n"))


@pytest.mark.parametrize("counter", [count_list_items, count_integer_fields])
def test_counters_need_fields(counter: Any) -> None:
    with pytest.raises(Refusal) as e:
        counter(Body("json", {}), rule("list_items"))
    assert e.value.code == "unpriced_endpoint"
