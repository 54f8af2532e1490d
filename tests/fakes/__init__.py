"""Fake vendor servers (Stripe, Twilio, Resend, OpenAI, Anthropic) over real TLS.

See ``base.py`` for the ledger and fault switches and each vendor module for what it
implements. Quick start::

    tls = make_fake_ca(tmp_path)
    with FakeStripe(tls) as fake:
        client = stripe.StripeClient(fake.secret, base_addresses={"api": fake.url})
        # + stripe.ca_bundle_path = str(tls.ca_pem)
"""

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import FakeRequest, FakeResponse, FakeVendor, LedgerEntry
from tests.fakes.openai import FakeOpenAI
from tests.fakes.resend import FakeResend
from tests.fakes.stripe import FakeStripe, mask_key, parse_stripe_form
from tests.fakes.tls import FakeTLS, load_or_make_fake_ca, make_fake_ca
from tests.fakes.twilio import FakeTwilio, sms_encoding, sms_segments

__all__ = [
    "FakeAnthropic",
    "FakeOpenAI",
    "FakeRequest",
    "FakeResend",
    "FakeResponse",
    "FakeStripe",
    "FakeTLS",
    "FakeTwilio",
    "FakeVendor",
    "LedgerEntry",
    "load_or_make_fake_ca",
    "make_fake_ca",
    "mask_key",
    "parse_stripe_form",
    "sms_encoding",
    "sms_segments",
]
