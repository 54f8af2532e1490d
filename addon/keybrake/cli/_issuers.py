"""``keybrake issuers …``, the kill switches (``keybrake keys revoke-all|suspend-all|
resume-all``) and ``keybrake freeze|unfreeze|frozen``: the vault use-cases on the local store,
or through a proxy's admin API with ``--admin-url`` (where an issuer token may be the bearer:
``--admin-token-file``)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from keybrake.cli._common import (
    AdminTokenFile,
    AdminUrl,
    AsJson,
    DataDir,
    PoliciesDir,
    StoreUrl,
    _dollars,
    _fail,
    _remote,
    _run_vault,
)
from keybrake.cli._packaged import policies_dir
from keybrake.core.policy import PolicyError, load_policies
from keybrake.vault import (
    CreateIssuerRequest,
    KeySelector,
    KeySpecError,
    Vault,
    freeze_to_json,
    issuer_to_json,
    key_to_json,
)

__all__ = [
    "freeze",
    "frozen",
    "issuers_create",
    "issuers_list",
    "issuers_revoke",
    "keys_resume_all",
    "keys_revoke_all",
    "keys_suspend_all",
    "unfreeze",
]


def _issuer_endpoints(allow: list[str], vendors: list[str]) -> dict[str, list[str]]:
    """``--allow`` values as the API takes them: ``'POST /v1/x'`` (one vendor) or
    ``'twilio:POST /2010-04-01/…'`` (naming the vendor)."""
    out: dict[str, list[str]] = {}
    for spec in allow:
        head = spec.strip().partition(" ")[0]
        vendor, sep, _ = head.partition(":")
        if sep:
            out.setdefault(vendor, []).append(spec.strip()[len(vendor) + 1 :])
        elif len(vendors) == 1:
            out.setdefault(vendors[0], []).append(spec)
        else:
            _fail(f"--allow {spec!r}: with several vendors, name one: 'stripe:{spec}'", 2)
    return out


def _issuer_line(body: dict[str, Any]) -> str:
    expires = body.get("expires_at") or "never"
    return (
        f"{body['issuer_id']:21} {body['status']:8} {','.join(body['vendors']):16} "
        f"{_dollars(body['max_daily_usd_cap']):>10} {expires:21} {body['label_prefix']}"
        + (f"  ({body['name']})" if body.get("name") else "")
    )


def issuers_create(
    vendor: Annotated[list[str], typer.Option(help="Vendor it may issue keys for, repeatable.")],
    label_prefix: Annotated[
        str, typer.Option(help="Keys it issues are labelled under this, e.g. beam/billing/.")
    ],
    allow: Annotated[
        list[str],
        typer.Option(
            help="An endpoint its keys may be granted, repeatable: 'POST /v1/payment_intents' "
            "(with several vendors: 'stripe:POST /v1/payment_intents')."
        ),
    ],
    max_daily_usd_cap: Annotated[str, typer.Option(help="Largest daily cap of a key, USD.")],
    max_usd_cap: Annotated[
        str | None, typer.Option(help="Largest lifetime cap; keys must then have one.")
    ] = None,
    max_expires_in: Annotated[str, typer.Option(help="Longest key lifetime.")] = "24h",
    account: Annotated[
        list[str] | None, typer.Option(help="A connected account keys may name, repeatable.")
    ] = None,
    budget_daily_usd_cap: Annotated[
        str | None,
        typer.Option(help="The issuer's own daily budget: every key it mints draws from it."),
    ] = None,
    budget_usd_cap: Annotated[
        str | None,
        typer.Option(help="The issuer's own lifetime budget: every key it mints draws from it."),
    ] = None,
    budget_max_requests_per_minute: Annotated[
        int | None,
        typer.Option(help="At most this many requests per minute, every key it minted together."),
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="When the token itself expires (default: never).")
    ] = None,
    name: Annotated[str, typer.Option(help="What it is for, shown in lists.")] = "",
    data_dir: DataDir = Path(".keybrake"),
    policies: PoliciesDir = None,
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Create an issuer token; it is printed once and never stored (only its SHA-256 is).

    Example: keybrake issuers create --vendor stripe --label-prefix beam/billing/ --allow 'POST /v1/payment_intents' --max-daily-usd-cap 300 --max-expires-in 2h --name 'beam billing driver'
    """  # noqa: E501
    fields: dict[str, Any] = {
        "name": name,
        "vendors": vendor,
        "label_prefix": label_prefix,
        "allowed_endpoints": _issuer_endpoints(allow, vendor),
        "max_daily_usd_cap": max_daily_usd_cap,
        "max_usd_cap": max_usd_cap,
        "max_expires_in": max_expires_in,
        "allowed_accounts": account or None,
        "budget_daily_usd_cap": budget_daily_usd_cap,
        "budget_usd_cap": budget_usd_cap,
        "budget_max_requests_per_minute": budget_max_requests_per_minute,
        "expires_in": expires_in,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            body: dict[str, Any] = api.call("POST", "/vault/issuers", body=fields)
    else:
        try:
            request = CreateIssuerRequest.from_json(fields, load_policies(policies_dir(policies)))
        except (PolicyError, KeySpecError) as e:
            _fail(str(e), 2)
        record, token = _run_vault(store, data_dir, lambda v: v.create_issuer(request))
        body = issuer_to_json(record, dt.datetime.now(dt.UTC)) | {"token": token}
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        typer.echo(f"{body['issuer_id']}  under {body['label_prefix']}\n{body['token']}")


def issuers_list(
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """List issuer tokens and their limits (never the tokens).

    Example: keybrake issuers list
    """
    rows: list[dict[str, Any]]
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            rows = api.items("/vault/issuers")
    else:
        now = dt.datetime.now(dt.UTC)
        rows = [issuer_to_json(i, now) for i in _run_vault(store, data_dir, Vault.issuers)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("No issuer tokens: create one with `keybrake issuers create`.")
        return
    typer.echo(
        f"{'ISSUER_ID':21} {'STATUS':8} {'VENDORS':16} {'MAX_CAP':>10} {'EXPIRES':21} PREFIX"
    )
    for r in rows:
        typer.echo(_issuer_line(r))


def issuers_revoke(
    issuer_id: Annotated[str, typer.Argument(help="The issuer id (iss_...).")],
    revoke_keys: Annotated[
        bool, typer.Option("--revoke-keys", help="Revoke every key it minted too.")
    ] = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Revoke an issuer token (its next use is refused); --revoke-keys: its keys as well.

    Example: keybrake issuers revoke iss_3f9a1c2b7d4e8f60 --revoke-keys
    """
    keys: list[str]
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            params = {"revoke_keys": "1" if revoke_keys else None}
            body = api.call("DELETE", f"/vault/issuers/{quote(issuer_id, safe='')}", params)
        keys = body["revoked_keys"]
    else:
        issuer, records = _run_vault(
            store, data_dir, lambda v: v.revoke_issuer(issuer_id, revoke_keys=revoke_keys)
        )
        if issuer is None:
            _fail(f"no issuer {issuer_id!r}", 4)
        keys = [k.key_id for k in records]
    typer.echo(f"revoked {issuer_id}" + (f" and {len(keys)} keys it minted" if revoke_keys else ""))
    for key_id in keys:
        typer.echo(f"  revoked {key_id}")


_PAST = {"revoke": "revoked", "suspend": "suspended", "resume": "resumed"}


def _bulk(
    action: str,
    label_prefix: str | None,
    issuer: str | None,
    reason: str | None,
    dry_run: bool,
    data_dir: Path,
    store: str,
    admin_url: str | None,
    admin_token_file: Path | None,
    as_json: bool,
) -> None:
    fields = {"label_prefix": label_prefix, "issuer_id": issuer, "reason": reason}
    fields = {k: v for k, v in fields.items() if v is not None}
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            params = {"dry_run": "1" if dry_run else None}
            rows = api.call("POST", f"/vault/bulk/{action}", params, body=fields)["data"]
    else:
        try:
            selector = KeySelector.from_json(fields)
        except KeySpecError as e:
            _fail(str(e), 2)
        records = _run_vault(
            store,
            data_dir,
            lambda v: v.stop_keys(selector, action, reason=reason, dry_run=dry_run),
        )
        now = dt.datetime.now(dt.UTC)
        rows = [key_to_json(k, now) for k in records]
    if as_json:
        typer.echo(json.dumps({"action": action, "dry_run": dry_run, "data": rows}, indent=2))
        return
    verb = f"would {action}" if dry_run else _PAST[action]
    typer.echo(f"{verb} {len(rows)} keys")
    for r in rows:
        typer.echo(f"  {r['key_id']:22} {r['vendor']:8} {r['status']:9} {r['agent_run_label']}")


BulkPrefix = Annotated[
    str | None,
    typer.Option(
        help="Every key whose label is this or under it (segment-wise).", show_default=False
    ),
]
BulkIssuer = Annotated[
    str | None,
    typer.Option("--issuer", help="Every key this issuer minted (iss_...).", show_default=False),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="List the keys; change nothing.")]


def keys_revoke_all(
    label_prefix: BulkPrefix = None,
    issuer: BulkIssuer = None,
    dry_run: DryRun = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Kill switch: revoke every key under a label prefix and/or minted by an issuer; each
    is refused on every replica from its next request.

    Example: keybrake keys revoke-all --label-prefix beam/billing/ --dry-run
    """
    _bulk(
        "revoke",
        label_prefix,
        issuer,
        None,
        dry_run,
        data_dir,
        store,
        admin_url,
        admin_token_file,
        as_json,
    )


def keys_suspend_all(
    label_prefix: BulkPrefix = None,
    issuer: BulkIssuer = None,
    reason: Annotated[str, typer.Option(help="Why, shown with every refusal.")] = "kill switch",
    dry_run: DryRun = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Kill switch: suspend every key under a label prefix and/or minted by an issuer
    (undo with resume-all).

    Example: keybrake keys suspend-all --issuer iss_3f9a1c2b7d4e8f60 --reason "runaway run"
    """
    _bulk(
        "suspend",
        label_prefix,
        issuer,
        reason,
        dry_run,
        data_dir,
        store,
        admin_url,
        admin_token_file,
        as_json,
    )


def keys_resume_all(
    label_prefix: BulkPrefix = None,
    issuer: BulkIssuer = None,
    dry_run: DryRun = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Resume every suspended key under a label prefix and/or minted by an issuer.

    Example: keybrake keys resume-all --label-prefix beam/billing/
    """
    _bulk(
        "resume",
        label_prefix,
        issuer,
        None,
        dry_run,
        data_dir,
        store,
        admin_url,
        admin_token_file,
        as_json,
    )


def _known_vendor(vendor: str, policies: Path | None) -> None:
    try:
        known = load_policies(policies_dir(policies)).vendors
    except PolicyError as e:
        _fail(str(e), 2)
    if vendor not in known:
        _fail(f"no vendor policy named {vendor!r} (known: {', '.join(sorted(known))})", 4)


def freeze(
    vendor: Annotated[str, typer.Argument(help="The vendor to stop, e.g. stripe.")],
    reason: Annotated[
        str, typer.Option(help="Why, shown with every refusal.")
    ] = "frozen by an operator",
    data_dir: DataDir = Path(".keybrake"),
    policies: PoliciesDir = None,
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Refuse every call to a vendor (503 vendor_frozen, never retried) on every replica from
    the next request, until `keybrake unfreeze`: a compromised or mis-billing account.

    Example: keybrake freeze stripe --reason "account compromised"
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            api.call("PUT", f"/vault/freezes/{quote(vendor, safe='')}", body={"reason": reason})
    else:
        _known_vendor(vendor, policies)
        _run_vault(store, data_dir, lambda v: v.freeze(vendor, reason))
    typer.echo(f"froze {vendor}: every call is refused until `keybrake unfreeze {vendor}`")


def unfreeze(
    vendor: Annotated[str, typer.Argument(help="The vendor to let through again.")],
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Lift a vendor freeze.

    Example: keybrake unfreeze stripe
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            lifted = api.call("DELETE", f"/vault/freezes/{quote(vendor, safe='')}")["lifted"]
    else:
        lifted = _run_vault(store, data_dir, lambda v: v.unfreeze(vendor))
    typer.echo(f"lifted the freeze of {vendor}" if lifted else f"{vendor} was not frozen")


def frozen(
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """List frozen vendors.

    Example: keybrake frozen
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            rows = api.items("/vault/freezes")
    else:
        rows = [freeze_to_json(f) for f in _run_vault(store, data_dir, Vault.freezes)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("No vendor is frozen.")
    else:
        for r in rows:
            typer.echo(f"{r['vendor']:10} since {r['frozen_at']}  {r['reason']}")
