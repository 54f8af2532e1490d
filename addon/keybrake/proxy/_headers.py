"""Header work done in one pass over a message's raw fields.

mitmproxy's `Headers` answers every ``get``/``in``/``[]=`` by scanning all fields and
lower-casing each name again; an admission asks about a dozen headers and changes four. Here
the worker's headers are read once into a `HeaderView`, and the changes are made in one
rebuild of ``fields`` with the same meaning as mitmproxy's ``headers[name] = value`` (the
first field of that name keeps its place and spelling and takes the value, later ones go;
a missing one is appended) and ``del headers[name]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from mitmproxy import http

__all__ = ["CREDENTIAL_HEADERS", "HeaderView", "redact", "rewrite"]

CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"proxy-authorization", b"x-api-key"})
"""Request headers that carry credentials: never shown by mitmweb, flow files or logs."""


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # as mitmproxy's Headers decode


def _raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


class HeaderView:
    """The headers of a request as they were when it was read, by lower-case name.

    ``get`` folds repeated headers with ``", "`` and ``get_all`` keeps them apart, as
    mitmproxy's `Headers` do.
    """

    __slots__ = ("_values",)

    def __init__(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        values: dict[str, list[str]] = {}
        for name, value in fields:
            key = _text(name.lower())  # bytes.lower, as mitmproxy compares names
            found = values.get(key)
            if found is None:
                values[key] = [_text(value)]
            else:
                found.append(_text(value))
        self._values = values

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values

    def get(self, name: str) -> str | None:
        found = self._values.get(name.lower())
        return None if found is None else ", ".join(found)

    def get_all(self, name: str) -> list[str]:
        return list(self._values.get(name.lower(), ()))


def rewrite(
    headers: http.Headers, values: Mapping[str, str], drop_prefix: str | None = None
) -> None:
    """Set each of ``values`` (name → value) and remove every header whose name starts
    with ``drop_prefix``, in one pass over ``headers.fields``."""
    drop = None if drop_prefix is None else _raw(drop_prefix.lower())
    wanted = {_raw(name.lower()): (_raw(name), _raw(value)) for name, value in values.items()}
    out: list[tuple[bytes, bytes]] = []
    placed: set[bytes] = set()
    for name, value in headers.fields:
        key = name.lower()
        if drop is not None and key.startswith(drop):
            continue
        new = wanted.get(key)
        if new is None:
            out.append((name, value))
        elif key not in placed:
            placed.add(key)
            out.append((name, new[1]))
    out.extend(new for key, new in wanted.items() if key not in placed)
    headers.fields = tuple(out)


def redact(headers: http.Headers, replacement: str) -> None:
    """Each credential header (`CREDENTIAL_HEADERS`) once, with ``replacement`` as its
    value; headers without credentials are left as they are (and not copied)."""
    masked = _raw(replacement)
    seen: set[bytes] = set()
    for name, value in headers.fields:
        key = name.lower()
        if key in CREDENTIAL_HEADERS:
            if value != masked or key in seen:
                break
            seen.add(key)
    else:
        return  # nothing to hide: the common case once a flow was redacted
    out: list[tuple[bytes, bytes]] = []
    seen.clear()
    for name, value in headers.fields:
        key = name.lower()
        if key not in CREDENTIAL_HEADERS:
            out.append((name, value))
        elif key not in seen:
            seen.add(key)
            out.append((name, masked))
    headers.fields = tuple(out)
