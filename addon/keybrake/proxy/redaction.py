"""The `FlowRedaction` addon: what mitmweb and flow files may show of Keybrake's flows.

`VaultGuard` puts the real vendor secret into a request in its ``request`` hook and redacts it
again in ``responseheaders``/``error``. mitmproxy can show a flow in between:

- mitmweb sends every flow to its UI after each hook (the ``update`` that follows ``request``,
  through its ``view``), and serves in-flight flows on ``GET /flows``;
- flow files (``-w``, ``save_stream_file``, ``save.file``, mitmweb's "Save") write flows that
  are still in flight at shutdown or on demand.

So credentials are redacted where flows leave the process: in
``mitmproxy.tools.web.app.flow_to_json`` (mitmweb's REST and WebSocket API) and in the
flow-file writers (``mitmproxy.io.FlowWriter``, ``FilteredFlowWriter``). Both are patched
once per process and only ever remove data. Flow files also get a plain-data copy of
``flow.metadata`` (only plain data: the call's breadcrumb, never its record).

The addon also comments and marks each vendor flow with its vault key id, label and outcome,
and lets no one hold an admitted vendor request with mitmproxy's intercept (``intercept``
option, mitmweb's "Intercept"): the request already carries the real secret and was checked
and priced as it is, so an edit made while it is held would go out unchecked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import flowfilter, http
from mitmproxy.io import io as mio
from mitmproxy.io import tnetstring
from mitmproxy.proxy.mode_specs import ReverseMode

from keybrake.core.money import format_usd
from keybrake.proxy.calls import CallState, call_of
from keybrake.proxy.core import Runtime
from keybrake.proxy.credentials import REDACTED

__all__ = ["FlowRedaction", "describe", "redact_flow_json", "redacted_state"]

log = logging.getLogger("keybrake")

# Credentials on every flow; on the admin listener also the dashboard's session cookie.
ALWAYS = frozenset({"authorization", "proxy-authorization", "x-api-key"})
ADMIN_ONLY = frozenset({"cookie", "set-cookie"})
MARKERS = {"refused": ":no_entry:", "unknown": ":warning:", "vendor_error": ":warning:"}
_PATCHED = "_keybrake_redacts"


def describe(call: CallState, finished: bool = True) -> str:
    """The flow comment mitmweb shows for a vendor call.

    >>> describe(CallState(vendor="stripe", key_id="key_1", label="etl", outcome="refused",
    ...                    code="cap_exhausted"))
    'keybrake stripe key_1 [etl] refused: cap_exhausted'
    """
    # A call still "forwarded" once it is over was never settled: the audit says unknown.
    outcome = "unknown" if finished and call.outcome == "forwarded" else call.outcome
    text = f"keybrake {call.vendor} {call.key_id or '(no key)'} [{call.label or '-'}] {outcome}"
    if call.code:
        text += f": {call.code}"
    if call.actual_micros:  # an unanswered call's code, and the estimate it keeps counted
        text += f" ${format_usd(call.actual_micros)}"
    return text


def _names(flow: mflow.Flow) -> frozenset[str]:
    admin = isinstance(flow.client_conn.proxy_mode, ReverseMode) if flow.client_conn else False
    return ALWAYS | ADMIN_ONLY if admin else ALWAYS


def _redact_pairs(pairs: Iterable[Any], names: frozenset[str]) -> tuple[Any, ...]:
    out = []
    for name, value in pairs:
        key = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if key.lower() in names:
            value = REDACTED.encode() if isinstance(value, bytes) else REDACTED
        out.append((name, value))
    return tuple(out)


def redact_flow_json(flow: mflow.Flow, data: dict[str, Any]) -> dict[str, Any]:
    """Redact credential headers in mitmweb's JSON of a flow (in place; returned)."""
    names = _names(flow)
    for part in ("request", "response"):
        message = data.get(part)
        if isinstance(message, dict) and "headers" in message:
            message["headers"] = _redact_pairs(message["headers"], names)
    return data


def _plain(value: Any) -> Any:
    """``value`` if flow files can store it, else a plain-data stand-in."""
    if isinstance(value, CallState):
        value = value.breadcrumb()
    try:
        tnetstring.dumps(value)
    except ValueError:
        return f"<{type(value).__name__}>"  # never a repr: it could hold anything
    return value


_VAULT_KEY_BYTES = re.compile(rb"kbv_[a-z][a-z0-9_-]{0,31}_[A-Za-z0-9_-]{43}")
_ISSUER_TOKEN_BYTES = re.compile(rb"kbi_[A-Za-z0-9_-]{43}")


def _redact_state(state: dict[str, Any], names: frozenset[str]) -> None:
    for part in ("request", "response"):
        message = state.get(part)
        if isinstance(message, dict) and "headers" in message:
            message["headers"] = _redact_pairs(message["headers"], names)
        if isinstance(message, dict) and isinstance(message.get("content"), bytes):
            # A vault key (an issuer token) is shown once, in the answer that made it: never
            # keep it in a file.
            content = _VAULT_KEY_BYTES.sub(b"kbv_[redacted]", message["content"])
            message["content"] = _ISSUER_TOKEN_BYTES.sub(b"kbi_[redacted]", content)
    if isinstance(state.get("metadata"), dict):
        state["metadata"] = {k: _plain(v) for k, v in state["metadata"].items()}
    backup = state.get("backup")
    if isinstance(backup, dict):  # the state before an edit in mitmweb: redact it too
        _redact_state(backup, names)


def redacted_state(flow: mflow.Flow) -> dict[str, Any]:
    """``flow.get_state()`` as a flow file should store it: credentials redacted."""
    state: dict[str, Any] = flow.get_state()
    _redact_state(state, _names(flow))
    return state


def _flow_writer_add(self: mio.FlowWriter, f: mflow.Flow) -> None:
    tnetstring.dump(redacted_state(f), self.fo)


def _filtered_flow_writer_add(self: mio.FilteredFlowWriter, f: mflow.Flow) -> None:
    if self.flt and not flowfilter.match(self.flt, f):
        return
    tnetstring.dump(redacted_state(f), self.fo)
    self.fo.flush()


def _patch_flow_files() -> None:
    for cls, add in (
        (mio.FlowWriter, _flow_writer_add),
        (mio.FilteredFlowWriter, _filtered_flow_writer_add),
    ):
        if not getattr(cls.add, _PATCHED, False):
            setattr(add, _PATCHED, True)
            cls.add = add  # type: ignore[method-assign]


def _patch_mitmweb() -> None:
    """Wrap mitmweb's flow serialiser, if this process is mitmweb (already imported then)."""
    for module_name in ("mitmproxy.tools.web.app", "mitmproxy.tools.web.static_viewer"):
        module = sys.modules.get(module_name)
        original: Callable[[mflow.Flow], dict[str, Any]] | None = getattr(
            module, "flow_to_json", None
        )
        if module is None or original is None or getattr(original, _PATCHED, False):
            continue

        def flow_to_json(
            f: mflow.Flow, _original: Callable[[mflow.Flow], dict[str, Any]] = original
        ) -> dict[str, Any]:
            return redact_flow_json(f, _original(f))

        setattr(flow_to_json, _PATCHED, True)
        module.flow_to_json = flow_to_json  # type: ignore[attr-defined]


class FlowRedaction:
    """Keeps credentials out of mitmweb and flow files; labels vendor flows for mitmweb."""

    name = "keybrake_redaction"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime  # the one Runtime all of Keybrake's addons share

    def load(self, loader: object) -> None:
        _patch_flow_files()
        _patch_mitmweb()

    def running(self) -> None:
        _patch_mitmweb()

    # Hooks run after VaultGuard's (see addon.py) and, in mitmweb, before its view sends the
    # flow to the UI.
    def request(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow, finished=flow.response is not None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def update(self, flows: Sequence[mflow.Flow]) -> None:
        # mitmproxy runs "update" after every hook and waits for an intercepted flow only
        # after that: resuming here means an admitted vendor request is never held.
        for f in flows:
            call = call_of(f) if isinstance(f, http.HTTPFlow) else None
            if (
                isinstance(f, http.HTTPFlow)
                and f.intercepted
                and f.response is None
                and isinstance(call, CallState)
                and call.outcome == "forwarded"
            ):
                f.resume()
                log.warning(
                    "keybrake: not holding intercepted %s request of %s: it carries the real "
                    "secret and was already checked; intercept responses instead",
                    call.vendor,
                    call.key_id,
                )

    @staticmethod
    def _annotate(flow: http.HTTPFlow, finished: bool = True) -> None:
        call = call_of(flow)
        if call is None:
            return
        flow.comment = describe(call, finished)
        marker = MARKERS.get(call.outcome)
        if marker is None and flow.error is not None:
            marker = MARKERS["unknown"]
        if marker:
            flow.marked = marker
