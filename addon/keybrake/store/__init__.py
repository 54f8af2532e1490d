"""State backends: embedded SQLite (default) and Redis, behind one `Store` protocol."""

from __future__ import annotations

import os
import pathlib
import urllib.parse
from typing import TYPE_CHECKING, Any

from keybrake.store._base import (
    OBJECT_TTL,
    Admission,
    AdmissionRequest,
    BudgetState,
    Hold,
    IdempotencyBegin,
    IdempotencyClaim,
    IssuerRecord,
    KeyRecord,
    LabelBudget,
    LabelTreeConflict,
    ObjectOwner,
    RateResult,
    ReserveResult,
    Settlement,
    Store,
    StoredResponse,
    StoreUnavailable,
    VendorFreeze,
    utc_day,
)
from keybrake.store._redis_url import PASSWORD_ENV, redact_url, split_password
from keybrake.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from keybrake.store.redis import RedisStore

__all__ = [
    "OBJECT_TTL",
    "PASSWORD_ENV",
    "Admission",
    "AdmissionRequest",
    "BudgetState",
    "Hold",
    "IdempotencyBegin",
    "IdempotencyClaim",
    "IssuerRecord",
    "KeyRecord",
    "LabelBudget",
    "LabelTreeConflict",
    "ObjectOwner",
    "RateResult",
    "RedisStore",
    "ReserveResult",
    "SQLiteStore",
    "Settlement",
    "Store",
    "StoreUnavailable",
    "StoredResponse",
    "VendorFreeze",
    "open_store",
    "redact_url",
    "split_password",
    "utc_day",
]


def __getattr__(name: str) -> Any:
    # redis is imported only by deployments that use it: SQLite users skip its import cost.
    if name == "RedisStore":
        from keybrake.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> Store:
    """The store a URL names; call ``await store.open()`` before use.

    - ``sqlite:///abs/path/state.db`` (absolute) or ``sqlite:relative/state.db`` (relative to
      the working directory) → `SQLiteStore`
    - ``redis://[[user]:password@]host:port/db`` or, with TLS, ``rediss://…``, optionally
      with ``?prefix=keybrake-prod:`` (default ``keybrake:``) and, for TLS, ``ssl_ca_certs``,
      ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs=none`` → `RedisStore`. Without a
      password in the URL, the ``KEYBRAKE_STORE_PASSWORD`` environment variable's is used.
    - ``redis+cluster://host:port[,host:port…]`` (``rediss+cluster://`` with TLS), the same
      options → `RedisStore` on a Redis Cluster (or Valkey's), discovered from those nodes

    Errors (`ValueError`) show the URL with its password replaced by ``***``.

    Example::

        store = open_store("sqlite:///var/lib/keybrake/state.db")
        store = open_store("redis://127.0.0.1:6379/0?prefix=kb-staging:")
        store = open_store("rediss://keybrake@10.0.0.5:6380/0?ssl_ca_certs=/etc/kb/ca.pem")
        store = open_store("redis+cluster://10.0.0.5:7000,10.0.0.6:7000/0")
    """
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if rest.startswith("///"):
            path = rest[2:]
        elif rest.startswith("//"):
            raise ValueError(
                f"store URL {redact_url(url)!r}: a SQLite URL has no host; write "
                "sqlite:///abs/path.db (absolute) or sqlite:relative/path.db"
            )
        else:
            path = rest
        path = urllib.parse.unquote(path)
        if not path or path.endswith("/"):
            raise ValueError(
                f"store URL {redact_url(url)!r}: name a database file, e.g. sqlite:///data/kb.db"
            )
        return SQLiteStore(pathlib.Path(path))
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from keybrake.store.redis import RedisStore

        return RedisStore(url, password=os.environ.get(PASSWORD_ENV) or None)
    raise ValueError(
        f"store URL {redact_url(url)!r}: unsupported scheme {scheme!r}; use "
        "sqlite:///abs/path.db, sqlite:relative.db, redis://host:6379/0 or "
        "rediss://host:6380/0 (optionally ?prefix=…)"
    )
