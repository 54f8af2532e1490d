"""mitmproxy options that would change a call after Keybrake admitted it, and the addon chain.

An operator's mistake (or a config file someone else wrote) must not undo the guard: with
``map_remote`` a request that already carries the real vendor secret goes to another host;
with ``server_replay`` a paid call is answered without the vendor; with ``modify_headers``
the credential or the idempotency key changes after the checks. Keybrake refuses these
options however they are set: on the command line (one ``Error:`` line before anything
starts), in mitmproxy's ``config.yaml`` (the proxy exits before serving a call).

``keybrake run`` also unloads the mitmproxy addons it never uses from mitmdump's chain, and
has each event delivered only to the addons that handle it (`keybrake.proxy._dispatch`);
the calls still go through and the log says both.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe, FakeTLS
from tests.security.conftest import error_code, raw_post, sdk
from tests.test_cli_mistakes import keybrake, one_error_line, run_args

from keybrake.proxy.mitm_chain import UNLOADED, refused_in_args

pytestmark = pytest.mark.e2e


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--set", "map_remote=|https://api.stripe.com/|https://127.0.0.1:1/"], "map_remote"),
        (["--set=modify_headers=/~q/Authorization/Bearer sk_live_x"], "modify_headers"),
        (["-M", "|api.stripe.com|127.0.0.1:1"], "map_remote"),
        (["--server-replay", "flows.mitm"], "server_replay"),
        (["-H", "/Idempotency-Key/x"], "modify_headers"),
        (["--upstream-auth", "user:pass"], "upstream_auth"),
        (["--anticache"], "anticache"),
    ],
)
def test_rewriting_options_on_the_command_line_stop_the_start(
    tmp_path: Path, home: Path, keybrake_certs: Path, args: list[str], option: str
) -> None:
    done = keybrake(
        *run_args(tmp_path / "data", keybrake_certs), "--", *args, cwd=tmp_path, home=home
    )
    line = one_error_line(done, 1)
    assert f"mitmproxy's {option} option" in line, line
    assert not (tmp_path / "data").exists()  # nothing was started or created


def test_options_that_change_nothing_are_not_refused() -> None:
    assert refused_in_args(["--set", "flow_detail=0", "--no-anticache", "-v"]) is None
    assert refused_in_args(["--set", "keybrake_shutdown_grace=5"]) is None


def test_map_remote_from_config_yaml_never_reaches_a_call(
    tmp_path: Path, keybrake_certs: Path, fake_tls: FakeTLS, fake_stripe: FakeStripe
) -> None:
    # mitmproxy reads config.yaml from its confdir, Keybrake's certs dir: whoever can write
    # there tries to send Stripe calls, real secret included, to a host of their choosing.
    certs = tmp_path / "certs"
    shutil.copytree(keybrake_certs, certs)
    (certs / "config.yaml").write_text(
        "map_remote:\n  - '|https://api.stripe.com/|https://127.0.0.1:9/'\n"
    )
    workdir = tmp_path / "kb"
    workdir.mkdir()
    kb = KeybrakeProcess(workdir, certs, {"stripe": fake_stripe}, fake_tls)
    with pytest.raises(RuntimeError, match="keybrake exited") as exc:
        kb.start(timeout=30)
    assert "mitmproxy's map_remote option" in str(exc.value)
    assert fake_stripe.ledger == []


def test_mitmdump_runs_without_the_addons_keybrake_never_uses(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = sdk(keybrake_stripe, keybrake_stripe.issue_key(), monkeypatch)
    pi = client.v1.payment_intents.create(params={"amount": 700, "currency": "usd"})
    assert pi.amount == 700
    assert len(fake_stripe.ledger) == 1
    assert f"unloaded {len(UNLOADED)} mitmproxy addons" in keybrake_stripe.log()
    assert "each mitmproxy event goes only to the addons that handle it" in keybrake_stripe.log()


def test_a_script_reloaded_while_the_proxy_runs_leaves_every_call_checked(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """An operator's ``-s`` script that mitmproxy reloads while the proxy runs changes the
    tree of addons: the per-event handler lists (`keybrake.proxy._dispatch`) are made again,
    the new script's hooks run and the old one's do not, and the guard still checks every
    call: a refused endpoint never reaches the vendor, an allowed one is charged once."""
    script = tmp_path / "extra.py"
    body = "def response(flow):\n    flow.response.headers['x-extra'] = {!r}\n"
    script.write_text(body.format("v1"))
    kb = keybrake_factory({"stripe": fake_stripe}, extra_args=["-s", str(script)])
    key = kb.issue_key()
    form, content = (
        b"amount=500&currency=usd",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    first = raw_post(kb, key, "/v1/payment_intents", form, content)
    assert first.status_code == 200 and first.headers["x-extra"] == "v1"

    script.write_text(body.format("v2"))
    os.utime(script, (time.time() + 5, time.time() + 5))  # a newer mtime than the load
    loaded = f"Loading script {script}"
    deadline = time.monotonic() + 15  # mitmproxy looks at the file once a second
    while kb.log().count(loaded) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kb.log().count(loaded) == 2, kb.log()[-2000:]

    refused = raw_post(kb, key, "/v1/refunds", b"payment_intent=pi_1", content)
    assert refused.status_code == 403, refused.text
    assert error_code(refused) == "endpoint_not_allowed"
    assert refused.headers["x-extra"] == "v2"
    second = raw_post(kb, key, "/v1/payment_intents", form, content)
    assert second.status_code == 200 and second.headers["x-extra"] == "v2"
    assert [e.path for e in fake_stripe.ledger] == ["/v1/payment_intents"] * 2
    assert fake_stripe.ledger[-1].headers["Authorization"] == f"Bearer {fake_stripe.secret}"
