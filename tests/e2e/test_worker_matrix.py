"""The worker distribution on every Python it supports (3.9 to 3.13), against this proxy.

For each interpreter pyenv has, a fresh venv gets the keybrake wheel built from a copy of this
tree (the worker side: no proxy package) and, from that interpreter's wheelhouse
(``make worker-wheelhouses``, ``.venv/matrix/<version>``; nothing here reaches an index), the
real ``dramatiq[redis]``, the stripe SDK and ``apache-beam``. That venv's Python then runs
``tests/matrix/worker_checks.py`` against a ``keybrake run`` started here, on 3.12, in front
of the fake Stripe: the client's calls and errors, a Dramatiq actor stopped by the cap without
a retry, a Beam DoFn on the DirectRunner stopped at the cap. The fake's ledger says what was
really charged.

A missing interpreter is a skip with its reason, or a failure where the matrix is required
(``KEYBRAKE_WORKER_MATRIX=required``, as ``.ci/run`` sets).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import REDIS_URL, ROOT, KeybrakeProcess
from tests.e2e.test_install import build_wheel
from tests.fakes import FakeStripe

from keybrake.core.money import parse_usd

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

# The worker side's Pythons; the proxy side is 3.12+ only.
WORKER_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
MATRIX = ROOT / ".venv" / "matrix"
CHECKS = ROOT / "tests" / "matrix" / "worker_checks.py"
REQUIRED = os.environ.get("KEYBRAKE_WORKER_MATRIX") == "required"
# What worker_checks.py charges at $1 a call: the caps of its Dramatiq and Beam keys.
DRAMATIQ_CAP, BEAM_CAP = 5, 12


def _run(
    *cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBRAKE_", "PYTHON"))}
    done = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def interpreter(version: str) -> Path | None:
    """pyenv's newest ``version`` (e.g. 3.9 -> 3.9.18), or None when it is not installed."""
    found = subprocess.run(
        ["pyenv", "which", "python"],
        env={**os.environ, "PYENV_VERSION": version},
        capture_output=True,
        text=True,
    )
    return Path(found.stdout.strip()) if found.returncode == 0 else None


@pytest.fixture(scope="module")
def worker_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory)


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "venv"
    yield where
    shutil.rmtree(where, ignore_errors=True)  # up to 500 MB with Beam, of no use afterwards


@pytest.mark.parametrize("version", WORKER_PYTHONS)
def test_the_worker_side_on(
    version: str,
    worker_wheel: Path,
    keybrake_stripe: KeybrakeProcess,
    fake_stripe: FakeStripe,
    venv: Path,
    tmp_path: Path,
) -> None:
    python = interpreter(version)
    if python is None:
        reason = f"Python {version} is not installed here (pyenv install {version})"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    wheelhouse = MATRIX / version
    if not (wheelhouse / ".done").exists():
        pytest.fail(f"no wheelhouse for {version}: run `make worker-wheelhouses` first")
    beam_missing = wheelhouse / "beam-unavailable"
    # Below 3.12 the proxy extra installs nothing (its packages are marked 3.12+), and the
    # command says which Python the proxy needs; from 3.12 the plain worker install says
    # which extra to install.
    old_python = tuple(int(n) for n in version.split(".")) < (3, 12)
    wheel = f"keybrake[proxy] @ {worker_wheel.as_uri()}" if old_python else str(worker_wheel)
    requirements = [wheel, "dramatiq[redis]", "stripe"]
    checks = ["client", "dramatiq"]
    if beam_missing.exists():
        warnings.warn(f"Beam not checked on {version}: {beam_missing.read_text()}", stacklevel=1)
    else:
        requirements.append("apache-beam")
        checks.append("beam")

    # No pip in the venv (ensurepip copying and compiling it is ~4 s per Python): the pip the
    # interpreter bundles runs from its wheel, as `python pip.whl/pip`, and installs into it.
    _run(python, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    bundled = _run(
        py, "-c", "import ensurepip, pathlib; print(next(pathlib.Path(ensurepip.__file__)"
        ".parent.glob('_bundled/pip-*.whl')))",
    ).stdout.strip()  # fmt: skip
    _run(
        py, f"{bundled}/pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
        # No bytecode for all of Beam's tree at install (half the install's CPU): the
        # modules the checks import are compiled once, when first imported.
        "--no-compile", "--find-links", wheelhouse / "wheelhouse", *requirements,
    )  # fmt: skip
    proxy_only = _run(
        py, "-c", "import importlib.util as u; print([m for m in ('mitmproxy', 'typer', "
        "'pydantic', 'psycopg') if u.find_spec(m)])",
    )  # fmt: skip
    assert proxy_only.stdout.strip() == "[]"  # the worker install pulls no proxy package
    cli = subprocess.run(
        [str(venv / "bin" / "keybrake"), "run"], capture_output=True, text=True, timeout=60
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    if old_python:
        assert "need Python 3.12 or newer" in cli.stderr, cli.stderr
    else:
        assert "pip install 'keybrake[proxy]'" in cli.stderr, cli.stderr

    done = _run(
        py, CHECKS, *checks,
        cwd=tmp_path,
        env={
            "KB_ADMIN_URL": keybrake_stripe.admin_url,
            "KB_ADMIN_TOKEN": keybrake_stripe.admin_token,
            "KB_REDIS_URL": REDIS_URL,
            "KB_NAMESPACE": f"kbtest-matrix-{uuid.uuid4().hex[:10]}",
        },
    )  # fmt: skip
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(done.stdout)
    assert summary["python"].startswith(f"{version}.")
    assert str(venv) in summary["keybrake"]  # the wheel, not this tree

    # What the fake vendor really charged: each key's cap and not a cent more, once a call.
    caps = {"dramatiq": DRAMATIQ_CAP, "beam": BEAM_CAP}
    expected = sum(caps[c] for c in checks if c in caps)
    assert fake_stripe.charged_usd_micros() == expected * 1_000_000
    charges = [e for e in fake_stripe.ledger if e.amount_charged_minor]
    assert len(charges) == expected == len({e.idempotency_key for e in charges})
    for check in caps.keys() & set(checks):
        key = keybrake_stripe.admin("GET", f"/vault/keys/{summary[check]['key_id']}").json()
        assert parse_usd(key["spent_today_usd"]) == caps[check] * 1_000_000
    assert summary["dramatiq"]["outcomes"] == {"ok": 5, "BudgetExhausted": 3}
    if "beam" in checks:
        assert (summary["beam"]["charged"], summary["beam"]["stopped"]) == (12, 18)
