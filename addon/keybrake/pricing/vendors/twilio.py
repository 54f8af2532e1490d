"""Twilio Programmable Messaging: the ``sms_segments`` counter.

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` is priced in ``policies/twilio.yaml``
as ``per_unit`` with this counter: the SMS segments of ``Body``
(`keybrake.pricing.sms.count_segments`, GSM-7 or UCS-2 as Twilio's own calculator splits it)
times the per-segment price for the ``To``
number's calling code. Sends through a Messaging Service (``MessagingServiceSid`` instead of
``From``) are priced the same way. A ``MediaUrl`` makes the message an MMS, which the policy
prices with ``min_usd_when_present``.

Refused rather than guessed: a message built from a Content Template (``ContentSid``: its
length is not in the request) and channel addresses other than a plain E.164 number
(``whatsapp:+44…``: WhatsApp is billed per conversation, not per segment).

>>> from keybrake.pricing.model import Body, Registry
>>> from keybrake.pricing.bodies import parse_stripe_form
>>> from keybrake.core.policy import PerUnitCost
>>> rule = PerUnitCost(kind="per_unit", counter="sms_segments")
>>> form = parse_stripe_form(b"To=%2B15551234567&Body=" + b"a" * 161)
>>> count_sms_segments(Body("form", form), rule)
2
"""

from __future__ import annotations

from keybrake.core.errors import Refusal
from keybrake.core.policy import PerUnitCost
from keybrake.pricing.model import Body, Registry
from keybrake.pricing.sms import count_segments

__all__ = ["count_sms_segments"]


def count_sms_segments(body: Body, rule: PerUnitCost) -> int:
    """Segments Twilio bills for the message's ``Body`` (an absent body counts one)."""
    if body.get("ContentSid") not in (None, ""):
        raise Refusal(
            "unpriced_endpoint",
            "messages built from a Content Template (ContentSid) cannot be priced before "
            "sending: send the text in Body instead",
        )
    to = body.get("To")
    if isinstance(to, str) and ":" in to:
        raise Refusal(
            "unpriced_endpoint",
            f"only SMS/MMS to E.164 numbers are priced; {to.partition(':')[0]!r} channel "
            "addresses are not",
        )
    text = body.get("Body")
    if text is not None and not isinstance(text, str):
        raise ValueError("Body must be text")
    return count_segments(text or "")


def register(registry: Registry) -> None:
    """Put this module's pricing code into ``registry`` under the names policy YAML uses."""
    registry.counters["sms_segments"] = count_sms_segments
