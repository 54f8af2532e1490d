"""The mitmproxy addons that run beside Keybrake, and the mitmproxy options it refuses.

mitmproxy delivers every event (``requestheaders``, ``request``, ``response``, …) to every
addon in its chain, one coroutine and one ``safecall`` each, whether the addon handles the
event or not: with mitmdump's 36 built-in addons that dispatch is a third of a bare
mitmdump's CPU per request. Most of those addons are interactive or rewriting tools that a
budget-enforcing proxy never uses, so ``keybrake run`` (mitmdump) unloads them once the
proxy is running. mitmweb (``keybrake run --web``) keeps its whole chain: its UI calls the
commands of several of them.

Independently of the chain, the options that make mitmproxy rewrite, redirect or replay a
call after Keybrake admitted it are refused at start and whenever they are changed (e.g. in
mitmweb's options editor): ``map_remote`` could send a request that already carries the real
vendor secret to another host, ``server_replay`` could answer a paid call without the vendor,
``modify_headers`` could change the credential or the idempotency key after the checks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import traverse

__all__ = [
    "REFUSED_OPTIONS",
    "UNLOADED",
    "check_options",
    "refused_in_args",
    "unload_unused_addons",
]

log = logging.getLogger(__name__)

# mitmproxy addons (by class name) that `keybrake run` unloads from mitmdump's chain. What
# stays: Core, Block (refuses clients from public addresses), ProxyAuth, DisableH2C,
# Proxyserver, ScriptLoader (Keybrake itself and any ``-s`` script), NextLayer, TlsConfig,
# DnsResolver, Save (``-w`` flow files, redacted), UpdateAltSvc (reverse mode keeps clients on
# the proxy), and mitmdump's TermLog, Dumper and ErrorCheck.
UNLOADED = frozenset(
    {
        "AntiCache",
        "AntiComp",
        "BlockList",
        "Browser",
        "ClientPlayback",
        "CommandHistory",
        "Comment",
        "Cut",
        "Export",
        "KeepServing",
        "MapLocal",
        "MapRemote",
        "ModifyBody",
        "ModifyHeaders",
        "Onboarding",
        "ReadFileStdin",
        "SaveHar",
        "ServerPlayback",
        "StickyAuth",
        "StickyCookie",
        "StripDnsHttpsRecords",
        "UpstreamAuth",
    }
)

# Options that would change a call after admission; each must keep its default.
REFUSED_OPTIONS: dict[str, str] = {
    "map_remote": "it would send calls (with the real vendor secret) to other hosts",
    "map_local": "it would answer calls from local files",
    "modify_body": "it would change bodies after Keybrake priced them",
    "modify_headers": "it would change credentials or idempotency keys after the checks",
    "upstream_auth": "it would replace the credential Keybrake swapped in",
    "server_replay": "it would answer vendor calls without the vendor",
    "client_replay": "it would resend recorded calls",
    "stickyauth": "it would copy one call's credentials onto another",
    "stickycookie": "it would copy one call's cookies onto another",
    "anticache": "it would change requests after Keybrake checked them",
    "anticomp": "it would change requests after Keybrake checked them",
    "block_list": "Keybrake's egress policy decides what is refused",
}


def _refused(name: str) -> str:
    return f"Keybrake does not allow mitmproxy's {name} option: {REFUSED_OPTIONS[name]}"


def check_options(options: Any, updated: set[str]) -> None:
    """Raise `OptionsError` if an option in `REFUSED_OPTIONS` was given a value."""
    for name in sorted(updated & REFUSED_OPTIONS.keys()):
        if getattr(options, name, None):
            raise exceptions.OptionsError(_refused(name))


# mitmdump's command-line flags for `REFUSED_OPTIONS` (long and short forms).
_FLAGS = {
    "--map-remote": "map_remote",
    "-M": "map_remote",
    "--map-local": "map_local",
    "--modify-body": "modify_body",
    "-B": "modify_body",
    "--modify-headers": "modify_headers",
    "-H": "modify_headers",
    "--upstream-auth": "upstream_auth",
    "--server-replay": "server_replay",
    "-S": "server_replay",
    "--client-replay": "client_replay",
    "-C": "client_replay",
    "--stickyauth": "stickyauth",
    "--stickycookie": "stickycookie",
    "--anticache": "anticache",
    "--anticomp": "anticomp",
}


def refused_in_args(args: list[str]) -> str | None:
    """The first refused option that mitmproxy arguments set, as an error message, or None.

    `keybrake run` checks its extra arguments with this before it starts anything, so the
    mistake is one line; `check_options` is the backstop for other ways to set options.
    """
    for i, arg in enumerate(args):
        flag, _, inline = arg.partition("=")
        name = _FLAGS.get(flag)
        if name is None and flag == "--set":
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            name = value.partition("=")[0].strip()
        if name in REFUSED_OPTIONS:
            return _refused(name)
    return None


def unload_unused_addons(master: Any) -> None:
    """Remove the `UNLOADED` addons from a mitmdump master's chain (soon: not mid-event).

    Only mitmdump's ``DumpMaster`` is pruned; mitmweb and test harnesses keep their chain.
    """
    if type(master).__name__ != "DumpMaster":
        return

    async def prune() -> None:
        # One step, no await: the chain is replaced by a new list, so an event being
        # delivered right now finishes on the list it started with (removing items from
        # that list would shift it and skip an addon, Keybrake's among them).
        gone = [a for a in master.addons.chain if type(a).__name__ in UNLOADED]
        master.addons.chain = [a for a in master.addons.chain if a not in gone]
        for addon in gone:
            for a in traverse([addon]):
                master.addons.lookup.pop(getattr(a, "name", type(a).__name__.lower()), None)
        # AddonManager.remove would call `done` synchronously, which ClientPlayback's (a
        # coroutine) cannot take: each unloaded addon is ended here instead.
        for addon in gone:
            await master.addons.invoke_addon(addon, hooks.DoneHook())
        log.info("keybrake: unloaded %d mitmproxy addons Keybrake does not use", len(gone))

    task = asyncio.get_running_loop().create_task(prune())
    _pruning.add(task)
    task.add_done_callback(_pruning.discard)


_pruning: set[asyncio.Task[None]] = set()  # a strong reference until the task is done
