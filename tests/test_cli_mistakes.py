"""The first hour: every mistake a new user makes gets one clear line, never a traceback.

Each test drives the installed ``keybrake`` console script in a subprocess, from a working
directory of its own and with ``HOME`` pointed at a temporary directory (the CA's default
place is ``~/.keybrake/certs``). A mistake exits non-zero with exactly one ``Error: …`` line
on stderr naming what to fix; ``keybrake run`` finds it before it prints its banner. What
happens at Ctrl-C / SIGTERM on a running proxy: ``tests/e2e/test_shutdown.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests._redis import REDIS_ACL_PASSWORD, REDIS_ACL_USER, PrivateRedis
from tests.conftest import KEYBRAKE, ROOT, free_port

POLICIES = ROOT / "policies"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def keybrake(
    *args: str | Path, cwd: Path, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``keybrake ARGS`` as a user types it: none of the test run's KEYBRAKE_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    return subprocess.run(
        [str(KEYBRAKE), *map(str, args)],
        cwd=cwd,
        env={**base, "HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``Error: …`` line a mistake prints (nothing on stdout, no traceback)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.stdout == "", done.stdout  # for `run`: the banner is never printed
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def run_args(data_dir: Path, keybrake_certs: Path, *more: str | Path) -> list[str | Path]:
    return [
        "run",
        *("--data-dir", data_dir, "--policies", POLICIES, "--certs-dir", keybrake_certs),
        *("--proxy-port", str(free_port()), "--admin-port", str(free_port())),
        *more,
    ]


# -- spend and audit on a store with no rows ---------------------------------------------------
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("command", ["spend", "audit"])
def test_spend_and_audit_on_an_empty_store(
    tmp_path: Path, home: Path, command: str, as_json: bool
) -> None:
    data = tmp_path / "data"
    done = keybrake(
        command, "--data-dir", data, *(["--json"] if as_json else []), cwd=tmp_path, home=home
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    if as_json:
        assert json.loads(done.stdout) == []
        return
    header, *rest = done.stdout.splitlines()
    assert header.split()[:2] == (["GROUP", "LABEL"] if command == "spend" else ["TS", "KEY_ID"])
    assert rest == (["total spent: $0.00 in 0 calls"] if command == "spend" else [])


# -- a data dir that cannot be written -----------------------------------------------------------
DATA_DIR_COMMANDS = {
    "run": [],  # run_args adds the rest
    "keys list": ["keys", "list"],
    "keys issue": [
        *("keys", "issue", "--vendor", "stripe", "--daily-usd-cap", "5", "--label", "x"),
        *("--allow", "POST /v1/payment_intents", "--policies", str(POLICIES)),
    ],
    "spend": ["spend"],
    "audit": ["audit"],
}


def data_dir_command(name: str, data_dir: Path, keybrake_certs: Path) -> list[str | Path]:
    if name == "run":
        return run_args(data_dir, keybrake_certs)
    return [*DATA_DIR_COMMANDS[name], "--data-dir", data_dir]


@pytest.mark.parametrize("command", list(DATA_DIR_COMMANDS))
def test_a_data_dir_that_is_a_file(
    tmp_path: Path, home: Path, keybrake_certs: Path, command: str
) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    done = keybrake(*data_dir_command(command, data, keybrake_certs), cwd=tmp_path, home=home)
    line = one_error_line(done, 1)
    assert line == f"Error: data dir {data} is a file, not a directory: pass another --data-dir"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write, root included (``chattr +i``; skipped without it)."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if not chattr or subprocess.run([chattr, "+i", path], capture_output=True).returncode:
            pytest.skip("running as root without `chattr +i`: cannot make a directory read-only")
    else:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", path], check=True)
        path.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "keys list", "spend"])
def test_a_data_dir_that_is_not_writable(
    tmp_path: Path, home: Path, keybrake_certs: Path, read_only_dir: Path, command: str
) -> None:
    args = data_dir_command(command, read_only_dir, keybrake_certs)
    # A token from the environment: the data dir is still where the store lives.
    done = keybrake(*args, cwd=tmp_path, home=home, env={"KEYBRAKE_ADMIN_TOKEN": "kba_" + "x" * 40})
    line = one_error_line(done, 1)
    assert re.fullmatch(
        rf"Error: data dir {re.escape(str(read_only_dir))} is not writable \(.+\): fix its "
        r"permissions or pass another --data-dir \(or KEYBRAKE_DATA_DIR\)",
        line,
    ), line


# -- a store that cannot be reached, or a store URL that is not one ------------------------------
def test_run_with_a_store_that_cannot_be_reached(
    tmp_path: Path, home: Path, keybrake_certs: Path
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    done = keybrake(
        *run_args(tmp_path / "data", keybrake_certs, "--store", down), cwd=tmp_path, home=home
    )
    line = one_error_line(done, 3)
    assert line.startswith(f"Error: store unavailable: Redis store {down}: ConnectionError"), line
    assert line.endswith(
        "; start it or fix --store / KEYBRAKE_STORE (--wait-for-store starts anyway and "
        "refuses vendor calls until it is back)"
    ), line
    # The CLI's key commands say the same kind of thing.
    listed = keybrake("keys", "list", "--store", down, cwd=tmp_path, home=home)
    assert one_error_line(listed, 3).startswith(f"Error: store unavailable: Redis store {down}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://kb.db", "a SQLite URL has no host"),
        ("postgres://127.0.0.1/kb", "unsupported scheme 'postgres'"),
        ("redis://127.0.0.1:port/0", "the port must be a number"),
    ],
)
@pytest.mark.parametrize("command", ["run", "keys list", "audit"])
def test_a_store_url_that_is_not_one(
    tmp_path: Path, home: Path, keybrake_certs: Path, command: str, url: str, message: str
) -> None:
    data = tmp_path / "data"
    args = data_dir_command(command, data, keybrake_certs)
    done = keybrake(*args, "--store", url, cwd=tmp_path, home=home)
    line = one_error_line(done, 2)
    assert line.startswith(f"Error: --store: store URL {url!r}: {message}"), line


# -- a port another process listens on -----------------------------------------------------------
@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("flag", ["--proxy-port", "--admin-port"])
def test_a_port_already_in_use(
    tmp_path: Path, home: Path, keybrake_certs: Path, taken_port: int, flag: str
) -> None:
    data = tmp_path / "data"
    done = keybrake(*run_args(data, keybrake_certs, flag, str(taken_port)), cwd=tmp_path, home=home)
    line = one_error_line(done, 1)
    assert line == (
        f"Error: cannot listen on 127.0.0.1:{taken_port} ({flag}): address already in use; "
        f"stop what listens there or pass another {flag}"
    )
    assert not (data / "keybrake.db").exists()  # found before anything was set up


def test_one_port_for_two_listeners(tmp_path: Path, home: Path, keybrake_certs: Path) -> None:
    port = str(free_port())
    args = run_args(tmp_path / "data", keybrake_certs, "--proxy-port", port, "--admin-port", port)
    line = one_error_line(keybrake(*args, cwd=tmp_path, home=home), 1)
    assert line == (
        f"Error: --proxy-port and --admin-port are both {port}: give each listener its own port"
    )


# -- a policy file with a YAML or schema error ---------------------------------------------------
def policies_with(directory: Path, name: str, edit: tuple[str, str]) -> Path:
    """A copy of the shipped policies; in ``name``, the first ``edit[0]`` is ``edit[1]``."""
    directory.mkdir()
    for f in POLICIES.glob("*.yaml"):
        (directory / f.name).write_text(f.read_text())
    path = directory / name
    text = path.read_text()
    assert edit[0] in text, edit
    path.write_text(text.replace(*edit, 1))
    return path


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


POLICY_MISTAKES = {
    # a bracket left open: the problem is found on the next line, where it began is named
    "yaml syntax": (
        "resend.yaml",
        ("hosts: [api.resend.com]", "hosts: [api.resend.com"),
        "{path}:{next}:5: not valid YAML: expected ',' or ']', but got ':' (while parsing a "
        "flow sequence that began on line {line})",
        "hosts: [api.resend.com",
    ),
    "unknown top-level field": (
        "resend.yaml",
        ("\nhosts: [api.resend.com]", "\nhostz: [api.resend.com]"),
        "{path}:{line}: hostz: unknown field; did you mean 'hosts'?",
        "hostz:",
    ),
    "unknown nested field": (
        "stripe.yaml",
        ("  secret_env: STRIPE_SECRET_KEY", "  secret_envv: STRIPE_SECRET_KEY"),
        "{path}:{line}: auth.secret_envv: unknown field; did you mean 'secret_env'?",
        "secret_envv:",
    ),
    "bad value": (
        "resend.yaml",
        ("max_requests_per_minute: 120", "max_requests_per_minute: 0"),
        "{path}:{line}: max_requests_per_minute: Input should be greater than or equal to 1",
        "max_requests_per_minute: 0",
    ),
}


@pytest.mark.parametrize("command", ["check-policy", "run"])
@pytest.mark.parametrize("mistake", list(POLICY_MISTAKES))
def test_a_policy_mistake_names_file_line_and_field(
    tmp_path: Path, home: Path, keybrake_certs: Path, mistake: str, command: str
) -> None:
    name, edit, expected, needle = POLICY_MISTAKES[mistake]
    policies = tmp_path / "policies"
    path = policies_with(policies, name, edit)
    line = line_of(path, needle)
    if command == "check-policy":
        done = keybrake("check-policy", policies, cwd=tmp_path, home=home)
    else:
        args = run_args(tmp_path / "data", keybrake_certs, "--policies", policies)
        done = keybrake(*args, cwd=tmp_path, home=home)
    assert one_error_line(done, 1) == "Error: " + expected.format(
        path=path, line=line, next=line + 1
    )


def test_an_unknown_field_inside_a_cost_rule(tmp_path: Path, home: Path) -> None:
    """Pydantic's location has the rule's kind in it (``cost.amount_field.amout``); the line
    names the field as the file spells it."""
    policies = tmp_path / "policies"
    edit = (
        "cost: {kind: amount_field, amount: amount,",
        "cost: {kind: amount_field, amout: amount,",
    )
    path = policies_with(policies, "stripe.yaml", edit)
    done = keybrake("check-policy", policies, cwd=tmp_path, home=home)
    line = one_error_line(done, 1)
    n = line_of(path, "amout: amount")
    assert re.fullmatch(
        rf"Error: {re.escape(str(path))}:{n}: endpoints\.\d+\.cost\.amout: unknown field; "
        r"did you mean 'amount'\?",
        line,
    ), line


# -- a mistyped --data-dir: a new store, said so -------------------------------------------------
def test_a_new_store_is_announced_and_an_empty_one_says_so(tmp_path: Path, home: Path) -> None:
    typo = tmp_path / "datta"
    first = keybrake("keys", "list", "--data-dir", typo, cwd=tmp_path, home=home)
    assert first.returncode == 0, first.stderr
    store = typo / "keybrake.db"
    assert first.stderr == f"Note: created a new, empty store: {store}\n"
    assert first.stdout == f"No vault keys in {store}: issue one with `keybrake keys issue`.\n"
    again = keybrake("keys", "list", "--data-dir", typo, cwd=tmp_path, home=home)
    assert again.returncode == 0 and again.stderr == ""  # it exists now: nothing to say
    assert again.stdout == first.stdout
    listed = keybrake("keys", "list", "--data-dir", typo, "--json", cwd=tmp_path, home=home)
    assert json.loads(listed.stdout) == []
    # The reports say it too, on stderr (their --json output stays parseable).
    other = tmp_path / "other"
    spent = keybrake("spend", "--data-dir", other, "--json", cwd=tmp_path, home=home)
    assert spent.stderr == f"Note: created a new, empty store: {other / 'keybrake.db'}\n"
    assert json.loads(spent.stdout) == []


# -- the CA: one well-known place, and said whether it is new ------------------------------------
def test_the_ca_lives_in_one_place_whatever_the_directory(tmp_path: Path, home: Path) -> None:
    certs = home / ".keybrake" / "certs"
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    first = keybrake("ca", cwd=here, home=home)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"Created a new Keybrake CA in {certs}",
        f"CA: {certs / 'mitmproxy-ca-cert.pem'}",
        f"Bundle: {certs / 'keybrake-ca-bundle.pem'}",
    ]
    ca_cert = (certs / "mitmproxy-ca-cert.pem").read_text()
    second = keybrake("ca", cwd=there, home=home)
    assert second.stdout.splitlines()[0] == f"Using the Keybrake CA in {certs}"
    assert (certs / "mitmproxy-ca-cert.pem").read_text() == ca_cert  # the same CA
    assert not (here / "certs").exists() and not (there / "certs").exists()

    # `keybrake run` says where the CA is, and that it is new when it is.
    options = ["--", "--options"]  # print the banner and mitmproxy's options, then exit
    fresh = tmp_path / "fresh-home"
    fresh.mkdir()
    for who, expected in (
        (home, f"CA: {certs}"),
        (fresh, f"CA: created a new Keybrake CA in {fresh / '.keybrake' / 'certs'} (workers "),
    ):
        done = keybrake(
            "run",
            "--data-dir",
            tmp_path / "data",
            "--policies",
            POLICIES,
            *options,
            cwd=there,
            home=who,
        )
        assert done.returncode == 0, done.stderr
        assert any(line.startswith(expected) for line in done.stdout.splitlines()), done.stdout


def test_a_ca_in_the_old_default_place_is_pointed_out(tmp_path: Path, home: Path) -> None:
    old = tmp_path / "certs"
    old.mkdir()
    (old / "mitmproxy-ca.pem").write_text("an earlier version's CA")
    done = keybrake("ca", cwd=tmp_path, home=home)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"Note: {old} holds a Keybrake CA made by an earlier version (the default was "
        "./certs); pass --certs-dir certs to keep the CA your workers trust\n"
    )


@pytest.mark.parametrize("damage", ["garbage", "another certificate", "no certificate"])
def test_a_damaged_ca_is_named_in_one_line_and_left_alone(
    tmp_path: Path, home: Path, keybrake_certs: Path, damage: str
) -> None:
    """The CA workers trust is never replaced behind their back: a ``mitmproxy-ca.pem`` that
    is not a key with its own certificate stops ``run`` and ``ca`` with its path."""
    certs = tmp_path / "certs"
    certs.mkdir()
    good = (keybrake_certs / "mitmproxy-ca.pem").read_text()
    key = good[: good.index("-----BEGIN CERTIFICATE-----")]
    other = tmp_path / "other"
    assert keybrake("ca", "--certs-dir", other, cwd=tmp_path, home=home).returncode == 0
    other_cert = (other / "mitmproxy-ca-cert.pem").read_text()
    text = {"garbage": "garbage\n", "another certificate": key + other_cert, "no certificate": key}
    (certs / "mitmproxy-ca.pem").write_text(text[damage])
    for command in (["ca"], ["run", "--data-dir", tmp_path / "data", "--policies", POLICIES]):
        done = keybrake(*command, "--certs-dir", certs, cwd=tmp_path, home=home)
        line = one_error_line(done, 1)
        assert line.startswith(f"Error: {certs / 'mitmproxy-ca.pem'}: "), line
        assert line.endswith("restore the CA your workers trust, or pass another --certs-dir")
        if damage == "another certificate":
            assert "the certificate is not the private key's" in line
    assert (certs / "mitmproxy-ca.pem").read_text() == text[damage]
    assert not (certs / "keybrake-ca-bundle.pem").exists()


@pytest.mark.redis
@pytest.mark.parametrize(
    ("given", "code", "expected"),
    [
        ("wrong", 3, "(check the Redis user and password)"),
        ("missing", 2, "names a Redis user but no password: put it in the URL"),
    ],
)
def test_run_with_a_bad_redis_password_names_the_problem_never_the_password(
    tmp_path: Path,
    home: Path,
    keybrake_certs: Path,
    acl_redis: PrivateRedis,
    given: str,
    code: int,
    expected: str,
) -> None:
    wrong = f"kb-wrong-{uuid.uuid4().hex[:12]}"
    userinfo = f"{REDIS_ACL_USER}:{wrong}" if given == "wrong" else REDIS_ACL_USER
    url = f"redis://{userinfo}@127.0.0.1:{acl_redis.port}/0?prefix=kbtest:mistakes:"
    args = run_args(tmp_path / "data", keybrake_certs, "--store", url)
    line = one_error_line(keybrake(*args, cwd=tmp_path, home=home), code)
    assert expected in line, line
    assert wrong not in line and REDIS_ACL_PASSWORD not in line
