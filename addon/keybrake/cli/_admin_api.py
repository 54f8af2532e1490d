"""The command line's remote side: ``--admin-url`` and the admin token make `RemoteAdmin`.

With ``--admin-url`` the key, budget, spend and audit commands go through a proxy's admin API
(`keybrake.client`) instead of opening the store, and print what the API answers: the same
JSON the local commands build. Every refusal or transport failure becomes a `RemoteError`
with one line to show and the exit code the local commands use for the same failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from keybrake.client import (
    Forbidden,
    InvalidRequest,
    KeybrakeClient,
    KeybrakeError,
    NotFound,
    TransportError,
    Unauthorized,
    Unavailable,
)
from keybrake.client._calls import Op

__all__ = ["RemoteAdmin", "RemoteError", "admin_token", "remote_admin"]

TOKEN_ENV = "KEYBRAKE_ADMIN_TOKEN"


class RemoteError(Exception):
    """The admin API could not do it: ``message`` is one line, ``exit_code`` as the CLI's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def admin_token(token_file: Path | None, data_dir: Path) -> str:
    """The admin token: ``--admin-token-file``, else ``KEYBRAKE_ADMIN_TOKEN``, else
    ``<data dir>/admin-token`` (where ``keybrake run`` writes it) when that file exists.

    >>> admin_token(None, Path("/nowhere"))  # doctest: +SKIP
    'kba_...'
    """
    if token_file is None and os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = token_file if token_file is not None else data_dir / "admin-token"
    if token_file is None and not path.is_file():
        raise RemoteError(
            "--admin-url needs the proxy's admin token: --admin-token-file FILE or "
            f"{TOKEN_ENV} (`keybrake run` prints where its token is)",
            2,
        )
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise RemoteError(f"--admin-token-file: cannot read {path} ({e.strerror or e})", 2) from e
    if not token:
        raise RemoteError(f"--admin-token-file: {path} is empty", 2)
    return token


class RemoteAdmin(KeybrakeClient):
    """`KeybrakeClient` answering with the JSON the API sent (what the local commands print).

    >>> RemoteAdmin("http://10.0.0.5:8081", token).call("GET", "/vault/keys")  # doctest: +SKIP
    {'object': 'list', 'data': [...]}
    """

    def call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int | None] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        return self._run(Op(method, path, _as_is, query, body))

    def items(self, path: str, params: Mapping[str, str | int | None] | None = None) -> Any:
        """The ``data`` of a list answer."""
        payload = self.call("GET", path, params)
        return payload.get("data", []) if isinstance(payload, dict) else []


def _as_is(payload: Any) -> Any:
    return payload


@contextlib.contextmanager
def remote_admin(admin_url: str, token_file: Path | None, data_dir: Path) -> Iterator[RemoteAdmin]:
    """A `RemoteAdmin` for ``admin_url``; any `KeybrakeError` inside becomes a `RemoteError`."""
    url = admin_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RemoteError(
            f"--admin-url: {admin_url!r} is not a URL such as http://10.0.0.5:8081", 2
        )
    token = admin_token(token_file, data_dir)
    try:
        with RemoteAdmin(url, token) as api:
            yield api
    except Unauthorized as e:
        raise RemoteError(
            f"the admin API at {url} refused the admin token (401 {e.code}): give the "
            f"proxy's token with --admin-token-file or {TOKEN_ENV}",
            2,
        ) from None
    except NotFound as e:
        raise RemoteError(e.message, 4) from None
    except Forbidden as e:
        raise RemoteError(f"refused (403 {e.code}): {e.message}", 2) from None
    except InvalidRequest as e:
        raise RemoteError(e.message, 2) from None
    except Unavailable as e:
        raise RemoteError(f"store unavailable (the admin API at {url}: {e.message})", 3) from None
    except TransportError as e:
        raise RemoteError(f"cannot reach the admin API: {e.message}", 3) from None
    except KeybrakeError as e:
        raise RemoteError(f"the admin API at {url} answered {e.status}: {e}", 1) from None
