"""State backends: embedded SQLite (default) and Redis, behind one `Store` protocol."""

from __future__ import annotations

import pathlib
import urllib.parse
from typing import TYPE_CHECKING, Any

from keybrake.store._base import (
    BudgetState,
    IdempotencyBegin,
    KeyRecord,
    RateResult,
    ReserveResult,
    Store,
    StoredResponse,
    StoreUnavailable,
    utc_day,
)
from keybrake.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from keybrake.store.redis import RedisStore

__all__ = [
    "BudgetState",
    "IdempotencyBegin",
    "KeyRecord",
    "RateResult",
    "RedisStore",
    "ReserveResult",
    "SQLiteStore",
    "Store",
    "StoreUnavailable",
    "StoredResponse",
    "open_store",
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
    - ``redis://[:password@]host:port/db`` or ``rediss://…``, optionally with
      ``?prefix=keybrake-prod:`` (default ``keybrake:``) → `RedisStore`

    Example::

        store = open_store("sqlite:///var/lib/keybrake/state.db")
        store = open_store("redis://127.0.0.1:6379/0?prefix=kb-staging:")
    """
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if rest.startswith("///"):
            path = rest[2:]
        elif rest.startswith("//"):
            raise ValueError(
                f"store URL {url!r}: a SQLite URL has no host; write sqlite:///abs/path.db "
                "(absolute) or sqlite:relative/path.db"
            )
        else:
            path = rest
        path = urllib.parse.unquote(path)
        if not path or path.endswith("/"):
            raise ValueError(f"store URL {url!r}: name a database file, e.g. sqlite:///data/kb.db")
        return SQLiteStore(pathlib.Path(path))
    if scheme in ("redis", "rediss"):
        from keybrake.store.redis import RedisStore

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for name, value in query if name == "prefix"]
        others = [(name, value) for name, value in query if name != "prefix"]
        # redis-py would pass an unknown query argument on to the connection and fail.
        redis_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(others)))
        if prefixes:
            return RedisStore(redis_url, prefix=prefixes[-1])
        return RedisStore(redis_url)
    raise ValueError(
        f"store URL {url!r}: unsupported scheme {scheme!r}; use sqlite:///abs/path.db, "
        "sqlite:relative.db, redis://host:6379/0 or rediss://host:6380/0 (optionally ?prefix=…)"
    )
