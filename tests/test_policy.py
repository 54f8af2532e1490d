"""Tests for keybrake.core.policy: vendor YAML validation and ``keybrake check-policy``.

Every bad file must fail with the file name and the dotted path of the bad field.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import KEYBRAKE, ROOT
from typer.testing import CliRunner

from keybrake.cli import app
from keybrake.core.policy import (
    AmountFieldCost,
    FixedCost,
    PerUnitCost,
    PolicyError,
    PolicySet,
    VendorPolicy,
    load_policies,
    load_policy_file,
)

POLICIES = ROOT / "policies"
STRIPE: dict[str, Any] = yaml.safe_load((POLICIES / "stripe.yaml").read_text())


def write(directory: Path, name: str, data: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def stripe_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(STRIPE)
    change(data)
    return data


def minimal(vendor: str, host: str, **extra: Any) -> dict[str, Any]:
    return {
        "vendor": vendor,
        "hosts": [host],
        "auth": {"schemes": ["bearer"], "secret_env": f"{vendor.upper()}_KEY"},
        "endpoints": [
            {"match": "POST /v1/things", "cost": {"kind": "fixed_usd", "usd": "0.01"}, "params": []}
        ],
        **extra,
    }


# -- the shipped policies ----------------------------------------------------------------------
def test_shipped_policies_load() -> None:
    ps = load_policies(POLICIES)
    assert isinstance(ps, PolicySet)
    assert "stripe" in ps.vendors
    stripe = ps.vendors["stripe"]
    assert stripe.hosts == ("api.stripe.com",)
    assert stripe.auth.secret_env == "STRIPE_SECRET_KEY"
    assert stripe.request_id_header == "Request-Id"
    assert stripe.idempotency_header == "Idempotency-Key"
    assert stripe.upstream is None
    assert ps.files["stripe"] == POLICIES / "stripe.yaml"
    matches = {ep.match for ep in stripe.endpoints}
    assert {
        "POST /v1/payment_intents",
        "GET /v1/payment_intents/{id}",
        "POST /v1/payment_intents/{id}/confirm",
        "POST /v1/payment_intents/{id}/capture",
    } <= matches
    assert stripe.fx_to_usd["usd"] == Decimal(1)
    assert stripe.fx_to_usd["eur"] == Decimal("1.2")  # parsed from YAML floats exactly


SECRET_LIKE = re.compile(r"\b(?:[sr]k_(?:live|test)_[A-Za-z0-9]{8,}|re_[A-Za-z0-9]{12,})")


def test_no_secret_in_shipped_policies() -> None:
    for f in POLICIES.glob("*.y*ml"):
        for line in f.read_text().splitlines():
            # Only raw-secret detection patterns name secrets, never a value.
            assert "raw_secret_patterns" in line or not SECRET_LIKE.search(line), line


def test_host_lookup_and_allow_hosts() -> None:
    ps = load_policies(POLICIES)
    assert ps.for_host("api.stripe.com") is ps.vendors["stripe"]
    assert ps.for_host("API.Stripe.com.") is ps.vendors["stripe"]
    assert ps.for_host("stripe.com") is None
    assert ps.for_host("api.stripe.com.evil.example") is None
    regexes = ps.allow_hosts_regexes()
    assert r"^api\.stripe\.com(:\d+)?$" in regexes


def test_cost_rules_parse_money_exactly(tmp_path: Path) -> None:
    data = minimal(
        "acme",
        "api.acme.example",
        endpoints=[
            {"match": "POST /v1/a", "cost": {"kind": "fixed_usd", "usd": 0.0083}, "params": []},
            {"match": "POST /v1/b", "cost": {"kind": "fixed_usd", "usd": "12.50"}, "params": []},
            {
                "match": "POST /v1/c",
                "params": [],
                "cost": {
                    "kind": "per_unit",
                    "counter": "sms_segments",
                    "unit_usd": 0.0079,
                    "by_prefix": {1: 0.0083, "44": "0.04"},
                },
            },
            {
                "match": "POST /v1/d",
                "cost": {"kind": "amount_field", "amount": "amount"},
                "params": [],
            },
            {"match": "GET /v1/d/{id}", "free": True},
        ],
    )
    p = load_policy_file(write(tmp_path, "acme.yaml", data))
    a, b, c, d, e = (ep.cost for ep in p.endpoints)
    assert isinstance(a, FixedCost) and a.usd == 8_300
    assert isinstance(b, FixedCost) and b.usd == 12_500_000
    assert isinstance(c, PerUnitCost) and c.unit_usd == 7_900
    assert c.by_prefix == {"1": 8_300, "44": 40_000}
    assert isinstance(d, AmountFieldCost) and d.currency == "currency"
    assert e is None and p.endpoints[4].free


def test_fx_table_is_lowercased_and_gets_usd(tmp_path: Path) -> None:
    p = load_policy_file(
        write(tmp_path, "acme.yaml", minimal("acme", "api.acme.example", fx_to_usd={"EUR": 1.2}))
    )
    assert p.fx_to_usd == {"usd": Decimal(1), "eur": Decimal("1.2")}


def test_relative_ca_file_is_relative_to_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here")
    p = load_policy_file(
        write(
            tmp_path,
            "acme.yaml",
            minimal(
                "acme",
                "api.acme.example",
                upstream={"url": "https://127.0.0.1:9443/", "ca_file": "ca.pem"},
            ),
        )
    )
    assert p.upstream is not None
    assert p.upstream.url == "https://127.0.0.1:9443"
    assert p.upstream.ca_file == tmp_path / "ca.pem"


# -- bad files: file name + dotted field path --------------------------------------------------
BAD_STRIPE: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    (
        "zero request rate",
        lambda d: d.update(max_requests_per_minute=0),
        "max_requests_per_minute",
        "greater than or equal to 1",
    ),
    (
        "request rate as text",
        lambda d: d.update(max_requests_per_minute="600"),
        "max_requests_per_minute",
        "valid integer",
    ),
    (
        "fractional request rate",
        lambda d: d.update(max_requests_per_minute=1.5),
        "max_requests_per_minute",
        "valid integer",
    ),
    (
        "huge request rate",
        lambda d: d.update(max_requests_per_minute=10**9),
        "max_requests_per_minute",
        "less than or equal to 1000000",
    ),
    ("unknown top-level field", lambda d: d.update(colour="blue"), "colour", "unknown field"),
    ("unknown auth field", lambda d: d["auth"].update(token="x"), "auth.token", "unknown field"),
    (
        "unknown endpoint field",
        lambda d: d["endpoints"][1].update(price=1),
        "endpoints.1.price",
        "unknown field",
    ),
    (
        "unknown cost field",
        lambda d: d["endpoints"][0]["cost"].update(amout="x"),
        "endpoints.0.cost.amout",
        "unknown field; did you mean 'amount'?",
    ),
    (
        "wrong cost kind",
        lambda d: d["endpoints"][0]["cost"].update(kind="percent"),
        "endpoints.0.cost",
        "'amount_field', 'fixed_usd', 'per_unit', 'function'",
    ),
    (
        "cost kind missing",
        lambda d: d["endpoints"][0]["cost"].pop("kind"),
        "endpoints.0.cost",
        "kind",
    ),
    (
        "bad fixed price",
        lambda d: d["endpoints"][1].update(free=False, cost={"kind": "fixed_usd", "usd": "$1"}),
        "endpoints.1.cost.usd",
        "plain dollar amount",
    ),
    (
        "negative fixed price",
        lambda d: d["endpoints"][1].update(free=False, cost={"kind": "fixed_usd", "usd": -1}),
        "endpoints.1.cost.usd",
        "negative",
    ),
    ("upper-case host", lambda d: d.update(hosts=["API.stripe.com"]), "hosts.0", "host name"),
    ("host with port", lambda d: d.update(hosts=["api.stripe.com:443"]), "hosts.0", "host name"),
    (
        "host with scheme",
        lambda d: d.update(hosts=["api.stripe.com", "https://api.stripe.com"]),
        "hosts.1",
        "host name",
    ),
    ("bare host", lambda d: d.update(hosts=["localhost"]), "hosts.0", "host name"),
    ("wildcard host", lambda d: d.update(hosts=["*.stripe.com"]), "hosts.0", "host name"),
    ("no hosts", lambda d: d.update(hosts=[]), "hosts", "at least one host"),
    (
        "host with newline",
        lambda d: d.update(hosts=["api.stripe.com\n"]),
        "hosts.0",
        "host name",
    ),
    (
        "bad env var name",
        lambda d: d["auth"].update(secret_env="stripe-secret"),
        "auth.secret_env",
        "environment variable name",
    ),
    (
        "env var with newline",
        lambda d: d["auth"].update(secret_env="STRIPE_SECRET_KEY\n"),
        "auth.secret_env",
        "environment variable name",
    ),
    (
        "env var starting with digit",
        lambda d: d["auth"].update(secret_env="1STRIPE"),
        "auth.secret_env",
        "environment variable name",
    ),
    (
        "bad username env",
        lambda d: d["auth"].update(username_env="a b"),
        "auth.username_env",
        "environment variable name",
    ),
    (
        "bad regex",
        lambda d: d["auth"].update(raw_secret_patterns=["^sk_", "(sk_"]),
        "auth.raw_secret_patterns.1",
        "invalid regex",
    ),
    (
        "unknown auth scheme",
        lambda d: d["auth"].update(schemes=["bearer", "digest"]),
        "auth.schemes.1",
        "bearer",
    ),
    ("no auth schemes", lambda d: d["auth"].update(schemes=[]), "auth.schemes", "at least 1"),
    (
        "account env without path",
        lambda d: d["auth"].update(account_env="STRIPE_ACCOUNT"),
        "auth",
        "go together",
    ),
    (
        "unknown currency",
        lambda d: d["fx_to_usd"].update(xyz=1.0),
        "fx_to_usd.xyz",
        "unknown currency 'xyz'",
    ),
    (
        "non-numeric fx rate",
        lambda d: d["fx_to_usd"].update(eur="lots"),
        "fx_to_usd.eur",
        "USD per unit",
    ),
    ("null fx rate", lambda d: d["fx_to_usd"].update(eur=None), "fx_to_usd.eur", "USD per unit"),
    ("zero fx rate", lambda d: d["fx_to_usd"].update(gbp=0), "fx_to_usd.gbp", "USD per unit"),
    ("negative fx rate", lambda d: d["fx_to_usd"].update(gbp=-1.4), "fx_to_usd.gbp", "USD per"),
    (
        "infinite fx rate",
        lambda d: d["fx_to_usd"].update(gbp=float("inf")),
        "fx_to_usd.gbp",
        "USD per unit",
    ),
    ("huge fx rate", lambda d: d["fx_to_usd"].update(gbp="1e999"), "fx_to_usd.gbp", "USD per"),
    ("boolean fx rate", lambda d: d["fx_to_usd"].update(gbp=True), "fx_to_usd.gbp", "USD per"),
    ("fx table not a map", lambda d: d.update(fx_to_usd=[1, 2]), "fx_to_usd", "dictionary"),
    ("bad vendor name", lambda d: d.update(vendor="Stripe Inc"), "vendor", "lowercase"),
    ("vendor missing", lambda d: d.pop("vendor"), "vendor", "Field required"),
    ("auth missing", lambda d: d.pop("auth"), "auth", "Field required"),
    ("no endpoints", lambda d: d.update(endpoints=[]), "endpoints", "at least 1"),
    (
        "bad endpoint pattern",
        lambda d: d["endpoints"][0].update(match="POST /v1/payment_*"),
        "endpoints.0.match",
        "whole path segment",
    ),
    (
        "endpoint without method",
        lambda d: d["endpoints"][2].update(match="/v1/payment_intents"),
        "endpoints.2.match",
        "<METHOD> <path>",
    ),
    (
        "free and priced",
        lambda d: d["endpoints"][0].update(free=True),
        "endpoints.0",
        "either free or has a cost rule",
    ),
    (
        "duplicate endpoint",
        lambda d: d["endpoints"].append({"match": "post /v1//payment_intents/", "free": True}),
        f"endpoints.{len(STRIPE['endpoints'])}.match",
        "repeats endpoints.0",
    ),
    (
        "default currency without rate",
        lambda d: d["endpoints"][0]["cost"].update(default_currency="nzd"),
        "endpoints.0.cost.default_currency",
        "no rate in fx_to_usd",
    ),
    (
        "upstream with path",
        lambda d: d.update(upstream={"url": "https://127.0.0.1:9443/v1"}),
        "upstream.url",
        "https://host:port",
    ),
    (
        "upstream with bad port",
        lambda d: d.update(upstream={"url": "https://127.0.0.1:99999"}),
        "upstream.url",
        "https://host:port",
    ),
    (
        "upstream with non-numeric port",
        lambda d: d.update(upstream={"url": "https://127.0.0.1:https"}),
        "upstream.url",
        "https://host:port",
    ),
    (
        "upstream with credentials",
        lambda d: d.update(upstream={"url": "https://user:pw@127.0.0.1:9443"}),
        "upstream.url",
        "https://host:port",
    ),
    (
        "upstream not http",
        lambda d: d.update(upstream={"url": "ftp://127.0.0.1"}),
        "upstream.url",
        "https://host:port",
    ),
    (
        "upstream CA file missing",
        lambda d: d.update(upstream={"url": "https://127.0.0.1:9443", "ca_file": "nope.pem"}),
        "upstream.ca_file",
        "not a readable file",
    ),
    (
        "bad body kind",
        lambda d: d.update(body="xml"),
        "body",
        "'xml' is not a body type; use form or json",
    ),
    (
        "bad per-unit prefix",
        lambda d: d["endpoints"][1].update(
            free=False,
            cost={"kind": "per_unit", "counter": "x", "by_prefix": {"+44": 0.04}},
        ),
        "endpoints.1.cost.by_prefix",
        "must be digits",
    ),
]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [pytest.param(c, f, m, id=name) for name, c, f, m in BAD_STRIPE],
)
def test_bad_field_names_file_and_path(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], field: str, message: str
) -> None:
    path = write(tmp_path / "policies", "stripe.yaml", stripe_with(change))
    with pytest.raises(PolicyError) as e:
        load_policy_file(path)
    text = str(e.value)
    # file:line: field: message (the line where the file has the field, when it has it)
    assert re.match(rf"{re.escape(str(path))}(:\d+)?: {re.escape(field)}: ", text), text
    assert message in text, text
    # The directory loader reports exactly the same.
    with pytest.raises(PolicyError) as e2:
        load_policies(path.parent)
    assert str(e2.value) == text


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["hosts"] = ["API"]
        d["auth"]["secret_env"] = "x-y"
        d["colour"] = 1

    path = write(tmp_path, "stripe.yaml", stripe_with(change))
    with pytest.raises(PolicyError) as e:
        load_policy_file(path)
    lines = str(e.value).splitlines()
    assert {line.split(": ")[1] for line in lines} == {"hosts.0", "auth.secret_env", "colour"}
    assert all(re.match(rf"{re.escape(str(path))}:\d+: ", line) for line in lines), lines


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vendor: stripe\nhosts: [api.stripe.com\n", "not valid YAML"),
        ("vendor: [unclosed\n", "not valid YAML"),
        ("\tvendor: stripe\n", "not valid YAML"),
        ("vendor: stripe\nvendor: evil\n", "duplicate key 'vendor'"),
        ("", "(top level): must be a mapping"),
        ("- a\n- b\n", "(top level): must be a mapping"),
        ("just a string\n", "(top level): must be a mapping"),
        ("!!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_invalid_yaml_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "stripe.yaml", text)
    with pytest.raises(PolicyError) as e:
        load_policy_file(path)
    assert str(e.value).startswith(f"{path}:")
    assert message in str(e.value)


def test_duplicate_key_in_nested_mapping_is_refused(tmp_path: Path) -> None:
    text = (
        (POLICIES / "stripe.yaml")
        .read_text()
        .replace(
            "  secret_env: STRIPE_SECRET_KEY\n",
            "  secret_env: STRIPE_SECRET_KEY\n  secret_env: OTHER_KEY\n",
        )
    )
    assert "OTHER_KEY" in text
    path = write(tmp_path, "stripe.yaml", text)
    with pytest.raises(PolicyError, match="duplicate key 'secret_env'") as e:
        load_policy_file(path)
    assert str(path) in str(e.value)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stripe.yaml"
    path.write_bytes(b"vendor: str\xffipe\n")
    with pytest.raises(PolicyError) as e:
        load_policy_file(path)
    assert str(e.value) == f"{path}: not valid UTF-8 text"


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "stripe.yaml").mkdir()
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert f"{tmp_path / 'stripe.yaml'}: cannot read" in str(e.value)


def test_duplicate_vendor_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", minimal("acme", "api.acme.example"))
    write(tmp_path, "b.yml", minimal("acme", "api2.acme.example"))
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'b.yml'}: vendor: 'acme' already defined in {tmp_path / 'a.yaml'}"
    )


def test_duplicate_host_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", minimal("acme", "api.shared.example"))
    write(tmp_path, "b.yaml", minimal("other", "api.shared.example"))
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'b.yaml'}: hosts: 'api.shared.example' already claimed by "
        f"{tmp_path / 'a.yaml'}"
    )


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a policy")
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == f"{tmp_path}: no *.yaml vendor policies found"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist") as e:
        load_policies(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_first_bad_file_stops_loading(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", minimal("acme", "api.acme.example"))
    bad = write(tmp_path, "b.yaml", minimal("Bad", "api.bad.example"))
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert re.match(rf"{re.escape(str(bad))}:\d+: vendor: ", str(e.value)), str(e.value)


def test_models_are_frozen() -> None:
    p = load_policy_file(POLICIES / "stripe.yaml")
    with pytest.raises(ValueError, match="frozen"):
        p.vendor = "evil"  # type: ignore[misc]
    assert isinstance(p, VendorPolicy)


# -- keybrake check-policy ---------------------------------------------------------------------
runner = CliRunner()


def test_check_policy_ok() -> None:
    result = runner.invoke(app, ["check-policy", str(POLICIES)])
    assert result.exit_code == 0, result.output
    assert f"ok  {POLICIES / 'stripe.yaml'}: stripe (" in result.stdout
    assert "hosts api.stripe.com" in result.stdout


def test_check_policy_bad_file_exit_1(tmp_path: Path) -> None:
    path = write(tmp_path, "stripe.yaml", stripe_with(lambda d: d["auth"].update(secret_env="x")))
    result = runner.invoke(app, ["check-policy", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert re.match(rf"Error: {re.escape(str(path))}:\d+: auth.secret_env: ", result.stderr)


def test_check_policy_empty_and_missing_dir(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-policy", str(tmp_path)])
    assert result.exit_code == 1
    assert "no *.yaml vendor policies found" in result.stderr
    result = runner.invoke(app, ["check-policy", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


def test_check_policy_default_dir_is_policies(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(KEYBRAKE), "check-policy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "KEYBRAKE_POLICIES_DIR": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "ok  policies/stripe.yaml: stripe" in result.stdout


def test_check_policy_subprocess_reports_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "stripe.yaml", stripe_with(lambda d: d["fx_to_usd"].update(xyz=1)))
    result = subprocess.run(
        [str(KEYBRAKE), "check-policy", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.search(rf"{re.escape(str(path))}:\d+: fx_to_usd.xyz: ", result.stderr)
    assert "unknown currency 'xyz'" in result.stderr
    assert "Traceback" not in result.stderr


OPENAI: dict[str, Any] = yaml.safe_load((POLICIES / "openai.yaml").read_text())
ANTHROPIC: dict[str, Any] = yaml.safe_load((POLICIES / "anthropic.yaml").read_text())


@pytest.mark.parametrize(
    ("name", "data", "change", "field", "message"),
    [
        (
            "openai.yaml",
            OPENAI,
            lambda d: d["models"]["gpt-4o"].update(input="cheap"),
            "models.gpt-4o.input",
            "plain dollar amount",
        ),
        (
            "openai.yaml",
            OPENAI,
            lambda d: d["models"]["gpt-4o"].update(cached_input=-1),
            "models.gpt-4o.cached_input",
            "must not be negative",
        ),
        (
            "openai.yaml",
            OPENAI,
            lambda d: d["models"]["gpt-4o"].update(outptu=1),
            "models.gpt-4o.outptu",
            "did you mean 'output'",
        ),
        (
            "anthropic.yaml",
            ANTHROPIC,
            lambda d: d["models"]["claude-haiku-4-5"].pop("input"),
            "models.claude-haiku-4-5.input",
            "Field required",
        ),
        (
            "anthropic.yaml",
            ANTHROPIC,
            lambda d: d["models"].update({"bad model!": {"input": 1}}),
            "models",
            "is not a model name",
        ),
        (
            "anthropic.yaml",
            ANTHROPIC,
            lambda d: d["auth"].update(key_header="Authorization"),
            "auth",
            "other than Authorization",
        ),
        (
            "openai.yaml",
            OPENAI,
            lambda d: d["endpoints"][0]["actual"].update(price="price"),
            "endpoints.0.actual",
            "read one of amount, price or usage",
        ),
    ],
)
def test_bad_ai_price_tables_name_file_and_path(
    tmp_path: Path,
    name: str,
    data: dict[str, Any],
    change: Callable[[dict[str, Any]], None],
    field: str,
    message: str,
) -> None:
    changed = copy.deepcopy(data)
    change(changed)
    path = write(tmp_path / "policies", name, changed)
    with pytest.raises(PolicyError) as e:
        load_policy_file(path)
    text = str(e.value)
    assert re.match(rf"{re.escape(str(path))}(:\d+)?: {re.escape(field)}: ", text), text
    assert message in text, text


def test_shipped_ai_prices_are_exact_micro_dollars_per_million_tokens() -> None:
    policies = load_policies(POLICIES)
    gpt = policies.vendors["openai"].models["gpt-4o-mini"]
    assert (gpt.input, gpt.cached_input_price, gpt.output) == (150_000, 75_000, 600_000)
    haiku = policies.vendors["anthropic"].models["claude-haiku-4-5"]
    assert haiku.dearest_input == haiku.cache_write_1h_price == 2_000_000
    embed = policies.vendors["openai"].models["text-embedding-3-small"]
    assert (embed.input, embed.output, embed.dearest_input) == (20_000, 0, 20_000)


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.yaml")))
def test_libyaml_reads_each_shipped_policy_as_pyyaml_does(name: str) -> None:
    """Policies are read with libyaml's parser (`_FastStrictLoader`); a file it refuses is read
    again by the pure-Python one for the message. Both give the same document."""
    from keybrake.core import policy

    text = (POLICIES / name).read_text()
    assert policy._FastStrictLoader.__mro__[1] is yaml.CSafeLoader
    fast = yaml.load(text, Loader=policy._FastStrictLoader)
    assert fast == yaml.load(text, Loader=policy._StrictLoader)
    assert fast == yaml.safe_load(text)
