"""``keybrake keys …`` and ``keybrake budgets …``: the vault use-cases on the local store,
or through a proxy's admin API with ``--admin-url``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from keybrake.cli._common import (
    AdminTokenFile,
    AdminUrl,
    AsJson,
    DataDir,
    KeyArg,
    PoliciesDir,
    StoreUrl,
    _cli_store_url,
    _dollars,
    _fail,
    _no_key,
    _note,
    _open_store,
    _remote,
    _run_vault,
)
from keybrake.cli._packaged import (
    policies_dir,
)
from keybrake.core.policy import PolicyError, load_policies
from keybrake.store import (
    SQLiteStore,
    redact_url,
)
from keybrake.vault import (
    IssueKeyRequest,
    KeyCapsChange,
    KeySpecError,
    Vault,
    is_vault_key,
    key_to_json,
    parse_label_budget,
)

if TYPE_CHECKING:
    pass


def keys_issue(
    vendor: Annotated[str, typer.Option(help="Vendor name from policies/, e.g. stripe.")],
    daily_usd_cap: Annotated[str, typer.Option(help="Daily cap in USD, e.g. 300 or 12.50.")],
    allow: Annotated[
        list[str], typer.Option(help="Allowed endpoint, repeatable: 'POST /v1/payment_intents'.")
    ],
    label: Annotated[str, typer.Option(help="agent_run_label, e.g. dramatiq/nightly-billing.")],
    expires_in: Annotated[str, typer.Option(help="30m, 2h, 7d or ISO-8601 (PT2H).")] = "1h",
    usd_cap: Annotated[str | None, typer.Option(help="Optional lifetime cap in USD.")] = None,
    max_requests_per_minute: Annotated[
        int | None,
        typer.Option(help="Request-rate limit (any 60 s); default: the vendor policy's."),
    ] = None,
    account: Annotated[
        list[str] | None,
        typer.Option(
            help="A connected account the key may act on (Stripe-Account: acct_...), "
            "repeatable; none by default."
        ),
    ] = None,
    data_dir: DataDir = Path(".keybrake"),
    policies: PoliciesDir = None,
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Issue a vault key; it is printed once and never stored.

    With --admin-url the proxy's own policies check it (--policies is not used).

    Example: keybrake keys issue --vendor stripe --daily-usd-cap 300 --allow 'POST /v1/payment_intents' --expires-in 2h --label dramatiq/nightly-billing
    """  # noqa: E501
    fields: dict[str, Any] = {
        "vendor": vendor,
        "daily_usd_cap": daily_usd_cap,
        "usd_cap": usd_cap,
        "allowed_endpoints": allow,
        "expires_in": expires_in,
        "agent_run_label": label,
        "max_requests_per_minute": max_requests_per_minute,
        "allowed_accounts": account or None,
    }
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            sent = {k: v for k, v in fields.items() if v is not None}
            body: dict[str, Any] = api.call("POST", "/vault/keys", body=sent)
    else:
        try:
            request = IssueKeyRequest.from_json(fields, load_policies(policies_dir(policies)))
        except (PolicyError, KeySpecError) as e:
            _fail(str(e), 2)
        record, vault_key = _run_vault(store, data_dir, lambda v: v.issue(request))
        body = key_to_json(record, dt.datetime.now(dt.UTC)) | {"vault_key": vault_key}
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        typer.echo(f"{body['key_id']}  expires {body['expires_at']}\n{body['vault_key']}")


def keys_list(
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """List vault keys with today's spend (never secrets).

    Example: keybrake keys list --admin-url http://10.0.0.5:8081
    """
    rows: list[dict[str, Any]]
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            rows = api.items("/vault/keys")
        where = admin_url
    else:
        now = dt.datetime.now(dt.UTC)
        rows = [view.to_json(now) for view in _run_vault(store, data_dir, Vault.keys)]
        url = _cli_store_url(store, data_dir)
        s = _open_store(url)
        where = str(s.path.resolve()) if isinstance(s, SQLiteStore) else redact_url(url)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"No vault keys in {where}: issue one with `keybrake keys issue`.")
        return
    typer.echo(
        f"{'KEY_ID':22} {'VENDOR':8} {'STATUS':9} {'CAP':>10} {'SPENT':>10} {'EXPIRES':21} LABEL"
    )
    for r in rows:
        typer.echo(
            f"{r['key_id']:22} {r['vendor']:8} {r['status']:9} {_dollars(r['daily_usd_cap']):>10} "
            f"{_dollars(r.get('spent_today_usd')):>10} {r['expires_at']:21} {r['agent_run_label']}"
        )


def keys_revoke(
    key: KeyArg,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Revoke a vault key; the next request with it is refused on every replica.

    Given the vault key itself (a leaked one), only its key id is printed.

    Example: keybrake keys revoke key_7Hq2... (or: keybrake keys revoke "$LEAKED_VAULT_KEY")
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            if is_vault_key(key):
                body = api.call("POST", "/vault/revoke", body={"vault_key": key})
            else:
                body = api.call("DELETE", f"/vault/keys/{quote(key, safe='')}")
        typer.echo(f"revoked {body['key_id']}")
        return
    rec = _local_key_action(key, data_dir, store, Vault.revoke)
    typer.echo(f"revoked {rec.key_id}")


def _local_key_action(
    key: str, data_dir: Path, store: str, action: Callable[[Vault, str], Awaitable[Any]]
) -> Any:
    """Run ``action`` on the key an argument names (a key id or a vault key); exit 4 if none."""

    async def act(vault: Vault) -> Any:
        found = await vault.find(key)
        return None if found is None else await action(vault, found.key_id)

    rec = _run_vault(store, data_dir, act)
    if rec is None:
        _fail(_no_key(key), 4)
    return rec


def _remote_key_path(key: str, action: str = "") -> str:
    if is_vault_key(key):
        _fail("with --admin-url, name the key by its key id (key_...), not the vault key", 2)
    return f"/vault/keys/{quote(key, safe='')}{action}"


def keys_suspend(
    key: KeyArg,
    reason: Annotated[str, typer.Option(help="Why, shown with every refusal.")] = "by operator",
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Suspend a vault key: refused (403 key_suspended) on every replica until resumed.

    The proxy suspends a key by itself when a call cost more than its estimate.

    Example: keybrake keys suspend key_123 --reason "investigating a refund loop"
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            path = _remote_key_path(key, "/suspend")
            body = api.call("POST", path, body={"reason": reason})
        typer.echo(f"suspended {body['key_id']} ({body['suspended_reason']})")
        return
    rec = _local_key_action(key, data_dir, store, lambda v, key_id: v.suspend(key_id, reason))
    typer.echo(f"suspended {rec.key_id} ({rec.suspended_reason})")


def keys_resume(
    key: KeyArg,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Lift a suspension (harmless when the key is not suspended).

    Example: keybrake keys resume key_123
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            body = api.call("POST", _remote_key_path(key, "/resume"))
        typer.echo(f"resumed {body['key_id']}")
        return
    rec = _local_key_action(key, data_dir, store, Vault.resume)
    typer.echo(f"resumed {rec.key_id}")


def keys_set_cap(
    key: KeyArg,
    daily_usd_cap: Annotated[
        str | None, typer.Option(help="The new daily cap in USD.", show_default=False)
    ] = None,
    usd_cap: Annotated[
        str | None, typer.Option(help="The new lifetime cap in USD.", show_default=False)
    ] = None,
    no_usd_cap: Annotated[
        bool, typer.Option("--no-usd-cap", help="Remove the lifetime cap.")
    ] = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Raise or lower a key's daily or lifetime cap; every replica's next call uses it.

    A cap below what the key has spent is allowed: its paid calls are refused from then on
    (until the next UTC day, for the daily cap). Nothing spent or reserved moves.

    Example: keybrake keys set-cap key_123 --daily-usd-cap 50
    """
    fields: dict[str, Any] = {}
    if daily_usd_cap is not None:
        fields["daily_usd_cap"] = daily_usd_cap
    if usd_cap is not None and no_usd_cap:
        _fail("--usd-cap and --no-usd-cap: give one of them", 2)
    if usd_cap is not None or no_usd_cap:
        fields["usd_cap"] = usd_cap
    if not fields:
        _fail("give --daily-usd-cap, --usd-cap or --no-usd-cap", 2)
    try:
        change = KeyCapsChange.from_json(fields)
    except KeySpecError as e:
        _fail(str(e), 2)
    body: dict[str, Any]
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            body = api.call("PATCH", _remote_key_path(key), body=fields)
    else:
        view = _local_key_action(key, data_dir, store, lambda v, key_id: v.set_caps(key_id, change))
        body = view.to_json(dt.datetime.now(dt.UTC))
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    lifetime = _dollars(body["usd_cap"]) or "none"
    typer.echo(
        f"{body['key_id']}: daily cap {_dollars(body['daily_usd_cap'])}, lifetime cap "
        f"{lifetime}; spent today {_dollars(body.get('spent_today_usd'))}, remaining "
        f"{_dollars(body.get('remaining_usd')) or 'no limit'}"
    )
    if body.get("remaining_usd") in ("0.00", "0"):
        _note(f"{body['key_id']} has no room left under its caps: its paid calls are refused")


def _show_budget(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    parts = []
    if body.get("daily_usd_cap") is not None:
        parts.append(f"daily cap {_dollars(body['daily_usd_cap'])}")
    if body.get("usd_cap") is not None:
        parts.append(f"lifetime cap {_dollars(body['usd_cap'])}")
    if body.get("max_requests_per_minute") is not None:
        parts.append(f"{body['max_requests_per_minute']} requests per minute")
    if not parts:
        typer.echo(f"{body['label']}: no label cap (each key's own caps still apply)")
    else:
        typer.echo(f"{body['label']}: {', '.join(parts)} (shared)")


def budgets_set(
    label: Annotated[str, typer.Argument(help="The agent_run_label, e.g. dramatiq/nightly.")],
    daily_usd_cap: Annotated[
        str | None, typer.Option(help="The shared daily cap in USD.", show_default=False)
    ] = None,
    usd_cap: Annotated[
        str | None, typer.Option(help="The shared lifetime cap in USD.", show_default=False)
    ] = None,
    max_requests_per_minute: Annotated[
        int | None,
        typer.Option(
            help="At most this many requests per minute, all keys of the label together.",
            show_default=False,
        ),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the label's limits.")] = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Cap what every key with a label may spend per UTC day and in all, and how many
    requests they may make per minute, together. Sets every limit at once: one left out is
    removed.

    Example: keybrake budgets set dramatiq/nightly-billing --daily-usd-cap 500 --usd-cap 5000
    """
    given = (daily_usd_cap, usd_cap, max_requests_per_minute)
    if all(v is None for v in given) == (not remove) or (remove and any(given)):
        _fail("give --daily-usd-cap N, --usd-cap N, --max-requests-per-minute N, or --remove", 2)
    request: dict[str, Any] = {
        "daily_usd_cap": daily_usd_cap,
        "usd_cap": usd_cap,
        "max_requests_per_minute": max_requests_per_minute,
    }
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            path = f"/vault/budgets/{quote(label, safe='')}"
            _show_budget(api.call("PUT", path, body=request), as_json)
        return
    try:
        cap = parse_label_budget(label, request)
    except KeySpecError as e:
        _fail(str(e), 2)
    _show_budget(_run_vault(store, data_dir, lambda v: v.set_label_budget(label, cap)), as_json)


def budgets_show(
    label: Annotated[str, typer.Argument(help="The agent_run_label.")],
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """A label's shared daily cap.

    Example: keybrake budgets show dramatiq/nightly-billing
    """
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            _show_budget(api.call("GET", f"/vault/budgets/{quote(label, safe='')}"), as_json)
        return
    _show_budget(_run_vault(store, data_dir, lambda v: v.label_budget(label)), as_json)
