"""Where a policy file went wrong: one line per mistake, with the line number of the field.

`yaml_problem` turns a YAML syntax error into ``file:line:column: not valid YAML: …``;
`SourceLines` maps a pydantic error location (``endpoints.3.cost``) back to the line of the
YAML file it came from; `schema_problems` writes ``file:line: field.path: message`` for each
validation error, with the closest valid name for a misspelt field::

    policies/stripe.yaml:25: auth.secret_envv: unknown field; did you mean 'secret_env'?
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["SourceLines", "field_names_at", "schema_problems", "yaml_problem"]

Loc = Sequence[str | int]


def yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """``file:line:column: not valid YAML: problem`` (plus where the construct began).

    >>> yaml_problem(Path("p.yaml"), error_of("hosts: [a\\nauth: x"))  # doctest: +SKIP
    "p.yaml:2:5: not valid YAML: expected ',' or ']', but got ':' (the flow sequence ...)"
    """
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"{path}: not valid YAML: {err}"
    mark = err.problem_mark
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {err.problem}"
    began = err.context_mark
    if err.context and began is not None and began.line != mark.line:
        text += f" ({err.context} that began on line {began.line + 1})"
    return text


class SourceLines:
    """Line numbers of a YAML document's fields, by pydantic location."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    @classmethod
    def of(cls, text: str, loader: type[yaml.SafeLoader]) -> SourceLines:
        try:
            root = yaml.compose(text, Loader=loader)
        except yaml.YAMLError:
            root = None
        return cls(root)

    def line(self, loc: Loc) -> int | None:
        """The 1-based line of the deepest part of ``loc`` found in the file, or ``None``
        when not even its first part is there (a missing top-level field)."""
        node, line = self.root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        node, line = value, key.start_mark.line + 1
                        break
                # else: a union's tag (``cost.per_unit``) or a missing field: stay here
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                node = node.value[part]
                line = node.start_mark.line + 1
        return line


def _members(annotations: Iterable[Any]) -> list[Any]:
    """``annotations`` without ``Annotated``, ``Optional`` and unions: the types that remain."""
    out: list[Any] = []
    for a in annotations:
        origin = typing.get_origin(a)
        if origin is typing.Annotated:
            out += _members([typing.get_args(a)[0]])
        elif origin is typing.Union or origin is types.UnionType:
            out += _members(typing.get_args(a))
        elif a is not type(None):
            out.append(a)
    return out


def _models(level: Iterable[Any]) -> list[type[BaseModel]]:
    return [t for t in _members(level) if isinstance(t, type) and issubclass(t, BaseModel)]


def _tagged(model: type[BaseModel], tag: str) -> bool:
    """Whether a discriminated union names ``model`` by ``tag`` (``kind: per_unit``)."""
    for field in model.model_fields.values():
        ann = field.annotation
        if typing.get_origin(ann) is typing.Literal and tag in typing.get_args(ann):
            return True
    return False


def _walk(model: type[BaseModel], loc: Loc) -> tuple[list[Any], tuple[str | int, ...]]:
    """Follow pydantic's location parts through nested models, lists, dicts and tagged
    unions: the types found at ``loc``, and ``loc`` as the file spells it (without the tags
    pydantic adds for a tagged union's member: ``cost.per_unit.by_prefix`` → ``cost.by_prefix``)."""
    level: list[Any] = [model]
    path: list[str | int] = []
    for part in loc:
        models = _models(level)
        if isinstance(part, str) and any(part in m.model_fields for m in models):
            level = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        elif isinstance(part, str) and any(_tagged(m, part) for m in models):
            level = [m for m in models if _tagged(m, part)]
            continue
        else:  # an item of a list or tuple, or a value of a dict
            items: list[Any] = []
            for t in _members(level):
                args = [a for a in typing.get_args(t) if a is not Ellipsis]
                origin = typing.get_origin(t)
                if origin in (list, tuple) and isinstance(part, int):
                    items += args[:1]
                elif origin is dict and args:
                    items.append(args[-1])
            level = items
        path.append(part)
    return level, tuple(path)


def field_names_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The field names a mapping at pydantic location ``loc`` may have.

    >>> field_names_at(VendorPolicy, ("auth",))  # doctest: +SKIP
    ['raw_secret_patterns', 'schemes', 'secret_env', ...]
    """
    level, _ = _walk(model, loc)
    return sorted({name for m in _models(level) for name in m.model_fields})


def schema_problems(
    path: Path, err: ValidationError, model: type[BaseModel], lines: SourceLines
) -> str:
    """One ``file:line: field.path: message`` line per validation error.

    An unknown field gets the closest valid name; the "Field required" error pydantic adds
    for the name it was probably meant to be is left out (one mistake, one line).
    """
    suggested: set[tuple[str | int, ...]] = set()
    out: list[tuple[tuple[str | int, ...], str, str]] = []
    for e in err.errors():
        # "[key]" is pydantic's marker for a bad mapping key; the key itself names the field.
        loc = tuple(x for x in e["loc"] if x != "[key]")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            msg = "unknown field"
            close = difflib.get_close_matches(loc[-1], field_names_at(model, loc[:-1]), n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
                suggested.add((*loc[:-1], close[0]))
        out.append((loc, e["type"], msg))
    text = []
    for loc, kind, msg in out:
        if kind == "missing" and loc in suggested:
            continue
        line = lines.line(loc)
        where = f"{path}:{line}" if line is not None else str(path)
        field = ".".join(str(x) for x in _walk(model, loc)[1]) or "(top level)"
        text.append(f"{where}: {field}: {msg}")
    return "\n".join(text)
