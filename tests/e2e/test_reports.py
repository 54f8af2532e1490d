"""End to end: spend reports and audit queries, from the CLI and the admin API.

One proxy per audit sink (SQLite and PostgreSQL) carries a fixed mix of traffic for two
labels; every report must add up to what the fake vendor's ledger says was charged.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import httpx
import pytest
from tests.conftest import KEYBRAKE, KeybrakeProcess, audit_query, postgres_schema
from tests.fakes import FakeStripe, FakeTLS

pytestmark = pytest.mark.e2e

PI = "https://api.stripe.com/v1/payment_intents"
REFUNDS = "https://api.stripe.com/v1/refunds"


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


@dataclass
class Traffic:
    kb: KeybrakeProcess
    kind: str
    audit_url: str  # "" for the embedded SQLite sink
    run: str
    labels: dict[str, str]  # tag -> label
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # tag -> issued key
    refusals: dict[str, list[str]] = field(default_factory=dict)  # label -> codes
    calls: dict[str, int] = field(default_factory=dict)  # key tag -> calls made

    def charged_by_key(self, fake: FakeStripe) -> dict[str, int]:
        """What the vendor charged per key tag (the tag rides in the charge's metadata)."""
        out = {tag: 0 for tag in self.keys}
        for e in fake.ledger:
            tag = parse_qs(e.body.decode()).get("metadata[kbtest]", [""])[0]
            run, _, key_tag = tag.partition(":")
            if run == self.run:
                out[key_tag] += e.charged_usd_micros or 0
        return out

    def charged_by_label(self, fake: FakeStripe) -> dict[str, int]:
        by_key = self.charged_by_key(fake)
        out: dict[str, int] = {}
        for tag, amount in by_key.items():
            label = self.keys[tag]["agent_run_label"]
            out[label] = out.get(label, 0) + amount
        return out


@pytest.fixture(scope="module")
def stripe_fake(fake_tls: FakeTLS) -> Iterator[FakeStripe]:
    with FakeStripe(fake_tls) as fake:
        yield fake


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def traffic(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    stripe_fake: FakeStripe,
) -> Iterator[Traffic]:
    work = tmp_path_factory.mktemp(f"kb-reports-{request.param}")
    with postgres_schema() as pg_url:
        audit_url = pg_url if request.param == "postgresql" else ""
        extra = ["--set", f"keybrake_audit={audit_url}"] if audit_url else []
        kb = KeybrakeProcess(
            work, keybrake_certs, {"stripe": stripe_fake}, fake_tls, extra_args=extra
        )
        kb.start()
        try:
            run = uuid.uuid4().hex[:8]
            t = Traffic(
                kb,
                request.param,
                audit_url,
                run,
                {"nightly": f"dramatiq/{run}-nightly", "beam": f"beam/{run}-backfill"},
            )
            make_traffic(t)
            source: Path | str = audit_url or kb.data_dir / "audit.db"
            total = sum(t.calls.values()) + 1  # + the unknown-key refusal
            deadline = time.monotonic() + 10
            while len(audit_query(source)) < total and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(audit_query(source)) == total
            yield t
        finally:
            kb.stop()


def make_traffic(t: Traffic) -> None:
    kb = t.kb
    nightly, beam = t.labels["nightly"], t.labels["beam"]
    r = kb.admin("PUT", f"/vault/budgets/{quote(nightly, safe='')}", {"daily_usd_cap": 70})
    assert r.status_code == 200, r.text
    allowed = ["POST /v1/payment_intents"]
    t.keys = {
        "a": kb.issue_key(daily_usd_cap="50", agent_run_label=nightly, allowed_endpoints=allowed),
        "b": kb.issue_key(daily_usd_cap="30", agent_run_label=nightly, allowed_endpoints=allowed),
        "c": kb.issue_key(daily_usd_cap="40", agent_run_label=beam, allowed_endpoints=allowed),
    }
    t.refusals = {nightly: [], beam: []}

    def post(tag: str, amount: int, url: str = PI, pm: str = "pm_card_visa", **h: str) -> int:
        key = t.keys[tag]
        data = {
            "amount": amount,
            "currency": "usd",
            "confirm": "true",
            "payment_method": pm,
            "metadata[kbtest]": f"{t.run}:{tag}",
        }
        if url == REFUNDS:
            data = {"payment_intent": "pi_123", "amount": amount}
        resp = httpx.post(
            url,
            data=data,
            headers={"Authorization": f"Bearer {key['vault_key']}", **h},
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
            timeout=30,
        )
        t.calls[tag] = t.calls.get(tag, 0) + 1
        if resp.status_code in (401, 403, 409, 422, 429):
            t.refusals[key["agent_run_label"]].append(resp.json()["error"]["code"])
        return resp.status_code

    ik = f"ik_{uuid.uuid4().hex}"
    assert post("a", 1234, **{"Idempotency-Key": ik}) == 200
    assert post("a", 1234, **{"Idempotency-Key": ik}) == 200  # replayed
    assert post("a", 500) == 200
    assert post("a", 100) == 200
    assert post("a", 100, REFUNDS) == 403
    assert post("b", 750) == 200
    assert post("b", 4000) == 429  # over the key's $30
    assert post("b", 900, pm="pm_card_chargeDeclined") == 402
    assert post("c", 300) == 200
    assert post("c", 400) == 200
    assert post("c", 100, REFUNDS) == 403
    # A call with an unknown key: a refusal with no key and no label.
    r = httpx.post(
        PI,
        data={"amount": 100, "currency": "usd"},
        headers={"Authorization": "Bearer kbv_stripe_" + "Z" * 43},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )
    assert r.status_code == 401


def cli(t: Traffic, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(KEYBRAKE), *args, "--data-dir", str(t.kb.data_dir)]
    if t.audit_url:
        cmd += ["--audit", t.audit_url]
    env = {k: v for k, v in t.kb.env.items() if k != "KEYBRAKE_AUDIT"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, check=False)
    if check:
        assert out.returncode == 0, out.stderr
    return out


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_spend_per_key_matches_the_vendor_ledger(
    traffic: Traffic, stripe_fake: FakeStripe
) -> None:
    nightly = traffic.labels["nightly"]
    out = cli(traffic, "spend", "--label", nightly, "--since", "24h", "--json")
    rows = {r["group"]: r for r in json.loads(out.stdout)}
    a, b = traffic.keys["a"], traffic.keys["b"]
    assert set(rows) == {a["key_id"], b["key_id"]}
    charged = traffic.charged_by_key(stripe_fake)
    assert charged["a"] == 12_340_000 + 5_000_000 + 1_000_000
    assert charged["b"] == 7_500_000
    ra, rb = rows[a["key_id"]], rows[b["key_id"]]
    assert ra["spent_micros"] == charged["a"] and ra["spent_usd"] == "18.34"
    assert rb["spent_micros"] == charged["b"]
    assert (
        sum(r["spent_micros"] for r in rows.values())
        == traffic.charged_by_label(stripe_fake)[nightly]
    )
    assert (ra["calls"], ra["refusals"], ra["replays"], ra["cap_hits"]) == (5, 1, 1, 0)
    assert (rb["calls"], rb["refusals"], rb["replays"], rb["cap_hits"]) == (3, 1, 0, 1)
    assert (ra["label"], ra["vendor"], ra["status"]) == (nightly, "stripe", "active")
    assert (ra["daily_cap_usd"], ra["remaining_usd"]) == ("50.00", "31.66")
    # b's own cap leaves 22.50, but the label's $70 shared with a leaves 70 - 25.84 = 44.16.
    assert (rb["daily_cap_usd"], rb["remaining_usd"]) == ("30.00", "22.50")


def test_cli_spend_by_label_and_table(traffic: Traffic, stripe_fake: FakeStripe) -> None:
    out = cli(traffic, "spend", "--group-by", "label", "--json")
    rows = {r["group"]: r for r in json.loads(out.stdout)}
    for label, charged in traffic.charged_by_label(stripe_fake).items():
        assert rows[label]["spent_micros"] == charged
    assert rows[traffic.labels["nightly"]]["daily_cap_usd"] == "70.00"
    assert rows[traffic.labels["beam"]]["daily_cap_usd"] is None
    # The unknown-key refusal has no label: its own group, nothing spent.
    assert rows[None]["calls"] == 1 and rows[None]["spent_micros"] == 0
    table = cli(traffic, "spend", "--label", traffic.labels["beam"]).stdout
    assert traffic.keys["c"]["key_id"] in table
    assert "total spent: $7.00 in 3 calls" in table


def test_cli_audit_lists_refusals_newest_first(traffic: Traffic) -> None:
    nightly = traffic.labels["nightly"]
    out = cli(
        traffic,
        "audit",
        "--label",
        nightly,
        "--outcome",
        "refused",
        "--since",
        "24h",
        "--limit",
        "50",
        "--json",
    )
    rows = json.loads(out.stdout)
    assert [r["code"] for r in rows] == list(reversed(traffic.refusals[nightly]))
    assert [r["code"] for r in rows] == ["cap_exhausted", "endpoint_not_allowed"]
    assert all(r["outcome"] == "refused" and r["label"] == nightly for r in rows)
    assert rows[0]["id"] > rows[1]["id"]
    one = json.loads(cli(traffic, "audit", "--label", nightly, "--limit", "1", "--json").stdout)
    assert len(one) == 1 and one[0]["id"] == max(
        r["id"]
        for r in audit_query(traffic.audit_url or traffic.kb.data_dir / "audit.db")
        if r["label"] == nightly
    )
    text = cli(traffic, "audit", "--label", nightly, "--outcome", "refused").stdout
    assert "cap_exhausted" in text and "endpoint_not_allowed" in text


@pytest.mark.parametrize(
    "args",
    [
        ["spend", "--since", "yesterday"],
        ["spend", "--group-by", "month"],
        ["audit", "--outcome", "maybe"],
        ["audit", "--limit", "0"],
        ["audit", "--until", "soon"],
    ],
)
def test_cli_bad_parameters_exit_2(tmp_path: Path, args: list[str]) -> None:
    out = subprocess.run(
        [str(KEYBRAKE), *args, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Error" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_time_windows(traffic: Traffic) -> None:
    future = json.loads(cli(traffic, "spend", "--since", "2999-01-01", "--json").stdout)
    assert future == []
    past = json.loads(cli(traffic, "audit", "--until", "2000-01-01", "--json").stdout)
    assert past == []


# -- admin API -----------------------------------------------------------------------------------
def get(t: Traffic, path: str, **params: Any) -> httpx.Response:
    return t.kb.admin("GET", f"{path}?{urlencode(params)}" if params else path)


@pytest.mark.parametrize("group_by", ["label", "key", "vendor", "hour"])
def test_admin_spend_groups_add_up_to_the_ledger(
    traffic: Traffic, stripe_fake: FakeStripe, group_by: str
) -> None:
    nightly = traffic.labels["nightly"]
    r = get(traffic, "/vault/spend", label=nightly, since="24h", group_by=group_by)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert all(row["group_by"] == group_by for row in rows)
    charged = traffic.charged_by_label(stripe_fake)[nightly]
    assert sum(row["spent_micros"] for row in rows) == charged
    assert sum(row["calls"] for row in rows) == traffic.calls["a"] + traffic.calls["b"]
    if group_by == "label":
        (row,) = rows
        assert row["group"] == nightly
        assert (row["daily_cap_usd"], row["refusals"], row["replays"]) == ("70.00", 2, 1)
    elif group_by == "key":
        assert {row["group"] for row in rows} == {
            traffic.keys["a"]["key_id"],
            traffic.keys["b"]["key_id"],
        }
    elif group_by == "vendor":
        assert [row["group"] for row in rows] == ["stripe"]
    else:
        assert all(len(row["group"]) == len("2026-11-25T16") for row in rows)
    # Without a label: everything this proxy saw.
    everything = get(traffic, "/vault/spend", group_by=group_by).json()["data"]
    assert sum(row["spent_micros"] for row in everything) == sum(
        traffic.charged_by_label(stripe_fake).values()
    )


def test_admin_audit_pages_newest_first(traffic: Traffic) -> None:
    nightly = traffic.labels["nightly"]
    seen: list[int] = []
    before: int | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"label": nightly, "limit": 3}
        if before is not None:
            params["before"] = before
        r = get(traffic, "/vault/audit", **params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [row["id"] for row in body["data"]]
        assert all(row["label"] == nightly for row in body["data"])
        pages += 1
        before = body["next_before"]
        if before is None:
            break
        assert before == body["data"][-1]["id"]
        assert pages < 10
    total = traffic.calls["a"] + traffic.calls["b"]
    assert len(seen) == len(set(seen)) == total
    assert seen == sorted(seen, reverse=True)
    refused = get(traffic, "/vault/audit", label=nightly, outcome="refused").json()
    assert [row["code"] for row in refused["data"]] == ["cap_exhausted", "endpoint_not_allowed"]
    assert refused["next_before"] is None
    by_key = get(traffic, "/vault/audit", key=traffic.keys["c"]["key_id"]).json()["data"]
    assert len(by_key) == traffic.calls["c"]
    for row in by_key:
        assert set(row) >= {"ts", "key_id", "outcome", "actual_micros", "vendor_request_id"}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/vault/spend", {"group_by": "month"}),
        ("/vault/spend", {"since": "yesterday"}),
        ("/vault/spend", {"until": "later"}),
        ("/vault/audit", {"limit": "0"}),
        ("/vault/audit", {"limit": "5000"}),
        ("/vault/audit", {"limit": "ten"}),
        ("/vault/audit", {"before": "x"}),
        ("/vault/audit", {"outcome": "maybe"}),
        ("/vault/audit", {"since": "1y"}),
        pytest.param(
            "/vault/spend",
            {"since": "999999d"},
        ),
    ],
)
def test_admin_bad_parameters_are_422(traffic: Traffic, path: str, params: dict[str, str]) -> None:
    r = get(traffic, path, **params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert r.headers["X-Keybrake-Error"] == "invalid_request"


def test_admin_reports_need_the_admin_token(traffic: Traffic) -> None:
    for path in ("/vault/spend", "/vault/audit"):
        r = traffic.kb.admin("GET", path, token="kba_wrong")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "admin_token_invalid"
        r = httpx.get(f"{traffic.kb.admin_url}{path}", timeout=10)
        assert r.status_code == 401
