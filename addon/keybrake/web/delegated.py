"""The admin API's delegated issuing and kill switches (`AdminApi` inherits these routes).

With the admin token:

- ``POST /vault/issuers`` create an issuer token (shown once, in this response only);
  ``GET /vault/issuers``, ``GET /vault/issuers/{issuer_id}``;
  ``DELETE /vault/issuers/{issuer_id}[?revoke_keys=1]`` revoke it (and every key it minted)
- ``POST /vault/bulk/{revoke|suspend|resume}[?dry_run=1]`` with
  ``{"label_prefix": "beam/billing/", "issuer_id": "iss_…", "reason": "…"}``: every key
  selected, in one call; ``dry_run`` lists them and changes nothing
- ``GET /vault/freezes``, ``PUT /vault/freezes/{vendor}`` (``{"reason": "…"}``),
  ``DELETE /vault/freezes/{vendor}``: every call to a frozen vendor is refused
  (``503 vendor_frozen``, never retried) until the freeze is lifted

With an issuer token (`keybrake.vault.issuers`) only `IssuerRoutes.route_for_issuer`'s routes
answer, each within the token's scope; everything else is ``403 issuer_scope``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from mitmproxy import http

from keybrake.core.errors import Refusal
from keybrake.core.keys import hash_vault_key
from keybrake.proxy.core import Runtime
from keybrake.store import IssuerRecord, KeyRecord
from keybrake.vault import (
    ACTIONS,
    CreateIssuerRequest,
    IssueKeyRequest,
    IssuerScopeError,
    KeySelector,
    KeySpecError,
    Vault,
    covers,
    freeze_to_json,
    issuer_to_json,
    key_to_json,
    label_under,
)

__all__ = ["IssuerRoutes", "json_response"]


def json_response(status: int, payload: Any) -> http.Response:
    return http.Response.make(
        status,
        json.dumps(payload, separators=(",", ":")).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def scope_refusal(message: str, fields: dict[str, str] | None = None) -> Refusal:
    return Refusal("issuer_scope", message, extra={"fields": fields} if fields else None)


def _invalid(e: KeySpecError) -> Refusal:
    return Refusal("invalid_request", str(e), extra={"fields": e.fields})


def _flag(flow: http.HTTPFlow, name: str) -> bool:
    return flow.request.query.get(name, "").lower() in ("1", "true", "yes")


class IssuerRoutes:
    """Routes for issuer tokens, bulk key actions and vendor freezes (see the module)."""

    runtime: Runtime

    # Provided by `AdminApi`.
    def _body(self, flow: http.HTTPFlow) -> Any:
        raise NotImplementedError

    async def _vault(self) -> Vault:
        raise NotImplementedError

    async def _spend(
        self, flow: http.HTTPFlow, issuer: IssuerRecord | None = None
    ) -> http.Response:
        raise NotImplementedError

    async def _audit(
        self, flow: http.HTTPFlow, issuer: IssuerRecord | None = None
    ) -> http.Response:
        raise NotImplementedError

    async def _get_budget(self, label: str) -> http.Response:
        raise NotImplementedError

    # -- the admin token -------------------------------------------------------------------------
    async def route_delegation(
        self, flow: http.HTTPFlow, method: str, parts: list[str]
    ) -> http.Response | None:
        """The admin token's routes of this module; None when ``parts`` is none of them."""
        if parts[:2] == ["vault", "issuers"] and len(parts) <= 3:
            return await self._issuers(flow, method, parts[2:])
        if parts[:2] == ["vault", "bulk"] and len(parts) == 3:
            if method != "POST":
                raise Refusal("method_not_allowed", f"{method} not allowed on a bulk action")
            return await self._bulk(flow, parts[2], None)
        if parts[:2] == ["vault", "freezes"] and len(parts) <= 3:
            return await self._freezes(flow, method, parts[2:])
        return None

    async def _issuers(self, flow: http.HTTPFlow, method: str, rest: list[str]) -> http.Response:
        rt = self.runtime
        vault = await self._vault()
        if not rest:
            if method == "POST":
                assert rt.policies is not None
                try:
                    request = CreateIssuerRequest.from_json(self._body(flow), rt.policies)
                except KeySpecError as e:
                    raise _invalid(e) from None
                record, token = await vault.create_issuer(request)
                return json_response(201, issuer_to_json(record, rt.now()) | {"token": token})
            if method == "GET":
                now = rt.now()
                data = [issuer_to_json(i, now) for i in await vault.issuers()]
                return json_response(200, {"object": "list", "data": data})
            raise Refusal("method_not_allowed", f"{method} not allowed on /vault/issuers")
        issuer_id = rest[0]
        if method == "GET":
            found = await vault.issuer(issuer_id)
            if found is None:
                raise _no_issuer(issuer_id)
            return json_response(200, issuer_to_json(found, rt.now()))
        if method == "DELETE":
            revoked, keys = await vault.revoke_issuer(
                issuer_id, revoke_keys=_flag(flow, "revoke_keys")
            )
            if revoked is None:
                raise _no_issuer(issuer_id)
            if rt.alerts is not None:
                rt.alerts.issuer_revoked(revoked, len(keys))
            body = issuer_to_json(revoked, rt.now())
            return json_response(200, body | {"revoked_keys": [k.key_id for k in keys]})
        raise Refusal("method_not_allowed", f"{method} not allowed on an issuer")

    async def _bulk(
        self, flow: http.HTTPFlow, action: str, issuer: IssuerRecord | None
    ) -> http.Response:
        """``POST /vault/bulk/{action}``: one call for every key selected."""
        if action not in ACTIONS:
            raise Refusal("not_found", f"no bulk action {action[:32]!r}: {', '.join(ACTIONS)}")
        data = self._body(flow)
        try:
            selector = KeySelector.from_json(data)
        except KeySpecError as e:
            raise _invalid(e) from None
        reason = data.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise Refusal("invalid_request", "reason must be a string")
        if issuer is not None:
            _check_selector(issuer, selector, action)
        dry_run = _flag(flow, "dry_run")
        keys = await (await self._vault()).stop_keys(
            selector, action, reason=reason, dry_run=dry_run, issuer=issuer
        )
        alerts = self.runtime.alerts
        if alerts is not None and keys and not dry_run and action in ("revoke", "suspend"):
            alerts.keys_stopped(action, selector.to_json(), [k.key_id for k in keys])
        now = self.runtime.now()
        return json_response(
            200,
            {
                "object": "bulk_action",
                "action": action,
                "dry_run": dry_run,
                "selector": selector.to_json(),
                "count": len(keys),
                "data": [key_to_json(k, now) for k in keys],
            },
        )

    async def _freezes(self, flow: http.HTTPFlow, method: str, rest: list[str]) -> http.Response:
        vault = await self._vault()
        if not rest:
            if method != "GET":
                raise Refusal("method_not_allowed", f"{method} not allowed on /vault/freezes")
            data = [freeze_to_json(f) for f in await vault.freezes()]
            return json_response(200, {"object": "list", "data": data})
        vendor = rest[0]
        policies = self.runtime.policies
        if method == "PUT":
            if policies is None or vendor not in policies.vendors:
                raise Refusal("not_found", f"no vendor policy named {vendor[:40]!r}")
            data = self._body(flow)
            reason = data.get("reason") if isinstance(data, dict) else None
            if reason is not None and not isinstance(reason, str):
                raise Refusal("invalid_request", "reason must be a string")
            return json_response(200, freeze_to_json(await vault.freeze(vendor, reason)))
        if method == "DELETE":
            lifted = await vault.unfreeze(vendor)
            return json_response(
                200, {"object": "vendor_freeze", "vendor": vendor, "lifted": lifted}
            )
        raise Refusal("method_not_allowed", f"{method} not allowed on a freeze")

    # -- an issuer token -------------------------------------------------------------------------
    async def route_for_issuer(
        self, flow: http.HTTPFlow, method: str, parts: list[str], path: str, issuer: IssuerRecord
    ) -> http.Response:
        """What an issuer token may do: issue, list, read, suspend and revoke keys in its
        scope; read spend, audit and label budgets under its prefix; bulk-revoke or suspend
        its keys; read its own record. Everything else is ``403 issuer_scope``."""
        rt = self.runtime
        if parts == ["vault", "keys"] and method == "POST":
            assert rt.policies is not None
            try:
                request = IssueKeyRequest.from_json(self._body(flow), rt.policies)
            except KeySpecError as e:
                raise _invalid(e) from None
            try:
                record, vault_key = await (await self._vault()).issue(request, issuer)
            except IssuerScopeError as e:
                raise scope_refusal(str(e), e.fields) from None
            return json_response(201, key_to_json(record, rt.now()) | {"vault_key": vault_key})
        if parts == ["vault", "keys"] and method == "GET":
            now = rt.now()
            views = await (await self._vault()).keys(issuer=issuer)
            return json_response(200, {"object": "list", "data": [v.to_json(now) for v in views]})
        if len(parts) == 3 and parts[:2] == ["vault", "keys"] and method in ("GET", "DELETE"):
            vault = await self._vault()
            await self._key_in_scope(vault, parts[2], issuer)
            if method == "GET":
                view = await vault.key(parts[2])
                assert view is not None
                return json_response(200, view.to_json(rt.now()))
            return await self._revoke_in_scope(vault, parts[2])
        if parts[:2] == ["vault", "keys"] and parts[3:] == ["suspend"] and method == "POST":
            vault = await self._vault()
            await self._key_in_scope(vault, parts[2], issuer)
            data = self._body(flow)
            reason = data.get("reason") if isinstance(data, dict) else None
            if reason is not None and not isinstance(reason, str):
                raise Refusal("invalid_request", "reason must be a string")
            key = await vault.suspend(parts[2], reason)
            assert key is not None
            return json_response(200, key_to_json(key, rt.now()))
        if parts == ["vault", "revoke"] and method == "POST":
            data = self._body(flow)
            secret = data.get("vault_key") if isinstance(data, dict) else None
            if not isinstance(secret, str) or not secret:
                raise Refusal("invalid_request", 'body must be {"vault_key": "kbv_..."}')
            vault = await self._vault()
            found = await vault.store.get_key_by_secret_hash(hash_vault_key(secret))
            if found is None:
                raise Refusal("not_found", "no vault key matches the vault key given")
            if not covers(issuer, found):
                raise scope_refusal(f"vault key {found.key_id} is outside this issuer's scope")
            return await self._revoke_in_scope(vault, found.key_id)
        if parts == ["vault", "spend"] and method == "GET":
            self._check_report_query(flow, issuer)
            return await self._spend(flow, issuer)
        if parts == ["vault", "tree"] and method == "GET":
            return json_response(200, await (await self._vault()).tree(issuer))
        if parts == ["vault", "audit"] and method == "GET":
            self._check_report_query(flow, issuer)
            return await self._audit(flow, issuer)
        if len(parts) >= 3 and parts[:2] == ["vault", "budgets"] and method == "GET":
            label = unquote(path[len("/vault/budgets/") :])
            if not label_under(label, issuer.label_prefix):
                raise scope_refusal(
                    f"label {label[:64]!r} is not under {issuer.label_prefix!r}",
                    {"label": f"must be under {issuer.label_prefix!r}"},
                )
            return await self._get_budget(label)
        if parts[:2] == ["vault", "bulk"] and len(parts) == 3 and method == "POST":
            return await self._bulk(flow, parts[2], issuer)
        if parts == ["vault", "issuers", issuer.issuer_id] and method == "GET":
            return json_response(200, issuer_to_json(issuer, rt.now()))
        raise scope_refusal(
            f"an issuer token may not {method} {path[:100]}: it issues, reads, suspends and "
            f"revokes keys under {issuer.label_prefix!r} and reads their spend and audit only"
        )

    async def _key_in_scope(self, vault: Vault, key_id: str, issuer: IssuerRecord) -> KeyRecord:
        found = await vault.store.get_key(key_id)
        if found is None:
            raise Refusal("not_found", f"no vault key {key_id[:64]!r}")
        if not covers(issuer, found):
            raise scope_refusal(f"vault key {found.key_id} is outside this issuer's scope")
        return found

    async def _revoke_in_scope(self, vault: Vault, key_id: str) -> http.Response:
        key = await vault.revoke(key_id)
        assert key is not None
        if self.runtime.alerts is not None:
            self.runtime.alerts.key_revoked(key, "an issuer token")
        return json_response(200, key_to_json(key, self.runtime.now()))

    @staticmethod
    def _check_report_query(flow: http.HTTPFlow, issuer: IssuerRecord) -> None:
        """Spend and audit: a label or vendor asked for must be in the issuer's scope (the
        rows are limited to it in any case)."""
        fields: dict[str, str] = {}
        label = flow.request.query.get("label")
        if label and not label_under(label, issuer.label_prefix):
            fields["label"] = f"must be under {issuer.label_prefix!r}"
        vendor = flow.request.query.get("vendor")
        if vendor and vendor not in issuer.vendors:
            fields["vendor"] = f"must be one of {', '.join(issuer.vendors)}"
        if fields:
            raise scope_refusal("outside this issuer's scope", fields)


def _check_selector(issuer: IssuerRecord, selector: KeySelector, action: str) -> None:
    """An issuer token stops keys in its own scope only, and never resumes one (a key the
    proxy suspended after an estimate overrun stays so until an operator looks)."""
    fields: dict[str, str] = {}
    if action == "resume":
        raise scope_refusal("an issuer token may not resume keys; an operator can")
    if selector.label_prefix is not None and not label_under(
        selector.label_prefix.rstrip("/"), issuer.label_prefix
    ):
        fields["label_prefix"] = f"must be under {issuer.label_prefix!r}"
    if selector.issuer_id is not None and selector.issuer_id != issuer.issuer_id:
        fields["issuer_id"] = "an issuer token selects its own keys only"
    if fields:
        raise scope_refusal("outside this issuer's scope", fields)


def _no_issuer(issuer_id: str) -> Refusal:
    return Refusal("not_found", f"no issuer {issuer_id[:64]!r}")
