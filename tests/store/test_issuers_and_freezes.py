"""The `Store` contract for delegated issuing and kill switches: issuer tokens (stored by the
hash of the token, revocable), the issuer a key was minted by, and vendor freezes read by the
very next admission of every replica. Every test runs against SQLite and the real Redis (and
Redis as an ACL user, and over TLS)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

import pytest
from tests.store.conftest import USD, StoreFactory, make_key

from keybrake.store import AdmissionRequest, IdempotencyClaim, IssuerRecord, Store

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def make_issuer(issuer_id: str = "iss_a", **changes: object) -> IssuerRecord:
    record = IssuerRecord(
        issuer_id=issuer_id,
        token_sha256=hashlib.sha256(issuer_id.encode()).hexdigest(),
        name="beam billing driver",
        vendors=("stripe", "twilio"),
        label_prefix="beam/billing/",
        allowed_endpoints=(
            ("stripe", ("POST /v1/payment_intents", "GET /v1/charges/{id}")),
            ("twilio", ("POST /2010-04-01/Accounts/{AccountSid}/Messages.json",)),
        ),
        max_daily_cap_micros=300 * USD,
        max_expires_in_seconds=7200,
        created_at=NOON,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# -- issuer tokens -----------------------------------------------------------------------------


async def test_issuer_round_trips_by_id_and_by_token_hash(store: Store) -> None:
    full = make_issuer(
        max_usd_cap_micros=1_000 * USD,
        allowed_accounts=("acct_1",),
        budget_daily_micros=500 * USD,
        budget_lifetime_micros=5_000 * USD,
        expires_at=NOON + dt.timedelta(days=30),
    )
    bare = make_issuer("iss_b", created_at=NOON + dt.timedelta(seconds=1))
    await store.create_issuer(full)
    await store.create_issuer(bare)

    assert await store.get_issuer("iss_a") == full
    assert await store.get_issuer_by_token_hash(full.token_sha256) == full
    assert await store.get_issuer("iss_b") == bare
    assert full.endpoints_of("twilio") == ("POST /2010-04-01/Accounts/{AccountSid}/Messages.json",)
    assert await store.get_issuer("iss_never") is None
    assert await store.get_issuer_by_token_hash("0" * 64) is None
    assert [i.issuer_id for i in await store.list_issuers()] == ["iss_b", "iss_a"]


async def test_create_issuer_refuses_a_taken_id_or_token_hash(store: Store) -> None:
    first = make_issuer()
    await store.create_issuer(first)
    with pytest.raises(ValueError):
        await store.create_issuer(dataclasses.replace(first, token_sha256="f" * 64))
    with pytest.raises(ValueError):
        await store.create_issuer(make_issuer("iss_other", token_sha256=first.token_sha256))
    assert [i.issuer_id for i in await store.list_issuers()] == ["iss_a"]


async def test_revoke_issuer_keeps_the_first_time(store: Store) -> None:
    await store.create_issuer(make_issuer(expires_at=NOON + dt.timedelta(hours=1)))
    first = await store.revoke_issuer("iss_a", NOON)
    again = await store.revoke_issuer("iss_a", NOON + dt.timedelta(hours=1))
    assert first is not None and again is not None
    assert first.revoked_at == again.revoked_at == NOON
    assert again.state(NOON) == "revoked"
    assert await store.revoke_issuer("iss_never", NOON) is None
    found = await store.get_issuer("iss_a")
    assert found is not None and found.revoked_at == NOON


async def test_issuer_state_expires(store: Store) -> None:
    issuer = make_issuer(expires_at=NOON + dt.timedelta(hours=1))
    assert issuer.state(NOON) == "active"
    assert issuer.state(NOON + dt.timedelta(hours=1)) == "expired"
    assert make_issuer().state(NOON + dt.timedelta(days=3650)) == "active"


async def test_a_key_remembers_the_issuer_that_minted_it(store: Store) -> None:
    minted = dataclasses.replace(make_key("kb_a", label="beam/billing/run-1"), issuer_id="iss_a")
    await store.create_key(minted)
    await store.create_key(make_key("kb_b"))
    by_id = {k.key_id: k.issuer_id for k in await store.list_keys()}
    assert by_id == {"kb_a": "iss_a", "kb_b": None}
    assert await store.get_key("kb_a") == minted
    assert (await store.get_key_by_secret_hash(minted.secret_sha256)) == minted
    admitted = await store.admit(AdmissionRequest("kb_a", NOON))
    assert admitted.key is not None and admitted.key.issuer_id == "iss_a"


async def test_a_label_may_not_name_a_reserved_field(store: Store) -> None:
    with pytest.raises(ValueError, match="must not start with '!'"):
        await store.create_key(make_key("kb_a", label="!frozen:stripe"))
    assert await store.list_keys() == []


# -- vendor freezes ----------------------------------------------------------------------------


async def test_freeze_refuses_every_key_of_the_vendor_on_every_replica_until_lifted(
    store: Store, make_store: StoreFactory
) -> None:
    stripe_key = make_key("kb_s", label="beam/billing/run-1", daily=10 * USD)
    twilio_key = make_key("kb_t", vendor="twilio")
    await store.create_key(stripe_key)
    await store.create_key(twilio_key)
    other = make_store()  # another replica on the same state
    await other.open()
    try:
        # The other replica has admitted the key before (it knows its static fields).
        assert (await other.admit(AdmissionRequest("kb_s", NOON))).status == "admitted"

        frozen = await store.freeze_vendor("stripe", "account compromised", NOON)
        assert (frozen.vendor, frozen.reason, frozen.frozen_at) == (
            "stripe",
            "account compromised",
            NOON,
        )

        paid = AdmissionRequest(
            "kb_s",
            NOON,
            reservation_id="res_1",
            estimate_micros=USD,
            rate_limit=5,
            idempotency=IdempotencyClaim("idem:k1", "h1", 60, 30, 10),
        )
        for replica in (store, other):
            refused = await replica.admit(paid)
            assert (refused.status, refused.code) == ("refused", "vendor_frozen")
            assert refused.detail == "account compromised"
            assert refused.key is not None and refused.key.key_id == "kb_s"
        # Nothing was reserved or claimed; the other vendor is not affected.
        assert [
            (b.spent_micros, b.reserved_micros) for b in await store.budgets(stripe_key, NOON)
        ] == [(0, 0)]
        assert (
            await store.idempotency_begin("kb_s", "idem:k1", "h1", 60, 30, 9)
        ).status == "started"
        assert (await other.admit(AdmissionRequest("kb_t", NOON))).status == "admitted"

        assert await other.unfreeze_vendor("stripe") is True
        assert await other.unfreeze_vendor("stripe") is False
        assert (await store.admit(AdmissionRequest("kb_s", NOON))).status == "admitted"
        assert (await other.admit(AdmissionRequest("kb_s", NOON))).status == "admitted"
    finally:
        await other.close()


async def test_freeze_is_idempotent_and_listed(store: Store) -> None:
    assert await store.frozen_vendors() == []
    await store.freeze_vendor("twilio", "mis-billing", NOON)
    await store.freeze_vendor("stripe", "compromised", NOON)
    again = await store.freeze_vendor("stripe", "second reason", NOON + dt.timedelta(hours=1))
    assert (again.reason, again.frozen_at) == ("compromised", NOON)
    listed = await store.frozen_vendors()
    assert [(f.vendor, f.reason, f.frozen_at) for f in listed] == [
        ("stripe", "compromised", NOON),
        ("twilio", "mis-billing", NOON),
    ]
    assert await store.unfreeze_vendor("twilio") is True
    assert [f.vendor for f in await store.frozen_vendors()] == ["stripe"]


async def test_a_freeze_is_no_label_budget(store: Store) -> None:
    """The Redis freeze flag shares the label-budgets hash: labels and budgets never see it."""
    key = make_key("kb_a", label="run-1", daily=10 * USD)
    await store.create_key(key)
    await store.set_label_budget("run-1", 5 * USD)
    await store.freeze_vendor("stripe", "", NOON)
    assert await store.get_label_budget("run-1") == 5 * USD
    assert [b.cap_micros for b in await store.budgets(key, NOON)] == [10 * USD, 5 * USD]
    refused = await store.admit(
        AdmissionRequest("kb_a", NOON, reservation_id="res_1", estimate_micros=USD)
    )
    assert refused.code == "vendor_frozen"
    await store.unfreeze_vendor("stripe")
    admitted = await store.admit(
        AdmissionRequest("kb_a", NOON, reservation_id="res_2", estimate_micros=USD)
    )
    assert admitted.status == "admitted"
    assert [b.reserved_micros for b in admitted.budgets] == [USD, USD]


async def test_a_revoked_or_suspended_key_says_so_before_the_freeze(store: Store) -> None:
    await store.create_key(make_key("kb_r"))
    await store.create_key(make_key("kb_s"))
    await store.revoke_key("kb_r", NOON)
    await store.suspend_key("kb_s", NOON, "overrun")
    await store.freeze_vendor("stripe", "x", NOON)
    assert (await store.admit(AdmissionRequest("kb_r", NOON))).code == "vault_key_revoked"
    assert (await store.admit(AdmissionRequest("kb_s", NOON))).code == "key_suspended"
