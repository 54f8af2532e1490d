"""`keybrake.proxy._dispatch.HookCache` delivers every event exactly as mitmproxy's own
``AddonManager`` does: each test runs the same addons and the same steps on a stock master
and on a cached one and compares what every handler saw, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, hooks, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.addons.script import ScriptLoader
from mitmproxy.master import Master
from mitmproxy.proxy.layers import http as layers_http
from mitmproxy.test import tflow

from keybrake.proxy import _dispatch
from keybrake.proxy._dispatch import HookCache

Seen = list[tuple[str, str]]


class Recorder:
    """An addon whose listed hooks append (its name, the event) to `seen`."""

    def __init__(self, name: str, seen: Seen, events: tuple[str, ...], **behaviour: Any) -> None:
        self.name = name
        self.seen = seen
        self.behaviour = behaviour
        for event in events:
            setattr(self, event, self._handler(event))

    def _handler(self, event: str) -> Callable[..., Any]:
        def handle(*args: Any) -> None:
            self.seen.append((self.name, event))
            raised = self.behaviour.get(event)
            if raised is not None:
                raise raised

        return handle


class AsyncRecorder:
    def __init__(self, name: str, seen: Seen) -> None:
        self.name = name
        self.seen = seen

    async def request(self, flow: Any) -> None:
        self.seen.append((self.name, "request"))


class Parent:
    """An addon with sub-addons (like mitmproxy's script loader)."""

    def __init__(self, name: str, children: list[Any]) -> None:
        self.name = name
        self.addons = children


def _events(flow: Any) -> list[hooks.Hook]:
    return [
        layers_http.HttpRequestHeadersHook(flow),
        layers_http.HttpRequestHook(flow),
        layers_http.HttpResponseHeadersHook(flow),
        layers_http.HttpResponseHook(flow),
    ]


async def _deliver(master: Master, flow: Any) -> None:
    for event in _events(flow):
        await master.addons.handle_lifecycle(event)


def _tree(seen: Seen) -> list[Any]:
    return [
        Recorder("a", seen, ("request", "response")),
        Parent(
            "p",
            [
                Recorder("c", seen, ("requestheaders", "request", "update")),
                Recorder("d", seen, ()),
                Parent("q", [Recorder("e", seen, ("response", "responseheaders"))]),
            ],
        ),
        AsyncRecorder("f", seen),
        Recorder("g", seen, ()),
    ]


async def _both(
    steps: Callable[[Master, Seen], Any],
) -> tuple[Seen, Seen]:
    """Run `steps` on a stock master and on a cached one; what each recorded."""
    results = []
    for cached in (False, True):
        seen: Seen = []
        master = Master(options.Options())
        if cached:
            assert _dispatch.install(master)
            assert type(master.addons) is HookCache
        else:
            assert type(master.addons) is AddonManager
        await steps(master, seen)
        results.append(seen)
    return results[0], results[1]


async def test_every_event_reaches_the_same_handlers_in_the_same_order() -> None:
    async def steps(master: Master, seen: Seen) -> None:
        master.addons.add(*_tree(seen))
        flow = tflow.tflow(resp=True)
        for _ in range(3):
            await _deliver(master, flow)

    stock, cached = await _both(steps)
    assert cached == stock
    # Not vacuous: nested, async and update handlers all ran, in chain order.
    assert stock[:5] == [
        ("c", "requestheaders"),
        ("c", "update"),
        ("a", "request"),
        ("c", "request"),
        ("f", "request"),
    ]
    assert ("e", "responseheaders") in stock and ("d", "request") not in stock


async def test_changes_to_the_tree_are_seen_by_the_next_event() -> None:
    async def steps(master: Master, seen: Seen) -> None:
        flow = tflow.tflow(resp=True)
        tree = _tree(seen)
        master.addons.add(*tree)
        await _deliver(master, flow)
        seen.append(("step", "add"))
        late = Recorder("late", seen, ("request",))
        master.addons.add(late)
        await _deliver(master, flow)
        seen.append(("step", "remove"))
        master.addons.remove(tree[0])
        await _deliver(master, flow)
        seen.append(("step", "register a child"))  # how the script loader adds a script
        child = Recorder("child", seen, ("response",))
        tree[1].addons.append(child)
        master.addons.register(child)
        await _deliver(master, flow)
        seen.append(("step", "remove a child"))
        master.addons.remove(child)
        tree[1].addons.remove(child)
        await _deliver(master, flow)
        seen.append(("step", "a new chain"))  # how `keybrake run` prunes mitmdump's chain
        master.addons.chain = [a for a in master.addons.chain if a is not tree[2]]
        await _deliver(master, flow)
        seen.append(("step", "a method replaced"))
        late.request = lambda f: seen.append(("late", "request, replaced"))
        await _deliver(master, flow)
        seen.append(("step", "clear"))
        master.addons.clear()
        await _deliver(master, flow)

    stock, cached = await _both(steps)
    assert cached == stock
    assert ("late", "request") in stock and ("child", "response") in stock
    assert ("late", "request, replaced") in stock
    after_remove = stock[stock.index(("step", "remove")) :]
    assert ("a", "request") not in after_remove
    after_prune = stock[stock.index(("step", "a new chain")) :]
    assert ("f", "request") not in after_prune
    assert stock[stock.index(("step", "clear")) :] == [("step", "clear")]


async def test_a_method_replaced_on_its_addon_is_called_through_the_new_one() -> None:
    class Plain:
        def __init__(self, seen: Seen) -> None:
            self.seen = seen

        def request(self, flow: Any) -> None:
            self.seen.append(("plain", "request"))

    async def steps(master: Master, seen: Seen) -> None:
        addon = Plain(seen)
        master.addons.add(addon)
        flow = tflow.tflow()
        await master.addons.trigger_event(layers_http.HttpRequestHook(flow))
        addon.request = lambda f: seen.append(("plain", "replaced"))  # type: ignore[method-assign]
        await master.addons.trigger_event(layers_http.HttpRequestHook(flow))

    stock, cached = await _both(steps)
    assert cached == stock == [("plain", "request"), ("plain", "replaced")]


async def test_an_error_is_logged_and_ends_only_its_own_addons_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)

    async def steps(master: Master, seen: Seen) -> None:
        master.addons.add(
            Parent(
                "p",
                [
                    Recorder("x", seen, ("request",), request=ValueError("boom")),
                    Recorder("y", seen, ("request",)),
                ],
            ),
            Recorder("z", seen, ("request",)),
        )
        await master.addons.trigger_event(layers_http.HttpRequestHook(tflow.tflow()))

    stock, cached = await _both(steps)
    assert cached == stock == [("x", "request"), ("z", "request")]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["Addon error: boom", "Addon error: boom"]


async def test_addon_halt_stops_the_event_and_options_errors_propagate() -> None:
    async def halted(master: Master, seen: Seen) -> None:
        master.addons.add(
            Recorder("x", seen, ("request",), request=exceptions.AddonHalt()),
            Recorder("y", seen, ("request",)),
        )
        await master.addons.trigger_event(layers_http.HttpRequestHook(tflow.tflow()))

    stock, cached = await _both(halted)
    assert cached == stock == [("x", "request")]

    async def refused(master: Master, seen: Seen) -> None:
        master.addons.add(
            Recorder("x", seen, ("request",), request=exceptions.OptionsError("no")),
            Recorder("y", seen, ("request",)),
        )
        with pytest.raises(exceptions.OptionsError):
            await master.addons.trigger_event(layers_http.HttpRequestHook(tflow.tflow()))

    stock, cached = await _both(refused)
    assert cached == stock == [("x", "request")]


async def test_a_hook_that_is_not_callable_is_reported_as_mitmproxy_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)

    class Broken:
        request = "not a function"

    async def steps(master: Master, seen: Seen) -> None:
        master.addons.add(Broken(), Recorder("y", seen, ("request",)))
        await master.addons.trigger_event(layers_http.HttpRequestHook(tflow.tflow()))

    stock, cached = await _both(steps)
    assert cached == stock == [("y", "request")]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("not callable" in e for e in errors)


async def test_a_reloaded_script_is_dispatched_to_as_its_new_code(tmp_path: Path) -> None:
    """mitmproxy's own script loader (``-s``; Keybrake's addons are loaded by it), with the
    script reloaded after its file changed."""
    path = tmp_path / "script.py"

    async def steps(master: Master, seen: Seen) -> None:
        body = "def {}(flow):\n    flow.metadata.setdefault('seen', []).append(({!r}, {!r}))\n"
        path.write_text(body.format("request", "v1", "request"))
        loader = ScriptLoader()
        master.addons.add(loader)
        master.options.update(scripts=[str(path)])
        for _ in range(100):  # the script's watcher task loads it
            if loader.addons and loader.addons[0].ns is not None:
                break
            await asyncio.sleep(0.01)
        script = loader.addons[0]
        flow = tflow.tflow()
        await master.addons.trigger_event(layers_http.HttpRequestHook(flow))
        path.write_text(body.format("response", "v2", "response"))
        script.loadscript()
        await master.addons.trigger_event(layers_http.HttpRequestHook(flow))
        await master.addons.trigger_event(layers_http.HttpResponseHook(flow))
        master.options.update(scripts=[])
        await master.addons.trigger_event(layers_http.HttpResponseHook(flow))
        seen.extend(flow.metadata["seen"])
        seen.append(("removed", str(loader.addons)))

    stock, cached = await _both(steps)
    assert cached == stock == [("v1", "request"), ("v2", "response"), ("removed", "[]")]


async def test_install_leaves_a_manager_it_does_not_know_alone() -> None:
    class Custom(AddonManager):
        pass

    master = Master(options.Options())
    master.addons.__class__ = Custom
    assert not _dispatch.install(master)
    assert type(master.addons) is Custom
    plain = Master(options.Options())
    assert _dispatch.install(plain) and _dispatch.install(plain)
    assert type(plain.addons) is HookCache
