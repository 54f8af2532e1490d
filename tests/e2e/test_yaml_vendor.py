"""A vendor Keybrake has never heard of, added with one YAML file and no code change.

The test writes ``acme.yaml`` into a temporary policies directory, serves a tiny HTTPS JSON
API standing in for ``api.acme.test``, and proves that a real ``keybrake run`` intercepts it,
swaps the credential, prices its calls with the declarative rules (fixed price, per unit,
amount field with the actual amount read back) and enforces the key's cap.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests._secrets import REAL_SECRETS
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeTLS
from tests.fakes.base import FakeRequest, FakeResponse, FakeVendor, json_response

from keybrake.core.money import format_usd

pytestmark = pytest.mark.e2e

ACME_YAML = """\
# Acme Render API: known to Keybrake only through this file.
vendor: acme
hosts: [api.acme.test]
auth:
  schemes: [bearer]
  secret_env: ACME_API_KEY
  raw_secret_patterns: ['^acme_live_']
request_id_header: X-Request-Id
idempotency_header: Idempotency-Key
body: json
fx_to_usd: {usd: 1, eur: 1.20}
endpoints:
  - match: POST /v1/renders
    cost: {kind: fixed_usd, usd: 0.25}
    creates: id   # the render belongs to the key that made it: GET /v1/renders/{id} is its own
    params: [scene]   # pricing is a closed world: every parameter the price understands
  - match: GET /v1/renders/{id}
    free: true
  - match: POST /v1/notify
    cost: {kind: per_unit, counter: list_items, fields: [to, cc], unit_usd: 0.01}
    actual: {price_list: true}
    params: ['to', 'to.*', 'cc', 'cc.*']
  - match: POST /v1/credits
    # The request names an amount; Acme answers what it really charged (after discounts).
    cost: {kind: amount_field, amount: amount, currency: currency}
    actual: {amount: charged.amount, currency: charged.currency}
    params: [amount, currency]
"""


class FakeAcme(FakeVendor):
    """A small HTTPS JSON API: renders ($0.25 each), notifications ($0.01 per recipient),
    credit purchases (charged at 75% of the amount asked, in its currency)."""

    name = "acme"
    request_id_header = "X-Request-Id"

    def __init__(self, tls: FakeTLS) -> None:
        super().__init__(tls)
        self.api_key = REAL_SECRETS["ACME_API_KEY"]  # scanned for after the run
        self.renders: dict[str, dict[str, Any]] = {}

    def env(self) -> dict[str, str]:
        return {"ACME_API_KEY": self.api_key}

    def handle(self, req: FakeRequest) -> FakeResponse:
        if req.header("Authorization") != f"Bearer {self.api_key}":
            return json_response(401, {"error": "bad key"})
        if req.method == "GET" and req.path.startswith("/v1/renders/"):
            render = self.renders.get(req.path.rsplit("/", 1)[1])
            return json_response(200 if render else 404, render or {"error": "not found"})
        body = req.json() if req.body else {}
        if req.path == "/v1/renders":
            rid = "rnd_" + secrets.token_hex(6)
            self.renders[rid] = {"id": rid, "status": "done", "scene": body.get("scene")}
            return json_response(200, self.renders[rid], object_id=rid, charged_usd_micros=250_000)
        if req.path == "/v1/notify":
            n = sum(
                len(v) if isinstance(v, list) else 1 for v in (body.get("to"), body.get("cc")) if v
            )
            return json_response(200, {"sent": n}, charged_usd_micros=n * 10_000)
        if req.path == "/v1/credits":
            charged = int(body["amount"]) * 3 // 4
            rate = {"usd": 10_000, "eur": 12_000}[body["currency"]]
            return json_response(
                200,
                {"id": "cr_1", "charged": {"amount": charged, "currency": body["currency"]}},
                charged_usd_micros=charged * rate,
            )
        return json_response(404, {"error": "no route"})


@pytest.fixture
def acme(fake_tls: FakeTLS) -> Iterator[FakeAcme]:
    with FakeAcme(fake_tls) as fake:
        yield fake


@pytest.fixture
def kb(keybrake_factory: Any, acme: FakeAcme, tmp_path: Path) -> KeybrakeProcess:
    src = tmp_path / "only-acme"
    src.mkdir()
    (src / "acme.yaml").write_text(ACME_YAML)
    proc: KeybrakeProcess = keybrake_factory({"acme": acme}, policies_src=src)
    return proc


def test_a_yaml_only_vendor_is_priced_and_capped(kb: KeybrakeProcess, acme: FakeAcme) -> None:
    key = kb.issue_key(
        vendor="acme",
        daily_usd_cap="1",
        allowed_endpoints=[
            "POST /v1/renders",
            "GET /v1/renders/{id}",
            "POST /v1/notify",
            "POST /v1/credits",
        ],
        agent_run_label="render/run-7",
    )
    assert key["vault_key"].startswith("kbv_acme_")
    auth = {"Authorization": f"Bearer {key['vault_key']}"}

    def spent() -> str:
        return str(kb.admin("GET", f"/vault/keys/{key['key_id']}").json()["spent_today_usd"])

    with httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context(), headers=auth) as c:
        base = "https://api.acme.test/v1"
        first = c.post(f"{base}/renders", json={"scene": "a"})
        assert first.status_code == 200, first.text
        assert first.headers["X-Keybrake-Spent-Usd"] == "0.25"
        c.post(f"{base}/renders", json={"scene": "b"}).raise_for_status()
        got = c.get(f"{base}/renders/{first.json()['id']}")  # free
        assert got.json()["scene"] == "a"
        sent = c.post(f"{base}/notify", json={"to": ["a@x.io", "b@x.io"], "cc": "c@x.io"})
        assert sent.json() == {"sent": 3}
        assert spent() == "0.53"
        # Estimated at 36 euro cents x 1.20 = $0.432 (it fits the $0.47 left), settled at what
        # Acme says it charged: 27 euro cents = $0.324.
        credits = c.post(f"{base}/credits", json={"amount": 36, "currency": "eur"})
        assert credits.status_code == 200, credits.text
        assert spent() == format_usd(acme.charged_usd_micros()) == "0.854"

        # $0.146 left: a $0.25 render is refused, and Acme never hears of it.
        before = len(acme.ledger)
        over = c.post(f"{base}/renders", json={"scene": "c"})
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "cap_exhausted"
        assert over.headers["X-Keybrake-Cap-Hit"] == "true"
        # Anything the YAML does not price, or this key does not allow, is refused too.
        assert c.post(f"{base}/credits", json={"amount": 5, "currency": "gbp"}).status_code == 403
        assert c.delete(f"{base}/renders/x").json()["error"]["code"] == "endpoint_not_allowed"
        assert len(acme.ledger) == before

    assert spent() == format_usd(acme.charged_usd_micros()) == "0.854"
    for entry in acme.ledger:
        assert entry.header("Authorization") == f"Bearer {acme.api_key}"
        assert key["vault_key"] not in json.dumps(entry.headers)
    # The policy directory held only acme.yaml: no other vendor is known to this proxy.
    assert sorted(p.name for p in kb.policies.glob("*.yaml")) == ["acme.yaml"]
