"""The dashboard's issuer tokens and vendor freezes page (``/dashboard/issuers``).

`Dashboard` inherits these handlers: list, create (the token is shown once) and revoke issuer
tokens (optionally with every key they minted), and freeze or unfreeze a vendor. Every change
goes through `keybrake.vault.Vault`, as the admin API's and the command line's do.
"""

from __future__ import annotations

from typing import Any, Protocol

from mitmproxy import http

from keybrake.vault import CreateIssuerRequest, KeySpecError, issuer_to_json
from keybrake.web._pages import DashboardPart

__all__ = ["IssuerPages"]


class _Session(Protocol):
    flash: list[str]
    reveal_issuer: dict[str, str] | None


class IssuerPages(DashboardPart):
    """``GET /dashboard/issuers`` and its forms (see the module)."""

    async def _issuers_page(
        self,
        session: _Session,
        errors: dict[str, str] | None = None,
        values: dict[str, str] | None = None,
    ) -> http.Response:
        rt = self.runtime
        vault = self._vault(await rt.open_store())
        now = rt.now()
        reveal, session.reveal_issuer = session.reveal_issuer, None
        flash, session.flash = session.flash, []
        return self._page(
            "issuers.html",
            {
                "issuers": [issuer_to_json(i, now) for i in await vault.issuers()],
                "freezes": await vault.freezes(),
                "vendors": sorted(rt.policies.vendors) if rt.policies else [],
                "reveal": reveal,
                "flash": flash,
                "errors": errors or {},
                "values": values or {"max_expires_in": "24h"},
            },
            session,
            status=422 if errors else 200,
        )

    async def _create_issuer(self, session: _Session, form: dict[str, str]) -> http.Response:
        rt = self.runtime
        assert rt.policies is not None
        vendor = form.get("vendor", "")
        body: dict[str, Any] = {
            "name": form.get("name", "").strip(),
            "vendors": [vendor],
            "label_prefix": form.get("label_prefix", "").strip(),
            "allowed_endpoints": [
                line.strip() for line in form.get("allowed_endpoints", "").splitlines()
            ],
            "max_daily_usd_cap": form.get("max_daily_usd_cap", "").strip(),
            "max_expires_in": form.get("max_expires_in", "").strip() or "24h",
        }
        body["allowed_endpoints"] = [e for e in body["allowed_endpoints"] if e]
        for name in ("max_usd_cap", "expires_in"):
            if form.get(name, "").strip():
                body[name] = form[name].strip()
        try:
            request = CreateIssuerRequest.from_json(body, rt.policies)
        except KeySpecError as e:
            return await self._issuers_page(session, e.fields, form)
        vault = self._vault(await rt.open_store())
        record, token = await vault.create_issuer(request)
        # Post/redirect/get: a reload must not create a second token; it is shown once.
        session.reveal_issuer = {"issuer_id": record.issuer_id, "token": token}
        return self._redirect_to("/dashboard/issuers")

    async def _revoke_issuer(
        self, session: _Session, issuer_id: str, form: dict[str, str]
    ) -> http.Response:
        vault = self._vault(await self.runtime.open_store())
        issuer, keys = await vault.revoke_issuer(
            issuer_id, revoke_keys=form.get("revoke_keys") == "1"
        )
        if issuer is None:
            session.flash.append(f"No issuer {issuer_id[:64]}.")
        else:
            with_keys = f" and {len(keys)} keys it minted" if form.get("revoke_keys") else ""
            session.flash.append(f"Revoked {issuer.issuer_id}{with_keys}.")
        return self._redirect_to("/dashboard/issuers")

    async def _freeze(
        self, session: _Session, vendor: str, action: str, form: dict[str, str]
    ) -> http.Response:
        rt = self.runtime
        vault = self._vault(await rt.open_store())
        if rt.policies is None or vendor not in rt.policies.vendors:
            session.flash.append(f"No vendor policy named {vendor[:40]}.")
        elif action == "freeze":
            await vault.freeze(vendor, form.get("reason", "").strip() or "frozen (dashboard)")
            session.flash.append(f"Froze {vendor}: every call is refused until unfrozen.")
        elif await vault.unfreeze(vendor):
            session.flash.append(f"Lifted the freeze of {vendor}.")
        return self._redirect_to("/dashboard/issuers")
