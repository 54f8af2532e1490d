"""`pip install keybrake` and `pip install 'keybrake[proxy]'` from the built wheel, in fresh
venvs, outside this repository.

The wheel is built from a copy of this tree; every dependency comes from the wheelhouse that
`make test` fills (`.venv/wheelhouse`, built with the venv), so nothing here reaches an index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e

WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
PROXY_ONLY = ("mitmproxy", "typer", "pydantic", "yaml", "redis", "psycopg")


def _run(
    *cmd: str | Path, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBRAKE_", "PYTHON"))}
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def build_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The keybrake wheel, built (offline) from a copy of this tree."""
    if not (WHEELHOUSE / ".done").exists():
        pytest.fail("no wheelhouse: run `make test` (or `make .venv/wheelhouse/.done`) first")
    src = tmp_path_factory.mktemp("src") / "keybrake"
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".keybrake", "*.egg-info", "__pycache__", ".*_cache", "build"
        ),
    )
    out = tmp_path_factory.mktemp("dist")
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
        "--find-links", WHEELHOUSE, "-w", out, src,
    )  # fmt: skip
    (built,) = out.glob("keybrake-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory)


def _venv(where: Path, requirement: str) -> Path:
    _run(sys.executable, "-m", "venv", where)
    py = where / "bin" / "python"
    _run(
        py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", WHEELHOUSE, requirement
    )
    return where / "bin"


def test_the_worker_install_has_no_proxy(wheel: Path, tmp_path: Path) -> None:
    """`pip install keybrake`: the client and the Dramatiq/Beam helpers, without the proxy;
    the command line says what to install instead of a traceback."""
    bin_ = _venv(tmp_path / "worker", str(wheel))
    code = (
        "import importlib.util, keybrake.client, keybrake.integrations\n"
        f"missing = [m for m in {PROXY_ONLY!r} if importlib.util.find_spec(m) is None]\n"
        "print(sorted(missing))\n"
    )
    done = _run(bin_ / "python", "-c", code, cwd=tmp_path)
    assert done.stdout.strip() == str(sorted(PROXY_ONLY))
    cli = _run(bin_ / "keybrake", "--help", cwd=tmp_path, check=False)
    assert cli.returncode == 2
    assert "Traceback" not in cli.stderr
    assert "pip install 'keybrake[proxy]'" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_the_proxy_install_runs_outside_a_clone(wheel: Path, tmp_path: Path) -> None:
    """`pip install 'keybrake[proxy]'` in a directory without policies: the shipped policies
    are enforced; `keybrake init` writes editable copies and a commented keybrake.toml."""
    bin_ = _venv(tmp_path / "proxy", f"keybrake[proxy] @ {wheel.as_uri()}")
    work = tmp_path / "elsewhere"
    work.mkdir()
    checked = _run(bin_ / "keybrake", "check-policy", cwd=work)
    for vendor in ("stripe", "twilio", "resend", "openai", "anthropic"):
        assert vendor in checked.stdout

    proxy_port, admin_port = free_port(), free_port()
    log = (work / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [
            str(bin_ / "keybrake"), "run", "--proxy-port", str(proxy_port),
            "--admin-port", str(admin_port), "--data-dir", str(work / "data"),
            "--certs-dir", str(work / "certs"),
        ],
        cwd=work, stdout=log, stderr=subprocess.STDOUT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")},
             "KEYBRAKE_ADMIN_TOKEN": "kba_install_test_" + "x" * 32},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=1).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status in (200, 503), (work / "proxy.log").read_text()
        keys = httpx.post(
            f"http://127.0.0.1:{admin_port}/vault/keys",
            headers={"Authorization": "Bearer kba_install_test_" + "x" * 32},
            json={
                "vendor": "stripe",
                "daily_usd_cap": 5,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "1h",
                "agent_run_label": "install/test",
            },
            timeout=10,
        )
        assert keys.status_code == 201, keys.text  # the packaged Stripe policy is loaded
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    init = _run(bin_ / "keybrake", "init", "deploy", cwd=work)
    written = sorted(
        p.relative_to(work / "deploy").as_posix() for p in (work / "deploy").rglob("*")
    )
    assert written == [
        "keybrake.toml",
        "policies",
        "policies/anthropic.yaml",
        "policies/openai.yaml",
        "policies/resend.yaml",
        "policies/stripe.yaml",
        "policies/twilio.yaml",
    ]
    assert "keybrake.toml" in init.stdout
    shipped = (ROOT / "policies" / "stripe.yaml").read_text()
    assert (work / "deploy" / "policies" / "stripe.yaml").read_text() == shipped
    # The copies are what runs from that directory: an edit there is enforced.
    checked = _run(bin_ / "keybrake", "check-policy", cwd=work / "deploy")
    assert "stripe" in checked.stdout
