"""keybrake.toml: `keybrake init` writes it, `keybrake run` reads it, flags win over it, and a
misspelt setting stops the command with the closest valid name (the real CLI, in a
subprocess, from a directory of its own)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import KEYBRAKE, ROOT


def keybrake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    return subprocess.run(
        [str(KEYBRAKE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_misspelt_setting_names_the_closest_one(tmp_path: Path) -> None:
    (tmp_path / "keybrake.toml").write_text("[run]\nproxy_prot = 9000\n")
    done = keybrake("run", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "Error: keybrake.toml: [run] proxy_prot: unknown setting (did you mean 'proxy_port'?)"
    )


def test_a_broken_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "keybrake.toml").write_text("[run\nproxy_port = 9000\n")
    done = keybrake("run", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: keybrake.toml: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_file_is_read_and_flags_win(tmp_path: Path) -> None:
    """`run -- --options` checks the policies, then only prints: nothing listens."""
    keybrake("init", ".", cwd=tmp_path)
    config = tmp_path / "keybrake.toml"
    config.write_text(config.read_text().replace('policies = "policies"', 'policies = "nope"'))
    done = keybrake("run", "--data-dir", "data", "--", "--options", cwd=tmp_path)
    assert done.returncode != 0
    assert f"{tmp_path / 'nope'}: policies directory does not exist" in done.stderr
    flag = keybrake(
        "run", "--data-dir", "data", "--policies", str(ROOT / "policies"), "--", "--options",
        cwd=tmp_path,
    )  # fmt: skip
    assert flag.returncode == 0, flag.stderr
    # --config FILE names the file from anywhere; its paths are relative to the file.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = keybrake("--config", str(config), "run", "--", "--options", cwd=elsewhere)
    assert f"{tmp_path / 'nope'}: policies directory does not exist" in done.stderr


def test_init_keeps_what_exists(tmp_path: Path) -> None:
    first = keybrake("init", "d", cwd=tmp_path)
    assert first.returncode == 0
    assert sorted(line.split()[-1] for line in first.stdout.splitlines()) == [
        "d/keybrake.toml",
        "d/policies/anthropic.yaml",
        "d/policies/openai.yaml",
        "d/policies/resend.yaml",
        "d/policies/stripe.yaml",
        "d/policies/twilio.yaml",
    ]
    edited = tmp_path / "d" / "policies" / "stripe.yaml"
    edited.write_text(edited.read_text() + "\n# mine\n")
    again = keybrake("init", "d", cwd=tmp_path)
    assert again.returncode == 0
    assert "nothing written" in again.stdout
    assert edited.read_text().endswith("# mine\n")
