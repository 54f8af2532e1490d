"""``keybrake run``, ``web``, ``ca``, ``check-policy`` and ``init``: starting the proxy and
what it needs."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keybrake.cli._common import (
    AdminListen,
    BaseUrlListen,
    CertsDir,
    DataDir,
    InsecureAdmin,
    Passthrough,
    PoliciesDir,
    ProxyListen,
    StoreUrl,
    TlsCert,
    TlsKey,
    TlsName,
    WaitForStore,
    _check_data_dir,
    _check_store,
    _fail,
    _note,
    _open_store,
    _passthrough_entries,
    _password_note,
    _store_url,
)
from keybrake.cli._packaged import (
    CONFIG_NAME,
    PACKAGED_POLICIES,
    init_deployment,
    policies_dir,
)
from keybrake.core.policy import PolicyError, load_policies
from keybrake.proxy._alert_rules import AlertConfigError, load_alert_config, parse_thresholds
from keybrake.proxy._listen import format_listen, is_loopback_host, parse_listen
from keybrake.proxy.ca import CA_KEY_NAME, BadCA, ca_exists, default_certs_dir, ensure_ca
from keybrake.proxy.preflight import PreflightError, check_listen
from keybrake.store import (
    PASSWORD_ENV,
    redact_url,
    split_password,
)

if TYPE_CHECKING:
    pass


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
    except BadCA as e:
        _fail(f"{e}: restore the CA your workers trust, or pass another --certs-dir")
    if created and certs_dir is None and (Path("certs") / CA_KEY_NAME).is_file():
        _note(
            f"{Path('certs').resolve()} holds a Keybrake CA made by an earlier version (the "
            "default was ./certs); pass --certs-dir certs to keep the CA your workers trust"
        )
    return where.resolve(), bundle.resolve(), created


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
    alerts: Annotated[
        Path | None,
        typer.Option(
            "--alerts",
            envvar="KEYBRAKE_ALERTS",
            help="Alerts file (TOML): thresholds per label/key and the webhooks alerts go to.",
            show_default=False,
        ),
    ] = None,
    alert_thresholds: Annotated[
        str,
        typer.Option(
            "--alert-thresholds",
            envvar="KEYBRAKE_ALERT_THRESHOLDS",
            help="Default alert thresholds, percent of each cap (e.g. 50,80,100).",
        ),
    ] = "50,80,100",
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
    # mitmproxy is loaded from here on (this command runs it), not by every other command.
    from keybrake.proxy.core import load_admin_token
    from keybrake.proxy.mitm_chain import refused_in_args

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
    try:
        # The alerts file and the thresholds, as the proxy will read them (one line if wrong).
        default = parse_thresholds(alert_thresholds, "--alert-thresholds")
        load_alert_config(str(alerts) if alerts else "", default)
    except AlertConfigError as e:
        _fail(f"alerts: {e}", 2)
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
        *(["--set", f"keybrake_alerts={alerts.resolve()}"] if alerts else []),
        "--set",
        f"keybrake_alert_thresholds={alert_thresholds}",
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
