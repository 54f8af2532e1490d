"""Redis store URLs: ``redis://`` and ``rediss://`` (one server) and ``redis+cluster://`` and
``rediss+cluster://`` (a Redis Cluster, or Valkey's, named by one or more of its nodes) parsed
into connection settings, and the same URLs shown without their password.

The password goes no further than `RedisTarget.password`, which its ``repr`` leaves out;
every message, log line, ``repr(store)`` and banner shows a URL through `redact_url`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
import urllib.parse
from typing import Any

__all__ = [
    "AUDIT_CLAIM_IDLE_MS",
    "PASSWORD_ENV",
    "RedisTarget",
    "parse_redis_url",
    "redact_url",
    "split_password",
]

#: Environment variable with the Redis password, used when the store URL has none.
PASSWORD_ENV = "KEYBRAKE_STORE_PASSWORD"
DEFAULT_PREFIX = "keybrake:"
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = ("prefix", "allow_eviction", "audit_claim_idle_ms", *_TLS_OPTIONS)
#: How long (ms) an audit outbox row another replica claimed stays its own before a live
#: replica's pump claims it again (that replica died, or is stuck), by default.
AUDIT_CLAIM_IDLE_MS = 30_000
# Below a second a slow but live pump would see its rows moved by another (written once all
# the same: the sink skips a row it has), above a day a dead replica's rows would wait too long.
_AUDIT_CLAIM_IDLE_RANGE = (1_000, 86_400_000)
_YES, _NO = ("1", "true", "yes"), ("0", "false", "no", "")
_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
# Query options other than ours may hold anything (``?password=``): their values are hidden.
_QUERY_VALUE = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
_ENCODE_HINT = "percent-encode / ? # @ in a password: %2F %3F %23 %40"
_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
_SCHEMES_SEP = tuple(f"{scheme}://" for scheme in _SCHEMES)


def redact_url(url: str) -> str:
    """``url`` with the password in its user info, and the value of any query option but
    Keybrake's own, replaced by ``***``; never raises.

    Works on text that is not a well-formed URL too (say an unencoded ``/`` in the password):
    it may then hide more than the password, never less.

    >>> redact_url("rediss://keybrake:s3cret@10.0.0.5:6380/0?prefix=kb:")
    'rediss://keybrake:***@10.0.0.5:6380/0?prefix=kb:'
    >>> redact_url("redis://:s3/cret@10.0.0.5:6379/0")
    'redis://:***@10.0.0.5:6379/0'
    >>> redact_url("redis://keybrake@10.0.0.5:6379/0?password=s3cret")
    'redis://keybrake@10.0.0.5:6379/0?password=***'
    """
    url = _QUERY_VALUE.sub(_hide_unknown_value, url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return url  # a user name alone: nothing secret
    return f"{scheme}://{user}:***@{hostpart}"


def _hide_unknown_value(match: re.Match[str]) -> str:
    separator, name, value = match.groups()
    return f"{separator}{name}={value if name in _OPTIONS else '***'}"


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password (``None`` when it has none).

    Lets ``keybrake run`` hand the password to the proxy by environment variable rather than
    inside a mitmproxy option, which mitmweb displays and mitmproxy repeats in its errors.

    >>> split_password("redis://keybrake:s%40cret@10.0.0.5:6379/0")
    ('redis://keybrake@10.0.0.5:6379/0', 's@cret')
    >>> split_password("sqlite:///data/keybrake.db")
    ('sqlite:///data/keybrake.db', None)
    """
    if not url.lower().startswith(_SCHEMES_SEP):
        return url, None
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url, None
    hostport = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{hostport}" if parts.username else hostport
    return (
        urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
        urllib.parse.unquote(parts.password),
    )


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """Where and how to reach Redis; ``url`` is for messages (no password, no prefix)."""

    url: str
    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    prefix: str = DEFAULT_PREFIX
    # Start even though Redis may evict keys (its maxmemory-policy is not noeviction).
    allow_eviction: bool = False
    # How long (ms) a row another replica claimed from the audit outbox stays its own.
    audit_claim_idle_ms: int = AUDIT_CLAIM_IDLE_MS
    # A Redis Cluster: ``nodes`` are where to start discovering it (``host``/``port`` is the
    # first of them).
    cluster: bool = False
    nodes: tuple[tuple[str, int], ...] = ()

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a redis-py connection (pool), TLS aside."""
        if self.cluster:
            return {"username": self.username, "password": self.password}
        return {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
        }

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of ``rediss://`` (``None`` for ``redis://``), made once: building
        one loads the CA store, far too slow to repeat for every new connection.

        ``ssl_ca_certs`` replaces the system's CAs (a private Redis has a private CA); the
        server's host name is checked against its certificate unless ``ssl_cert_reqs=none``.
        `ValueError` when a certificate or key file cannot be loaded.
        """
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_certs)
            if not self.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.certfile:
                context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ValueError) as e:
            raise ValueError(f"store URL {self.url!r}: cannot load its TLS files: {e}") from None
        return context


def _cluster_nodes(netloc: str, shown: str) -> tuple[tuple[str, int], ...]:
    """The ``host:port`` list of a cluster URL (after any user info), each port defaulting to
    6379; IPv6 addresses in brackets.

    >>> _cluster_nodes("kb@10.0.0.5:7000,10.0.0.6", "")
    (('10.0.0.5', 7000), ('10.0.0.6', 6379))
    """
    nodes: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        one = urllib.parse.urlsplit(f"//{item.strip()}")
        try:
            host, port = one.hostname, one.port
        except ValueError:
            raise ValueError(
                f"store URL {shown!r}: each node's port must be a number ({_ENCODE_HINT})"
            ) from None
        if not host:
            raise ValueError(
                f"store URL {shown!r}: name the cluster's nodes, e.g. "
                "redis+cluster://10.0.0.5:7000,10.0.0.6:7000"
            )
        nodes.append((host, port if port is not None else 6379))
    return tuple(nodes)


def parse_redis_url(url: str, password: str | None = None) -> RedisTarget:
    """The `RedisTarget` of a ``redis://``, ``rediss://``, ``redis+cluster://`` or
    ``rediss+cluster://`` store URL.

    ``redis[s]://[[user]:password@]host[:port][/db][?option=value&…]``, or for a Redis
    Cluster ``redis[s]+cluster://[[user]:password@]host[:port][,host[:port]…][/0][?…]`` (the
    nodes to discover the cluster from; any one that answers will do; a cluster has database 0
    only). Options: ``prefix``
    (key prefix, default ``keybrake:``), ``allow_eviction`` (``1``: start even when Redis's
    ``maxmemory-policy`` may evict budget state; default ``0``: refuse),
    ``audit_claim_idle_ms`` (how long audit rows a replica took from the outbox and has not
    written stay its own before another replica's pump takes them over, 1000 to 86400000,
    default 30000) and, with
    ``rediss://`` only, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (PEM files) and
    ``ssl_cert_reqs`` (``required``, the default: the server's certificate and host name are
    checked; ``none``: not checked).
    ``password`` is used when the URL has none. `ValueError` names what is wrong, with the
    URL redacted.

    Example::

        parse_redis_url("rediss://keybrake@redis.internal:6380/0?ssl_ca_certs=/etc/kb/ca.pem",
                        password=os.environ["KEYBRAKE_STORE_PASSWORD"])
    """
    shown = redact_url(url)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"store URL {shown!r}: a Redis URL starts with redis:// or rediss:// (one server), "
            "or redis+cluster:// or rediss+cluster:// (a Redis Cluster)"
        )
    cluster = scheme.endswith("+cluster")
    nodes: tuple[tuple[str, int], ...] = ()
    host: str | None
    port: int | None
    if cluster:
        nodes = _cluster_nodes(parts.netloc, shown)
        host, port = nodes[0]
    else:
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ValueError(
                f"store URL {shown!r}: the port must be a number ({_ENCODE_HINT})"
            ) from None
    if not host:
        raise ValueError(
            f"store URL {shown!r}: name the Redis host, e.g. redis://10.0.0.5:6379/0 "
            f"({_ENCODE_HINT})"
        )
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"store URL {shown!r}: the path is a database number, e.g. /0")
    if cluster and db != "0":
        raise ValueError(f"store URL {shown!r}: a Redis Cluster has database 0 only")
    options: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name not in _OPTIONS:
            hint = f" (a password goes before the host, or in {PASSWORD_ENV})"
            raise ValueError(
                f"store URL {shown!r}: unknown option {name!r}; the options are "
                + ", ".join(_OPTIONS)
                + (hint if "pass" in name.lower() else "")
            )
        options[name] = value
    tls = scheme.startswith("rediss")
    if not tls and any(name in options for name in _TLS_OPTIONS):
        raise ValueError(f"store URL {shown!r}: ssl_* options need TLS: write rediss://")
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if cluster and ("{" in prefix or "}" in prefix):
        # Every key's hash tag is the store's own (one per budget tree): a brace in the
        # prefix would make the prefix the tag, putting everything on one shard or none.
        raise ValueError(f"store URL {shown!r}: on a cluster the prefix may not contain {{ or }}")
    cert_reqs = options.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in ("required", "none"):
        raise ValueError(f"store URL {shown!r}: ssl_cert_reqs is 'required' (default) or 'none'")
    for name in _FILE_OPTIONS:
        path = options.get(name)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"store URL {shown!r}: {name}: no such file {path!r}")
    allow_eviction = options.get("allow_eviction", "0").lower()
    if allow_eviction not in _YES + _NO:
        raise ValueError(f"store URL {shown!r}: allow_eviction is 1 or 0 (the default)")
    claim_idle = options.get("audit_claim_idle_ms", str(AUDIT_CLAIM_IDLE_MS))
    low, high = _AUDIT_CLAIM_IDLE_RANGE
    if not (claim_idle.isdigit() and low <= int(claim_idle) <= high):
        raise ValueError(
            f"store URL {shown!r}: audit_claim_idle_ms is a whole number of milliseconds from "
            f"{low} to {high} (default {AUDIT_CLAIM_IDLE_MS})"
        )
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError(f"store URL {shown!r}: ssl_keyfile needs ssl_certfile too")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    secret = urllib.parse.unquote(parts.password) if parts.password else password or None
    if username and not secret:
        raise ValueError(
            f"store URL {shown!r} names a Redis user but no password: put it in the URL "
            f"(user:password@host) or in the {PASSWORD_ENV} environment variable"
        )
    query = urllib.parse.urlencode([(k, v) for k, v in options.items() if k != "prefix"], safe="/")
    return RedisTarget(
        url=redact_url(urllib.parse.urlunsplit(parts._replace(query=query, fragment=""))),
        host=host,
        port=port if port is not None else 6379,
        db=int(db),
        username=username,
        password=secret,
        tls=tls,
        ca_certs=options.get("ssl_ca_certs"),
        certfile=options.get("ssl_certfile"),
        keyfile=options.get("ssl_keyfile"),
        verify=cert_reqs == "required",
        prefix=prefix,
        allow_eviction=allow_eviction in _YES,
        audit_claim_idle_ms=int(claim_idle),
        cluster=cluster,
        nodes=nodes,
    )
