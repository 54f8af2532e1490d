"""Request bodies read the way the vendor reads them, or not at all.

The proxy prices a call from fields of its body (``amount``, ``currency``,
``line_items[0][price_data][unit_amount]``). If the proxy and the vendor could read one body
two ways, a worker could show the proxy a small amount and the vendor a large one. So:

- A field given twice (``amount=100&amount=5000``) or with two shapes
  (``a=1&a[b]=2``) is recorded as *ambiguous*: reading it raises `AmbiguousField`
  instead of picking one; other fields stay readable.
- Field names are normalised *coarsely*: index-like keys lose leading zeros
  (``line_items[00]`` is ``line_items[0]``) and spaces after ``&`` are dropped, as Rack
  does. Two names a lenient server might merge are merged here too, so their clash shows
  up as ambiguity instead of being read differently.
- Where a separator is in doubt the body is refused: a raw ``;`` (older Rack split pairs on
  it, WHATWG does not; SDKs always send ``%3B``) is a `FormError`, as are malformed
  percent-escapes, invalid UTF-8, more than `MAX_FORM_FIELDS` fields, names nested deeper
  than `MAX_FORM_DEPTH`, and bodies over `MAX_BODY_BYTES`.

JSON bodies get the same treatment from `parse_json_body`: duplicate keys are ambiguous,
numbers with a fraction are `Decimal`, never float.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from decimal import Decimal
from typing import Any, Final, NoReturn

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_FORM_DEPTH",
    "MAX_FORM_FIELDS",
    "MAX_JSON_DEPTH",
    "AmbiguousField",
    "BadField",
    "FormError",
    "FormTree",
    "FormValue",
    "parse_json_body",
    "parse_stripe_form",
]

MAX_BODY_BYTES: Final = 1024 * 1024
"""Largest request body parsed for pricing (1 MiB)."""
MAX_FORM_FIELDS: Final = 1000
"""Most ``name=value`` pairs in one form body."""
MAX_FORM_DEPTH: Final = 8
"""Most bracket levels in one form field name (``a[1][2]...[8]``)."""
MAX_JSON_DEPTH: Final = 32
"""Most nested objects/arrays in one JSON body."""

type FormValue = str | list[FormValue] | dict[str, FormValue]
"""A parsed form field: a string, or nested lists and objects of them."""


class FormError(ValueError):
    """A body that cannot be read safely: bad escapes or UTF-8, too big, too deep."""


class AmbiguousField(ValueError):
    """A field the vendor could read differently from the proxy; ``path`` names it.

    >>> str(AmbiguousField("amount"))
    "field 'amount' is given more than once"
    """

    def __init__(self, path: str, reason: str = "is given more than once") -> None:
        self.path = path
        super().__init__(f"field {path!r} {reason}")


class BadField(ValueError):
    """A field that is present but not of the kind asked for; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"field {path!r} {reason}")


class _Ambiguous:
    """Stands in the tree where a field was given twice or in two shapes."""

    __slots__ = ("path", "reason", "values")

    def __init__(self, path: str, reason: str, values: list[str] | None) -> None:
        self.path = path
        self.reason = reason
        # The repeated scalar values, in order; None once a nested shape was involved.
        self.values = values

    def error(self) -> AmbiguousField:
        return AmbiguousField(self.path, self.reason)


type _Node = str | list[_Node] | dict[str, _Node] | _Ambiguous

_REPEATED: Final = "is given more than once"
_TWO_SHAPES: Final = "is given both as a single value and as nested fields"
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PAIR: Final = re.compile(rb"[^&]+")
_FIELD_NAME: Final = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT: Final = re.compile(r"\[([^\[\]]*)\]")
_MAX_INT_DIGITS: Final = 18
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _show(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _canon(key: str) -> str:
    """Index-like keys by value: ``007`` and ``7`` name the same field."""
    if key.isascii() and key.isdigit():
        return key.lstrip("0") or "0"
    return key


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _conflict(existing: _Node, path: str, value: str | None) -> _Ambiguous:
    """The marker for ``existing`` meeting a second ``value`` (None: a nested shape)."""
    if isinstance(existing, _Ambiguous):
        if value is not None and existing.values is not None:
            existing.values.append(value)
        else:
            existing.reason, existing.values = _TWO_SHAPES, None
        return existing
    if isinstance(existing, str) and value is not None:
        return _Ambiguous(path, _REPEATED, [existing, value])
    return _Ambiguous(path, _TWO_SHAPES, None)


def _has_path(node: _Node, segments: list[str]) -> bool:
    for segment in segments:
        if segment == "":
            continue
        if not isinstance(node, dict) or _canon(segment) not in node:
            return False
        node = node[_canon(segment)]
    return True


def _assign(parent: dict[str, _Node], key: str, rest: list[str], value: str, path: str) -> None:
    """Set ``parent[key]`` followed by bracket segments ``rest`` to ``value``."""
    existing = parent.get(key)
    if not rest:
        parent[key] = value if existing is None else _conflict(existing, path, value)
        return
    if existing is None:
        existing = parent[key] = [] if rest[0] == "" else {}
    if rest[0] == "" and isinstance(existing, list):
        _append(existing, rest[1:], value, path)
    elif rest[0] != "" and isinstance(existing, dict):
        child = _canon(rest[0])
        _assign(existing, child, rest[1:], value, f"{path}.{child}")
    else:
        parent[key] = _conflict(existing, path, None)


def _append(items: list[_Node], rest: list[str], value: str, path: str) -> None:
    """Rack's ``name[]...`` rule: ``a[][x]`` fills the last object until ``x`` repeats."""
    if not rest:
        items.append(value)
        return
    if rest[0] == "":
        inner: list[_Node] = []
        items.append(inner)
        _append(inner, rest[1:], value, f"{path}.{len(items) - 1}")
        return
    last = items[-1] if items else None
    if not isinstance(last, dict) or _has_path(last, rest):
        last = {}
        items.append(last)
    child = _canon(rest[0])
    _assign(last, child, rest[1:], value, f"{path}.{len(items) - 1}.{child}")


def _decode(raw: bytes, what: str) -> str:
    try:
        return urllib.parse.unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"{what} is not valid UTF-8 once percent-decoded") from None


def _split_name(name: str) -> tuple[str, list[str]]:
    """``a[b][]`` → ``("a", ["b", ""])``; anything else with brackets is refused."""
    if name.count("[") > MAX_FORM_DEPTH:
        raise FormError(f"field {_show(name)!r} is nested deeper than {MAX_FORM_DEPTH} levels")
    match = _FIELD_NAME.fullmatch(name)
    if match is None:
        raise FormError(f"field name {_show(name)!r} is not of the form name[key][key]...")
    return match.group(1), _SEGMENT.findall(match.group(2))


def _plain(node: _Node) -> FormValue:
    """A copy of ``node`` for callers; ambiguity anywhere inside raises."""
    if isinstance(node, _Ambiguous):
        raise node.error()
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return [_plain(item) for item in node]
    return {key: _plain(child) for key, child in node.items()}


class FormTree:
    """A parsed form body, read by dotted path; ambiguous fields raise when read.

    >>> tree = parse_stripe_form(b"amount=500&currency=usd&metadata%5Border%5D=7&expand[]=a")
    >>> tree.get("metadata.order"), tree.get_int("amount"), tree.get_list("expand")
    ('7', 500, ['a'])
    """

    __slots__ = ("_root",)

    def __init__(self, root: dict[str, _Node]) -> None:
        self._root = root

    def __repr__(self) -> str:
        return f"<FormTree fields={sorted(self._root)!r}>"

    def _find(self, path: str) -> _Node | None:
        """The node at ``path`` (possibly an ambiguity marker) or None; a marker on the way
        raises."""
        parts = path.split(".")
        if "" in parts:
            raise BadField(path, "is not a dotted path such as 'metadata.order_id'")
        node: _Node = self._root
        for depth, part in enumerate(parts):
            if isinstance(node, _Ambiguous):
                raise node.error()
            if isinstance(node, str):
                where = ".".join(parts[:depth])
                raise BadField(where, f"is a single value with no field {_show(part)!r}")
            child: _Node | None = None
            if isinstance(node, dict):
                child = node.get(_canon(part))
            elif _is_index(part) and len(_canon(part)) <= 9 and int(part) < len(node):
                child = node[int(part)]
            if child is None:
                return None
            node = child
        return node

    def get(self, path: str) -> str | None:
        """The single value at ``path``, or None when absent.

        Raises `AmbiguousField` when the field (or an object holding it) was given twice or
        in two shapes, and `BadField` when the path holds nested fields.

        >>> parse_stripe_form(b"line_items[0][price_data][unit_amount]=500").get(
        ...     "line_items.0.price_data.unit_amount")
        '500'
        >>> parse_stripe_form(b"amount=100&amount=5000").get("amount")
        Traceback (most recent call last):
        ...
        keybrake.pricing.bodies.AmbiguousField: field 'amount' is given more than once
        """
        node = self._find(path)
        if isinstance(node, _Ambiguous):
            raise node.error()
        if node is None or isinstance(node, str):
            return node
        raise BadField(path, "holds nested fields, not a single value")

    def get_int(self, path: str) -> int | None:
        """The value at ``path`` as a non-negative int: plain ASCII digits only, at most 18
        (no sign, spaces, exponent or decimal point), else `BadField`. None when absent.

        >>> parse_stripe_form(b"amount=0500").get_int("amount")
        500
        >>> parse_stripe_form(b"amount=1e3").get_int("amount")
        Traceback (most recent call last):
        ...
        keybrake.pricing.bodies.BadField: field 'amount' must be a plain base-10 integer, not '1e3'
        """
        value = self.get(path)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or len(value) > _MAX_INT_DIGITS:
            raise BadField(path, f"must be a plain base-10 integer, not {_show(value)!r}")
        return int(value)

    def get_value(self, path: str) -> FormValue | None:
        """The value at ``path`` whatever its shape (a string, or nested lists and objects),
        or None when absent; an ambiguous field raises `AmbiguousField`.

        >>> parse_stripe_form(b"a[b]=1&a[c][]=2").get_value("a")
        {'b': '1', 'c': ['2']}
        """
        node = self._find(path)
        if node is None:
            return None
        if isinstance(node, _Ambiguous):
            raise node.error()
        return _plain(node)

    def get_list(self, path: str) -> list[FormValue]:
        """The items at ``path``: a ``name[]`` list, a ``name[0]``/``name[1]`` object in index
        order, a repeated plain field (Twilio's ``MediaUrl=a&MediaUrl=b``) in body order, or a
        lone value as one item. [] when absent.

        >>> parse_stripe_form(b"to[1]=b&to[0]=a").get_list("to")
        ['a', 'b']
        >>> parse_stripe_form(b"MediaUrl=x&MediaUrl=y").get_list("MediaUrl")
        ['x', 'y']
        """
        node = self._find(path)
        if node is None:
            return []
        if isinstance(node, _Ambiguous):
            if node.values is None:
                raise node.error()
            return list(node.values)
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [_plain(item) for item in node]
        if all(_is_index(key) for key in node):
            return [_plain(node[key]) for key in sorted(node, key=lambda k: (len(k), k))]
        raise BadField(path, "holds named fields, not a list")

    def items(self) -> list[tuple[str, FormValue]]:
        """Every top-level field and its value; `AmbiguousField` if any field is ambiguous
        (check `ambiguous_paths` first to avoid that).

        >>> parse_stripe_form(b"a=1&b[c]=2").items()
        [('a', '1'), ('b', {'c': '2'})]
        """
        return [(key, _plain(node)) for key, node in self._root.items()]

    def leaf_paths(self) -> list[str]:
        """The dotted path of every value in the body (list items by index), a field given
        twice counted once, in body order.

        >>> parse_stripe_form(b"a=1&b[c][]=2&b[c][]=3&d=4&d=5").leaf_paths()
        ['a', 'b.c.0', 'b.c.1', 'd']
        """
        out: list[str] = []

        def walk(node: _Node, path: str) -> None:
            if isinstance(node, str | _Ambiguous):
                out.append(path)
            elif isinstance(node, list):
                for i, item in enumerate(node):
                    walk(item, f"{path}.{i}")
            else:
                for key, child in node.items():
                    walk(child, f"{path}.{key}" if path else key)

        walk(self._root, "")
        return out

    @property
    def ambiguous_paths(self) -> tuple[str, ...]:
        """Dotted paths of every ambiguous field, sorted.

        >>> parse_stripe_form(b"a=1&a[b]=2&c=3&c=4").ambiguous_paths
        ('a', 'c')
        """
        found: list[str] = []
        stack: list[_Node] = [self._root]
        while stack:
            node = stack.pop()
            if isinstance(node, _Ambiguous):
                found.append(node.path)
            elif isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        return tuple(sorted(found))


def parse_stripe_form(body: bytes) -> FormTree:
    """Parse an ``application/x-www-form-urlencoded`` body the way Stripe reads it.

    Names nest with brackets (``metadata[order_id]``, ``line_items[0][quantity]``), ``[]``
    appends (``expand[]=a&expand[]=b``), brackets may be percent-encoded (``%5B``/``%5D``)
    and ``+`` is a space. See the module docstring for what is refused.

    >>> parse_stripe_form(b"expand[]=a&expand[]=b&description=two+words").items()
    [('expand', ['a', 'b']), ('description', 'two words')]
    """
    body = bytes(body)
    if len(body) > MAX_BODY_BYTES:
        raise FormError(f"form body is larger than {MAX_BODY_BYTES} bytes")
    if b";" in body:
        raise FormError(
            "form body contains a raw ';': servers disagree whether it separates fields"
        )
    bad = _BAD_ESCAPE.search(body)
    if bad is not None:
        raise FormError(f"form body has a malformed percent-escape at byte {bad.start()}")
    root: dict[str, _Node] = {}
    number = 0
    for match in _PAIR.finditer(body):
        pair = match.group().lstrip(b" ")
        if not pair:
            continue
        number += 1
        if number > MAX_FORM_FIELDS:
            raise FormError(f"form body has more than {MAX_FORM_FIELDS} fields")
        raw_name, _, raw_value = pair.partition(b"=")
        name = _decode(raw_name, f"the name of field {number}")
        value = _decode(raw_value, f"the value of field {_show(name)!r}")
        top, segments = _split_name(name)
        top = _canon(top)
        _assign(root, top, segments, value, top)
    return FormTree(root)


class _Duplicated(dict[str, Any]):
    """A JSON object that had ``duplicate`` more than once; reported with its full path."""

    duplicate: str


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked = _Duplicated(obj)
            marked.duplicate = key
            return marked
        seen.add(key)
    raise AssertionError("unreachable: a duplicate key was counted but not found")


def _refuse_constant(name: str) -> NoReturn:
    raise FormError(f"JSON body contains {name}, which is not a JSON number")


def _check_json(data: Any) -> None:
    """Depth, duplicate keys and unpaired surrogates, walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise FormError(f"JSON string at {path or 'top level'!r} has an unpaired surrogate")
            continue
        if not isinstance(node, dict | list):
            continue
        if depth + 1 > MAX_JSON_DEPTH:
            raise FormError(f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, _Duplicated):
            raise AmbiguousField(
                f"{path}.{node.duplicate}" if path else node.duplicate,
                "is given more than once in the JSON body",
            )
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in children:
            child_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                raise FormError(f"JSON key at {child_path!r} has an unpaired surrogate")
            stack.append((child, child_path, depth + 1))


def parse_json_body(body: bytes) -> Any:
    """Parse a UTF-8 JSON body; fractions become `Decimal`, duplicate keys `AmbiguousField`.

    NaN/Infinity, nesting deeper than `MAX_JSON_DEPTH`, invalid UTF-8 and bodies over
    `MAX_BODY_BYTES` are a `FormError`.

    >>> parse_json_body(b'{"to": ["a@example.com"], "price": 0.0079}')
    {'to': ['a@example.com'], 'price': Decimal('0.0079')}
    >>> parse_json_body(b'{"amount": 1, "amount": 9}')
    Traceback (most recent call last):
    ...
    keybrake.pricing.bodies.AmbiguousField: field 'amount' is given more than once in the JSON body
    """
    body = bytes(body)
    if len(body) > MAX_BODY_BYTES:
        raise FormError(f"JSON body is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("JSON body is not valid UTF-8") from None
    try:
        data = json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_refuse_constant,
            object_pairs_hook=_json_object,
        )
    except FormError:
        raise
    except RecursionError:
        raise FormError(f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, ArithmeticError) as e:
        raise FormError(f"JSON body cannot be parsed: {_show(str(e))}") from None
    _check_json(data)
    return data
