"""What the dashboard's page mixins (`IssuerPages`, `TreePage`) use of `Dashboard`.

Each mixin holds one page's handlers; `Dashboard` inherits them and provides these.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from keybrake.proxy.core import Runtime
from keybrake.store import Store
from keybrake.vault import Vault

__all__ = ["DashboardPart"]


class DashboardPart:
    """The part of `Dashboard` a page mixin calls: the runtime, the vault, page rendering."""

    runtime: Runtime

    def _vault(self, store: Store) -> Vault:
        raise NotImplementedError

    def _page(
        self, template: str, context: dict[str, Any], session: Any = None, status: int = 200
    ) -> http.Response:
        raise NotImplementedError

    def _redirect_to(self, location: str) -> http.Response:
        raise NotImplementedError
