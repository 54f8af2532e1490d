"""Vendor-specific counters and cost functions that policy YAML can name.

Importing this package registers them in `keybrake.pricing.COUNTERS`,
`keybrake.pricing.COST_FUNCTIONS` and `keybrake.pricing.ASYNC_COST_FUNCTIONS`:

- `keybrake.vendors.generic`: ``list_items``, ``integer_fields`` (for YAML-only vendors).
- `keybrake.vendors.stripe`: ``stripe_checkout_session``, ``stripe_subscription``,
  ``stripe_invoice``, ``stripe_invoice_item``.
- `keybrake.vendors.twilio`: ``sms_segments``.
- `keybrake.vendors.resend`: ``email_recipients``, ``email_batch_recipients``.
- `keybrake.vendors.llm`: ``openai_chat``, ``openai_responses``, ``openai_embeddings``,
  ``anthropic_messages`` (cost functions, token-usage readers and stream metering).
"""

from keybrake.vendors import generic, llm, resend, stripe, twilio

__all__ = ["generic", "llm", "resend", "stripe", "twilio"]
