"""What every command shares: its option types, one-line failures, the store and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from keybrake.cli._admin_api import RemoteAdmin, RemoteError, remote_admin
from keybrake.core.errors import Refusal
from keybrake.core.money import MoneyError, format_usd, minor_unit_exponent
from keybrake.proxy._passthrough import parse_passthrough
from keybrake.proxy.preflight import PreflightError, check_data_dir, new_sqlite_file
from keybrake.store import (
    PASSWORD_ENV,
    Store,
    StoreUnavailable,
    open_store,
)
from keybrake.vault import (
    Vault,
    is_vault_key,
)

if TYPE_CHECKING:
    pass

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", envvar="KEYBRAKE_DATA_DIR", help="SQLite store, admin token, audit log."
    ),
]
PoliciesDir = Annotated[
    Path | None,
    typer.Option(
        "--policies",
        envvar="KEYBRAKE_POLICIES_DIR",
        help="Directory of vendor policy YAML files (default: ./policies if it exists, else "
        "the policies shipped with Keybrake; `keybrake init` writes editable copies).",
        show_default=False,
    ),
]
StoreUrl = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="KEYBRAKE_STORE",
        help="sqlite:///path.db (default: <data dir>/keybrake.db), redis://[user@]host:6379/0 "
        f"or rediss://… (TLS); the Redis password is best given in {PASSWORD_ENV}.",
    ),
]
CertsDir = Annotated[
    Path | None,
    typer.Option(
        "--certs-dir",
        envvar="KEYBRAKE_CERTS_DIR",
        help="Where the Keybrake CA lives (default: ~/.keybrake/certs, whatever the working "
        "directory).",
        show_default=False,
    ),
]
WaitForStore = Annotated[
    bool,
    typer.Option(
        "--wait-for-store",
        envvar="KEYBRAKE_WAIT_FOR_STORE",
        help="Start even when the store cannot be reached (for a supervisor that may start "
        "Keybrake before its Redis): vendor calls are refused (503 store_unavailable) until it "
        "can. Without it, an unreachable store stops the start with exit code 3.",
    ),
]
Passthrough = Annotated[
    list[str] | None,
    typer.Option(
        "--passthrough",
        metavar="PATTERN",
        help="A non-vendor destination to tunnel untouched (repeatable): a host glob such as "
        "*.googleapis.com or storage.googleapis.com:443. Everything else is refused (403 "
        "egress_denied); loopback, private and link-local addresses always are. Default: "
        "KEYBRAKE_PASSTHROUGH (comma-separated).",
    ),
]


ProxyListen = Annotated[
    str | None,
    typer.Option(
        "--proxy-listen",
        envvar="KEYBRAKE_PROXY_LISTEN",
        metavar="HOST:PORT",
        help="Forward proxy (HTTPS_PROXY) address, e.g. 0.0.0.0:8080 (default: "
        "--listen-host:--proxy-port).",
        show_default=False,
    ),
]
BaseUrlListen = Annotated[
    str | None,
    typer.Option(
        "--base-url-listen",
        envvar="KEYBRAKE_BASE_URL_LISTEN",
        metavar="HOST:PORT",
        help="A listener of its own for the base-URL routes (/stripe/...), without the admin "
        "API (default: served on the admin listener).",
        show_default=False,
    ),
]
AdminListen = Annotated[
    str | None,
    typer.Option(
        "--admin-listen",
        envvar="KEYBRAKE_ADMIN_LISTEN",
        metavar="HOST:PORT",
        help="Admin API, dashboard and /metrics address (default: --listen-host:--admin-port). "
        "Not loopback: needs TLS or --insecure-admin.",
        show_default=False,
    ),
]
InsecureAdmin = Annotated[
    bool,
    typer.Option(
        "--insecure-admin",
        envvar="KEYBRAKE_INSECURE_ADMIN",
        help="Allow the admin listener on a network address over plain HTTP (warned about at "
        "every start).",
    ),
]
TlsCert = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        envvar="KEYBRAKE_TLS_CERT",
        help="PEM certificate chain for the admin and base-URL listeners (with --tls-key; "
        "read again on SIGHUP). Plain HTTP is then refused there.",
        show_default=False,
    ),
]
TlsKey = Annotated[
    Path | None,
    typer.Option(
        "--tls-key",
        envvar="KEYBRAKE_TLS_KEY",
        help="PEM private key (unencrypted) of --tls-cert.",
        show_default=False,
    ),
]
TlsName = Annotated[
    list[str] | None,
    typer.Option(
        "--tls-name",
        envvar="KEYBRAKE_TLS_NAMES",
        metavar="NAME",
        help="Serve the admin and base-URL listeners over TLS with a certificate from the "
        "Keybrake CA for this name or IP address (repeatable; the variable is "
        "comma-separated).",
        show_default=False,
    ),
]


def _store_url(store: str, data_dir: Path) -> str:
    return store or f"sqlite:///{(data_dir / 'keybrake.db').resolve()}"


def _password_note(url: str, from_url: str | None) -> str:
    """Where the Redis password comes from, for the start banner (never the password)."""
    if from_url is not None:
        return " (password: from the store URL)"
    if url.startswith("redis") and os.environ.get(PASSWORD_ENV):
        return f" (password: from {PASSWORD_ENV})"
    return ""


def _passthrough_entries(flags: list[str] | None) -> list[str]:
    """The effective passthrough list: the flags, else ``KEYBRAKE_PASSTHROUGH``; validated."""
    raw = flags if flags else [os.environ.get("KEYBRAKE_PASSTHROUGH", "")]
    entries = [e.strip() for item in raw for e in item.split(",") if e.strip()]
    for e in entries:
        try:
            parse_passthrough(e)
        except ValueError as err:
            _fail(f"--passthrough: {err}", 2)
    return entries


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and the exit code: 1 cannot start (data dir, port, policy),
    2 a bad argument, 3 the store or audit log unavailable, 4 no such vault key."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _note(message: str) -> None:
    typer.echo(f"Note: {message}", err=True)


def _check_data_dir(data_dir: Path) -> None:
    try:
        check_data_dir(data_dir)
    except PreflightError as e:
        _fail(str(e))


def _open_store(url: str) -> Store:
    """The store a URL names (not opened yet); a malformed URL exits with code 2."""
    try:
        return open_store(url)
    except ValueError as e:
        _fail(f"--store: {e}", 2)


def _cli_store_url(store: str, data_dir: Path) -> str:
    """The store URL a command uses; the default one lives in the data dir, which must be
    writable (a data dir that is not says so, instead of a store error)."""
    if not store:
        _check_data_dir(data_dir)
    return _store_url(store, data_dir)


def _check_store(url: str, wait: bool) -> Path | None:
    """Open and close the store before starting; the SQLite file it created, if new."""

    async def open_and_close(s: Store) -> None:
        try:
            await s.open()
        finally:
            await s.close()

    store = _open_store(url)
    new = new_sqlite_file(store)
    try:
        asyncio.run(open_and_close(store))
    except StoreUnavailable as e:
        if not wait:
            _fail(
                f"store unavailable: {str(e).rstrip('.')}; start it or fix --store / "
                "KEYBRAKE_STORE (--wait-for-store starts anyway and refuses vendor calls until "
                "it is back)",
                3,
            )
        typer.echo(
            f"Warning: store unavailable: {e}; vendor calls fail closed until it is back",
            err=True,
        )
    return new if new is not None and new.exists() else None


async def _with_store(store: Store, fn: Any) -> Any:
    new = new_sqlite_file(store)
    try:
        await store.open()
        if new is not None:
            _note(f"created a new, empty store: {new}")
        return await fn(store)
    finally:
        await store.close()


def _run_store(url: str, fn: Any) -> Any:
    store = _open_store(url)
    try:
        return asyncio.run(_with_store(store, fn))
    except StoreUnavailable as e:
        _fail(f"store unavailable: {e}", 3)
    except Refusal as e:
        _fail(f"{e.code}: {e.message}", 1)


def _run_vault(store: str, data_dir: Path, fn: Callable[[Vault], Awaitable[Any]]) -> Any:
    """Run one vault use-case (`keybrake.vault`) on the local store."""
    now = functools.partial(dt.datetime.now, dt.UTC)
    return _run_store(
        _cli_store_url(store, data_dir), lambda s: fn(Vault(s, now=now, via="command line"))
    )


AdminUrl = Annotated[
    str | None,
    typer.Option(
        "--admin-url",
        envvar="KEYBRAKE_ADMIN_URL",
        help="Manage a proxy that runs elsewhere through its admin API, e.g. "
        "http://10.0.0.5:8081 (default: open the store directly).",
        show_default=False,
    ),
]
AdminTokenFile = Annotated[
    Path | None,
    typer.Option(
        "--admin-token-file",
        envvar="KEYBRAKE_ADMIN_TOKEN_FILE",
        help="With --admin-url: the file holding the proxy's admin token (default: "
        "KEYBRAKE_ADMIN_TOKEN, else <data dir>/admin-token).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (exact amounts).")]
KeyArg = Annotated[
    str, typer.Argument(help="The key id (key_...); the vault key (kbv_...) works too.")
]


@contextlib.contextmanager
def _remote(admin_url: str, token_file: Path | None, data_dir: Path) -> Iterator[RemoteAdmin]:
    """The admin API at ``admin_url``; what it refuses is one line and an exit code."""
    try:
        with remote_admin(admin_url, token_file, data_dir) as api:
            yield api
    except RemoteError as e:
        _fail(str(e), e.exit_code)


def _no_key(value: str) -> str:
    """The message for a key that is not there: a vault key is never shown."""
    if is_vault_key(value):
        return "no vault key matches the vault key given"
    return f"no vault key {value!r}"


def _dollars(text: Any) -> str:
    """``"300.00"`` (dollars as the JSON gives them) as ``$300.00``; None as ``""``."""
    return "" if text is None or text == "" else f"${text}"


def _micros(value: Any) -> str:
    return "" if value is None else f"${format_usd(int(value))}"


def _amount(minor: Any, currency: Any) -> str:
    """A vendor amount in minor units: ``$12.00``, ``12.00 EUR``, ``1000 JPY``."""
    if minor is None or not currency:
        return ""
    code = str(currency).upper()
    try:
        places = minor_unit_exponent(code)
    except MoneyError:
        return f"{minor} {code} (minor units)"
    major = Decimal(int(minor)).scaleb(-places)
    return f"${major}" if code == "USD" else f"{major} {code}"
