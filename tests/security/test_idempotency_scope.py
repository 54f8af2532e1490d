"""Class 5 of *The cap is a bound*: a vendor's idempotency keys must not leak between keys.

Stripe scopes ``Idempotency-Key`` to the whole account, which every vault key of the vendor
shares. Before: key B sent key A's body with A's idempotency key and got A's PaymentIntent
(its ``client_secret`` included), and B poisoned a key A was about to use (Stripe's ``400
idempotency_error`` for A). The forwarded key is now namespaced per vault key,
deterministically, so a worker's own retries still deduplicate at the vendor.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import stripe
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.security.conftest import audit_rows, sdk

from keybrake.proxy._idempotency import vendor_idempotency_key

pytestmark = pytest.mark.e2e


def charge(cents: int) -> dict[str, Any]:
    return {"amount": cents, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"}


def issue(kb: KeybrakeProcess) -> dict[str, Any]:
    return kb.issue_key(daily_usd_cap="100", allowed_endpoints=["POST /v1/payment_intents"])


def test_another_key_cannot_read_a_keys_answer_with_its_idempotency_key(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = issue(kb), issue(kb)
    ik = f"order-{uuid.uuid4().hex}"
    mine = sdk(kb, a, monkeypatch).v1.payment_intents.create(
        params=charge(1500), options={"idempotency_key": ik}
    )
    theirs = sdk(kb, b, monkeypatch).v1.payment_intents.create(
        params=charge(1500), options={"idempotency_key": ik}
    )
    # B made a charge of its own: it never sees A's PaymentIntent or its client_secret.
    assert theirs.id != mine.id
    assert theirs.client_secret != mine.client_secret
    keys = [e.idempotency_key for e in stripe_fake.ledger]
    assert keys == [
        vendor_idempotency_key(a["key_id"], ik),
        vendor_idempotency_key(b["key_id"], ik),
    ]
    assert ik not in keys
    assert not [e for e in stripe_fake.ledger if e.replayed]


def test_another_key_cannot_poison_an_idempotency_key(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = issue(kb), issue(kb)
    ik = f"order-{uuid.uuid4().hex}"
    # B goes first with A's next idempotency key and another body.
    sdk(kb, b, monkeypatch).v1.payment_intents.create(
        params=charge(100), options={"idempotency_key": ik}
    )
    mine = sdk(kb, a, monkeypatch).v1.payment_intents.create(
        params=charge(2500), options={"idempotency_key": ik}
    )
    assert mine.status == "succeeded" and mine.amount == 2500
    assert [e.status for e in stripe_fake.ledger] == [200, 200]


def test_a_workers_retry_still_deduplicates_at_the_vendor(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer of the first attempt is lost on the way back: the retry reaches Stripe
    (Keybrake has nothing to replay) with the same namespaced key, and Stripe replays."""
    a = issue(kb)
    ik = f"order-{uuid.uuid4().hex}"
    client = sdk(kb, a, monkeypatch)
    stripe_fake.reset_connection_next(1, processed=True)
    with pytest.raises(stripe.StripeError):  # the proxy answers 502: the answer was lost
        client.v1.payment_intents.create(params=charge(700), options={"idempotency_key": ik})
    again = client.v1.payment_intents.create(params=charge(700), options={"idempotency_key": ik})
    assert again.amount == 700
    forwarded = {e.idempotency_key for e in stripe_fake.ledger}
    assert forwarded == {vendor_idempotency_key(a["key_id"], ik)}
    assert stripe_fake.charged_usd_micros() == 7_000_000  # charged once
    rows = audit_rows(kb, a, 2)
    assert {(r["idempotency_key"], r["vendor_idempotency_key"]) for r in rows} == {
        (ik, vendor_idempotency_key(a["key_id"], ik))
    }
