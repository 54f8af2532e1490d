"""End to end: the unmodified twilio SDK through ``HTTPS_PROXY`` and a fake Twilio.

Each test proves a piece of the contract with a real ``keybrake run`` process: the fake sees
only the real Account SID and Auth Token, the allowlist holds, the key's spend equals what the
fake charged, and an exhausted cap is refused without contacting Twilio.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeTLS, FakeTwilio
from twilio.base.exceptions import TwilioRestException  # type: ignore[import-untyped]
from twilio.http.http_client import TwilioHttpClient  # type: ignore[import-untyped]
from twilio.rest import Client  # type: ignore[import-untyped]

from keybrake.core.money import format_usd

pytestmark = pytest.mark.e2e

SEND = "POST /2010-04-01/Accounts/{AccountSid}/Messages.json"
FETCH = "GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json"
PLACEHOLDER_SID = "AC" + "f" * 32  # any SID: the proxy puts the real one in
US_SEGMENT = 8_300  # policies/twilio.yaml: +1 per segment
MMS = 20_000  # policies/twilio.yaml: MediaUrl minimum


@pytest.fixture(scope="module")
def _proxy(
    tmp_path_factory: pytest.TempPathFactory, keybrake_certs: Path, fake_tls: FakeTLS
) -> Iterator[tuple[KeybrakeProcess, FakeTwilio]]:
    """One fake Twilio and one proxy for the module: every test issues its own key."""
    # The fake charges what Twilio's US price list says; the policy must agree with it.
    with FakeTwilio(
        fake_tls, price_per_segment_usd_micros=US_SEGMENT, mms_price_usd_micros=MMS
    ) as fake:
        workdir = tmp_path_factory.mktemp("kb-twilio")
        proc = KeybrakeProcess(workdir, keybrake_certs, {"twilio": fake}, fake_tls).start()
        try:
            yield proc, fake
        finally:
            proc.stop()


@pytest.fixture
def fake(_proxy: tuple[KeybrakeProcess, FakeTwilio]) -> FakeTwilio:
    _proxy[1].reset()
    return _proxy[1]


@pytest.fixture
def kb(_proxy: tuple[KeybrakeProcess, FakeTwilio], fake: FakeTwilio) -> KeybrakeProcess:
    return _proxy[0]


def client(kb: KeybrakeProcess, username: str, password: str, **kw: Any) -> Client:
    """A worker's client: HTTPS_PROXY to keybrake, trusting the keybrake CA bundle."""
    http = TwilioHttpClient(proxy={"https": kb.proxy_url})
    assert http.session is not None
    http.session.trust_env = False  # REQUESTS_CA_BUNDLE on these machines would override verify
    http.session.verify = str(kb.bundle)
    return Client(username, password, http_client=http, environment={}, **kw)


def issue(kb: KeybrakeProcess, cap: str = "1", *endpoints: str) -> dict[str, Any]:
    return kb.issue_key(
        vendor="twilio",
        daily_usd_cap=cap,
        allowed_endpoints=list(endpoints or (SEND, FETCH)),
        agent_run_label="notify/run-1",
    )


def spent(kb: KeybrakeProcess, key: dict[str, Any]) -> str:
    detail: dict[str, Any] = kb.admin("GET", f"/vault/keys/{key['key_id']}").json()
    return str(detail["spent_today_usd"])


def usd(micros: int) -> str:
    return format_usd(micros)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("username", ["placeholder", "real"])
def test_send_swaps_in_the_real_sid_and_token(
    kb: KeybrakeProcess, fake: FakeTwilio, username: str
) -> None:
    key = issue(kb)
    sid = PLACEHOLDER_SID if username == "placeholder" else fake.account_sid
    tc = client(kb, sid, key["vault_key"])
    msg = tc.messages.create(to="+14155550123", from_="+15017122661", body="a" * 161)
    assert msg.sid.startswith("SM") and msg.num_segments == "2" and msg.price is None
    assert msg.account_sid == fake.account_sid
    got = tc.messages(msg.sid).fetch()
    assert got.sid == msg.sid and got.body == "a" * 161

    create, fetch = fake.ledger
    real_auth = basic(fake.account_sid, fake.auth_token)
    for entry in (create, fetch):
        assert entry.header("Authorization") == real_auth
        assert entry.route.startswith(f"/2010-04-01/Accounts/{fake.account_sid}/Messages")
        assert key["vault_key"] not in str(entry.headers) + entry.path
        assert PLACEHOLDER_SID not in entry.path
        assert not any(h.lower().startswith("x-keybrake") for h in entry.headers)
    assert fetch.route == f"/2010-04-01/Accounts/{fake.account_sid}/Messages/{msg.sid}.json"
    # Twilio answers price null: the two-segment estimate is the settled cost, the fetch free.
    assert create.charged_usd_micros == 2 * US_SEGMENT
    assert spent(kb, key) == usd(fake.charged_usd_micros()) == "0.0166"


def test_messaging_service_mms_and_unicode_cost_what_twilio_charges(
    kb: KeybrakeProcess, fake: FakeTwilio
) -> None:
    key = issue(kb)
    tc = client(kb, PLACEHOLDER_SID, key["vault_key"])
    service = "MG" + "1" * 32
    via_service = tc.messages.create(
        to="+14155550123", messaging_service_sid=service, body="Привет " * 11
    )
    assert via_service.status == "accepted" and via_service.num_segments == "0"
    mms = tc.messages.create(
        to="+14155550123", from_="+15017122661", body="pic", media_url=["https://e.x/a.png"]
    )
    assert mms.sid.startswith("MM")
    emoji = tc.messages.create(to="+16475550123", from_="+15017122661", body="ok 👍" * 20)
    assert emoji.num_segments == "2"
    segments = [e.segments for e in fake.ledger]
    assert segments == [2, 1, 2]  # UCS-2 77 units; MMS; UCS-2 100 units
    assert fake.charged_usd_micros() == 4 * US_SEGMENT + MMS
    assert spent(kb, key) == usd(fake.charged_usd_micros()) == "0.0532"


def test_allowlist_and_other_accounts_are_refused(kb: KeybrakeProcess, fake: FakeTwilio) -> None:
    key = issue(kb, "1", SEND)
    tc = client(kb, PLACEHOLDER_SID, key["vault_key"])
    with pytest.raises(TwilioRestException) as e:
        tc.messages("SM" + "0" * 32).fetch()  # GET is not in this key's allowlist
    # TwilioRestException shows only the status of a refusal (its body has no top-level
    # "message"/"code"); the codes themselves are checked in test_refusal_codes_reach_the_caller.
    assert e.value.status == 403
    # A path naming another account than the one presented (or the real one) is refused.
    other = client(kb, PLACEHOLDER_SID, key["vault_key"], account_sid="AC" + "e" * 32)
    with pytest.raises(TwilioRestException) as e2:
        other.messages.create(to="+14155550123", from_="+15017122661", body="hi")
    assert e2.value.status == 403
    # The real Auth Token presented to the proxy is refused, never forwarded.
    raw = client(kb, fake.account_sid, fake.auth_token)
    with pytest.raises(TwilioRestException) as e3:
        raw.messages.create(to="+14155550123", from_="+15017122661", body="hi")
    assert e3.value.status == 403
    # Destinations and channels the policy cannot price are refused before Twilio.
    with pytest.raises(TwilioRestException) as e4:
        tc.messages.create(to="+8613812345678", from_="+15017122661", body="hi")
    assert e4.value.status == 403
    with pytest.raises(TwilioRestException) as e5:
        tc.messages.create(to="whatsapp:+14155550123", from_="whatsapp:+15017122661", body="hi")
    assert e5.value.status == 403
    assert fake.ledger == []
    assert spent(kb, key) == "0.00"


def test_refusal_codes_reach_the_caller(kb: KeybrakeProcess, fake: FakeTwilio) -> None:
    """What a Twilio worker sees of a refusal: the status and Keybrake's JSON body."""
    key = issue(kb, "1", SEND)
    url = f"https://api.twilio.com/2010-04-01/Accounts/{PLACEHOLDER_SID}/Messages.json"
    with httpx.Client(proxy=kb.proxy_url, verify=kb.ssl_context()) as c:
        r = c.get(url, auth=(PLACEHOLDER_SID, key["vault_key"]))
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "endpoint_not_allowed"
        other = url.replace(PLACEHOLDER_SID, "AC" + "e" * 32)
        data = {"To": "+14155550123", "From": "+15017122661", "Body": "hi"}
        r = c.post(other, data=data, auth=(PLACEHOLDER_SID, key["vault_key"]))
        assert r.status_code == 403 and r.json()["error"]["code"] == "account_mismatch"
        r = c.post(url, data=data, auth=(fake.account_sid, fake.auth_token))
        assert r.status_code == 403 and r.json()["error"]["code"] == "raw_secret_refused"
        r = c.post(
            url, data={**data, "To": "+8613812345678"}, auth=(PLACEHOLDER_SID, key["vault_key"])
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "unpriced_endpoint"
        r = c.post(
            url,
            content=b"To=%2B14155550123&To=%2B447700900123&Body=x",
            auth=(PLACEHOLDER_SID, key["vault_key"]),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "ambiguous_amount"
    assert fake.ledger == []


def test_cap_is_enforced_without_contacting_twilio(kb: KeybrakeProcess, fake: FakeTwilio) -> None:
    key = issue(kb, "0.02")
    tc = client(kb, PLACEHOLDER_SID, key["vault_key"])
    for _ in range(2):
        tc.messages.create(to="+14155550123", from_="+15017122661", body="hello")
    assert spent(kb, key) == "0.0166"
    # $0.0034 remains: another one-segment SMS ($0.0083) does not fit.
    with pytest.raises(TwilioRestException) as e:
        tc.messages.create(to="+14155550123", from_="+15017122661", body="hello")
    assert e.value.status == 429
    # Nor does a long message that would fit in count but not in dollars.
    with pytest.raises(TwilioRestException):
        tc.messages.create(to="+14155550123", from_="+15017122661", body="a" * 161)
    assert len(fake.ledger) == 2
    assert fake.charged_usd_micros() == 2 * US_SEGMENT
    assert spent(kb, key) == "0.0166"
