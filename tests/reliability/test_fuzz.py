"""Property-based fuzzing of the parts that read attacker-controlled input.

Bodies (form and JSON), cost estimation over the shipped policies, the policy loader, and the
real addons in ``taddons.context()`` with random requests. The property is always the same: a
documented error comes out (never a stray ``TypeError``/``KeyError``), and what does come back
is well formed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import re
import urllib.parse
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHook, HttpResponseHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils
from tests.conftest import ROOT

from keybrake.core.errors import Refusal
from keybrake.core.paths import EndpointPattern, match_any, normalize_path
from keybrake.core.policy import (
    AmountFieldCost,
    EndpointPolicy,
    PolicyError,
    VendorPolicy,
    load_policies,
    load_policy_file,
)
from keybrake.pricing import Body, estimate_cost, parse_body
from keybrake.pricing.bodies import (
    AmbiguousField,
    BadField,
    FormError,
    parse_json_body,
    parse_stripe_form,
)
from keybrake.proxy.audit import AuditTrail
from keybrake.proxy.calls import CallState, call_of
from keybrake.proxy.core import Core, Runtime
from keybrake.proxy.guard import VaultGuard
from keybrake.proxy.limiter import FailureLimiter
from keybrake.web.admin import AdminApi

POLICIES = load_policies(ROOT / "policies")
FORM_ERRORS = (FormError, AmbiguousField, BadField)
FAST = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
CURRENCIES = [
    "usd",
    "USD",
    "eur",
    "jpy",
    "kwd",
    "gbp",
    "bhd",
    "xxx",
    "",
    "us d",
    "\uff55\uff53\uff44",
]


# ------------------------------------------------------------------------ body strategies
def _digits() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(min_value=0, max_value=10**6).map(str),
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.text("0123456789", min_size=0, max_size=40),
        st.sampled_from(
            ["1e3", "1.5", " 5", "5 ", "+5", "-0", "\uff10", "٣", "NaN", "0x10", "1_000"]
        ),
    )


_VALUE = st.one_of(
    _digits(),
    st.sampled_from(CURRENCIES),
    st.sampled_from(["true", "false", "pi_123", "ch_123", "price_1", "+14155550100"]),
    st.sampled_from(["+442071838750", "+12425550100", "+99912345", "1415", "", "a@x.io"]),
    st.text(max_size=30),
)

_NAMES = [
    "amount",
    "currency",
    "amount_to_capture",
    "charge",
    "payment_intent",
    "invoice",
    "auto_advance",
    "customer",
    "To",
    "From",
    "Body",
    "MediaUrl",
    "MediaUrl[]",
    "ContentSid",
    "expand[]",
    "metadata[order]",
    "line_items[0][price]",
    "line_items[0][quantity]",
    "line_items[0][price_data][unit_amount]",
    "line_items[0][price_data][unit_amount_decimal]",
    "line_items[0][price_data][currency]",
    "line_items[0][adjustable_quantity][enabled]",
    "line_items[0][adjustable_quantity][maximum]",
    "line_items[1][price_data][unit_amount]",
    "line_items[][price]",
    "line_items",
    "items[0][price]",
    "items[0][plan]",
    "items[0][quantity]",
    "items[0][price_data][unit_amount]",
    "items[0][price_data][currency]",
    "add_invoice_items[0][price_data][unit_amount]",
    "add_invoice_items[0][price_data][currency]",
    "add_invoice_items[0][quantity]",
    "amount[x]",
    "currency[]",
]
_NAME = st.one_of(st.sampled_from(_NAMES), st.text(max_size=12))


@st.composite
def form_bodies(draw: st.DrawFn) -> bytes:
    """A urlencoded body from random pairs (repeats and two shapes included)."""
    pairs = draw(st.lists(st.tuples(_NAME, _VALUE), max_size=12))
    body = urllib.parse.urlencode(pairs).encode()
    if draw(st.booleans()):
        # Raw brackets, as SDKs and hand-written clients send them.
        body = body.replace(b"%5B", b"[").replace(b"%5D", b"]")
    return body


_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["a@x.io", "Ann <b@x.io>", "c@x.io, d@x.io", "", " ", "@@@", "no-at"]),
    st.text(max_size=20),
)
_JSON_ADDRESSES = st.one_of(
    _JSON_LEAF, st.lists(_JSON_LEAF, max_size=5), st.dictionaries(st.text(max_size=3), _JSON_LEAF)
)


@st.composite
def email(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(_JSON_LEAF)
    out: dict[str, Any] = {}
    for name in ("to", "cc", "bcc", "from", "subject"):
        if draw(st.booleans()):
            out[name] = draw(_JSON_ADDRESSES)
    return out


_JSON_ANY = st.recursive(
    _JSON_LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    data: Any
    if kind == 0:
        data = draw(email())
    elif kind == 1:
        data = draw(st.lists(email(), max_size=5))
    elif kind == 2:
        # A batch just over the limit.
        data = [{"to": "a@x.io"}] * draw(st.integers(99, 102))
    elif kind == 3:
        data = {
            "amount": draw(st.one_of(st.integers(-(10**20), 10**20), _digits(), _JSON_LEAF)),
            "currency": draw(st.one_of(st.sampled_from(CURRENCIES), _JSON_LEAF)),
        }
    else:
        data = draw(_JSON_ANY)
    text = json.dumps(data)
    if draw(st.integers(0, 5)) == 0 and text.startswith("{") and len(text) > 2:
        # A duplicated key.
        text = '{"to": "x@y.io", ' + text[1:] if text != "{}" else text
        text = '{"to": "z@y.io", ' + text[1:]
    return text.encode()


ANY_BODY = st.one_of(form_bodies(), json_bodies(), st.binary(max_size=200))


# ------------------------------------------------------------------------ (a) body parsers
@FAST
@given(st.binary(max_size=400))
def test_form_parser_on_arbitrary_bytes(raw: bytes) -> None:
    _exercise_form(raw)


@FAST
@given(form_bodies())
def test_form_parser_on_structured_bodies(raw: bytes) -> None:
    _exercise_form(raw)


def _exercise_form(raw: bytes) -> None:
    try:
        tree = parse_stripe_form(raw)
    except FORM_ERRORS:
        return
    for path in (
        "amount",
        "currency",
        "line_items.0.price_data.unit_amount",
        "line_items",
        "MediaUrl",
        "metadata.order",
        "",
        "a..b",
    ):
        for read in (tree.get, tree.get_int, tree.get_list):
            with contextlib.suppress(*FORM_ERRORS):
                read(path)
    with contextlib.suppress(AmbiguousField):
        tree.items()
    assert isinstance(tree.ambiguous_paths, tuple)


@FAST
@given(
    st.one_of(
        st.binary(max_size=300), json_bodies(), _JSON_ANY.map(lambda v: json.dumps(v).encode())
    )
)
def test_json_parser_only_raises_form_errors(raw: bytes) -> None:
    try:
        data = parse_json_body(raw)
    except FORM_ERRORS:
        return
    # Fractions are Decimal, never float.
    stack = [data]
    while stack:
        node = stack.pop()
        assert not isinstance(node, float)
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def test_json_parser_refuses_deep_nesting_and_constants() -> None:
    for raw in (b"[" * 5000 + b"]" * 5000, b'{"a": NaN}', b"Infinity", b'"\\ud800"'):
        with pytest.raises(FormError):
            parse_json_body(raw)


# ------------------------------------------------------------------------ (b) pricing
ENDPOINTS: list[tuple[VendorPolicy, EndpointPolicy]] = [
    (p, ep) for p in POLICIES.vendors.values() for ep in p.endpoints
]
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_RECALL = st.one_of(st.none(), st.integers(0, 10**15))
_CONTENT_TYPE = st.sampled_from(
    ["", "application/x-www-form-urlencoded", "application/json", "text/plain", "multipart/form"]
)


def _recaller(answers: dict[str, int | None]) -> Any:
    async def recall(object_id: str) -> int | None:
        assert isinstance(object_id, str)
        return answers.get(object_id)

    return recall


@FAST
@given(
    st.sampled_from(ENDPOINTS),
    _CONTENT_TYPE,
    ANY_BODY,
    st.sampled_from(["pi_123", "ch_123", "in_1", "", "x" * 70, "%2F"]),
    st.dictionaries(st.sampled_from(["pi_123", "ch_123", "in_1", "price_1", "x" * 70]), _RECALL),
)
def test_pricing_only_refuses(
    target: tuple[VendorPolicy, EndpointPolicy],
    content_type: str,
    raw: bytes,
    object_id: str,
    answers: dict[str, int | None],
) -> None:
    policy, endpoint = target
    params = {name: object_id for name in _PLACEHOLDER.findall(endpoint.match)}
    _price(policy, endpoint, content_type, raw, params, answers)


def _price(
    policy: VendorPolicy,
    endpoint: EndpointPolicy,
    content_type: str,
    raw: bytes,
    params: dict[str, str],
    answers: dict[str, int | None],
) -> int | None:
    try:
        body = parse_body(endpoint.body_types(policy), [content_type] if content_type else [], raw)
        estimate = asyncio.run(estimate_cost(policy, endpoint, body, params, _recaller(answers)))
    except Refusal as r:
        assert r.code and r.status in (401, 403, 404, 405, 409, 413, 415, 422, 429, 503)
        return None
    assert type(estimate.micros) is int and estimate.micros >= 0, estimate
    return estimate.micros


_AMOUNT_ENDPOINTS = [
    (p, ep)
    for p, ep in ENDPOINTS
    if isinstance(ep.cost, AmountFieldCost) and ep.cost.amount == "amount" and p.vendor == "stripe"
]


@FAST
@given(
    st.sampled_from(_AMOUNT_ENDPOINTS),
    st.integers(0, 10**12),
    st.sampled_from(["usd", "USD", "Usd"]),
    st.lists(
        st.tuples(st.sampled_from(["description", "metadata[k]", "expand[]"]), st.text(max_size=8)),
        max_size=3,
    ),
)
def test_plain_usd_amount_is_priced_exactly(
    target: tuple[VendorPolicy, EndpointPolicy],
    amount: int,
    currency: str,
    extra: list[tuple[str, str]],
) -> None:
    policy, endpoint = target
    raw = urllib.parse.urlencode([("amount", str(amount)), ("currency", currency), *extra]).encode()
    params = {name: "pi_123" for name in _PLACEHOLDER.findall(endpoint.match)}
    micros = _price(policy, endpoint, "application/x-www-form-urlencoded", raw, params, {})
    assert micros == amount * 10_000


@FAST
@given(st.sampled_from(_AMOUNT_ENDPOINTS), st.integers(0, 10**9), st.integers(0, 10**9))
def test_duplicated_amount_is_refused(
    target: tuple[VendorPolicy, EndpointPolicy], a: int, b: int
) -> None:
    policy, endpoint = target
    raw = f"amount={a}&currency=usd&amount={b}".encode()
    with pytest.raises(Refusal) as e:
        asyncio.run(
            estimate_cost(
                policy,
                endpoint,
                parse_body(("form",), ["application/x-www-form-urlencoded"], raw),
                {"id": "pi_1"},
                _recaller({}),
            )
        )
    assert e.value.code == "ambiguous_amount"


@FAST
@given(
    st.sampled_from(["+14155550100", "+442071838750", "+12425550100", "+99912345", "", "x"]),
    st.text(max_size=400),
    st.lists(st.sampled_from(["https://x.io/a.png", ""]), max_size=3),
)
def test_twilio_messages_price(to: str, text: str, media: list[str]) -> None:
    policy = POLICIES.vendors["twilio"]
    endpoint = policy.endpoints[0]
    pairs = [("To", to), ("Body", text), *(("MediaUrl", m) for m in media)]
    raw = urllib.parse.urlencode(pairs).encode()
    form = "application/x-www-form-urlencoded"
    micros = _price(policy, endpoint, form, raw, {"AccountSid": "AC1"}, {})
    if micros is not None and any(media):
        assert micros >= 20_000


@FAST
@given(
    st.one_of(st.just("a@x.io"), st.lists(st.sampled_from(["a@x.io", "b@y.io"]), max_size=5)),
    st.one_of(st.none(), st.just("c@x.io"), st.lists(st.just("d@x.io"), max_size=3)),
    st.one_of(st.none(), st.just("e@x.io"), st.lists(st.just("f@x.io"), max_size=3)),
)
def test_resend_recipients_price(to: Any, cc: Any, bcc: Any) -> None:
    policy = POLICIES.vendors["resend"]
    endpoint = next(ep for ep in policy.endpoints if ep.match == "POST /emails")
    mail = {
        "from": "me@x.io",
        "to": to,
        **({"cc": cc} if cc else {}),
        **({"bcc": bcc} if bcc else {}),
    }
    micros = _price(policy, endpoint, "application/json", json.dumps(mail).encode(), {}, {})

    def count(v: Any) -> int:
        return 0 if v is None else 1 if isinstance(v, str) else len(v)

    assert micros == 900 * (count(to) + count(cc) + count(bcc))


def test_body_reader_handles_decimal_and_negative_json() -> None:
    body = Body("json", {"a": Decimal("1.5"), "b": -3, "c": Decimal("2.0")})
    for path in ("a", "b"):
        with pytest.raises(ValueError):
            body.get_int(path)
    assert body.get_int("c") == 2


# ------------------------------------------------------------------------ (c) policy loader
STRIPE_YAML: dict[str, Any] = yaml.safe_load((ROOT / "policies" / "stripe.yaml").read_text())
_YAML_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=15),
    st.sampled_from(["usd", "fixed_usd", "per_unit", "POST /v1/x", "api.example.com", "1e400"]),
)
_YAML_VALUE = st.recursive(
    _YAML_SCALAR,
    lambda c: st.one_of(
        st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_STRIPE_PATHS = _paths(STRIPE_YAML)[1:]


@st.composite
def mutated_policies(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(STRIPE_YAML)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_STRIPE_PATHS))
        parent: Any = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            last = path[-1]
            op = draw(st.integers(0, 3))
            if op == 0 and isinstance(parent, dict):
                del parent[last]
            elif op == 1 and isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(_YAML_VALUE)
            else:
                parent[last] = draw(_YAML_VALUE)
        except (KeyError, IndexError, TypeError):
            continue
    if draw(st.integers(0, 9)) == 0:
        return draw(_YAML_VALUE)
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_policies(), st.booleans())
def test_policy_loader_only_raises_policy_error(
    tmp_path_factory: pytest.TempPathFactory, doc: Any, raw_text: bool
) -> None:
    path = tmp_path_factory.mktemp("pol") / "stripe.yaml"
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if raw_text:
        # Random YAML-ish damage on top: tabs, anchors, tags, truncation.
        text = text[: len(text) * 2 // 3] + "\n\t*x !!python/object:os.system\n"
    path.write_text(text, encoding="utf-8")
    try:
        policy = load_policy_file(path)
    except PolicyError as e:
        assert str(path) in str(e)
        return
    assert isinstance(policy, VendorPolicy)


# ------------------------------------------------------------------------ (d) the real addons
SECRET = "sk_test_fuzzSecret0123456789abcdef"
ADMIN_TOKEN = "kba_fuzz_test_token"
ALLOWED = [
    "POST /v1/payment_intents",
    "GET /v1/payment_intents/{id}",
    "POST /v1/payment_intents/{id}/confirm",
    "POST /v1/refunds",
    "POST /v1/checkout/sessions",
    "GET /v1/balance",
]
ALLOWED_PATTERNS = [EndpointPattern.parse(p) for p in ALLOWED]


class Addons:
    def __init__(self, tctx: taddons.context, chain: list[Any], runtime: Runtime) -> None:
        self.tctx, self.chain, self.runtime = tctx, chain, runtime
        self.vault_key = ""

    async def invoke(self, event: Any) -> None:
        for addon in self.chain:
            await self.tctx.master.addons.invoke_addon(addon, event)


@pytest.fixture
async def addons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Addons]:
    monkeypatch.setenv("STRIPE_SECRET_KEY", SECRET)
    monkeypatch.setenv("KEYBRAKE_ADMIN_TOKEN", ADMIN_TOKEN)
    for name in ("KEYBRAKE_DATA_DIR", "KEYBRAKE_POLICIES_DIR", "KEYBRAKE_STORE", "KEYBRAKE_AUDIT"):
        monkeypatch.delenv(name, raising=False)
    runtime = Runtime()
    core = Core(runtime)
    chain = [core, AdminApi(runtime), VaultGuard(runtime), AuditTrail(runtime)]
    tctx = taddons.context(*chain)
    with tctx:
        tctx.configure(
            core,
            keybrake_data_dir=str(tmp_path / "data"),
            keybrake_policies=str(ROOT / "policies"),
            keybrake_store=f"sqlite:///{tmp_path / 'data' / 'keybrake.db'}",
            keybrake_shutdown_grace=0.0,
        )
        a = Addons(tctx, chain, runtime)
        issue = _flow(
            "POST",
            "/vault/keys",
            [("Authorization", f"Bearer {ADMIN_TOKEN}"), ("Content-Type", "application/json")],
            json.dumps(
                {
                    "vendor": "stripe",
                    "daily_usd_cap": 1_000_000,
                    "allowed_endpoints": ALLOWED,
                    "expires_in": "2h",
                    "agent_run_label": "fuzz/run",
                }
            ).encode(),
            admin=True,
        )
        await a.invoke(HttpRequestHook(issue))
        assert issue.response is not None and issue.response.status_code == 201, (
            issue.response and issue.response.text
        )
        a.vault_key = json.loads(issue.response.content or b"")["vault_key"]
        yield a
        for addon in chain:
            done = getattr(addon, "done", None)
            if done is not None:
                result = done()
                if asyncio.iscoroutine(result):
                    await result


def _flow(
    method: str, path: str, headers: list[tuple[str, str]], body: bytes, *, admin: bool = False
) -> http.HTTPFlow:
    raw_headers = [(b"Host", b"127.0.0.1:8081" if admin else b"api.stripe.com")]
    raw_headers += [
        (k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
        for k, v in headers
    ]
    req = tutils.treq(
        method=method.encode("utf-8", "surrogateescape"),
        scheme=b"http" if admin else b"https",
        host="127.0.0.1" if admin else "api.stripe.com",
        port=1 if admin else 443,
        path=path.encode("utf-8", "surrogateescape"),
        headers=http.Headers(raw_headers),
        content=body,
    )
    f = tflow.tflow(req=req)
    mode = "reverse:http://127.0.0.1:1@8081" if admin else "regular"
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.client_conn.sni = None if admin else "api.stripe.com"
    return f


_METHOD = st.sampled_from(["GET", "POST", "post", "DELETE", "PUT", "HEAD", "PATCH", "P0ST", "GET "])
_SEGMENT = st.one_of(
    st.sampled_from(
        [
            "v1",
            "payment_intents",
            "pi_123",
            "confirm",
            "refunds",
            "checkout",
            "sessions",
            "balance",
            "charges",
            "..",
            ".",
            "",
            "%2F",
            "%2e%2e",
            "V1",
            "payment_intents;x",
            "kbv_stripe_x",
            "%00",
            "\u0131",
            "pi_1?x=1",
            "#",
        ]
    ),
    st.text(max_size=6),
)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=5).map(lambda segs: "/" + "/".join(segs))
_AUTH_KIND = st.sampled_from(["vault", "vault_basic", "secret", "unknown", "none", "two", "junk"])
_HEADER = st.tuples(
    st.sampled_from(
        [
            "X-Keybrake-Actor",
            "X-Keybrake-Message-Id",
            "Idempotency-Key",
            "Content-Type",
            "Content-Length",
            "Host",
            "Transfer-Encoding",
            "Stripe-Account",
            "X-Other",
        ]
    ),
    st.text(max_size=20).map(lambda s: s.replace("\r", "").replace("\n", "")),
)


def _auth(kind: str, key: str, junk: str) -> list[tuple[str, str]]:
    if kind == "vault":
        return [("Authorization", f"Bearer {key}")]
    if kind == "vault_basic":
        return [("Authorization", "Basic " + base64.b64encode(f"{key}:".encode()).decode())]
    if kind == "secret":
        return [("Authorization", f"Bearer {SECRET}")]
    if kind == "unknown":
        return [("Authorization", "Bearer kbv_stripe_" + "A" * 43)]
    if kind == "two":
        return [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")]
    if kind == "junk":
        return [("Authorization", junk.replace("\r", "").replace("\n", ""))]
    return []


_GOOD_PATH = st.sampled_from(
    [
        "/v1/payment_intents",
        "/v1/payment_intents/pi_1/confirm",
        "/v1/payment_intents/pi_1",
        "/v1/refunds",
        "/v1/balance",
        "/v1//payment_intents",
        "/v1/payment_intents/",
        "/v1/payment_intents?x=1",
        "/v1/./payment_intents",
        "/v1/x/../payment_intents",
        "/v1/payment_intents;p=1",
        "/v1/%70ayment_intents",
        "/v1/checkout/sessions",
        "/v1/payment_intents#frag",
    ]
)
_ALLOWED_CALL = st.tuples(
    st.sampled_from(["POST", "post", "Post"]),
    st.sampled_from(
        [
            "/v1/payment_intents",
            "/v1//payment_intents/",
            "/v1/x/../payment_intents;p=1",
            "/v1/%70ayment_intents?expand[]=x",
            "/v1/payment_intents#frag",
        ]
    ),
) | st.sampled_from(
    [
        ("GET", "/v1/payment_intents/pi_1"),
        ("GET", "/v1/payment_intents/pi%5F1"),
        ("GET", "/v1/balance/"),
        ("POST", "/v1/refunds"),
        ("POST", "/v1/payment_intents/pi_1/confirm"),
    ]
)
_GOOD_BODY = st.one_of(
    st.tuples(st.integers(0, 10**6), st.sampled_from(["usd", "eur", "jpy", "xxx"])).map(
        lambda t: f"amount={t[0]}&currency={t[1]}".encode()
    ),
    form_bodies(),
)
_SAFE_HEADER = st.tuples(
    st.sampled_from(["X-Keybrake-Actor", "X-Keybrake-Message-Id", "Idempotency-Key", "X-Other"]),
    st.text("abcdefghij-_0123456789", max_size=12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    target=st.one_of(_ALLOWED_CALL, st.tuples(_METHOD, st.one_of(_GOOD_PATH, _PATH))),
    auth_kind=st.one_of(st.sampled_from(["vault", "vault_basic"]), _AUTH_KIND),
    junk=st.text(max_size=20),
    headers=st.one_of(st.lists(_SAFE_HEADER, max_size=3), st.lists(_HEADER, max_size=4)),
    body=st.one_of(_GOOD_BODY, ANY_BODY),
    outcome=st.sampled_from(["ok", "error_status", "garbage", "no_response"]),
)
async def test_addons_on_random_vendor_requests(
    addons: Addons,
    target: tuple[str, str],
    auth_kind: str,
    junk: str,
    headers: list[tuple[str, str]],
    body: bytes,
    outcome: str,
) -> None:
    method, path = target
    guard = next(a for a in addons.chain if isinstance(a, VaultGuard))
    guard.admitter.key_failures = FailureLimiter()  # random bad keys must not block later examples
    f = _flow(method, path, [*_auth(auth_kind, addons.vault_key, junk), *headers], body)
    await addons.invoke(HttpRequestHook(f))
    call = call_of(f)
    replayed = f.response is not None and f.response.headers.get("X-Keybrake-Replayed") == "true"
    if f.response is None:
        event("forwarded")
    else:
        event("replayed" if replayed else f.response.headers.get("X-Keybrake-Error", "?"))
    if replayed:
        # An idempotent replay of an earlier forwarded call (same key and Idempotency-Key).
        assert f.response is not None and "X-Keybrake-Error" not in f.response.headers
        assert SECRET not in (f.response.text or "")
    elif f.response is not None:
        assert f.response.headers.get("X-Keybrake-Error"), f.response.text
        code = f.response.headers["X-Keybrake-Error"]
        assert code != "internal_error", (method, path, headers, body, f.response.text)
        assert SECRET not in (f.response.text or "")
        assert SECRET not in str(f.request.headers)
    else:
        assert isinstance(call, CallState) and call.outcome == "forwarded"
        assert auth_kind in ("vault", "vault_basic")
        auth = f.request.headers.get_all("authorization")
        assert auth in (
            [f"Bearer {SECRET}"],
            ["Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()],
        ), auth
        assert addons.vault_key not in str(f.request.headers)
        assert not any(h.lower().startswith("x-keybrake-") for h in f.request.headers)
        assert f.request.host == "api.stripe.com" and f.request.scheme == "https"
        canonical = normalize_path(f.request.path)
        assert canonical.target == f.request.path
        assert match_any(ALLOWED_PATTERNS, f.request.method, canonical) is not None
    # Finish the flow: response or error hooks never raise either.
    if outcome == "no_response" or f.response is not None:
        if f.response is None:
            f.error = mflow.Error("connection reset")
            await addons.invoke(HttpErrorHook(f))
        else:
            await addons.invoke(HttpResponseHook(f))
        return
    status, content = {
        "ok": (
            200,
            json.dumps(
                {"id": "pi_1", "amount": 500, "currency": "usd", "status": "succeeded"}
            ).encode(),
        ),
        "error_status": (402, b'{"error": {"type": "card_error"}}'),
        "garbage": (200, body[:100]),
    }[outcome]
    f.response = http.Response.make(status, content, {"Content-Type": "application/json"})
    await addons.invoke(HttpResponseHook(f))
    assert f.response.headers.get("X-Keybrake-Error") is None
