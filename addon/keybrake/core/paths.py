"""Request-target normalisation and endpoint allowlist patterns (DESIGN §2 step 4).

The allowlist check and the vendor must see the same path, so :func:`normalize_path` returns
one canonical form that is both matched against the patterns and forwarded upstream. Anything
two servers could read differently (an encoded slash, double encoding, a backslash, a
non-ASCII look-alike, ``..`` above the root) is refused with :class:`PathRejected` instead of
being guessed at.

    >>> target = normalize_path("/v1//payment_intents/./pi_%41bc/confirm/?expand[]=x")
    >>> target.path, target.query
    ('/v1/payment_intents/pi_Abc/confirm', 'expand[]=x')
    >>> pattern = EndpointPattern.parse("post /v1/payment_intents/{id}/confirm/")
    >>> str(pattern), pattern.match("POST", target.segments)
    ('POST /v1/payment_intents/{id}/confirm', {'id': 'pi_Abc'})

Matching is case-sensitive on the path (vendor ids are), case-insensitive on the method.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import quote

__all__ = [
    "MAX_PATH_BYTES",
    "MAX_SEGMENTS",
    "EndpointPattern",
    "NormalizedPath",
    "PathRejected",
    "PatternError",
    "RejectReason",
    "match_any",
    "normalize_method",
    "normalize_path",
    "split_base_url",
]

MAX_PATH_BYTES: Final = 2048
"""Longest path (before the query string) accepted, raw and canonical."""
MAX_SEGMENTS: Final = 64
"""Most non-empty path segments accepted."""

RejectReason = Literal[
    "backslash",
    "bad_method",
    "bad_percent_encoding",
    "control_char",
    "dot_segment_escape",
    "double_encoding",
    "encoded_slash",
    "non_ascii",
    "not_origin_form",
    "nul_byte",
    "too_long",
]
"""The machine-readable ``PathRejected.reason`` values."""

# RFC 3986 pchar minus "%" and ";": what a canonical segment may carry unescaped.
_SAFE: Final = "-._~!$&'()*+,=:@"
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A placeholder followed by a literal suffix in the same segment: Twilio's "{Sid}.json".
_SUFFIXED: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}([^{}*]+)")


class PathRejected(ValueError):
    """A method or request target that is refused rather than normalised.

    >>> try:
    ...     normalize_path("/v1/a%2Fb")
    ... except PathRejected as e:
    ...     print(e.reason, "-", e)
    encoded_slash - a path segment contains an encoded '/' (%2F)
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason


class PatternError(ValueError):
    """An allowlist or policy endpoint spec that cannot be parsed.

    >>> EndpointPattern.parse("POST /v1/pay*")
    Traceback (most recent call last):
    ...
    keybrake.core.paths.PatternError: 'POST /v1/pay*': '*' must be a whole path segment, got 'pay*'
    """


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    """A request target in canonical form.

    ``path`` is what is checked and what is forwarded; ``segments`` are its decoded segments;
    ``query`` is the raw query string (no ``?``), passed through untouched.

    >>> normalize_path("/v1/x?a=1").target
    '/v1/x?a=1'
    """

    path: str
    segments: tuple[str, ...]
    query: str = ""

    @property
    def target(self) -> str:
        """The request target to forward: canonical path plus the untouched query."""
        return f"{self.path}?{self.query}" if self.query else self.path


def split_base_url(target: str) -> tuple[str, str]:
    """The first path segment of a base-URL request and the target that follows it.

    The admin listener routes ``/{vendor}/…`` to the vendor and everything else to the admin
    API; both sides split with this one function, so no request is claimed by neither.

    >>> split_base_url("/stripe/v1/charges?expand[]=x")
    ('stripe', '/v1/charges?expand[]=x')
    >>> split_base_url("/stripe?x")
    ('stripe', '/?x')
    """
    path, sep, query = target.partition("?")
    first, _, rest = path.lstrip("/").partition("/")
    return first, "/" + rest + sep + query


def normalize_method(method: str) -> str:
    """Uppercase an HTTP method, refusing anything that is not an RFC 9110 token.

    >>> normalize_method("post")
    'POST'
    >>> normalize_method("PO ST")
    Traceback (most recent call last):
    ...
    keybrake.core.paths.PathRejected: 'PO ST' is not an HTTP method token
    """
    # The token check comes first: str.upper() maps some non-ASCII letters to ASCII (U+017F to "S").
    if not _TOKEN.fullmatch(method):
        raise PathRejected("bad_method", f"{_show(method)} is not an HTTP method token")
    return method.upper()


def normalize_path(target: str) -> NormalizedPath:
    """Normalise an origin-form request target, or raise :class:`PathRejected`.

    Drops the fragment and ``;params``, decodes each segment once, collapses empty segments,
    resolves ``.`` and ``..`` (also when percent-encoded), drops the trailing slash and
    re-encodes each segment, so ``normalize_path(p.path)`` returns ``p.path`` again.

    >>> normalize_path("/v1/refunds;x=1/../payment_intents/").path
    '/v1/payment_intents'
    >>> normalize_path("/v1/%2e%2e/%2e%2e/etc")
    Traceback (most recent call last):
    ...
    keybrake.core.paths.PathRejected: '..' climbs above the root of the path
    """
    if not target.startswith("/"):
        raise PathRejected(
            "not_origin_form",
            f"the request target must be a path starting with '/', got {_show(target)}",
        )
    path, _, query = target.partition("#")[0].partition("?")
    if len(path) > MAX_PATH_BYTES:  # characters <= bytes, so this bound is safe
        raise PathRejected("too_long", f"the path is longer than {MAX_PATH_BYTES} bytes")
    _refuse_unsafe_chars(path, "the path")
    _refuse_control_chars(query, "the query string")
    raw_segments = [s for s in path.split("/") if s]
    if len(raw_segments) > MAX_SEGMENTS:
        raise PathRejected("too_long", f"the path has more than {MAX_SEGMENTS} segments")

    segments: list[str] = []
    for raw in raw_segments:
        name, _, params = raw.partition(";")
        _decode(params)  # checked like the rest, then dropped: matrix params are not forwarded
        segment = _decode(name)
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise PathRejected("dot_segment_escape", "'..' climbs above the root of the path")
            segments.pop()
            continue
        segments.append(segment)

    canonical = "/" + "/".join(quote(s, safe=_SAFE) for s in segments)
    if len(canonical) > MAX_PATH_BYTES:  # re-encoding can lengthen it; keep a fixed point
        raise PathRejected("too_long", f"the path is longer than {MAX_PATH_BYTES} bytes")
    return NormalizedPath(canonical, tuple(segments), query)


@dataclass(frozen=True, slots=True)
class EndpointPattern:
    """A method plus a path whose segments are literals, ``{name}``, ``{name}suffix`` or ``*``.

    A placeholder or ``*`` matches exactly one non-empty segment; build one with
    :meth:`parse`. ``segments`` holds decoded literals, ``"{name}"`` and ``"*"`` as written.
    A placeholder may be followed by a literal suffix in the same segment (Twilio's
    ``{Sid}.json``): the segment must end with the suffix, and what comes before it, which must
    not be empty, ``.`` or ``..``, is captured.

    >>> p = EndpointPattern.parse("GET /v1/customers/*/sources/{id}")
    >>> p.match("get", ("v1", "customers", "cus_1", "sources", "src_2"))
    {'id': 'src_2'}
    >>> p.match("GET", ("v1", "customers", "cus_1", "sources")) is None
    True
    >>> EndpointPattern.parse("GET /Messages/{Sid}.json").match("GET", ("Messages", "SM1.json"))
    {'Sid': 'SM1'}
    """

    method: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> EndpointPattern:
        """Parse ``"METHOD /path/{id}"``; the path is normalised like a request path.

        >>> str(EndpointPattern.parse("post  /v1//payment_intents/"))
        'POST /v1/payment_intents'
        """
        parts = spec.split()
        if len(parts) != 2:
            raise PatternError(f"{spec!r}: expected '<METHOD> <path>', e.g. 'POST /v1/refunds'")
        method_text, path_text = parts
        try:
            method = normalize_method(method_text)
        except PathRejected as e:
            raise PatternError(f"{spec!r}: {e}") from None
        if method == "*":
            raise PatternError(f"{spec!r}: '*' is not a method; list each method explicitly")
        if "?" in path_text or "#" in path_text:
            raise PatternError(f"{spec!r}: a pattern has no query string or fragment")
        try:
            normalized = normalize_path(path_text)
        except PathRejected as e:
            raise PatternError(f"{spec!r}: {e}") from None
        names: set[str] = set()
        for segment in normalized.segments:
            if segment == "*":
                continue
            if m := _PLACEHOLDER.fullmatch(segment) or _SUFFIXED.fullmatch(segment):
                if m[1] in names:
                    raise PatternError(f"{spec!r}: placeholder {{{m[1]}}} appears twice")
                names.add(m[1])
            elif "*" in segment:
                raise PatternError(f"{spec!r}: '*' must be a whole path segment, got {segment!r}")
            elif segment.startswith("{") and segment.endswith("}"):
                raise PatternError(
                    f"{spec!r}: placeholder names are letters, digits and '_', got {segment!r}"
                )
            elif "{" in segment or "}" in segment:
                raise PatternError(
                    f"{spec!r}: a placeholder must be a whole path segment or be followed only "
                    f"by a literal suffix ('{{Sid}}.json'), got {segment!r}"
                )
        return cls(method, normalized.segments)

    @property
    def path(self) -> str:
        """The canonical path, placeholders and ``*`` as written."""
        return "/" + "/".join(_render(s) for s in self.segments)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def match(self, method: str, segments: tuple[str, ...]) -> dict[str, str] | None:
        """The captured placeholders if ``method`` and ``segments`` match, else None."""
        if not method.isascii() or method.upper() != self.method:
            return None
        if len(segments) != len(self.segments):
            return None
        captured: dict[str, str] = {}
        for want, got in zip(self.segments, segments, strict=True):
            if _is_variable(want):
                name, _, suffix = want[1:].partition("}")
                if suffix:
                    if not got.endswith(suffix):
                        return None
                    got = got[: -len(suffix)]
                if got in ("", ".", "..") or "/" in got:
                    return None
                if want != "*":
                    captured[name] = got
            elif want != got:
                return None
        return captured

    def _specificity(self) -> tuple[int, ...]:
        # A literal segment beats "{Sid}.json", which beats a bare "{id}" or "*".
        return tuple(
            0 if s == "*" or s.endswith("}") else 1 if _is_variable(s) else 2 for s in self.segments
        )


def match_any(
    patterns: Sequence[EndpointPattern], method: str, path: NormalizedPath
) -> EndpointPattern | None:
    """The most specific pattern matching the request, or None.

    A literal segment beats a placeholder, comparing from the left; ties go to the earlier
    pattern. Raises :class:`PathRejected` if ``method`` is not a method token.

    >>> allow = [EndpointPattern.parse(s) for s in ("POST /v1/c/{id}", "POST /v1/c/search")]
    >>> str(match_any(allow, "post", normalize_path("/v1/c/search")))
    'POST /v1/c/search'
    """
    method = normalize_method(method)
    best: EndpointPattern | None = None
    for pattern in patterns:
        if pattern.match(method, path.segments) is None:
            continue
        if best is None or pattern._specificity() > best._specificity():
            best = pattern
    return best


def _is_variable(segment: str) -> bool:
    return segment == "*" or segment.startswith("{")


def _render(segment: str) -> str:
    """A pattern segment in canonical form: literals and suffixes percent-encoded."""
    if segment == "*":
        return segment
    if segment.startswith("{"):
        name, _, suffix = segment.partition("}")
        return f"{name}}}{quote(suffix, safe=_SAFE)}"
    return quote(segment, safe=_SAFE)


def _decode(raw: str) -> str:
    """Percent-decode one segment once, refusing anything ambiguous after decoding."""
    if "%" in _ESCAPE.sub("", raw):
        raise PathRejected(
            "bad_percent_encoding", "a '%' in the path is not followed by two hex digits"
        )
    decoded = _ESCAPE.sub(lambda m: chr(int(m[1], 16)), raw)
    if "/" in decoded:
        raise PathRejected("encoded_slash", "a path segment contains an encoded '/' (%2F)")
    if "%" in decoded:
        raise PathRejected("double_encoding", "the path is percent-encoded twice (%25)")
    _refuse_unsafe_chars(decoded, "a decoded path segment")
    return decoded


def _refuse_unsafe_chars(text: str, where: str) -> None:
    _refuse_control_chars(text, where)
    if "\\" in text:
        raise PathRejected("backslash", f"{where} contains a backslash")
    if not text.isascii():
        raise PathRejected("non_ascii", f"{where} contains a non-ASCII character")


def _refuse_control_chars(text: str, where: str) -> None:
    if "\x00" in text:
        raise PathRejected("nul_byte", f"{where} contains a NUL byte")
    if _CONTROL.search(text):
        raise PathRejected("control_char", f"{where} contains a control character")


def _show(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."
