"""Tests for keybrake.core.paths: the allowlist decision on hostile request targets."""

from __future__ import annotations

import contextlib
import doctest
from typing import NamedTuple, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keybrake.core import paths as _paths
from keybrake.core.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENTS,
    EndpointPattern,
    NormalizedPath,
    PathRejected,
    PatternError,
    RejectReason,
    match_any,
    normalize_method,
    normalize_path,
)

ALLOWLIST = [
    "POST /v1/payment_intents",
    "POST /v1/payment_intents/{id}/confirm",
    "GET /v1/payment_intents/{id}",
]
PATTERNS = [EndpointPattern.parse(s) for s in ALLOWLIST]
NOT_ALLOWED = "endpoint_not_allowed"


def decide(method: str, target: str) -> tuple[str, str]:
    """What the guard does: ("allowed", forwarded target) or ("refused", reason)."""
    try:
        normalized = normalize_path(target)
        pattern = match_any(PATTERNS, method, normalized)
    except PathRejected as e:
        return ("refused", e.reason)
    if pattern is None:
        return ("refused", NOT_ALLOWED)
    return ("allowed", normalized.target)


def allowed(target: str) -> tuple[str, str]:
    return ("allowed", target)


def refused(reason: str) -> tuple[str, str]:
    return ("refused", reason)


PI = "/v1/payment_intents"


class Case(NamedTuple):
    method: str
    target: str
    expected: tuple[str, str]
    id: str


CASES = [
    # plain requests
    Case("POST", PI, allowed(PI), id="plain"),
    Case("POST", f"{PI}/pi_1/confirm", allowed(f"{PI}/pi_1/confirm"), id="plain-confirm"),
    Case("GET", f"{PI}/pi_1", allowed(f"{PI}/pi_1"), id="plain-get-by-id"),
    Case("GET", PI, refused(NOT_ALLOWED), id="wrong-method-list"),
    Case("GET", f"{PI}/pi_1/confirm", refused(NOT_ALLOWED), id="wrong-method-confirm"),
    Case("POST", "/v1/refunds", refused(NOT_ALLOWED), id="other-endpoint"),
    Case("GET", "/", refused(NOT_ALLOWED), id="root"),
    Case("POST", f"{PI}/pi_1/confirm/x", refused(NOT_ALLOWED), id="extra-segment"),
    # slashes
    Case("POST", f"{PI}/", allowed(PI), id="trailing-slash"),
    Case("POST", f"{PI}///", allowed(PI), id="trailing-slashes"),
    Case("POST", "/v1//payment_intents", allowed(PI), id="double-slash"),
    Case("POST", f"/{PI}", allowed(PI), id="leading-double-slash"),
    Case("POST", "//v1/refunds", refused(NOT_ALLOWED), id="leading-double-slash-other"),
    Case("POST", f"{PI}//confirm", refused(NOT_ALLOWED), id="empty-id-segment"),
    # dot segments, raw and encoded
    Case("POST", f"{PI}/../refunds", refused(NOT_ALLOWED), id="dotdot-to-refunds"),
    Case("POST", "/v1/refunds/../payment_intents", allowed(PI), id="dotdot-into-allowed"),
    Case("POST", f"{PI}/%2e%2e/refunds", refused(NOT_ALLOWED), id="encoded-dotdot"),
    Case("POST", f"{PI}/pi_1/%2E%2e/", allowed(PI), id="encoded-dotdot-mixed-case"),
    Case("POST", f"{PI}/.%2e/refunds", refused(NOT_ALLOWED), id="half-encoded-dotdot"),
    Case("POST", "/v1/./payment_intents", allowed(PI), id="dot-segment"),
    Case("POST", "/v1/%2e/payment_intents", allowed(PI), id="encoded-dot-segment"),
    Case("POST", f"{PI}/../confirm", refused(NOT_ALLOWED), id="id-receives-dotdot"),
    Case("POST", f"{PI}/%2e%2e/confirm", refused(NOT_ALLOWED), id="id-gets-enc-dotdot"),
    Case("POST", f"{PI}/..;x/confirm", refused(NOT_ALLOWED), id="id-gets-dotdot-param"),
    Case("GET", f"{PI}/.", refused(NOT_ALLOWED), id="id-receives-dot"),
    Case("POST", "/../v1/payment_intents", refused("dot_segment_escape"), id="escape"),
    Case("POST", "/v1/%2e%2e/%2e%2e/x", refused("dot_segment_escape"), id="enc-escape"),
    # encodings
    Case("POST", f"{PI}/pi_1%2Fx/confirm", refused("encoded_slash"), id="encoded-slash"),
    Case("POST", "/v1%2fpayment_intents", refused("encoded_slash"), id="encoded-slash-lc"),
    Case("POST", f"{PI}/%252e%252e", refused("double_encoding"), id="double-enc-dots"),
    Case("POST", f"{PI}%252F", refused("double_encoding"), id="double-enc-slash"),
    Case("POST", f"{PI}/pi_%4", refused("bad_percent_encoding"), id="short-escape"),
    Case("POST", f"{PI}/pi_%zz", refused("bad_percent_encoding"), id="non-hex-escape"),
    Case("POST", f"{PI}/pi_%41bc/confirm", allowed(f"{PI}/pi_Abc/confirm"), id="encoded-id"),
    Case("GET", f"{PI}/pi%7E1", allowed(f"{PI}/pi~1"), id="encoded-unreserved"),
    Case("GET", f"{PI}/pi 1", allowed(f"{PI}/pi%201"), id="raw-space-reencoded"),
    Case("GET", f"{PI}/%7Bid%7D", allowed(f"{PI}/%7Bid%7D"), id="literal-braces-id"),
    # case
    Case("POST", "/V1/Refunds", refused(NOT_ALLOWED), id="upper-case-path"),
    Case("POST", "/v1/Payment_Intents", refused(NOT_ALLOWED), id="mixed-case-path"),
    Case("GET", f"{PI}/PI_1", allowed(f"{PI}/PI_1"), id="id-case-kept"),
    # methods
    Case("post", PI, allowed(PI), id="method-lower"),
    Case("PoSt", PI, allowed(PI), id="method-mixed"),
    Case("POST ", PI, refused("bad_method"), id="method-trailing-space"),
    Case("PO ST", PI, refused("bad_method"), id="method-inner-space"),
    Case("POST\r\n", PI, refused("bad_method"), id="method-crlf"),
    Case("", PI, refused("bad_method"), id="method-empty"),
    Case("po\u017ft", PI, refused("bad_method"), id="method-long-s-uppercases-to-S"),
    # query, fragment, params
    Case(
        "GET",
        f"{PI}/pi_1?expand[]=customer&x=%2F",
        allowed(f"{PI}/pi_1?expand[]=customer&x=%2F"),
        id="query-preserved",
    ),
    Case("POST", f"{PI}?x=/../refunds", allowed(f"{PI}?x=/../refunds"), id="query-dots"),
    Case("POST", "/v1/refunds?/v1/payment_intents", refused(NOT_ALLOWED), id="query-path"),
    Case("POST", f"{PI}?", allowed(PI), id="empty-query"),
    Case("POST", f"{PI}#frag", allowed(PI), id="fragment"),
    Case("POST", f"{PI}#x?y=1", allowed(PI), id="fragment-before-query"),
    Case("POST", f"{PI}?a=1#frag", allowed(f"{PI}?a=1"), id="query-then-fragment"),
    Case("POST", "/v1/refunds;x=1", refused(NOT_ALLOWED), id="params-other"),
    Case("POST", f"{PI};x=1", allowed(PI), id="params-stripped"),
    Case("POST", f"{PI}/pi_1;v=2/confirm", allowed(f"{PI}/pi_1/confirm"), id="params-on-id"),
    Case("GET", f"{PI}/pi_1%3Bx", allowed(f"{PI}/pi_1%3Bx"), id="encoded-semicolon-data"),
    # control characters
    Case("POST", f"{PI}\x00", refused("nul_byte"), id="nul-raw"),
    Case("POST", f"{PI}%00", refused("nul_byte"), id="nul-encoded"),
    Case("POST", f"{PI}?a=\x00", refused("nul_byte"), id="nul-in-query"),
    Case("POST", f"{PI}%0d%0aHost:x", refused("control_char"), id="crlf-encoded"),
    Case("POST", f"{PI}\r\nX: y", refused("control_char"), id="crlf-raw"),
    Case("POST", f"{PI}%7f", refused("control_char"), id="del-encoded"),
    # size
    Case("POST", f"{PI}/" + "a" * 5000, refused("too_long"), id="path-5000-chars"),
    Case("POST", "/v1" + "/a" * 100, refused("too_long"), id="100-segments"),
    # look-alikes and non-ASCII
    Case("POST", "/v1/payment_\u0456ntents", refused("non_ascii"), id="cyrillic-i"),
    Case("POST", "/v1\uff0fpayment_intents", refused("non_ascii"), id="fullwidth-slash"),
    Case("POST", "/v1/payment_%D1%96ntents", refused("non_ascii"), id="enc-cyrillic"),
    Case("POST", f"{PI}/%C0%AE%C0%AE/x", refused("non_ascii"), id="overlong-utf8-dots"),
    Case("POST", f"{PI}/%C0%AF", refused("non_ascii"), id="overlong-utf8-slash"),
    Case("POST", f"{PI}/\udcc0", refused("non_ascii"), id="surrogate-escape"),
    # backslashes
    Case("POST", f"{PI}\\..\\refunds", refused("backslash"), id="backslash-raw"),
    Case("POST", f"{PI}%5C..%5Crefunds", refused("backslash"), id="backslash-enc"),
    Case("POST", f"{PI}/pi_1%5cx/confirm", refused("backslash"), id="backslash-enc-lc"),
    # not origin-form
    Case("POST", f"https://api.stripe.com{PI}", refused("not_origin_form"), id="absolute"),
    Case("OPTIONS", "*", refused("not_origin_form"), id="asterisk-form"),
    Case("POST", "", refused("not_origin_form"), id="empty-target"),
    Case("POST", "v1/payment_intents", refused("not_origin_form"), id="relative"),
]


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [pytest.param(c.method, c.target, c.expected, id=c.id) for c in CASES],
)
def test_allowlist_decision(method: str, target: str, expected: tuple[str, str]) -> None:
    assert decide(method, target) == expected


def test_table_covers_enough_cases() -> None:
    assert len(CASES) >= 40


def test_refusal_reasons_are_declared() -> None:
    for case in CASES:
        verdict, detail = case.expected
        if verdict == "refused" and detail != NOT_ALLOWED:
            assert detail in get_args(RejectReason), case.id


def test_allowed_target_is_a_fixed_point() -> None:
    for case in CASES:
        verdict, forwarded = case.expected
        if verdict == "allowed":
            assert decide(case.method, forwarded) == ("allowed", forwarded), case.id


def test_normalized_path_fields() -> None:
    n = normalize_path("/v1//payment_intents/pi_%41bc/./confirm/;x?expand[]=a&b=%2F#top")
    assert n == NormalizedPath(
        "/v1/payment_intents/pi_Abc/confirm",
        ("v1", "payment_intents", "pi_Abc", "confirm"),
        "expand[]=a&b=%2F",
    )
    assert n.target == "/v1/payment_intents/pi_Abc/confirm?expand[]=a&b=%2F"
    assert normalize_path("/").segments == ()
    assert normalize_path("/").path == "/"
    assert normalize_path("/a/..").path == "/"


def test_limits_are_inclusive() -> None:
    assert len(normalize_path("/" + "a" * (MAX_PATH_BYTES - 1)).path) == MAX_PATH_BYTES
    assert len(normalize_path("/a" * MAX_SEGMENTS).segments) == MAX_SEGMENTS
    with pytest.raises(PathRejected) as e:
        normalize_path("/a" * (MAX_SEGMENTS + 1))
    assert e.value.reason == "too_long"


def test_reencoding_past_the_limit_is_refused() -> None:
    # 700 raw "{" become 2100 bytes of "%7B": the canonical form must stay within the limit.
    with pytest.raises(PathRejected) as e:
        normalize_path("/" + "{" * 700)
    assert e.value.reason == "too_long"


def test_path_rejected_is_a_value_error_with_reason_and_message() -> None:
    with pytest.raises(ValueError, match="encoded '/'") as e:
        normalize_path("/a%2Fb")
    assert isinstance(e.value, PathRejected)
    assert e.value.reason == "encoded_slash"


@pytest.mark.parametrize(
    ("method", "expected"),
    [("get", "GET"), ("Delete", "DELETE"), ("M-SEARCH", "M-SEARCH"), ("PATCH", "PATCH")],
)
def test_normalize_method_valid(method: str, expected: str) -> None:
    assert normalize_method(method) == expected


@pytest.mark.parametrize(
    "method", ["", " GET", "GET ", "G\tET", "GET\n", "GE(T", "G/T", "G\u0130T", "\u0661"]
)
def test_normalize_method_invalid(method: str) -> None:
    with pytest.raises(PathRejected) as e:
        normalize_method(method)
    assert e.value.reason == "bad_method"


# -- patterns ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("POST /v1/payment_intents", "POST /v1/payment_intents"),
        ("post /v1/payment_intents/", "POST /v1/payment_intents"),
        ("  GET\t/v1//customers/{id}  ", "GET /v1/customers/{id}"),
        ("DELETE /v1/customers/*/discount", "DELETE /v1/customers/*/discount"),
        ("GET /v1/./a/../b", "GET /v1/b"),
        ("GET /v1/files/a%20b;v=1", "GET /v1/files/a%20b"),
        ("GET /v1/%41", "GET /v1/A"),
        (
            "POST /2010-04-01/Accounts/{AccountSid}/Messages.json",
            "POST /2010-04-01/Accounts/{AccountSid}/Messages.json",
        ),
        ("GET /v1/a/{id}/b/{id_2}", "GET /v1/a/{id}/b/{id_2}"),
        (
            "GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json",
            "GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json",
        ),
        ("POST /v1/{id}.json", "POST /v1/{id}.json"),
        ("GET /v1/{id}%20x", "GET /v1/{id}%20x"),
        ("GET /v1/{id}.tar.gz/", "GET /v1/{id}.tar.gz"),
        ("GET /", "GET /"),
    ],
)
def test_pattern_parse_valid(spec: str, canonical: str) -> None:
    pattern = EndpointPattern.parse(spec)
    assert str(pattern) == canonical
    assert EndpointPattern.parse(str(pattern)) == pattern


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "expected '<METHOD> <path>'"),
        ("POST", "expected '<METHOD> <path>'"),
        ("/v1/x", "expected '<METHOD> <path>'"),
        ("POST /v1/x extra", "expected '<METHOD> <path>'"),
        ("PO@ST /v1/x", "not an HTTP method token"),
        ("* /v1/x", "'\\*' is not a method"),
        ("POST v1/x", "starting with '/'"),
        ("POST https://api.stripe.com/v1/x", "starting with '/'"),
        ("POST /v1/pay*", "'\\*' must be a whole path segment, got 'pay\\*'"),
        ("POST /v1/**", "'\\*' must be a whole path segment, got '\\*\\*'"),
        ("POST /v1/{id", "placeholder must be a whole path segment"),
        ("POST /v1/pi_{id}", "placeholder must be a whole path segment"),
        ("POST /v1/{id}{x}.json", "placeholder must be a whole path segment"),
        ("POST /v1/{id}.*", "must be a whole path segment"),
        ("POST /v1/{id}.json}", "placeholder names are letters"),
        ("POST /v1/{Sid}.json/{Sid}.xml", "placeholder {Sid} appears twice"),
        ("POST /v1/{id}/{id}.json", "placeholder {id} appears twice"),
        ("POST /v1/{}", "placeholder names are letters"),
        ("POST /v1/{1d}", "placeholder names are letters"),
        ("POST /v1/{id}/x/{id}", "placeholder {id} appears twice"),
        ("POST /v1/x?y=1", "no query string"),
        ("POST /v1/x#f", "no query string"),
        ("POST /../x", "climbs above the root"),
        ("POST /v1/a%2Fb", "encoded '/'"),
        ("POST /v1/payment_\u0456ntents", "non-ASCII"),
    ],
)
def test_pattern_parse_invalid(spec: str, problem: str) -> None:
    with pytest.raises(PatternError, match=problem) as e:
        EndpointPattern.parse(spec)
    assert repr(spec) in str(e.value)


def test_pattern_match_captures() -> None:
    confirm = EndpointPattern.parse("POST /v1/payment_intents/{id}/confirm")
    segs = ("v1", "payment_intents", "pi_1", "confirm")
    assert confirm.match("POST", segs) == {"id": "pi_1"}
    assert confirm.match("post", segs) == {"id": "pi_1"}
    assert confirm.match("GET", segs) is None
    assert confirm.match("po\u017ft", segs) is None
    assert confirm.match("POST", segs[:3]) is None
    assert confirm.match("POST", ("v1", "payment_intents", "", "confirm")) is None
    assert confirm.match("POST", ("v1", "payment_intents", "..", "confirm")) is None
    assert confirm.match("POST", ("v1", "payment_intents", "a/b", "confirm")) is None
    assert confirm.match("POST", ("v1", "Payment_Intents", "pi_1", "confirm")) is None
    star = EndpointPattern.parse("GET /v1/customers/*/sources/{src}")
    assert star.match("GET", ("v1", "customers", "cus_1", "sources", "s")) == {"src": "s"}
    assert star.match("GET", ("v1", "customers", "", "sources", "s")) is None


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("SM123.json", {"Sid": "SM123"}),
        ("SM.json.json", {"Sid": "SM.json"}),
        ("a b.json", {"Sid": "a b"}),
        (".json", None),  # nothing before the suffix
        ("..json", None),  # "." would be captured
        ("...json", None),  # ".." would be captured
        ("SM123.JSON", None),  # the suffix is case-sensitive like every literal
        ("SM123.json5", None),
        ("SM123", None),
        ("json", None),
        ("{Sid}.json", {"Sid": "{Sid}"}),  # an allowlist pattern matched against the policy
    ],
)
def test_suffixed_placeholder_match(segment: str, expected: dict[str, str] | None) -> None:
    fetch = EndpointPattern.parse("GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json")
    segs = ("2010-04-01", "Accounts", "AC1", "Messages", segment)
    want = None if expected is None else {"AccountSid": "AC1", **expected}
    assert fetch.match("GET", segs) == want


def test_suffixed_placeholder_specificity() -> None:
    bare = EndpointPattern.parse("GET /v1/files/{id}")
    suffixed = EndpointPattern.parse("GET /v1/files/{id}.json")
    literal = EndpointPattern.parse("GET /v1/files/index.json")
    path = normalize_path("/v1/files/index.json")
    assert match_any([bare, suffixed, literal], "GET", path) is literal
    assert match_any([bare, suffixed], "GET", path) is suffixed
    assert match_any([suffixed, bare], "GET", path) is suffixed
    assert match_any([bare, suffixed], "GET", normalize_path("/v1/files/a.xml")) is bare
    target = normalize_path("/2010-04-01/Accounts/AC1/Messages/SM%31.json")
    assert target.path == "/2010-04-01/Accounts/AC1/Messages/SM1.json"
    messages = EndpointPattern.parse("GET /2010-04-01/Accounts/{AccountSid}/Messages.json")
    assert messages.match("GET", target.segments) is None


def test_pattern_matches_pattern_segments() -> None:
    # _keyspec checks that an allowlist pattern is priced by matching it against policy patterns.
    policy = EndpointPattern.parse("POST /v1/payment_intents/{id}/confirm")
    allow = EndpointPattern.parse("POST /v1/payment_intents/{pi}/confirm")
    assert policy.match(allow.method, allow.segments) == {"id": "{pi}"}


def test_match_any_prefers_literal_segments() -> None:
    by_id = EndpointPattern.parse("POST /v1/customers/{id}")
    search = EndpointPattern.parse("POST /v1/customers/search")
    any_ = EndpointPattern.parse("POST /v1/customers/*")
    path = normalize_path("/v1/customers/search")
    assert match_any([by_id, search], "POST", path) is search
    assert match_any([search, by_id], "POST", path) is search
    assert match_any([by_id, any_], "POST", path) is by_id  # tie: first wins
    assert match_any([any_, by_id], "POST", path) is any_
    assert match_any([by_id, search], "POST", normalize_path("/v1/customers/cus_1")) is by_id
    assert match_any([], "POST", path) is None
    with pytest.raises(PathRejected):
        match_any([by_id], "PO ST", path)


def test_patterns_are_hashable_values() -> None:
    a = EndpointPattern.parse("post /v1/x/")
    b = EndpointPattern.parse("POST /v1//x")
    assert a == b
    assert len({a, b}) == 1
    assert a.path == "/v1/x"


def test_docstring_examples() -> None:
    result = doctest.testmod(_paths, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# -- properties ----------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [
        "", ".", "..", "%2e", "%2E%2e", ".%2e", "..;", "v1", "payment_intents", "pi_%41bc",
        "a;b=c", ";x", "%3B", "%3b", "{", "}", " ", "~", "%7e", "%20", "+", "%2B", ":", "@",
        "%25", "%2F", "%5C", "%00", "%0a", "%C0%AE", "\u00e9", "\u0456", "\\", "?q=1", "#f",
        "%", "%4", "%zz", "*", "A", "'()", "[]",
    ]
)  # fmt: skip
_PATHS = st.lists(_PIECES, max_size=12).map(lambda parts: "/" + "/".join(parts))
_TARGETS = st.one_of(
    _PATHS,
    st.text().map(lambda s: "/" + s),
    st.text(alphabet=st.characters(codec="ascii")).map(lambda s: "/" + s),
)


def _normalized_or_none(target: str) -> NormalizedPath | None:
    try:
        return normalize_path(target)
    except PathRejected:
        return None


@given(_TARGETS)
def test_normalize_is_idempotent(target: str) -> None:
    n = _normalized_or_none(target)
    if n is None:
        return
    assert normalize_path(n.path) == NormalizedPath(n.path, n.segments, "")
    assert normalize_path(n.target) == n


@given(_TARGETS)
def test_normalized_path_shape(target: str) -> None:
    n = _normalized_or_none(target)
    if n is None:
        return
    p = n.path
    assert p.startswith("/")
    assert p.isascii()
    assert "//" not in p
    assert "/./" not in p
    assert "/../" not in p
    assert not p.endswith(("/.", "/.."))
    assert p == "/" or not p.endswith("/")
    assert "\\" not in p
    assert ";" not in p
    assert len(p) <= MAX_PATH_BYTES
    assert len(n.segments) <= MAX_SEGMENTS
    assert all(s not in ("", ".", "..") and "/" not in s for s in n.segments)


@given(st.text())
def test_normalize_path_only_raises_path_rejected(target: str) -> None:
    _normalized_or_none(target)
    _normalized_or_none("/" + target)


@given(st.text())
def test_normalize_method_only_raises_path_rejected(method: str) -> None:
    with contextlib.suppress(PathRejected):
        assert normalize_method(method).isascii()


@given(st.text())
def test_pattern_parse_only_raises_pattern_error(spec: str) -> None:
    for text in (spec, f"GET /{spec}", f"{spec} /v1"):
        try:
            pattern = EndpointPattern.parse(text)
        except PatternError:
            continue
        assert EndpointPattern.parse(str(pattern)) == pattern
