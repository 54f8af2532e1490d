"""Resend e-mail: the ``email_recipients`` and ``email_batch_recipients`` counters.

Resend bills per recipient: ``to`` + ``cc`` + ``bcc`` of each e-mail, each a string or a list
of strings. ``POST /emails/batch`` sends a JSON list of at most 100 such e-mails; a longer list
is refused (Resend refuses it too).

A string counts as many recipients as it holds ``@`` signs (at least one): Resend documents
``to`` as one address per string, but a comma-separated ``"a@x.io, b@y.io"`` must not cost
less here than it might at the vendor. A display name containing ``@`` overcounts, never under.

>>> from keybrake.pricing.model import Body, Registry
>>> from keybrake.core.policy import PerUnitCost
>>> rule = PerUnitCost(kind="per_unit", counter="email_recipients")
>>> count_email_recipients(Body("json", {"to": ["a@x.io", "b@x.io"], "cc": "Ann <c@x.io>"}), rule)
3
"""

from __future__ import annotations

from typing import Any, Final

from keybrake.core.errors import Refusal
from keybrake.core.policy import PerUnitCost
from keybrake.pricing.model import Body, Registry

__all__ = ["MAX_BATCH", "count_batch_recipients", "count_email_recipients"]

MAX_BATCH: Final = 100
"""Most e-mails in one ``POST /emails/batch``."""
_RECIPIENT_FIELDS: Final = ("to", "cc", "bcc")


def _addresses(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return max(1, value.count("@")) if value.strip() else 0
    if isinstance(value, list):
        return sum(_addresses_item(item, where) for item in value)
    raise ValueError(f"{where} must be an address or a list of addresses")


def _addresses_item(item: Any, where: str) -> int:
    if not isinstance(item, str):
        raise ValueError(f"{where} must list addresses as strings")
    return _addresses(item, where)


def _recipients(email: Any, where: str) -> int:
    if not isinstance(email, dict):
        raise ValueError(f"{where} must be a JSON object")
    return sum(
        _addresses(email.get(name), f"{where}{name}" if where else name)
        for name in _RECIPIENT_FIELDS
    )


def count_email_recipients(body: Body, rule: PerUnitCost) -> int:
    """Recipients of one e-mail (``POST /emails``)."""
    return _recipients(body.root, "")


def count_batch_recipients(body: Body, rule: PerUnitCost) -> int:
    """Recipients over every e-mail of a batch (``POST /emails/batch``).

    >>> from keybrake.pricing.model import Body, Registry
    >>> rule = PerUnitCost(kind="per_unit", counter="email_batch_recipients")
    >>> count_batch_recipients(Body("json", [{"to": "a@x.io"}, {"to": ["b@x.io", "c@x.io"]}]), rule)
    3
    """
    emails = body.root
    if not isinstance(emails, list):
        raise ValueError("a batch body must be a JSON list of e-mails")
    if len(emails) > MAX_BATCH:
        raise Refusal(
            "invalid_request",
            f"a batch holds at most {MAX_BATCH} e-mails, this one has {len(emails)}",
        )
    return sum(_recipients(email, f"{i}.") for i, email in enumerate(emails))


def register(registry: Registry) -> None:
    """Put this module's pricing code into ``registry`` under the names policy YAML uses."""
    registry.counters["email_recipients"] = count_email_recipients
    registry.counters["email_batch_recipients"] = count_batch_recipients
