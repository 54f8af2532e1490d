"""Vendor calls that got no answer: was the request sent, and what the worker is told.

mitmproxy 12 gives an ``error`` hook neither fact, so both are read from its HTTP layer:

- **Was it sent?** (`request_was_sent`) mitmproxy hands a request its server connection only
  once that connection is open, TLS handshake included (``HttpStream.make_server_connection``),
  and writes the request right after, with no hook in between. A connection that could not
  be opened (the name does not resolve, the port refuses, the TLS handshake fails, `Egress`
  killed it in ``server_connect``) is never handed over: ``flow.server_conn`` stays the
  connection the flow started with, which the ``lazy`` connection strategy Keybrake runs with
  never opens. So a flow whose server connection never completed its TCP (and, for https,
  TLS) setup cannot have sent a byte of its request. Anything else counts as sent: when in
  doubt, the call may have been charged.
- **The answer.** When a flow fails (its server side, or a request body over mitmproxy's
  ``body_size_limit``), mitmproxy writes its own HTML error page to the client (HTTP/1;
  HTTP/2 gets a reset stream), whatever the hooks did. `allow_error_answers` (installed once
  per process by `VaultGuard`) wraps ``HttpStream._handle_event`` so that an answer given
  with `answer_flow` replaces that page: the response goes to the client instead of the
  protocol error, as an addon's answer would, without a ``response`` hook (the flow keeps its
  error). Only registered answers are sent, and only while nothing of a response was sent to
  the client; an HTTP/1 connection whose request was not read in full is closed after the
  answer (as after mitmproxy's page), an HTTP/2 stream in that state is reset as before.
  Every other flow keeps mitmproxy's behaviour. (mitmproxy pull request #7999 proposes the
  same for every ``error`` hook.)
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Generator
from typing import Any, Final

from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

__all__ = ["allow_error_answers", "answer_flow", "request_was_sent"]

_PATCHED: Final = "_keybrake_answers_errors"
_STARTED: Final = "_keybrake_response_started"
_ANSWERS: weakref.WeakKeyDictionary[http.HTTPFlow, http.Response] = weakref.WeakKeyDictionary()

_Commands = Generator[commands.Command, Any, None]


def request_was_sent(flow: http.HTTPFlow) -> bool:
    """False only when no byte of the request can have reached a server (see above)."""
    server = flow.server_conn
    if server.timestamp_tcp_setup is None:
        return False
    return not (flow.request.scheme == "https" and server.timestamp_tls_setup is None)


def answer_flow(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer ``flow`` with ``response``, also when mitmproxy fails the flow: from an
    ``error`` hook, or before mitmproxy gives up on a request it will not read (a declared
    body over ``body_size_limit``), ``response`` replaces its error page (once
    `allow_error_answers` is installed)."""
    flow.response = response
    _ANSWERS[flow] = response


def allow_error_answers() -> None:
    """Let `answer_flow` answers reach clients (idempotent, once per process)."""
    original = HttpStream._handle_event
    if getattr(original, _PATCHED, False):
        return

    def _handle_event(self: HttpStream, event: events.Event) -> _Commands:
        produced = original(self, event)
        reply: Any = None
        while True:
            try:
                command = produced.send(reply)
            except StopIteration:
                return
            answer = _instead(self, command)
            if answer is None:
                reply = yield command
                continue
            yield from answer  # SendHttp commands do not block: nothing is sent back
            reply = None

    setattr(_handle_event, _PATCHED, True)
    HttpStream._handle_event = _handle_event  # type: ignore[method-assign]


def _instead(stream: HttpStream, command: commands.Command) -> list[commands.Command] | None:
    """The commands that answer the client instead of ``command``, or None to keep it."""
    if not isinstance(command, SendHttp) or command.connection is not stream.context.client:
        return None
    if isinstance(command.event, ResponseHeaders):
        setattr(stream, _STARTED, True)  # the client is being answered: never a second head
        return None
    if not isinstance(command.event, ResponseProtocolError) or getattr(stream, _STARTED, False):
        return None
    flow: http.HTTPFlow | None = getattr(stream, "flow", None)
    answer = _ANSWERS.get(flow) if flow is not None else None
    if answer is None or flow is None or answer is not flow.response:
        return None
    client, sid = stream.context.client, command.event.stream_id
    still_sending = stream.client_state != stream.state_done
    if still_sending and client.alpn in (b"h2", b"h3"):
        return None  # mitmproxy resets the one stream; closing would end the others
    setattr(stream, _STARTED, True)
    answer.timestamp_start = answer.timestamp_start or time.time()
    answer.timestamp_end = time.time()
    if still_sending:  # HTTP/1: the rest of the request is never read, so the connection
        answer.headers["Connection"] = "close"  # ends with this answer, as mitmproxy's would
    content = answer.raw_content or b""
    out: list[commands.Command] = [SendHttp(ResponseHeaders(sid, answer, not content), client)]
    if content:
        out.append(SendHttp(ResponseData(sid, content), client))
    out.append(SendHttp(ResponseEndOfMessage(sid), client))
    if still_sending:
        out.append(commands.CloseConnection(client))
    return out
