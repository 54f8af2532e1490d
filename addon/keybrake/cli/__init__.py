"""The ``keybrake`` command line.

    keybrake run                      start the proxy (SQLite store under .keybrake/)
    keybrake ca                       create the CA and its bundle in ~/.keybrake/certs/
    keybrake check-policy policies/   validate vendor policies without starting
    keybrake keys issue --vendor stripe --daily-usd-cap 300 \\
        --allow "POST /v1/payment_intents" --expires-in 2h --label dramatiq/nightly-billing
    keybrake keys list | keybrake keys revoke KEY_ID | keybrake keys set-cap KEY_ID ...
    keybrake budgets set LABEL --daily-usd-cap 500
    keybrake issuers create|list|revoke   scoped tokens for pipeline drivers
    keybrake keys revoke-all --label-prefix beam/billing/ [--dry-run]   kill switch
    keybrake freeze stripe | keybrake unfreeze stripe | keybrake frozen
    keybrake spend | keybrake audit [--follow]

Key, budget, spend and audit commands open the store (and audit log) directly, or with
``--admin-url`` (``KEYBRAKE_ADMIN_URL``) go through a proxy's admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import quote

import typer

from keybrake.cli._admin_api import RemoteAdmin, RemoteError, remote_admin
from keybrake.cli._packaged import (
    CONFIG_NAME,
    PACKAGED_POLICIES,
    ConfigError,
    config_defaults,
    init_deployment,
    policies_dir,
)
from keybrake.core.money import MoneyError, format_usd, minor_unit_exponent
from keybrake.core.policy import PolicyError, load_policies
from keybrake.proxy._passthrough import parse_passthrough
from keybrake.proxy.ca import CA_KEY_NAME, ca_exists, default_certs_dir, ensure_ca
from keybrake.proxy.core import load_admin_token
from keybrake.proxy.listeners import format_listen, is_loopback_host, parse_listen
from keybrake.proxy.mitm_chain import refused_in_args
from keybrake.proxy.preflight import PreflightError, check_data_dir, check_listen, new_sqlite_file
from keybrake.store import (
    PASSWORD_ENV,
    SQLiteStore,
    Store,
    StoreUnavailable,
    open_store,
    redact_url,
    split_password,
)
from keybrake.vault import (
    CreateIssuerRequest,
    IssueKeyRequest,
    KeyCapsChange,
    KeySelector,
    KeySpecError,
    Vault,
    freeze_to_json,
    is_vault_key,
    issuer_to_json,
    key_to_json,
    parse_label_budget,
)

if TYPE_CHECKING:
    from keybrake.auditlog.sinks import AuditSink

__all__ = ["app", "main"]

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Keybrake: vault keys, endpoint allowlists and dollar caps for workers calling paid "
    "APIs.\n\nExample: keybrake init && keybrake run",
    no_args_is_help=True,
    add_completion=True,
    context_settings=CONTEXT,
)
keys_app = typer.Typer(
    help="Issue, list, revoke, suspend and re-cap vault keys (in the store, or through a "
    "proxy's admin API with --admin-url).\n\nExample: keybrake keys list",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keybrake")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"keybrake {_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Keybrake: vault keys, endpoint allowlists and dollar caps for workers calling paid APIs.

    Example: keybrake init && keybrake run
    """


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


class _ListenerPlan:
    """Where each listener goes, from the address flags and their shorthand."""

    def __init__(
        self,
        proxy: tuple[str, int],
        admin: tuple[str, int],
        base_url: tuple[str, int] | None,
        flags: tuple[str, str] = ("--proxy-port", "--admin-port"),
    ) -> None:
        self.proxy = proxy
        self.admin = admin
        # None: the base-URL routes are on the admin listener.
        self.base_url = base_url
        # The flags that set the proxy and admin addresses, for messages.
        self.flags = flags

    def admin_addresses(self) -> list[tuple[str, int]]:
        return [self.admin]

    def bound(self) -> list[tuple[str, int, str]]:
        out = [(*self.proxy, self.flags[0]), (*self.admin, self.flags[1])]
        if self.base_url is not None:
            out.append((*self.base_url, "--base-url-listen"))
        return out

    def mode_args(self) -> list[str]:
        """mitmproxy ``--mode`` arguments and the roles of the reverse listeners."""
        # The reverse listeners' upstream is a placeholder: every request on them is
        # answered or routed by the addon (connection_strategy=lazy never dials it).
        args = ["--mode", f"regular@{format_listen(*self.proxy)}"]
        admin_roles = "admin" if self.base_url is not None else "admin,base_url"
        args += ["--mode", f"reverse:http://127.0.0.1:1@{format_listen(*self.admin)}"]
        args += ["--set", f"keybrake_listeners={admin_roles}@{format_listen(*self.admin)}"]
        if self.base_url is not None:
            args += ["--mode", f"reverse:http://127.0.0.1:1@{format_listen(*self.base_url)}"]
            args += ["--set", f"keybrake_listeners=base_url@{format_listen(*self.base_url)}"]
        return args

    def describe(self, tls: bool) -> str:
        scheme = "https" if tls else "http"
        text = f"forward proxy on {format_listen(*self.proxy)}, "
        if self.base_url is None:
            return text + f"admin + base URL on {scheme}://{format_listen(*self.admin)}"
        return (
            text + f"admin on {scheme}://{format_listen(*self.admin)}, "
            f"base URL on {scheme}://{format_listen(*self.base_url)}"
        )


def _listen_flag(value: str, flag: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as e:
        _fail(f"{flag}: {e}", 2)


def _listener_plan(
    listen_host: str,
    proxy_port: int,
    admin_port: int,
    proxy_listen: str | None,
    base_url_listen: str | None,
    admin_listen: str | None,
) -> _ListenerPlan:
    """``--proxy-listen``/``--admin-listen`` win over ``--listen-host`` + ports; a
    ``--base-url-listen`` equal to the admin address is the combined listener."""
    proxy = _listen_flag(proxy_listen, "--proxy-listen") if proxy_listen else None
    admin = _listen_flag(admin_listen, "--admin-listen") if admin_listen else None
    base = _listen_flag(base_url_listen, "--base-url-listen") if base_url_listen else None
    flags = (
        "--proxy-listen" if proxy else "--proxy-port",
        "--admin-listen" if admin else "--admin-port",
    )
    proxy = proxy or (listen_host, proxy_port)
    admin = admin or (listen_host, admin_port)
    if base is not None and base[1] == admin[1] and base[0] == admin[0]:
        base = None
    return _ListenerPlan(proxy, admin, base, flags)


def _tls_args(cert: Path | None, key: Path | None, names: list[str] | None) -> list[str]:
    """mitmproxy ``--set`` arguments for TLS on the reverse listeners (checked first)."""
    names = [n.strip() for item in names or [] for n in item.split(",") if n.strip()]
    if (cert is None) != (key is None):
        _fail("--tls-cert and --tls-key go together: give both", 2)
    if cert is not None and names:
        _fail("give either --tls-cert/--tls-key (your certificate) or --tls-name, not both", 2)
    if cert is not None and key is not None:
        for path, flag in ((cert, "--tls-cert"), (key, "--tls-key")):
            try:
                path.read_bytes()
            except OSError as e:
                _fail(f"{flag} {path}: cannot read it ({e.strerror})")
        return [
            "--set",
            f"keybrake_tls_cert={cert.resolve()}",
            "--set",
            f"keybrake_tls_key={key.resolve()}",
        ]
    return [arg for n in names for arg in ("--set", f"keybrake_tls_names={n}")]


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


def _prepare_ca(certs_dir: Path | None) -> tuple[Path, Path, bool]:
    """The certs dir, its bundle and whether the CA in it was created just now."""
    where = (certs_dir if certs_dir is not None else default_certs_dir()).expanduser()
    created = not ca_exists(where)
    try:
        bundle = ensure_ca(where)
    except OSError as e:
        _fail(
            f"cannot write the Keybrake CA in {where.absolute()} ({e.strerror}): pass another "
            "--certs-dir (or KEYBRAKE_CERTS_DIR)"
        )
    if created and certs_dir is None and (Path("certs") / CA_KEY_NAME).is_file():
        _note(
            f"{Path('certs').resolve()} holds a Keybrake CA made by an earlier version (the "
            "default was ./certs); pass --certs-dir certs to keep the CA your workers trust"
        )
    return where.resolve(), bundle.resolve(), created


@app.command()
def run(
    listen_host: Annotated[
        str, typer.Option(help="Address of both listeners (loopback by default).")
    ] = "127.0.0.1",
    proxy_port: Annotated[int, typer.Option(help="Forward proxy port (HTTPS_PROXY).")] = 8080,
    admin_port: Annotated[int, typer.Option(help="Admin API / base-URL listener port.")] = 8081,
    data_dir: DataDir = Path(".keybrake"),
    policies: PoliciesDir = None,
    store: StoreUrl = "",
    certs_dir: CertsDir = None,
    audit: Annotated[
        str,
        typer.Option(
            "--audit",
            envvar="KEYBRAKE_AUDIT",
            help="Audit sink: empty for <data dir>/audit.db, or postgresql://... (shared).",
        ),
    ] = "",
    web: Annotated[
        bool, typer.Option(help="Run mitmweb (live flow UI) instead of mitmdump.")
    ] = False,
    web_port: Annotated[
        int, typer.Option(help="mitmweb UI port (with --web; loopback only).")
    ] = 8082,
    passthrough: Passthrough = None,
    wait_for_store: WaitForStore = False,
    proxy_listen: ProxyListen = None,
    base_url_listen: BaseUrlListen = None,
    admin_listen: AdminListen = None,
    insecure_admin: InsecureAdmin = False,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_name: TlsName = None,
    extra: Annotated[
        list[str] | None, typer.Argument(help="Extra mitmproxy arguments, after '--'.")
    ] = None,
) -> None:
    """Start the proxy: forward listener + admin listener in one mitmproxy process.

    The base-URL routes (/stripe/...) are served on the admin listener unless
    --base-url-listen puts them on a listener of their own (then each listener answers only
    its own routes; /healthz and /readyz answer on both).

    Before anything starts, the policies, the data dir, the ports and the store are checked;
    a mistake is one line on stderr and a non-zero exit. Ctrl-C or SIGTERM stops it (exit 0)
    once admitted calls are settled and audited.

    Example: keybrake run --store redis://127.0.0.1:6379/0 --passthrough '*.googleapis.com'
    """
    refused = refused_in_args(extra or [])
    if refused:
        _fail(refused)
    web_args: list[str] = []
    if web:
        # mitmweb's own UI defaults to 8081, the admin listener's port; it never opens a
        # browser on a server. Its API needs the token printed at start (or --set web_password).
        web_args = [
            "--set",
            f"web_port={web_port}",
            "--set",
            "web_host=127.0.0.1",
            "--set",
            "web_open_browser=false",
        ]
    policies = policies_dir(policies)
    try:
        load_policies(policies)
    except PolicyError as e:
        _fail(str(e))
    tunnelled = _passthrough_entries(passthrough)
    # The data dir must be writable when something is written there: the SQLite store, the
    # audit log, a new admin token. Redis + PostgreSQL + KEYBRAKE_ADMIN_TOKEN need none.
    audit_elsewhere = bool(audit) or any(a.startswith("keybrake_audit=") for a in extra or [])
    token_elsewhere = (
        bool(os.environ.get("KEYBRAKE_ADMIN_TOKEN")) or (data_dir / "admin-token").is_file()
    )
    if not store or not audit_elsewhere or not token_elsewhere:
        _check_data_dir(data_dir)
    # `-- --options` and the like only print and exit: nothing listens, no store is needed.
    only_prints = bool({"--options", "--commands", "--version"} & set(extra or []))
    plan = _listener_plan(
        listen_host, proxy_port, admin_port, proxy_listen, base_url_listen, admin_listen
    )
    tls_args = _tls_args(tls_cert, tls_key, tls_name)
    exposed = [a for a in plan.admin_addresses() if not is_loopback_host(a[0])]
    if exposed and not tls_args:
        where = format_listen(*exposed[0])
        if not insecure_admin:
            _fail(
                f"the admin listener {where} is not loopback and would serve plain HTTP (the "
                "admin token in clear on the network): give it TLS (--tls-cert/--tls-key or "
                "--tls-name), keep it on loopback (--admin-listen 127.0.0.1:8081), or pass "
                "--insecure-admin",
                2,
            )
        typer.echo(
            f"Warning: --insecure-admin: the admin listener {where} serves plain HTTP on a "
            "network address; the admin token crosses the network unencrypted",
            err=True,
        )
    listeners = [(h, p, f) for h, p, f in plan.bound()]
    listeners += [("127.0.0.1", web_port, "--web-port")] if web else []
    for (_, port, flag), (_, other, other_flag) in itertools.combinations(listeners, 2):
        if port == other and port != 0:
            _fail(f"{flag} and {other_flag} are both {port}: give each listener its own port")
    new_store: Path | None = None
    if only_prints:
        _open_store(_store_url(store, data_dir))  # a malformed URL is still one line
    else:
        for host, port, flag in listeners:
            try:
                check_listen(host, port, flag)
            except PreflightError as e:
                _fail(str(e))
        new_store = _check_store(_store_url(store, data_dir), wait_for_store)
    certs, bundle, new_ca = _prepare_ca(certs_dir)
    _, token_where = load_admin_token(data_dir.absolute())
    # The Redis password reaches the proxy (this same process) by environment variable, never
    # inside a mitmproxy option: mitmweb displays options and mitmproxy repeats bad values.
    url, password = split_password(_store_url(store, data_dir))
    if password is not None:
        os.environ[PASSWORD_ENV] = password
    if "KEYBRAKE_STORE" in os.environ:  # the keybrake_store option's default
        os.environ["KEYBRAKE_STORE"] = split_password(os.environ["KEYBRAKE_STORE"])[0]
    script = Path(__file__).resolve().parent.parent / "addon.py"
    args = [
        *plan.mode_args(),
        *tls_args,
        *(["--set", "keybrake_insecure_admin=true"] if insecure_admin else []),
        "--set",
        f"confdir={certs}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        "upstream_cert=false",
        "--set",
        "rawtcp=false",
        "--set",
        f"keybrake_data_dir={data_dir.resolve()}",
        "--set",
        f"keybrake_policies={policies.resolve()}",
        "--set",
        f"keybrake_store={url}",
        *(["--set", f"keybrake_audit={audit}"] if audit else []),
        *[arg for e in tunnelled for arg in ("--set", f"keybrake_passthrough={e}")],
        "-s",
        str(script),
        *web_args,
        *(extra or []),
    ]
    proxy_host, proxy_port = plan.proxy
    admin_host, admin_port = plan.admin
    host = proxy_host if proxy_host not in ("0.0.0.0", "::", "") else "<this host>"
    admin_shown = admin_host if admin_host not in ("0.0.0.0", "::", "") else "<this host>"
    admin_scheme = "https" if tls_args else "http"
    typer.echo(
        "\n".join(
            [
                f"Keybrake: {plan.describe(bool(tls_args))}",
                f"Store: {redact_url(url)}{_password_note(url, password)}"
                + (" (new, empty: created just now)" if new_store else ""),
                f"Policies: {policies.resolve()}"
                + (
                    " (shipped with Keybrake; `keybrake init` for editable copies)"
                    if policies == PACKAGED_POLICIES
                    else ""
                ),
                f"CA: created a new Keybrake CA in {certs} (workers must trust the bundle below)"
                if new_ca
                else f"CA: {certs}",
                "Other destinations: "
                + (f"tunnelled if {', '.join(tunnelled)}; " if tunnelled else "")
                + "everything else refused (403 egress_denied)",
                "Workers need:",
                f"  export HTTPS_PROXY=http://{host}:{proxy_port}",
                f"  export REQUESTS_CA_BUNDLE={bundle}",
                f"  export SSL_CERT_FILE={bundle}",
                f"  (stripe: stripe.ca_bundle_path = '{bundle}')",
                f"Admin API: {admin_scheme}://{admin_shown}:{admin_port}/vault/keys  "
                f"(admin token: {token_where})",
                f"Dashboard: {admin_scheme}://{admin_shown}:{admin_port}/  "
                f"Metrics: {admin_scheme}://{admin_shown}:{admin_port}/metrics",
                *(
                    [f"mitmweb: http://127.0.0.1:{web_port}/ (token in the log line below)"]
                    if web
                    else []
                ),
                "",
            ]
        )
    )
    sys.stdout.flush()
    from mitmproxy.tools import main as mitmproxy_main

    start = mitmproxy_main.mitmweb if web else mitmproxy_main.mitmdump
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_QuietShutdownPolicy())
    try:
        start(args)
    finally:
        asyncio.set_event_loop_policy(policy)


def _ignore_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler outside mitmproxy's own run.

    At Ctrl-C or SIGTERM mitmproxy stops (once admitted calls are settled and audited), then
    ``asyncio.run`` cancels the client connections still open; asyncio's stream callback
    reports each as an error with a ``CancelledError`` traceback. A connection cancelled at
    shutdown is expected; anything else is reported as asyncio always does.
    """
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


class _QuietShutdownPolicy(asyncio.DefaultEventLoopPolicy):
    """Event loops made with `_ignore_cancelled_connections` as their exception handler
    (mitmproxy's run installs its own meanwhile, and puts this one back when it stops)."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_exception_handler(_ignore_cancelled_connections)
        return loop


@app.command()
def web(
    listen_host: Annotated[
        str, typer.Option(help="Address of both listeners (loopback by default).")
    ] = "127.0.0.1",
    proxy_port: Annotated[int, typer.Option(help="Forward proxy port (HTTPS_PROXY).")] = 8080,
    admin_port: Annotated[int, typer.Option(help="Admin API / base-URL listener port.")] = 8081,
    web_port: Annotated[int, typer.Option(help="mitmweb UI port (loopback only).")] = 8082,
    data_dir: DataDir = Path(".keybrake"),
    policies: PoliciesDir = None,
    store: StoreUrl = "",
    certs_dir: CertsDir = None,
    passthrough: Passthrough = None,
    wait_for_store: WaitForStore = False,
    extra: Annotated[
        list[str] | None, typer.Argument(help="Extra mitmproxy arguments, after '--'.")
    ] = None,
) -> None:
    """'keybrake run' with mitmweb's live flow UI (credentials redacted in every flow).

    Each vendor flow is commented with its vault key id, label and outcome; refusals are
    marked. mitmweb prints its URL with a one-time token; pin one with
    'keybrake web -- --set web_password=...'.

    Example: keybrake web --web-port 8082
    """
    run(
        listen_host=listen_host,
        proxy_port=proxy_port,
        admin_port=admin_port,
        data_dir=data_dir,
        policies=policies,
        store=store,
        certs_dir=certs_dir,
        web=True,
        web_port=web_port,
        passthrough=passthrough,
        wait_for_store=wait_for_store,
        extra=extra,
    )


@app.command()
def ca(certs_dir: CertsDir = None) -> None:
    """Create the Keybrake CA (if missing) and write its bundle for workers.

    The CA lives in ~/.keybrake/certs unless --certs-dir says otherwise; every command finds
    it there whatever the working directory. Says whether it was created now or reused.

    Example: keybrake ca && export REQUESTS_CA_BUNDLE=~/.keybrake/certs/keybrake-ca-bundle.pem
    """
    certs, bundle, created = _prepare_ca(certs_dir)
    typer.echo(
        f"{'Created a new' if created else 'Using the'} Keybrake CA in {certs}\n"
        f"CA: {certs / 'mitmproxy-ca-cert.pem'}\nBundle: {bundle}"
    )


@app.command("check-policy")
def check_policy(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Policies directory (default: ./policies if it exists, else the shipped ones).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Validate vendor policies without starting the proxy.

    Example: keybrake check-policy policies/
    """
    try:
        ps = load_policies(policies_dir(directory))
    except PolicyError as e:
        _fail(str(e))
    for name, p in sorted(ps.vendors.items()):
        typer.echo(
            f"ok  {ps.files[name]}: {name} "
            f"({len(p.endpoints)} endpoints, hosts {', '.join(p.hosts)})"
        )


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


@keys_app.command("issue")
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


@keys_app.command("list")
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


@keys_app.command("revoke")
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


@keys_app.command("suspend")
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


@keys_app.command("resume")
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


@keys_app.command("set-cap")
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


budgets_app = typer.Typer(
    help="Shared daily caps per agent_run_label (every key with the label counts against "
    "it).\n\nExample: keybrake budgets set dramatiq/nightly-billing --daily-usd-cap 500",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(budgets_app, name="budgets")


def _show_budget(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    elif body["daily_usd_cap"] is None:
        typer.echo(f"{body['label']}: no label cap (each key's own caps still apply)")
    else:
        typer.echo(f"{body['label']}: daily cap {_dollars(body['daily_usd_cap'])} (shared)")


@budgets_app.command("set")
def budgets_set(
    label: Annotated[str, typer.Argument(help="The agent_run_label, e.g. dramatiq/nightly.")],
    daily_usd_cap: Annotated[
        str | None, typer.Option(help="The shared daily cap in USD.", show_default=False)
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the label's cap.")] = False,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Cap what every key with a label may spend per UTC day, together.

    Example: keybrake budgets set dramatiq/nightly-billing --daily-usd-cap 500
    """
    if (daily_usd_cap is None) == (not remove):
        _fail("give --daily-usd-cap N or --remove", 2)
    request = {"daily_usd_cap": daily_usd_cap}
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


@budgets_app.command("show")
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


# -- issuer tokens, kill switches, vendor freezes ------------------------------------------------

issuers_app = typer.Typer(
    help="Issuer tokens: bearer tokens for pipeline drivers that issue, read and revoke vault "
    "keys under one label prefix, within set limits (never the admin token in pipeline code)."
    "\n\nExample: keybrake issuers create --vendor stripe --label-prefix beam/billing/ "
    "--allow 'POST /v1/payment_intents' --max-daily-usd-cap 300",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(issuers_app, name="issuers")


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


@issuers_app.command("create")
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
        str | None, typer.Option(help="The issuer's own daily budget (recorded; not enforced).")
    ] = None,
    budget_usd_cap: Annotated[
        str | None, typer.Option(help="The issuer's own lifetime budget (recorded).")
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


@issuers_app.command("list")
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


@issuers_app.command("revoke")
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


@keys_app.command("revoke-all")
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


@keys_app.command("suspend-all")
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


@keys_app.command("resume-all")
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


@app.command()
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


@app.command()
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


@app.command()
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


AuditUrl = Annotated[
    str,
    typer.Option(
        "--audit",
        envvar="KEYBRAKE_AUDIT",
        help="Audit sink: empty for <data dir>/audit.db, or postgresql://...",
    ),
]


def _open_sink(url: str, data_dir: Path) -> AuditSink:
    from keybrake.auditlog.sinks import open_audit_sink

    try:
        return open_audit_sink(url, data_dir)
    except Exception as e:
        _fail(f"cannot open the audit log: {type(e).__name__}: {e}", 3)


def _warn(message: str) -> None:
    typer.echo(f"Warning: {message}; the most recent calls may be missing", err=True)


def _report_sources(store: str, audit: str, data_dir: Path) -> tuple[Store, AuditSink]:
    """The store (not opened yet) and the audit log ``spend`` and ``audit`` read."""
    url = _cli_store_url(store, data_dir)
    if not audit:
        _check_data_dir(data_dir)
    return _open_store(url), _open_sink(audit, data_dir)


async def _read_audit(
    store: Store,
    sink: AuditSink,
    read: Callable[[Store | None], Awaitable[Any]],
    quiet: bool = False,
) -> Any:
    """``await read(store)`` once the rows still in the store's outbox (calls the proxy
    answered and has not moved yet) are in ``sink``. A store that cannot be opened is said
    so on stderr (unless ``quiet``) and ``read`` gets None: what the sink holds is still
    worth showing."""
    from keybrake.auditlog.pump import drain_outbox

    new = new_sqlite_file(store)
    try:
        try:
            await store.open()
        except StoreUnavailable as e:
            if not quiet:
                _warn(f"store unavailable ({e})")
            return await read(None)
        if new is not None:
            _note(f"created a new, empty store: {new}")
        try:
            await drain_outbox(store, sink)
        except StoreUnavailable as e:
            if not quiet:
                _warn(f"store unavailable ({e})")
        except Exception as e:  # the sink refused them: still show what it holds
            if not quiet:
                _warn(f"could not move recent rows to the audit log ({type(e).__name__}: {e})")
        return await read(store)
    finally:
        await store.close()


@app.command()
def spend(
    label: Annotated[str | None, typer.Option(help="Only this agent_run_label.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    vendor: Annotated[str | None, typer.Option(help="Only this vendor.")] = None,
    since: Annotated[str, typer.Option(help="24h, 7d, 30m or an ISO date/time.")] = "24h",
    until: Annotated[str | None, typer.Option(help="End of the window (default: now).")] = None,
    group_by: Annotated[
        str, typer.Option("--group-by", help="label, key, vendor, hour or day.")
    ] = "key",
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    audit: AuditUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Spend per key (or label, vendor, hour, day): calls, refusals, dollars, cap, remaining.

    Rows the proxy has not yet moved from the store to the audit log are moved first.

    Example: keybrake spend --label dramatiq/nightly-billing --since 24h
    """
    from keybrake.auditlog.reports import (
        ReportError,
        add_caps,
        format_table,
        parse_time,
        spend_summary,
    )

    rows: list[dict[str, Any]]
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            rows = api.items(
                "/vault/spend",
                {
                    "label": label,
                    "key": key,
                    "vendor": vendor,
                    "since": since,
                    "until": until,
                    "group_by": group_by,
                },
            )
    else:
        now = dt.datetime.now(dt.UTC)
        try:
            start = parse_time(since, now)
            end = parse_time(until, now, "until") if until else None
        except ReportError as e:
            _fail(str(e), 2)

        async def report(s: Store | None) -> list[dict[str, Any]]:
            rows = spend_summary(
                sink,
                group_by=group_by,  # type: ignore[arg-type]
                label=label,
                key_id=key,
                vendor=vendor,
                since=start,
                until=end,
            )
            try:
                if s is not None:
                    await add_caps(rows, s, now)
                    return rows
            except StoreUnavailable as e:
                _warn(f"store unavailable ({e})")
            for row in rows:  # caps and what remains come from the store
                row["daily_cap_usd"] = row["remaining_usd"] = None
            return rows

        source, sink = _report_sources(store, audit, data_dir)
        try:
            rows = asyncio.run(_read_audit(source, sink, report))
        except ReportError as e:
            _fail(str(e), 2)
        finally:
            sink.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = ["group", "label", "vendor", "calls", "refusals", "cap_hits", "replays", "spent_usd"]
    cols += ["daily_cap_usd", "remaining_usd"]
    if group_by != "key":
        cols = [c for c in cols if c not in ("label", "vendor")]
    money = ("spent_usd", "daily_cap_usd", "remaining_usd")
    shown = [r | {c: _dollars(r.get(c)) for c in money} for r in rows]
    typer.echo(format_table(shown, cols))
    total = sum(int(r["spent_micros"]) for r in rows)
    typer.echo(f"total spent: ${format_usd(total)} in {sum(r['calls'] for r in rows)} calls")


_AUDIT_COLUMNS = ["ts", "key_id", "label", "method", "path", "status", "outcome", "code"]
_AUDIT_COLUMNS += ["cost", "amount", "vendor_request_id", "vendor_object_id", "actor"]
_AUDIT_COLUMNS += ["message_id"]


def _audit_view(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row for people: its cost in dollars, the vendor amount in its currency."""
    return row | {
        "cost": _micros(row.get("actual_micros")),
        "amount": _amount(row.get("amount_minor"), row.get("currency")),
    }


def _audit_line(row: dict[str, Any]) -> str:
    """One audit row on one line, for ``--follow``: every column, ``-`` when empty."""
    view = _audit_view(row)
    return "  ".join(str(view.get(c) or "-") for c in _AUDIT_COLUMNS)


@app.command("audit")
def audit_cmd(
    label: Annotated[str | None, typer.Option(help="Only this agent_run_label.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    vendor: Annotated[str | None, typer.Option(help="Only this vendor.")] = None,
    outcome: Annotated[
        str | None,
        typer.Option(help="ok, held, overrun, refused, replayed, vendor_error or unknown."),
    ] = None,
    since: Annotated[str, typer.Option(help="24h, 7d, 30m or an ISO date/time.")] = "24h",
    until: Annotated[str | None, typer.Option(help="End of the window.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows (newest first).")] = 50,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing new rows as they are written, oldest first (Ctrl-C stops); "
            "with --json, one JSON object per line.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(help="With --follow: seconds between looks for new rows.")
    ] = 1.0,
    data_dir: DataDir = Path(".keybrake"),
    store: StoreUrl = "",
    audit: AuditUrl = "",
    admin_url: AdminUrl = None,
    admin_token_file: AdminTokenFile = None,
    as_json: AsJson = False,
) -> None:
    """Recent audit rows, newest first; with --follow, new rows as they come (like tail -f).

    Rows the proxy has not yet moved from the store to the audit log are moved first.

    Example: keybrake audit --label dramatiq/nightly-billing --outcome refused --limit 50

    Example: keybrake audit --follow --key key_123 --admin-url http://10.0.0.5:8081
    """
    from keybrake.auditlog.reports import ReportError, format_table, parse_time
    from keybrake.cli._audit_source import AuditFollower, LocalAuditSource, RemoteAuditSource

    filters = {"label": label, "key": key, "vendor": vendor, "outcome": outcome}
    if follow and until:
        _fail("--follow shows rows as they are written: leave out --until", 2)
    if not 0.05 <= interval <= 3600:
        _fail("--interval: give seconds between 0.05 and 3600", 2)
    if admin_url:
        with _remote(admin_url, admin_token_file, data_dir) as api:
            source: Any = RemoteAuditSource(api, filters, since, until)
            if follow:
                _follow(AuditFollower(source, limit), interval, as_json)
                return
            rows = source.newest(limit)
    else:
        now = dt.datetime.now(dt.UTC)
        try:
            start = parse_time(since, now)
            end = parse_time(until, now, "until") if until else None
        except ReportError as e:
            _fail(str(e), 2)
        store_, sink = _report_sources(store, audit, data_dir)
        try:
            source = LocalAuditSource(
                store_, sink, filters, start, end, read=_read_audit, warn=_warn
            )
            if follow:
                _follow(AuditFollower(source, limit), interval, as_json)
                return
            rows = source.newest(limit)
        except ReportError as e:
            _fail(str(e), 2)
        finally:
            sink.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(format_table([_audit_view(r) for r in rows], _AUDIT_COLUMNS))


def _follow(follower: Any, interval: float, as_json: bool) -> None:
    """Print rows as ``follower`` finds them until Ctrl-C or SIGTERM (exit 0, no traceback)."""
    from keybrake.auditlog.reports import ReportError

    stopped: list[int] = []  # a signal handler only appends: nothing it could block on
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stopped.append(signum))
    if not as_json:
        typer.echo("  ".join(c.upper() for c in _AUDIT_COLUMNS))
    try:
        while not stopped:
            for row in follower.poll():
                typer.echo(json.dumps(row) if as_json else _audit_line(row))
            deadline = time.monotonic() + interval
            while not stopped and time.monotonic() < deadline:
                time.sleep(min(0.1, interval))
    except KeyboardInterrupt:
        pass
    except ReportError as e:
        _fail(str(e), 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(0)


@app.command()
def init(
    directory: Annotated[
        Path, typer.Argument(help="Where to write policies/ and keybrake.toml.")
    ] = Path("."),
) -> None:
    """Write editable copies of the shipped vendor policies and a commented keybrake.toml.

    'keybrake run' started in that directory then enforces those policies and reads its
    settings from keybrake.toml (flags and environment variables still win). Existing files
    are kept.

    Example: keybrake init /etc/keybrake && cd /etc/keybrake && keybrake run
    """
    try:
        written = init_deployment(directory)
    except OSError as e:
        _fail(f"{directory}: cannot write there ({e.strerror or e})")
    for path in written:
        typer.echo(f"wrote {path}")
    if not written:
        typer.echo(f"{directory}: policies/ and {CONFIG_NAME} exist already; nothing written")


def main() -> None:
    """Console entry point: settings from ``--config FILE`` (or ``KEYBRAKE_CONFIG``, or
    ./keybrake.toml when present) are the defaults of ``run`` and ``web``."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = sys.argv[1:]
    path: str | None = os.environ.get("KEYBRAKE_CONFIG")
    if len(args) >= 2 and args[0] == "--config":
        path, args = args[1], args[2:]
    try:
        defaults = config_defaults(Path(path) if path else None, _run_settings())
    except ConfigError as e:
        typer.echo(f"Error: {e}", err=True)
        raise SystemExit(2) from None
    app(args=args, default_map={"run": defaults, "web": defaults} if defaults else None)


def _run_settings() -> frozenset[str]:
    """The settings keybrake.toml may give: ``run``'s options, by parameter name."""
    command = typer.main.get_command(app)
    assert isinstance(command, typer.core.TyperGroup)
    run_command = command.commands["run"]
    return frozenset(
        p.name for p in run_command.params if p.name and isinstance(p, typer.core.TyperOption)
    )


if __name__ == "__main__":
    main()
