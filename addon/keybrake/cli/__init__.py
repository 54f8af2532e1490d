"""The ``keybrake`` command line.

    keybrake run                      start the proxy (SQLite store under .keybrake/)
    keybrake ca                       create the CA and its bundle in ~/.keybrake/certs/
    keybrake check-policy policies/   validate vendor policies without starting
    keybrake keys issue --vendor stripe --daily-usd-cap 300 \\
        --allow "POST /v1/payment_intents" --expires-in 2h --label dramatiq/nightly-billing
    keybrake keys list | keybrake keys revoke KEY_ID | keybrake keys set-cap KEY_ID ...
    keybrake budgets set LABEL --daily-usd-cap 500
    keybrake issuers create|list|revoke   scoped tokens for pipeline drivers
    keybrake keys revoke-all --label-prefix beam/billing/ [--dry-run]   kill switch
    keybrake freeze stripe | keybrake unfreeze stripe | keybrake frozen
    keybrake spend | keybrake audit [--follow]

Key, budget, spend and audit commands open the store (and audit log) directly, or with
``--admin-url`` (``KEYBRAKE_ADMIN_URL``) go through a proxy's admin API.

This module builds the command tree and lists every command once (below); the commands are
in `keybrake.cli._run` (run, web, ca, check-policy, init), `keybrake.cli._keys` (keys,
budgets), `keybrake.cli._reports` (spend, audit) and `keybrake.cli._issuers` (issuers, the
kill switches, freezes), what they share in `keybrake.cli._common`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from keybrake.cli._alerts import alerts_show, alerts_test
from keybrake.cli._issuers import (
    freeze,
    frozen,
    issuers_create,
    issuers_list,
    issuers_revoke,
    keys_resume_all,
    keys_revoke_all,
    keys_suspend_all,
    unfreeze,
)
from keybrake.cli._keys import (
    budgets_set,
    budgets_show,
    keys_issue,
    keys_list,
    keys_resume,
    keys_revoke,
    keys_set_cap,
    keys_suspend,
)
from keybrake.cli._packaged import ConfigError, config_defaults
from keybrake.cli._reports import audit_cmd, spend
from keybrake.cli._run import ca, check_policy, init, run, web

__all__ = ["app", "main"]

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Keybrake: vault keys, endpoint allowlists and dollar caps for workers calling paid "
    "APIs.\n\nExample: keybrake init && keybrake run",
    no_args_is_help=True,
    add_completion=True,
    context_settings=CONTEXT,
)
keys_app = typer.Typer(
    help="Issue, list, revoke, suspend and re-cap vault keys (in the store, or through a "
    "proxy's admin API with --admin-url).\n\nExample: keybrake keys list",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keybrake")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"keybrake {_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Keybrake: vault keys, endpoint allowlists and dollar caps for workers calling paid APIs.

    Example: keybrake init && keybrake run
    """


budgets_app = typer.Typer(
    help="Shared daily caps per agent_run_label (every key with the label counts against "
    "it).\n\nExample: keybrake budgets set dramatiq/nightly-billing --daily-usd-cap 500",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(budgets_app, name="budgets")
issuers_app = typer.Typer(
    help="Issuer tokens: bearer tokens for pipeline drivers that issue, read and revoke vault "
    "keys under one label prefix, within set limits (never the admin token in pipeline code)."
    "\n\nExample: keybrake issuers create --vendor stripe --label-prefix beam/billing/ "
    "--allow 'POST /v1/payment_intents' --max-daily-usd-cap 300",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(issuers_app, name="issuers")
alerts_app = typer.Typer(
    help="Alerts of a running proxy: thresholds, webhooks, deliveries, and a test alert."
    "\n\nExample: keybrake alerts test --admin-url http://127.0.0.1:8081",
    context_settings=CONTEXT,
    no_args_is_help=True,
)
app.add_typer(alerts_app, name="alerts")


# -- the commands, in the order `keybrake --help` lists them ----------------------------------
app.command()(run)
app.command()(web)
app.command()(ca)
app.command("check-policy")(check_policy)
keys_app.command("issue")(keys_issue)
keys_app.command("list")(keys_list)
keys_app.command("revoke")(keys_revoke)
keys_app.command("suspend")(keys_suspend)
keys_app.command("resume")(keys_resume)
keys_app.command("set-cap")(keys_set_cap)
keys_app.command("revoke-all")(keys_revoke_all)
keys_app.command("suspend-all")(keys_suspend_all)
keys_app.command("resume-all")(keys_resume_all)
budgets_app.command("set")(budgets_set)
budgets_app.command("show")(budgets_show)
issuers_app.command("create")(issuers_create)
issuers_app.command("list")(issuers_list)
issuers_app.command("revoke")(issuers_revoke)
alerts_app.command("show")(alerts_show)
alerts_app.command("test")(alerts_test)
app.command()(spend)
app.command("audit")(audit_cmd)
app.command()(freeze)
app.command()(unfreeze)
app.command()(frozen)
app.command()(init)


def main() -> None:
    """Console entry point: settings from ``--config FILE`` (or ``KEYBRAKE_CONFIG``, or
    ./keybrake.toml when present) are the defaults of ``run`` and ``web``."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = sys.argv[1:]
    path: str | None = os.environ.get("KEYBRAKE_CONFIG")
    if len(args) >= 2 and args[0] == "--config":
        path, args = args[1], args[2:]
    try:
        defaults = config_defaults(Path(path) if path else None, _run_settings())
    except ConfigError as e:
        typer.echo(f"Error: {e}", err=True)
        raise SystemExit(2) from None
    app(args=args, default_map={"run": defaults, "web": defaults} if defaults else None)


def _run_settings() -> frozenset[str]:
    """The settings keybrake.toml may give: ``run``'s options, by parameter name."""
    command = typer.main.get_command(app)
    assert isinstance(command, typer.core.TyperGroup)
    run_command = command.commands["run"]
    return frozenset(
        p.name for p in run_command.params if p.name and isinstance(p, typer.core.TyperOption)
    )


if __name__ == "__main__":
    main()
