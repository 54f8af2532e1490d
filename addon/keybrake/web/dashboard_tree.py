"""The dashboard's budget tree page (``/dashboard/tree``): issuer → run label → key, with spent,
reserved and remaining per node, and a drill-down from an issuer to its labels, from a label
to its keys, and from a key to its audit rows (``/dashboard/audit?key=…``).

Server-rendered from `keybrake.vault.Vault.tree`, the same report as ``GET /vault/tree`` and
``keybrake spend --tree``; the query (``?issuer=<id>`` or ``operator``, ``&label=<label>``)
only chooses how deep the page opens.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from keybrake.web._pages import DashboardPart

__all__ = ["TreePage"]

OPERATOR = "operator"


class TreePage(DashboardPart):
    """``GET /dashboard/tree`` (see the module)."""

    async def _tree_page(self, flow: http.HTTPFlow, session: Any) -> http.Response:
        tree = await self._vault(await self.runtime.open_store()).tree()
        q = flow.request.query
        chosen_root, chosen_label = q.get("issuer") or "", q.get("label")
        root = None
        for candidate in tree["data"]:
            if (candidate["issuer_id"] or OPERATOR) == chosen_root:
                root = candidate
        label = None
        if root is not None and chosen_label is not None:
            label = next((lb for lb in root["labels"] if (lb["label"] or "") == chosen_label), None)
        return self._page(
            "tree.html",
            {"tree": tree, "root": root, "label": label, "operator": OPERATOR},
            session,
            status=404 if (chosen_root and root is None) else 200,
        )
