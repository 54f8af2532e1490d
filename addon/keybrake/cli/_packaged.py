"""What ships inside the package: the default vendor policies and `keybrake init`'s files.

The policies in ``policies/`` at the top of the repository are the package's own
(``keybrake/policies`` is that directory in a clone and a copy in the wheel), so
``pip install 'keybrake[proxy]'`` runs with the same rules as a clone does.
"""

from __future__ import annotations

import difflib
import shutil
import tomllib
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CONFIG_NAME",
    "PACKAGED_POLICIES",
    "ConfigError",
    "config_defaults",
    "init_deployment",
    "policies_dir",
]

PACKAGED_POLICIES: Final = Path(__file__).resolve().parent.parent / "policies"
CONFIG_NAME: Final = "keybrake.toml"

_CONFIG = """\
# Keybrake deployment settings: `keybrake run` reads ./keybrake.toml (or --config FILE).
# Every setting is also a `keybrake run` flag and an environment variable; flags win over
# the environment, the environment over this file. Uncomment what you change.

[run]
# Where the proxy keeps the embedded SQLite store, the admin token and the audit log.
# data_dir = ".keybrake"

# Vendor policies: this directory holds editable copies of the shipped ones.
policies = "{policies}"

# The shared store for several replicas (the Redis password goes in
# KEYBRAKE_STORE_PASSWORD, never here):
# store = "redis://keybrake@10.0.0.5:6379/0"

# The forward proxy (workers' HTTPS_PROXY) and the admin API + dashboard.
# proxy_port = 8080
# admin_port = 8081
# listen_host = "127.0.0.1"

# Non-vendor destinations workers may reach through the proxy, untouched.
# passthrough = ["*.googleapis.com"]

# Where the Keybrake CA lives (workers trust its bundle).
# certs_dir = "~/.keybrake/certs"

# Alerts: thresholds per label and key, and the webhooks they are posted to (a TOML file of
# its own; secrets named by variable or file there). Default thresholds, % of each cap:
# alerts = "alerts.toml"
# alert_thresholds = "50,80,100"
"""


def policies_dir(value: str | Path | None) -> Path:
    """The policies directory to load: ``value`` when given; else ``./policies`` when it
    exists (a clone, or a directory made by ``keybrake init``); else the packaged ones."""
    if value:
        return Path(value).expanduser()
    local = Path("policies")
    return local if local.is_dir() else PACKAGED_POLICIES


def init_deployment(directory: Path) -> list[Path]:
    """Write editable copies of the packaged policies and a commented ``keybrake.toml``
    into ``directory``; existing files are kept. Returns the files written."""
    written: list[Path] = []
    target = directory / "policies"
    target.mkdir(parents=True, exist_ok=True)
    for src in sorted(PACKAGED_POLICIES.glob("*.yaml")):
        dest = target / src.name
        if not dest.exists():
            shutil.copyfile(src, dest)
            written.append(dest)
    config = directory / CONFIG_NAME
    if not config.exists():
        config.write_text(_CONFIG.format(policies="policies"))
        written.append(config)
    return written


class ConfigError(Exception):
    """keybrake.toml cannot be read or names a setting that does not exist."""


def config_defaults(path: Path | None, settings: frozenset[str]) -> dict[str, Any]:
    """The ``[run]`` table of ``path`` (else of ./keybrake.toml, when there is one) as
    defaults for ``keybrake run``; every name must be one of ``settings``."""
    if path is None:
        path = Path(CONFIG_NAME)
        if not path.is_file():
            return {}
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown_tables = sorted(set(data) - {"run"})
    if unknown_tables:
        raise ConfigError(f"{path}: [{unknown_tables[0]}]: unknown table (only [run] is read)")
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: run: must be a table ([run])")
    for name in run:
        if name not in settings:
            close = difflib.get_close_matches(name, sorted(settings), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: [run] {name}: unknown setting{hint}")
    out = dict(run)
    for name in ("data_dir", "policies", "certs_dir", "alerts"):
        if isinstance(out.get(name), str):
            # Relative to the file, so `keybrake --config /etc/keybrake/keybrake.toml run`
            # works from anywhere.
            out[name] = str((path.parent / Path(out[name]).expanduser()).resolve())
    return out
