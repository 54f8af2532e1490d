"""The whole-suite secrets scan.

Every real vendor secret the fake vendors accept is listed here. After a test run (all
xdist workers included) every file under the run's base temp directory is scanned for each
secret in each form it travels in (raw, and inside an HTTP Basic credential): data dirs,
SQLite stores and their ``-wal``/``-shm`` files, ``audit.db``, proxy logs and flow files. Audit
rows written to PostgreSQL and keys written to Redis are scanned by their fixtures before
they are dropped. Any hit fails the run (see ``pytest_sessionfinish`` in ``conftest.py``).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests._redis import REDIS_ACL_PASSWORD, REDIS_ADMIN_PASSWORD
from tests.fakes.anthropic import DEFAULT_API_KEY as ANTHROPIC_API_KEY
from tests.fakes.openai import DEFAULT_API_KEY as OPENAI_API_KEY
from tests.fakes.resend import DEFAULT_API_KEY
from tests.fakes.stripe import DEFAULT_SECRET
from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN

__all__ = ["REAL_SECRETS", "ScanResult", "check_proxy_env", "needles", "scan_texts", "scan_tree"]

#: name -> value of every real secret a proxy under test is given.
REAL_SECRETS: dict[str, str] = {
    "STRIPE_SECRET_KEY": DEFAULT_SECRET,
    "TWILIO_AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
    "RESEND_API_KEY": DEFAULT_API_KEY,
    "OPENAI_API_KEY": OPENAI_API_KEY,
    "ANTHROPIC_API_KEY": ANTHROPIC_API_KEY,
    # The YAML-only vendor of tests/e2e/test_yaml_vendor.py.
    "ACME_API_KEY": "acme_live_" + "5f0c1e2d3b4a69788796a5b4",
    # The private Redis servers' passwords (tests/_redis.py): never in a log or a file either.
    "KEYBRAKE_STORE_PASSWORD": REDIS_ACL_PASSWORD,
    "REDIS_ADMIN_PASSWORD": REDIS_ADMIN_PASSWORD,
}


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def needles() -> dict[str, bytes]:
    """Each secret in every encoding it is sent in by the SDKs (and so could be logged in)."""
    out: dict[str, bytes] = {}
    for name, value in REAL_SECRETS.items():
        out[name] = value.encode()
    out["STRIPE_SECRET_KEY (Basic)"] = _b64(f"{DEFAULT_SECRET}:")
    out["TWILIO_AUTH_TOKEN (Basic)"] = _b64(f"{DEFAULT_ACCOUNT_SID}:{DEFAULT_AUTH_TOKEN}")
    return out


def check_proxy_env(env: dict[str, str]) -> None:
    """Refuse to start a proxy under test with a secret the scan would not look for."""
    for name, value in env.items():
        if name.endswith(("_SECRET_KEY", "_AUTH_TOKEN", "_API_KEY", "_PASSWORD")) and value:
            assert value in REAL_SECRETS.values(), (
                f"{name} is not in tests/_secrets.py REAL_SECRETS: add it so the whole-suite "
                "secrets scan looks for it"
            )


@dataclass
class ScanResult:
    files: int = 0
    bytes: int = 0
    hits: list[str] = field(default_factory=list)


def scan_tree(root: Path) -> ScanResult:
    """Scan every regular file under ``root`` (symlinks are not followed)."""
    result = ScanResult()
    wanted = needles()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            result.files += 1
            result.bytes += len(data)
            result.hits += [f"{what} in {path}" for what, n in wanted.items() if n in data]
    return result


def scan_texts(where: str, texts: Iterable[bytes | str]) -> list[str]:
    """Hits of any secret in ``texts`` (rows of a database, values of a Redis key)."""
    wanted = needles()
    hits = []
    for text in texts:
        blob = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        hits += [f"{what} in {where}" for what, n in wanted.items() if n in blob]
    return hits
