"""The ``keybrake`` console script: a clear line, not a traceback, where the proxy cannot run.

Workers install ``keybrake`` alone (the client and the Dramatiq/Beam helpers); the command
line runs and manages the proxy, which needs ``keybrake[proxy]`` and Python 3.12 or newer.
This module must import on every Python the worker side supports.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["main"]

# Top-level modules only the proxy side needs (``keybrake[proxy]``).
_PROXY_MODULES = frozenset(
    {
        "mitmproxy",
        "typer",
        "click",
        "pydantic",
        "yaml",
        "redis",
        "psycopg",
        "prometheus_client",
        "jinja2",
        "dns",
    }
)


def main() -> None:
    if sys.version_info < (3, 12):
        found = ".".join(str(n) for n in sys.version_info[:3])
        sys.stderr.write(
            f"Error: the keybrake proxy and its command line need Python 3.12 or newer (this is "
            f"{found}); workers use the keybrake package from their own code, no command "
            "needed\n"
        )
        raise SystemExit(2)
    try:
        from keybrake.cli import main as cli_main
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in _PROXY_MODULES:
            raise
        sys.stderr.write(
            f"Error: the keybrake command line runs the proxy, which needs its own packages "
            f"({missing} is not installed): pip install 'keybrake[proxy]'\n"
        )
        raise SystemExit(2) from None
    try:
        cli_main()
    finally:
        # The interpreter's exit would walk every object of mitmproxy, pydantic and the
        # policies through the cycle collector (~0.4 s of CPU); none is garbage that needs it.
        gc.freeze()
