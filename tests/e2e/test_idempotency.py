"""End to end: idempotent replay at the proxy (DESIGN §2 step 6).

A repeat of a call with the same idempotency key and the same body is answered from the
proxy's store (``X-Keybrake-Replayed: true``): the fake vendor's ledger shows one request and
the vault key's spend does not move. A repeat while the first is in flight is ``409``, the same
key with another body ``422``. Stripe's own rule is followed for errors: a ``402`` decline is
replayed, a ``400`` is not. Replays survive a restart (SQLite) and work across replicas (Redis).

Most tests share one proxy (module scope, unique keys per test) to keep the file fast.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
import yaml
from tests.conftest import ROOT, KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS, FakeTwilio

from keybrake.proxy._idempotency import vendor_idempotency_key

pytestmark = pytest.mark.e2e

PI = "https://api.stripe.com/v1/payment_intents"
SMS_SEND = "POST /2010-04-01/Accounts/{AccountSid}/Messages.json"
PLACEHOLDER_SID = "AC" + "f" * 32
US_SEGMENT = 8_300


# -- shared proxy --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stripe_fake(fake_tls: FakeTLS) -> Iterator[FakeStripe]:
    with FakeStripe(fake_tls) as fake:
        yield fake


@pytest.fixture(scope="module")
def twilio_fake(fake_tls: FakeTLS) -> Iterator[FakeTwilio]:
    with FakeTwilio(fake_tls, price_per_segment_usd_micros=US_SEGMENT) as fake:
        yield fake


def policies_with_sms_dedupe(dest: Path) -> Path:
    """The shipped policies, with content dedupe switched on for Twilio message sends."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "policies").glob("*.yaml"):
        shutil.copy(f, dest / f.name)
    data = yaml.safe_load((dest / "twilio.yaml").read_text())
    for ep in data["endpoints"]:
        if ep["match"] == SMS_SEND:
            ep["dedupe"] = {"by": "body", "window": "10m"}
    (dest / "twilio.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def kb(
    tmp_path_factory: pytest.TempPathFactory,
    keybrake_certs: Path,
    fake_tls: FakeTLS,
    stripe_fake: FakeStripe,
    twilio_fake: FakeTwilio,
) -> Iterator[KeybrakeProcess]:
    work = tmp_path_factory.mktemp("kb-idem")
    proc = KeybrakeProcess(
        work,
        keybrake_certs,
        {"stripe": stripe_fake, "twilio": twilio_fake},
        fake_tls,
        policies_src=policies_with_sms_dedupe(work / "policies-src"),
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _clean_fakes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("stripe_fake", "twilio_fake"):
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)
            fake.delay_seconds = 0.0
            fake.clear_faults()


# -- helpers -------------------------------------------------------------------------------------
def new_ik() -> str:
    return f"ik_{uuid.uuid4().hex}"


def sdk(kb: KeybrakeProcess, vault_key: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(stripe, "ca_bundle_path", str(kb.bundle))
    return stripe.StripeClient(vault_key, proxy=kb.proxy_url, max_network_retries=0)


def post(
    kb: KeybrakeProcess,
    vault_key: str,
    data: dict[str, str],
    headers: dict[str, str] | None = None,
    url: str = PI,
) -> httpx.Response:
    return httpx.post(
        url,
        data=data,
        headers={"Authorization": f"Bearer {vault_key}", **(headers or {})},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )


def charge(amount: int, pm: str = "pm_card_visa") -> dict[str, Any]:
    return {"amount": amount, "currency": "usd", "confirm": "true", "payment_method": pm}


def spent_micros(kb: KeybrakeProcess, key: dict[str, Any]) -> int:
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return int(Decimal(detail["spent_today_usd"]) * 1_000_000)


def with_ik(fake: FakeStripe, key: dict[str, Any], ik: str) -> list[Any]:
    """Ledger entries of the worker's idempotency key ``ik`` as the vendor received it:
    namespaced per vault key."""
    forwarded = vendor_idempotency_key(key["key_id"], ik)
    return [e for e in fake.ledger if e.idempotency_key == forwarded]


def refusal_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


# -- Stripe Idempotency-Key --------------------------------------------------------------------
def test_sdk_retry_is_replayed_without_vendor_or_budget(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="100")
    sc = sdk(kb, key["vault_key"], monkeypatch)
    ik = new_ik()
    first = sc.v1.payment_intents.create(params=charge(1234), options={"idempotency_key": ik})
    assert first.status == "succeeded"
    assert first.last_response is not None
    assert "X-Keybrake-Replayed" not in first.last_response.headers
    assert spent_micros(kb, key) == 12_340_000

    again = sc.v1.payment_intents.create(params=charge(1234), options={"idempotency_key": ik})
    assert again.id == first.id and again.amount == 1234 and again.status == "succeeded"
    assert again.last_response is not None
    assert again.last_response.headers["X-Keybrake-Replayed"] == "true"
    # The vendor's own Request-Id of the first call comes back, not a new one.
    assert again.last_response.headers["Request-Id"] == first.last_response.headers["Request-Id"]
    # Spend headers describe the first call; a replay must not pretend to have spent again.
    assert "X-Keybrake-Spent-Usd" not in again.last_response.headers

    (entry,) = with_ik(stripe_fake, key, ik)
    assert entry.status == 200 and not entry.replayed
    assert spent_micros(kb, key) == 12_340_000

    # Same key, other amount: refused at the proxy, the vendor never hears of it.
    with pytest.raises(stripe.StripeError) as e:
        sc.v1.payment_intents.create(params=charge(999), options={"idempotency_key": ik})
    assert e.value.http_status == 422
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "idempotency_mismatch"
    assert e.value.headers is not None
    assert e.value.headers.get("X-Keybrake-Error") == "idempotency_mismatch"
    assert len(with_ik(stripe_fake, key, ik)) == 1
    assert spent_micros(kb, key) == 12_340_000


def test_same_key_in_flight_is_409(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="100")
    ik = new_ik()
    stripe_fake.delay_seconds = 1.5
    first: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: first.update(
            r=post(kb, key["vault_key"], charge(500), {"Idempotency-Key": ik})
        )
    )
    t.start()
    time.sleep(0.6)  # the first call is now waiting on the (slow) vendor
    sc = sdk(kb, key["vault_key"], monkeypatch)
    started = time.monotonic()
    with pytest.raises(stripe.StripeError) as e:
        # The SDK would retry a vendor 409; Keybrake says Stripe-Should-Retry: false.
        stripe.StripeClient(
            key["vault_key"], proxy=kb.proxy_url, max_network_retries=2
        ).v1.payment_intents.create(params=charge(500), options={"idempotency_key": ik})
    assert time.monotonic() - started < 1.0, "the in-flight refusal must not wait on the vendor"
    assert e.value.http_status == 409
    assert e.value.json_body is not None
    assert e.value.json_body["error"]["code"] == "idempotency_in_flight"
    t.join(10)
    assert first["r"].status_code == 200, first["r"].text
    stripe_fake.delay_seconds = 0

    # Once the first is done, the retry is answered from the store.
    replay = sc.v1.payment_intents.create(params=charge(500), options={"idempotency_key": ik})
    assert replay.id == first["r"].json()["id"]
    assert replay.last_response is not None
    assert replay.last_response.headers["X-Keybrake-Replayed"] == "true"
    assert len(with_ik(stripe_fake, key, ik)) == 1
    assert spent_micros(kb, key) == 5_000_000


def test_declined_402_is_replayed_like_stripe(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="100")
    sc = sdk(kb, key["vault_key"], monkeypatch)
    ik = new_ik()
    params = charge(2000, "pm_card_chargeDeclined")
    with pytest.raises(stripe.CardError) as first:
        sc.v1.payment_intents.create(params=params, options={"idempotency_key": ik})
    assert first.value.code == "card_declined"
    assert first.value.headers is not None
    assert "X-Keybrake-Replayed" not in first.value.headers
    with pytest.raises(stripe.CardError) as again:
        sc.v1.payment_intents.create(params=params, options={"idempotency_key": ik})
    assert again.value.code == "card_declined"
    assert again.value.headers is not None
    assert again.value.headers.get("X-Keybrake-Replayed") == "true"
    (entry,) = with_ik(stripe_fake, key, ik)
    assert entry.status == 402
    assert spent_micros(kb, key) == 0  # a decline charges nothing and releases the reservation


def test_400_is_not_replayed_and_a_fixed_retry_goes_through(
    kb: KeybrakeProcess, stripe_fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = kb.issue_key(daily_usd_cap="100")
    sc = sdk(kb, key["vault_key"], monkeypatch)
    ik = new_ik()
    for _ in range(2):
        with pytest.raises(stripe.InvalidRequestError) as e:
            sc.v1.payment_intents.create(params=charge(10), options={"idempotency_key": ik})
        assert e.value.code == "amount_too_small"
        assert e.value.headers is not None
        assert "X-Keybrake-Replayed" not in e.value.headers
    entries = with_ik(stripe_fake, key, ik)
    assert [(x.status, x.replayed) for x in entries] == [(400, False), (400, False)]
    # Stripe keeps no result for a validation error: the same key with fixed params works.
    fixed = sc.v1.payment_intents.create(params=charge(100), options={"idempotency_key": ik})
    assert fixed.status == "succeeded"
    assert len(with_ik(stripe_fake, key, ik)) == 3
    assert spent_micros(kb, key) == 1_000_000


def test_replays_consume_no_budget(kb: KeybrakeProcess, stripe_fake: FakeStripe) -> None:
    key = kb.issue_key(daily_usd_cap="20")
    ik = new_ik()
    r = post(kb, key["vault_key"], charge(1500), {"Idempotency-Key": ik})
    assert r.status_code == 200, r.text
    assert r.headers["X-Keybrake-Remaining-Usd"] == "5.00"
    for _ in range(5):
        again = post(kb, key["vault_key"], charge(1500), {"Idempotency-Key": ik})
        assert again.status_code == 200, again.text
        assert again.headers["X-Keybrake-Replayed"] == "true"
        assert again.json()["id"] == r.json()["id"]
    assert len(with_ik(stripe_fake, key, ik)) == 1
    detail = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    assert detail["spent_today_usd"] == "15.00"
    assert detail["remaining_usd"] == "5.00"
    assert all(b["reserved_usd"] == "0.00" for b in detail["budgets"])
    # The cap is live: a new charge that does not fit is still refused.
    other = post(kb, key["vault_key"], charge(1500), {"Idempotency-Key": new_ik()})
    assert other.status_code == 429 and refusal_code(other) == "cap_exhausted"
    assert stripe_fake.charged_usd_micros() >= 15_000_000


# -- X-Keybrake-Idempotency-Key and content dedupe ----------------------------------------------
def test_keybrake_idempotency_header_is_honoured_and_stripped(
    kb: KeybrakeProcess, stripe_fake: FakeStripe
) -> None:
    key = kb.issue_key(daily_usd_cap="100")
    wk = f"worker-{uuid.uuid4().hex}"
    before = len(stripe_fake.ledger)
    headers = {"X-Keybrake-Idempotency-Key": wk}
    r1 = post(kb, key["vault_key"], charge(700), headers)
    r2 = post(kb, key["vault_key"], charge(700), headers)
    assert r1.status_code == r2.status_code == 200
    assert "X-Keybrake-Replayed" not in r1.headers
    assert r2.headers["X-Keybrake-Replayed"] == "true"
    assert r2.json()["id"] == r1.json()["id"]
    new = stripe_fake.ledger[before:]
    assert len(new) == 1
    assert not any(h.lower().startswith("x-keybrake") for h in new[0].headers)
    assert new[0].idempotency_key is None  # nothing was invented for the vendor either
    assert spent_micros(kb, key) == 7_000_000
    mismatch = post(kb, key["vault_key"], charge(701), headers)
    assert mismatch.status_code == 422 and refusal_code(mismatch) == "idempotency_mismatch"
    assert len(stripe_fake.ledger) == before + 1


def sms(
    kb: KeybrakeProcess, vault_key: str, body: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"https://api.twilio.com/2010-04-01/Accounts/{PLACEHOLDER_SID}/Messages.json",
        data={"To": "+14155550123", "From": "+15017122661", "Body": body},
        auth=(PLACEHOLDER_SID, vault_key),
        headers=headers or {},
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=30,
    )


def test_keybrake_idempotency_header_works_for_twilio(
    kb: KeybrakeProcess, twilio_fake: FakeTwilio
) -> None:
    key = kb.issue_key(
        vendor="twilio", daily_usd_cap="1", allowed_endpoints=[SMS_SEND], agent_run_label="sms/a"
    )
    before = len(twilio_fake.ledger)
    wk = {"X-Keybrake-Idempotency-Key": f"msg-{uuid.uuid4().hex}"}
    r1 = sms(kb, key["vault_key"], "your code is 1234", wk)
    r2 = sms(kb, key["vault_key"], "your code is 1234", wk)
    assert r1.status_code == r2.status_code == 201, r1.text
    assert r2.headers["X-Keybrake-Replayed"] == "true"
    assert r2.json()["sid"] == r1.json()["sid"]
    new = twilio_fake.ledger[before:]
    assert len(new) == 1
    assert not any(h.lower().startswith("x-keybrake") for h in new[0].headers)
    assert spent_micros(kb, key) == US_SEGMENT


def test_policy_dedupe_replays_identical_sms_within_window(
    kb: KeybrakeProcess, twilio_fake: FakeTwilio
) -> None:
    key = kb.issue_key(
        vendor="twilio", daily_usd_cap="1", allowed_endpoints=[SMS_SEND], agent_run_label="sms/b"
    )
    before = len(twilio_fake.ledger)
    text = f"order {uuid.uuid4().hex[:8]} shipped"
    r1 = sms(kb, key["vault_key"], text)
    r2 = sms(kb, key["vault_key"], text)
    other = sms(kb, key["vault_key"], text + "!")
    assert r1.status_code == r2.status_code == other.status_code == 201, r1.text
    assert r2.headers["X-Keybrake-Replayed"] == "true"
    assert r2.json()["sid"] == r1.json()["sid"]
    assert "X-Keybrake-Replayed" not in other.headers
    assert len(twilio_fake.ledger) == before + 2
    assert spent_micros(kb, key) == 2 * US_SEGMENT
    # Dedupe is per vault key: another worker's identical text is its own message.
    key2 = kb.issue_key(
        vendor="twilio", daily_usd_cap="1", allowed_endpoints=[SMS_SEND], agent_run_label="sms/b"
    )
    r3 = sms(kb, key2["vault_key"], text)
    assert r3.status_code == 201 and "X-Keybrake-Replayed" not in r3.headers
    assert len(twilio_fake.ledger) == before + 3


# -- restart and replicas --------------------------------------------------------------------------
def test_replay_survives_restart_on_sqlite(
    keybrake_factory: Any, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_proc: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    key = first_proc.issue_key(daily_usd_cap="100")
    ik = new_ik()
    pi = sdk(first_proc, key["vault_key"], monkeypatch).v1.payment_intents.create(
        params=charge(4200), options={"idempotency_key": ik}
    )
    first_proc.stop()

    second: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, data_dir=first_proc.data_dir
    )
    again = sdk(second, key["vault_key"], monkeypatch).v1.payment_intents.create(
        params=charge(4200), options={"idempotency_key": ik}
    )
    assert again.id == pi.id
    assert again.last_response is not None
    assert again.last_response.headers["X-Keybrake-Replayed"] == "true"
    assert len(fake_stripe.ledger) == 1
    assert spent_micros(second, key) == 42_000_000 == fake_stripe.charged_usd_micros()


@pytest.mark.redis
def test_replay_in_flight_and_mismatch_across_redis_replicas(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    a: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    b: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    key = a.issue_key(daily_usd_cap="100")
    ik = new_ik()

    fake_stripe.delay_seconds = 1.5
    first: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: first.update(
            r=post(a, key["vault_key"], charge(900), {"Idempotency-Key": ik})
        )
    )
    t.start()
    time.sleep(0.6)
    busy = post(b, key["vault_key"], charge(900), {"Idempotency-Key": ik})
    assert busy.status_code == 409 and refusal_code(busy) == "idempotency_in_flight"
    t.join(10)
    fake_stripe.delay_seconds = 0
    assert first["r"].status_code == 200, first["r"].text

    replay = post(b, key["vault_key"], charge(900), {"Idempotency-Key": ik})
    assert replay.status_code == 200
    assert replay.headers["X-Keybrake-Replayed"] == "true"
    assert replay.json()["id"] == first["r"].json()["id"]
    mismatch = post(b, key["vault_key"], charge(901), {"Idempotency-Key": ik})
    assert mismatch.status_code == 422 and refusal_code(mismatch) == "idempotency_mismatch"
    assert len(fake_stripe.ledger) == 1

    # Both replicas restart (Redis keeps the cache): still a replay, still one charge.
    a.stop()
    b.stop()
    c: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    later = post(c, key["vault_key"], charge(900), {"Idempotency-Key": ik})
    assert later.status_code == 200 and later.headers["X-Keybrake-Replayed"] == "true"
    assert len(fake_stripe.ledger) == 1
    assert spent_micros(c, key) == 9_000_000 == fake_stripe.charged_usd_micros()


def test_policy_dedupe_covers_sdks_sending_random_idempotency_keys(
    keybrake_factory: Any,
    fake_stripe: FakeStripe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "policies-src"
    src.mkdir()
    for f in (ROOT / "policies").glob("*.yaml"):
        shutil.copy(f, src / f.name)
    data = yaml.safe_load((src / "stripe.yaml").read_text())
    for ep in data["endpoints"]:
        if ep["match"] == "POST /v1/payment_intents":
            ep["dedupe"] = {"by": "body", "window": "10m"}
    (src / "stripe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    proc: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, policies_src=src)
    key = proc.issue_key(daily_usd_cap="100")
    monkeypatch.setattr(stripe, "ca_bundle_path", str(proc.bundle))
    # Retries enabled: the SDK invents a fresh Idempotency-Key for every create call.
    sc = stripe.StripeClient(key["vault_key"], proxy=proc.proxy_url, max_network_retries=2)
    a = sc.v1.payment_intents.create(params=charge(500))
    b = sc.v1.payment_intents.create(params=charge(500))
    keys = {e.idempotency_key for e in fake_stripe.ledger}
    assert len(fake_stripe.ledger) == 1, f"vendor saw {len(keys)} distinct keys"
    assert b.id == a.id
