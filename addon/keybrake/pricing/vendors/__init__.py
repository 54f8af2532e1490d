"""Vendor-specific counters and cost functions that policy YAML can name.

Each module's ``register(registry)`` puts them into a `keybrake.pricing.model.Registry`;
`register_all` calls every one (`keybrake.pricing` does, for `keybrake.pricing.REGISTRY`).
Importing a module registers nothing.

- `keybrake.pricing.vendors.generic`: ``list_items``, ``integer_fields`` (for YAML-only vendors).
- `keybrake.pricing.vendors.stripe`: ``stripe_checkout_session``, ``stripe_subscription``,
  ``stripe_invoice``, ``stripe_invoice_item``.
- `keybrake.pricing.vendors.twilio`: ``sms_segments``.
- `keybrake.pricing.vendors.resend`: ``email_recipients``, ``email_batch_recipients``.
- `keybrake.pricing.vendors.llm`: ``openai_chat``, ``openai_responses``, ``openai_embeddings``,
  ``anthropic_messages`` (cost functions, token-usage readers and stream metering).
"""

from __future__ import annotations

from keybrake.pricing.model import Registry
from keybrake.pricing.vendors import generic, llm, resend, stripe, twilio

__all__ = ["generic", "llm", "register_all", "resend", "stripe", "twilio"]


def register_all(registry: Registry) -> None:
    """Register every built-in vendor module's pricing code into ``registry``."""
    for module in (generic, stripe, twilio, resend, llm):
        module.register(registry)
