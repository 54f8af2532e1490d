"""What the fake AI vendors share: a toy tokenizer, list prices, and how a reply is made.

The tokenizer counts one token per 4 bytes of UTF-8 text (at least one per non-empty text)
plus 3 per message and 3 per request, like the real ones roughly do for English; it never
counts more tokens than bytes, which is the bound the proxy relies on. Prices are the list
prices the shipped policies hold, written out again here as exact fractions, so the fake
bills independently of the proxy's code: ``charged_usd_micros`` is the call's cost rounded
up to the micro-dollar, as the vendors round their invoices (never below).
"""

from __future__ import annotations

import math
import secrets
import string
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MESSAGE_TOKENS = 3
REQUEST_TOKENS = 3


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: Fraction
    cached: Fraction
    output: Fraction
    cache_write: Fraction | None = None
    cache_write_1h: Fraction | None = None


def _p(i: str, c: str, o: str, w: str | None = None, w1: str | None = None) -> Price:
    return Price(
        Fraction(i),
        Fraction(c),
        Fraction(o),
        Fraction(w) if w else None,
        Fraction(w1) if w1 else None,
    )


PRICES: dict[str, Price] = {
    # OpenAI (policies/openai.yaml)
    "gpt-4o": _p("2.50", "1.25", "10.00"),
    "gpt-4o-mini": _p("0.15", "0.075", "0.60"),
    "gpt-4.1-nano": _p("0.10", "0.025", "0.40"),
    "o4-mini": _p("1.10", "0.275", "4.40"),
    "gpt-5-nano": _p("0.05", "0.005", "0.40"),
    "text-embedding-3-small": _p("0.02", "0.02", "0"),
    # Anthropic (policies/anthropic.yaml)
    "claude-haiku-4-5": _p("1.00", "0.10", "5.00", "1.25", "2.00"),
    "claude-sonnet-4-5": _p("3.00", "0.30", "15.00", "3.75", "6.00"),
    # A model the vendor serves that the shipped policies do not price.
    "gpt-4o-unlisted": _p("5.00", "2.50", "20.00"),
    "claude-unlisted": _p("5.00", "0.50", "25.00", "6.25", "10.00"),
}


def text_tokens(text: str) -> int:
    size = len(text.encode("utf-8", "surrogatepass"))
    return math.ceil(size / 4) if size else 0


def texts(node: Any) -> list[str]:
    """Every string value under ``node`` that a model would read (not keys, not ids)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [t for item in node for t in texts(item)]
    if isinstance(node, dict):
        return [
            t for k, v in node.items() if k not in ("type", "id", "cache_control") for t in texts(v)
        ]
    return []


def prompt_tokens(*parts: Any, messages: int = 0) -> int:
    return (
        REQUEST_TOKENS
        + MESSAGE_TOKENS * messages
        + sum(text_tokens(t) for part in parts for t in texts(part))
    )


def cost_micros(price: Price, tokens: dict[str, int]) -> int:
    """Micro-USD, rounded up once per call."""
    usd = (
        tokens.get("input", 0) * price.input
        + tokens.get("cached", 0) * price.cached
        + tokens.get("cache_write", 0) * (price.cache_write or price.input)
        + tokens.get("cache_write_1h", 0)
        * (price.cache_write_1h or price.cache_write or price.input)
        + tokens.get("output", 0) * price.output
    ) / 1_000_000
    return math.ceil(usd * 1_000_000)


WORDS = [
    "the",
    "cap",
    "is",
    "a",
    "bound",
    "not",
    "a",
    "hope",
    "and",
    "every",
    "token",
    "is",
    "counted",
    "before",
    "it",
    "is",
    "spent",
]


def reply_text(tokens: int) -> str:
    """A reply of exactly ``tokens`` toy tokens (each word below is at most 4 bytes + space)."""
    return " ".join(WORDS[i % len(WORDS)][:3] for i in range(tokens))


def reply_pieces(text: str, pieces: int = 5) -> list[str]:
    words = text.split(" ")
    size = max(1, math.ceil(len(words) / pieces))
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return [c if i == 0 else " " + c for i, c in enumerate(chunks)] or [""]


def rand_id(n: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))
