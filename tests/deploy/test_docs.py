"""``docs/deploy.md``: every command is run here, or marked as needing cloud credentials.

Each fenced block starts with ``# run by tests/deploy/test_docs.py`` or ``# example: needs …``.
Shell blocks marked "run by" run as written: ``keybrake run`` lines in a network namespace
of their own (fixed ports clash with nothing there) and probed; the others with ``bash``
against a real proxy (``KEYBRAKE_ADMIN_URL``/``KEYBRAKE_ADMIN_TOKEN`` point at it). Every
Python block compiles.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import ssl
import subprocess
from pathlib import Path

import pytest
from tests.conftest import KEYBRAKE, ROOT, KeybrakeProcess
from tests.deploy._deployed import get, start, stop, unverified, wait_until_up
from tests.netns import namespaces, netns_unusable

GUIDE = ROOT / "docs" / "deploy.md"
RUN_BY = "# run by tests/deploy/test_docs.py"
EXAMPLE = "# example: needs "


def blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the guide."""
    return re.findall(r"```(\w+)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def run_blocks(kind: str) -> list[str]:
    return [
        body
        for lang, body in blocks()
        if lang == "sh" and body.startswith(RUN_BY) and ("keybrake run " in body) == (kind == "run")
    ]


def test_every_block_is_run_or_marked_as_an_example() -> None:
    found = blocks()
    assert len(found) >= 6
    for lang, body in found:
        first = body.splitlines()[0]
        assert first.startswith((RUN_BY, EXAMPLE)), f"unmarked {lang} block: {first!r}"
        if lang == "python":
            ast.parse(body)
    assert run_blocks("run") and run_blocks("admin")


def test_the_admin_commands_run_against_a_real_proxy(
    keybrake_stripe: KeybrakeProcess, tmp_path: Path
) -> None:
    kb = keybrake_stripe
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")},
        "KEYBRAKE_ADMIN_URL": kb.admin_url,
        "KEYBRAKE_ADMIN_TOKEN": kb.admin_token,
        "PATH": f"{KEYBRAKE.parent}:{os.environ['PATH']}",
    }
    for body in run_blocks("admin"):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert kb.admin_token not in done.stdout + done.stderr
    keys = kb.admin("GET", "/vault/keys").json()["data"]
    assert [k["status"] for k in keys] == ["revoked"]  # issued, then revoked by the guide
    assert keys[0]["agent_run_label"] == "dramatiq/nightly-billing"


@pytest.mark.skipif(netns_unusable() is not None, reason=str(netns_unusable()))
def test_the_keybrake_run_lines_start_and_serve_their_probes(tmp_path: Path) -> None:
    lines = [
        line
        for body in run_blocks("run")
        for line in body.splitlines()
        if line.startswith("keybrake run ")
    ]
    assert lines
    for n, line in enumerate(lines):
        args = shlex.split(line)[1:]
        listens = {flag: args[i + 1] for i, flag in enumerate(args) if flag.endswith("-listen")}
        home = tmp_path / f"home{n}"
        home.mkdir()
        env = {"HOME": str(home), "KEYBRAKE_ADMIN_TOKEN": "kba_docs_" + "x" * 40}
        log = tmp_path / f"run{n}.log"
        with namespaces(1, "kbdoc") as (ns,):
            proc = start(ns, [str(KEYBRAKE), *args], env, home, log)
            try:
                tls = unverified() if "--tls-name" in args or "--tls-cert" in args else None
                base_port = int(listens["--base-url-listen"].rsplit(":", 1)[1])
                wait_until_up(proc, ns, base_port, tls, log)
                bundle = home / ".keybrake" / "certs" / "keybrake-ca-bundle.pem"
                trusted = ssl.create_default_context(cafile=str(bundle)) if tls else None
                for flag, address in listens.items():
                    port = int(address.rsplit(":", 1)[1])
                    if flag == "--proxy-listen":
                        ns.connect(("127.0.0.1", port)).close()
                        continue
                    for path in ("/healthz", "/readyz"):
                        status, body = get(ns, port, path, tls=trusted)
                        assert status == 200, (line, flag, path, body)
            finally:
                stop(proc)
