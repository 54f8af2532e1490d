"""Vendor-specific counters and cost functions that policy YAML can name.

Importing this package registers them in `keybrake.pricing.COUNTERS` and
`keybrake.pricing.COST_FUNCTIONS`.
"""

__all__: list[str] = []
