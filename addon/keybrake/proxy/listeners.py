"""The `Listeners` addon: what each reverse listener serves, and the TLS it answers with.

``keybrake run`` opens up to three listeners: the forward proxy (``HTTPS_PROXY``), the
base-URL listener (``/stripe/…``) and the admin listener (``/vault/…``, the dashboard,
``/metrics``). The last two may be one listener (the default) or two, on different
addresses: a worker that can reach ``/stripe/…`` need not reach ``/vault/keys``. The
``keybrake_listeners`` option names the role of each reverse listener by its address::

    --set keybrake_listeners=admin@127.0.0.1:8081 --set keybrake_listeners=base_url@0.0.0.0:8443

A route asked of a listener without its role is ``404 not_found`` (JSON, like every refusal);
``/healthz`` and ``/readyz`` answer on every reverse listener. Without the option (running
the script by hand) every reverse listener serves both roles, as before.

TLS on the reverse listeners: ``keybrake_tls_cert`` + ``keybrake_tls_key`` (the operator's
certificate chain and key, PEM; read again on ``SIGHUP``: new connections get the new
certificate, open ones keep theirs), or ``keybrake_tls_names`` (a certificate issued from the
Keybrake CA for those names, whatever name the client asks for). With either, plain HTTP on
those listeners is refused (``403 tls_required``). Without either, mitmproxy answers TLS
with a Keybrake-CA certificate for the name the client asks for, and plain HTTP too.

An admin listener on an address other than loopback over plain HTTP would hand the admin
token to anyone on the path: refused at start unless ``keybrake_insecure_admin`` is set, and
then logged as a warning at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addons.tlsconfig import AppData, alpn_select_callback
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from OpenSSL import SSL, crypto

from keybrake.proxy._addresses import parse_ip_host
from keybrake.proxy._listen import format_listen, is_loopback_host, parse_listen

__all__ = [
    "ADMIN",
    "BASE_URL",
    "ListenerSpec",
    "Listeners",
    "format_listen",
    "is_loopback_host",
    "parse_listen",
    "parse_listener",
]

log = logging.getLogger("keybrake")
ADMIN = "admin"
BASE_URL = "base_url"
ROLES = (ADMIN, BASE_URL)


@dataclass(frozen=True)
class ListenerSpec:
    """One reverse listener's roles and address (``admin,base_url@127.0.0.1:8081``)."""

    roles: frozenset[str]
    host: str
    port: int

    def __str__(self) -> str:
        return (
            f"{','.join(r for r in ROLES if r in self.roles)}@{format_listen(self.host, self.port)}"
        )


def parse_listener(spec: str) -> ListenerSpec:
    """``ROLE[,ROLE]@host:port`` → `ListenerSpec`; raises ``ValueError``.

    >>> parse_listener("admin,base_url@127.0.0.1:8081").roles == {"admin", "base_url"}
    True
    """
    roles_text, sep, address = spec.partition("@")
    roles = frozenset(r.strip() for r in roles_text.split(",") if r.strip())
    if not sep or not roles or not roles <= set(ROLES):
        raise ValueError(
            f"keybrake_listeners {spec!r}: give ROLE[,ROLE]@host:port with roles from "
            f"{', '.join(ROLES)}"
        )
    host, port = parse_listen(address)
    return ListenerSpec(roles, host, port)


def _same_host(a: str, b: str) -> bool:
    ia, ib = parse_ip_host(a), parse_ip_host(b)
    if ia is not None and ib is not None:
        return ia == ib
    return a.lower().rstrip(".") == b.lower().rstrip(".")


class Listeners:
    """Knows each reverse listener's roles; serves TLS on them with a fixed certificate."""

    name = "keybrake_listeners"

    def __init__(self) -> None:
        self.specs: list[ListenerSpec] = []
        self._ssl_ctx: SSL.Context | None = None
        self._reload_installed = False

    def load(self, loader: object) -> None:
        add = loader.add_option  # type: ignore[attr-defined]
        add(
            "keybrake_listeners",
            Sequence[str],
            [],
            "Roles of the reverse listeners: ROLE[,ROLE]@host:port, roles admin and base_url "
            "(empty: every reverse listener serves both).",
        )
        add(
            "keybrake_insecure_admin",
            bool,
            False,
            "Allow an admin listener on an address other than loopback over plain HTTP "
            "(logged as a warning at every start).",
        )
        add(
            "keybrake_tls_cert",
            str,
            "",
            "PEM certificate chain for the admin and base-URL listeners (with "
            "keybrake_tls_key; read again on SIGHUP).",
        )
        add("keybrake_tls_key", str, "", "PEM private key of keybrake_tls_cert.")
        add(
            "keybrake_tls_names",
            Sequence[str],
            [],
            "Names (or IP addresses) for a certificate issued from the Keybrake CA for the "
            "admin and base-URL listeners.",
        )

    # -- options ---------------------------------------------------------------------------------
    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "keybrake_listeners" in updated:
            try:
                self.specs = [parse_listener(s) for s in opts.keybrake_listeners]
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        tls_options = {"keybrake_tls_cert", "keybrake_tls_key", "keybrake_tls_names"}
        if tls_options & updated:
            if bool(opts.keybrake_tls_cert) != bool(opts.keybrake_tls_key):
                raise exceptions.OptionsError(
                    "keybrake_tls_cert and keybrake_tls_key go together: give both"
                )
            if opts.keybrake_tls_cert and opts.keybrake_tls_names:
                raise exceptions.OptionsError(
                    "give either keybrake_tls_cert/keybrake_tls_key (your certificate) or "
                    "keybrake_tls_names (one from the Keybrake CA), not both"
                )
            if opts.keybrake_tls_cert:
                self._ssl_ctx = self._operator_context()
            elif not opts.keybrake_tls_names:
                self._ssl_ctx = None
            # Names: built in `running`, once mitmproxy's certificate store exists.
        if {"keybrake_listeners", "keybrake_insecure_admin", "mode", *tls_options} & updated:
            exposed = self.exposed_admin_listeners()
            if exposed and not self.tls_enabled and not opts.keybrake_insecure_admin:
                raise exceptions.OptionsError(
                    f"the admin listener on {exposed[0]} is not loopback and has no TLS: "
                    "anyone on the network path would see the admin token. Give it TLS "
                    "(--tls-cert/--tls-key or --tls-name), keep it on loopback, or pass "
                    "--insecure-admin"
                )

    @property
    def tls_enabled(self) -> bool:
        return bool(ctx.options.keybrake_tls_cert or ctx.options.keybrake_tls_names)

    def exposed_admin_listeners(self) -> list[str]:
        """Admin-role reverse listeners bound to an address other than loopback.

        Only listeners named in ``keybrake_listeners`` (as ``keybrake run`` names them all):
        a script run by hand keeps mitmproxy's own defaults."""
        if not self.specs:
            return []
        out = []
        for spec in ctx.options.mode:
            try:
                mode = ProxyMode.parse(spec)
            except ValueError:
                continue
            if not isinstance(mode, ReverseMode):
                continue
            host = mode.listen_host(ctx.options.listen_host)
            if ADMIN in self._roles(mode) and not is_loopback_host(host):
                out.append(format_listen(host or "0.0.0.0", mode.listen_port() or 0))
        return out

    async def running(self) -> None:
        if self.exposed_admin_listeners() and not self.tls_enabled:
            log.warning(
                "keybrake: the admin listener (%s) is not loopback and serves plain HTTP "
                "(--insecure-admin): the admin token crosses the network unencrypted",
                ", ".join(self.exposed_admin_listeners()),
            )
        if ctx.options.keybrake_tls_names:
            self._ssl_ctx = self._ca_context(list(ctx.options.keybrake_tls_names))
        # SIGHUP would otherwise end the process (Python's default): systemd's ExecReload
        # and `kill -HUP` read the certificate again, or do nothing without one.
        if not self._reload_installed:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
                self._reload_installed = True

    def done(self) -> None:
        if self._reload_installed:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._reload_installed = False

    def reload(self) -> None:
        """``SIGHUP``: read the certificate and key again; keep the old ones if they fail."""
        if not ctx.options.keybrake_tls_cert:
            log.info("keybrake: SIGHUP: no --tls-cert to read again; nothing to reload")
            return
        try:
            self._ssl_ctx = self._operator_context()
        except exceptions.OptionsError as e:
            log.error("keybrake: TLS certificate not reloaded, keeping the old one: %s", e)
            return
        log.warning("keybrake: TLS certificate reloaded from %s", ctx.options.keybrake_tls_cert)

    # -- roles -------------------------------------------------------------------------------
    def _roles(self, mode: ProxyMode) -> frozenset[str]:
        if not self.specs:
            return frozenset(ROLES)
        host = mode.listen_host(ctx.options.listen_host)
        port = mode.listen_port()
        for spec in self.specs:
            if spec.port == port and _same_host(spec.host, host):
                return spec.roles
        return frozenset()

    def roles_of(self, client: connection.Client) -> frozenset[str]:
        """What the reverse listener a client came in on serves (empty: not a reverse one)."""
        mode = client.proxy_mode
        return self._roles(mode) if isinstance(mode, ReverseMode) else frozenset()

    # -- TLS ---------------------------------------------------------------------------------
    def _new_context(self) -> SSL.Context:
        c = SSL.Context(SSL.TLS_SERVER_METHOD)
        c.set_min_proto_version(SSL.TLS1_2_VERSION)
        c.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        c.set_alpn_select_callback(alpn_select_callback)
        return c

    def _operator_context(self) -> SSL.Context:
        cert, key = ctx.options.keybrake_tls_cert, ctx.options.keybrake_tls_key
        c = self._new_context()
        try:
            c.use_certificate_chain_file(str(Path(cert).expanduser()))
            c.use_privatekey_file(str(Path(key).expanduser()))
            c.check_privatekey()
        except (OSError, SSL.Error) as e:
            raise exceptions.OptionsError(
                f"keybrake_tls_cert {cert} / keybrake_tls_key {key}: cannot use them "
                f"({type(e).__name__}: {e}); give a PEM certificate chain and its unencrypted key"
            ) from None
        return c

    def _ca_context(self, names: list[str]) -> SSL.Context:
        tlsconfig = ctx.master.addons.get("tlsconfig")
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        entry = tlsconfig.certstore.get_cert(names[0], sans)
        c = self._new_context()
        c.use_certificate(entry.cert.to_cryptography())
        c.use_privatekey(entry.privatekey)
        with contextlib.suppress(OSError, ValueError):
            if entry.chain_file is not None:
                for pem in _pem_blocks(entry.chain_file.read_bytes()):
                    c.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        return c

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        """Our certificate on the admin and base-URL listeners (mitmproxy's own otherwise)."""
        client = tls_start.context.client
        if self._ssl_ctx is None or not isinstance(client.proxy_mode, ReverseMode):
            return
        ssl_conn = SSL.Connection(self._ssl_ctx)
        ssl_conn.set_app_data(
            AppData(client_alpn=client.alpn, server_alpn=None, http2=ctx.options.http2)
        )
        ssl_conn.set_accept_state()
        tls_start.ssl_conn = ssl_conn

    def plain_http_refused(self, flow: http.HTTPFlow) -> bool:
        """A request over plain HTTP on a reverse listener that has TLS."""
        return self.tls_enabled and not flow.client_conn.tls_established


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [part + end for part in data.split(end) if b"-----BEGIN CERTIFICATE-----" in part]
