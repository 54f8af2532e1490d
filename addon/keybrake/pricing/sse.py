"""Server-sent events metered as they pass: the bytes go on, the usage is read on the way.

A streamed AI answer (``stream: true``) states its token usage in one of its events (OpenAI:
the last chunk, or ``response.completed``; Anthropic: ``message_start`` + ``message_delta``).
`StreamMeter` is what `VaultGuard` sets as mitmproxy's ``flow.response.stream``: it is called
with each piece of the body as it arrives, parses complete events incrementally and hands
them to the vendor's `StreamUsage`, and returns the bytes to send on at once. Nothing waits
for the whole answer.

When the proxy asked for usage the client did not (OpenAI's ``stream_options.include_usage``),
the meter forwards whole events only and drops the ones the vendor's reader says the client
would not have seen; otherwise every byte passes through untouched, as it came.

An event larger than `MAX_EVENT_BYTES` stops the parsing (the bytes still pass): the usage is
then unknown, and the call's estimate stays counted.

>>> meter = StreamMeter(_Collect(), strip=False)
>>> meter(b'data: {"a": 1}\\n\\nda') + meter(b'ta: [DONE]\\n\\n') + meter(b"")
[b'data: {"a": 1}\\n\\nda', b'ta: [DONE]\\n\\n']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final, Protocol

__all__ = ["MAX_EVENT_BYTES", "StreamMeter", "StreamMetering", "StreamUsage"]

MAX_EVENT_BYTES: Final = 4 * 1024 * 1024
"""Largest single event the meter parses (one chunk of an answer is a few hundred bytes)."""


class StreamUsage(Protocol):
    """A vendor's reading of its events: which reach the client, and the usage at the end."""

    def feed(self, event: str | None, data: str) -> bool:
        """Read one event (its ``event:`` name and ``data:`` text); False drops it (only
        when the meter strips what the proxy asked for)."""
        ...

    @property
    def final(self) -> dict[str, Any] | None:
        """The answer as a non-streamed one would state its usage (``{"model", "usage"}``),
        or None while (or if) the stream has not stated it completely."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class StreamMetering:
    """How one API's streams are metered.

    ``ask`` edits the request's JSON so that its stream states the usage, and returns True
    when it asked for something the client did not (the meter then strips it again);
    ``usage`` makes the reader of one stream (given that flag).
    """

    ask: Callable[[dict[str, Any]], bool]
    usage: Callable[[bool], StreamUsage]


class StreamMeter:
    """The ``flow.response.stream`` callable of one metered answer (module doc)."""

    def __init__(self, usage: StreamUsage, *, strip: bool) -> None:
        self.usage = usage
        self.strip = strip
        self.broken = False
        self.events = 0
        self._buffer = bytearray()

    def __call__(self, chunk: bytes) -> list[bytes]:
        """The pieces to send on for ``chunk`` (``b""``: the end of the body).

        Never an empty piece: mitmproxy writes each as an HTTP/1.1 chunk, and an empty chunk
        is the end of a chunked body (the client would take the rest for the next answer).
        """
        if self.broken:
            return [chunk] if chunk else []
        if not chunk:  # the end of the body: whatever is left was no complete event
            rest = bytes(self._buffer)
            self._buffer.clear()
            return [rest] if rest and self.strip else []
        self._buffer += chunk
        out = bytearray()
        while (end := _event_end(self._buffer)) is not None:
            raw = bytes(self._buffer[: end[1]])
            del self._buffer[: end[1]]
            if self._read(raw[: end[0]]) or not self.strip:
                out += raw
        if len(self._buffer) > MAX_EVENT_BYTES:
            self.broken = True  # the usage is unknown from here on: settled as unknown
            out += self._buffer if self.strip else b""
            self._buffer.clear()
        sent = chunk if not self.strip else bytes(out)
        return [sent] if sent else []

    def _read(self, raw: bytes) -> bool:
        name: str | None = None
        data: list[str] = []
        for line in raw.decode("utf-8", "replace").splitlines():
            field, sep, value = line.partition(":")
            value = value[1:] if sep and value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if not data:
            return True  # comments, keep-alives, retry hints: the client's business
        self.events += 1
        return self.usage.feed(name, "\n".join(data))

    @property
    def final(self) -> dict[str, Any] | None:
        """What the stream stated about its usage; None when broken or not stated."""
        return None if self.broken else self.usage.final


def _event_end(buffer: bytearray) -> tuple[int, int] | None:
    """(end of the event's text, end of its blank-line terminator), or None."""
    found: tuple[int, int] | None = None
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buffer.find(sep)
        if i >= 0 and (found is None or i < found[0]):
            found = (i, i + len(sep))
    return found


class _Collect:
    """A `StreamUsage` that keeps everything (for the doctest)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def feed(self, event: str | None, data: str) -> bool:
        self.seen.append(data)
        return True

    @property
    def final(self) -> dict[str, Any] | None:
        return None
