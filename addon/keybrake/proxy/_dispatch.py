"""mitmproxy's event dispatch with the list of handlers made once per event, not per event.

mitmproxy's ``AddonManager.trigger_event`` walks its whole chain for every event: per addon
in the chain one ``safecall`` context manager, one ``invoke_addon`` coroutine, and two
generators (``_iter_hooks`` over ``traverse``) that look the hook up with ``getattr`` on the
addon and each of its sub-addons, whether it handles the event or not. A proxied call
raises eight events (``requestheaders``, ``request``, ``responseheaders``, ``response``, each
followed by ``update``), so with the dozen addons ``keybrake run`` keeps and Keybrake's ten
inside the script loader that walk was about a tenth of the proxy's CPU per call.

`HookCache` is that ``AddonManager`` with one change: it remembers, per event name, which
addons of the chain handle it, and delivers the event to those only. What an event does is
unchanged: the same handlers in the same order, each looked up on its addon when it runs
(an addon that replaces a method is called through its new one), coroutines awaited,
``AddonHalt`` stops the event, ``OptionsError`` propagates, and any other exception is
logged by mitmproxy's own ``safecall`` and ends that top-level addon's share of the event,
exactly as before.

The lists are made again after anything that can change the tree of addons: ``register``
and ``remove`` (``add`` registers each addon; mitmproxy's script loader adds and removes
scripts through them), and any new ``chain`` list or length (``clear`` and ``keybrake run``'s
pruning assign a new one). An addon that grows a hook attribute later, outside those, is not
seen; none of mitmproxy's or Keybrake's does, and a hook that is not callable makes that
event take mitmproxy's own path every time.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from typing import Any, cast

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall, traverse

__all__ = ["HookCache", "install"]

# Per top-level addon of the chain, the addons in its tree that have the event's hook.
_Groups = tuple[tuple[Any, ...], ...]


class HookCache(AddonManager):
    """An ``AddonManager`` that delivers each event only to the addons that handle it."""

    _kb_hooks: dict[str, _Groups | None]
    _kb_chain: list[Any] | None
    _kb_length: int

    def _kb_forget(self) -> None:
        self._kb_hooks = {}
        self._kb_chain = None
        self._kb_length = -1

    def register(self, addon: Any) -> Any:
        try:
            return super().register(addon)  # type: ignore[no-untyped-call]
        finally:
            self._kb_forget()

    def remove(self, addon: Any) -> None:
        try:
            super().remove(addon)  # type: ignore[no-untyped-call]
        finally:
            self._kb_forget()

    def _kb_groups(self, name: str) -> _Groups | None:
        chain = self.chain
        if chain is not self._kb_chain or len(chain) != self._kb_length:
            self._kb_hooks = {}
            self._kb_chain, self._kb_length = chain, len(chain)
        try:
            return self._kb_hooks[name]
        except KeyError:
            groups = self._kb_hooks[name] = _handlers(chain, name)
            return groups

    async def trigger_event(self, event: hooks.Hook) -> None:
        groups = self._kb_groups(event.name)
        if groups is None:  # a hook attribute that is not callable: mitmproxy reports it
            await super().trigger_event(event)
            return
        if not groups:
            return
        name = event.name
        args = event.args()
        for group in groups:
            try:
                for addon in group:
                    func = getattr(addon, name, None)
                    if func is None:
                        continue
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:
                # mitmproxy's own report of an addon's error ("Addon error: …", traceback).
                with safecall():
                    raise exc

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        message = event.args()[0]
        if isinstance(message, flow.Flow) and self._kb_groups("update") != ():
            await self.trigger_event(hooks.UpdateHook([message]))


def _handlers(chain: Sequence[Any], name: str) -> _Groups | None:
    groups = []
    for top in chain:
        group = []
        for addon in traverse([top]):
            func = getattr(addon, name, None)
            if not func or isinstance(func, types.ModuleType):
                continue  # mitmproxy skips a module imported under a hook's name too
            if not callable(func):
                return None
            group.append(addon)
        if group:
            groups.append(tuple(group))
    return tuple(groups)


def install(master: Any) -> bool:
    """Make ``master.addons`` a `HookCache` (same object, same chain); False if it is not a
    plain ``AddonManager`` (a subclass of someone else's is left alone)."""
    manager: Any = master.addons
    if type(manager) is HookCache:
        return True
    if type(manager) is not AddonManager:
        return False
    manager.__class__ = HookCache
    cast(HookCache, manager)._kb_forget()
    return True
