"""Class 1 of *Keys are tenants*: objects belong to the key that created them.

Before, every vault key of a vendor acted in one vendor account and ``{id}`` in an allowlist
matched *any* object: a key allowed only free calls read another key's unconfirmed
PaymentIntent and raised its amount, so the owner's confirm was charged (and booked) $45 for
what it had created as $5 — or refused at a lower cap. The same gap let any key redact,
cancel or delete other keys' Twilio messages. Now the proxy records the owner of every object
a key creates; a call naming an object by id in its path is allowed for its owner only (or
its label, when the key shares by label, or when the allowlist names the id or uses ``*``),
and everything remembered about an object (amounts, holds) is the owner's alone.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe
from tests.conftest import REDIS_URL, KeybrakeProcess
from tests.fakes import FakeStripe, FakeTwilio
from tests.security.conftest import counted_usd, error_code, key_detail, raw_post, sdk

pytestmark = pytest.mark.e2e

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
OWNER = [
    "POST /v1/payment_intents",
    "POST /v1/payment_intents/{id}/confirm",
    "GET /v1/payment_intents/{id}",
]
FREE = ["GET /v1/payment_intents/{id}", "POST /v1/payment_intents/{id}"]


def test_a_key_cannot_read_or_reprice_another_keys_intent(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = kb.issue_key(daily_usd_cap="10", allowed_endpoints=OWNER)
    intruder = kb.issue_key(daily_usd_cap="10", allowed_endpoints=FREE)
    pi = sdk(kb, owner, monkeypatch).v1.payment_intents.create(
        params={"amount": 500, "currency": "usd"}
    )
    before = len(stripe_fake.ledger)
    for method, body in (("GET", b""), ("POST", b"amount=4500")):
        r = raw_post(kb, intruder, f"/v1/payment_intents/{pi.id}", body, FORM, method=method)
        assert r.status_code == 403, r.text
        assert error_code(r) == "object_not_owned"
    assert len(stripe_fake.ledger) == before  # nothing reached Stripe
    # The owner's confirm is charged and booked at what the owner created.
    done = sdk(kb, owner, monkeypatch).v1.payment_intents.confirm(
        pi.id, params={"payment_method": "pm_card_visa"}
    )
    assert done.amount == 500
    assert stripe_fake.charged_usd_micros() == 5_000_000
    assert key_detail(kb, owner)["budgets"][0]["spent_usd"] == counted_usd(kb, owner) == "5.00"
    assert counted_usd(kb, intruder) == "0.00"


def test_objects_never_seen_made_need_their_id_or_a_shared_segment(
    kb_sqlite: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = kb_sqlite
    # An intent made straight at Stripe, with the real key: the proxy never saw it made.
    unseen = httpx.post(
        f"{stripe_fake.url}/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers={"Authorization": f"Bearer {stripe_fake.secret}"},
        verify=stripe_fake.tls.client_context() if stripe_fake.tls else True,
    ).json()["id"]
    mine = kb.issue_key(allowed_endpoints=["GET /v1/payment_intents/{id}"])
    named = kb.issue_key(allowed_endpoints=[f"GET /v1/payment_intents/{unseen}"])
    shared = kb.issue_key(allowed_endpoints=["GET /v1/payment_intents/*"])
    r = raw_post(kb, mine, f"/v1/payment_intents/{unseen}", b"", method="GET")
    assert error_code(r) == "object_not_owned"
    for key in (named, shared):
        assert sdk(kb, key, monkeypatch).v1.payment_intents.retrieve(unseen).id == unseen


def test_keys_of_one_label_share_objects_only_when_issued_so(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    def key(label: str, share: str) -> dict[str, Any]:
        return kb.issue_key(
            daily_usd_cap="50",
            allowed_endpoints=OWNER,
            agent_run_label=label,
            share_objects=share,
        )

    maker = key("beam/run-1", "label")
    sibling = key("beam/run-1", "label")
    loner = key("beam/run-1", "none")
    stranger = key("beam/run-2", "label")
    pi = sdk(kb, maker, monkeypatch).v1.payment_intents.create(
        params={"amount": 700, "currency": "usd"}
    )
    assert sdk(kb, sibling, monkeypatch).v1.payment_intents.retrieve(pi.id).id == pi.id
    for other in (loner, stranger):
        with pytest.raises(stripe.PermissionError) as e:
            sdk(kb, other, monkeypatch).v1.payment_intents.retrieve(pi.id)
        assert e.value.json_body is not None
        assert e.value.json_body["error"]["code"] == "object_not_owned"


def test_a_refund_of_another_keys_charge_is_refused(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    payer = kb.issue_key(daily_usd_cap="50", allowed_endpoints=["POST /v1/charges"])
    refunder = kb.issue_key(daily_usd_cap="50", allowed_endpoints=["POST /v1/refunds"])
    ch = sdk(kb, payer, monkeypatch).v1.charges.create(
        params={"amount": 1200, "currency": "usd", "source": "tok_visa"}
    )
    before = len(stripe_fake.ledger)
    with pytest.raises(stripe.PermissionError) as e:
        sdk(kb, refunder, monkeypatch).v1.refunds.create(
            params={"charge": ch.id, "amount": 100, "currency": "usd"}
        )
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "object_not_owned"
    assert len(stripe_fake.ledger) == before


def test_a_key_cannot_touch_another_keys_twilio_messages(
    keybrake_factory: Any, fake_twilio: FakeTwilio
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"twilio": fake_twilio})
    base = f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages"
    send = kb.issue_key(vendor="twilio", daily_usd_cap="1", allowed_endpoints=[f"POST {base}.json"])
    meddler = kb.issue_key(
        vendor="twilio",
        daily_usd_cap="1",
        allowed_endpoints=[f"POST {base}/{{Sid}}.json", f"DELETE {base}/{{Sid}}.json"],
    )

    def call(
        key: dict[str, Any], method: str, path: str, data: dict[str, str] | None = None
    ) -> httpx.Response:
        return httpx.request(
            method,
            f"https://api.twilio.com{path}",
            data=data,
            auth=(fake_twilio.account_sid, key["vault_key"]),
            proxy=kb.proxy_url,
            verify=kb.ssl_context(),
        )

    sent = call(
        send, "POST", f"{base}.json", {"To": "+14155550123", "From": "+15017122661", "Body": "hi"}
    )
    assert sent.status_code == 201, sent.text
    sid = sent.json()["sid"]
    before = len(fake_twilio.ledger)
    for method, data in (("POST", {"Body": ""}), ("DELETE", None)):
        r = call(meddler, method, f"{base}/{sid}.json", data)
        assert r.status_code == 403 and error_code(r) == "object_not_owned", r.text
    assert len(fake_twilio.ledger) == before


def test_ownership_is_shared_by_replicas_and_survives_restarts(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = f"{REDIS_URL}?prefix={redis_prefix}"
    one: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    two: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    owner = one.issue_key(allowed_endpoints=OWNER)
    other = one.issue_key(allowed_endpoints=FREE)
    pi = sdk(one, owner, monkeypatch).v1.payment_intents.create(
        params={"amount": 100, "currency": "usd"}
    )
    one.stop()
    one.start()
    for replica in (one, two):
        assert sdk(replica, owner, monkeypatch).v1.payment_intents.retrieve(pi.id).id == pi.id
        r = raw_post(replica, other, f"/v1/payment_intents/{pi.id}", b"", method="GET")
        assert error_code(r) == "object_not_owned"
