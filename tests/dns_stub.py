"""A stub name server for tests: a UDP socket the test owns, answers from a table it controls.

The proxy is pointed at it with ``--set keybrake_dns_servers=127.0.0.1:PORT``, so names such
as ``metadata.test`` can resolve to 169.254.169.254 without any packet leaving the machine
(the refusal happens on the resolved address, before a connection is attempted). Every
question is recorded, so a test can assert how often a name was looked up.

    with StubDNS({"metadata.test": ["169.254.169.254"]}) as dns:
        kb = keybrake_factory(..., extra_args=["--set", f"keybrake_dns_servers={dns.address}"])
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import TracebackType

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

# An answer: the addresses for a name, or a function of how many times the name was asked
# (A questions) before, to change the answer between lookups (DNS rebinding).
Answer = list[str] | Callable[[int], list[str]]


class StubDNS:
    """Answers A/AAAA questions from ``answers``; unknown names get NXDOMAIN."""

    def __init__(self, answers: dict[str, Answer], sock: socket.socket | None = None) -> None:
        self.answers = {k.lower().rstrip("."): v for k, v in answers.items()}
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.sock.settimeout(0.2)
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def count(self, name: str, rdtype: str = "A") -> int:
        """How many ``rdtype`` questions for ``name`` were asked so far."""
        with self._lock:
            return self.queries.count((name.lower().rstrip("."), rdtype))

    def asked(self, name: str) -> bool:
        with self._lock:
            return any(q[0] == name.lower().rstrip(".") for q in self.queries)

    def __enter__(self) -> StubDNS:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = self._answer(dns.message.from_wire(data))
            except Exception:
                continue  # not a DNS question: ignore, as a server would
            self.sock.sendto(reply.to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            before = self.queries.count((name, rdtype))
            self.queries.append((name, rdtype))
        reply = dns.message.make_response(query)
        answer = self.answers.get(name)
        if answer is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        addresses = answer(before) if callable(answer) else answer
        wanted = [a for a in addresses if (":" in a) == (rdtype == "AAAA")]
        if rdtype in ("A", "AAAA") and wanted:
            reply.answer.append(dns.rrset.from_text(question.name, 0, "IN", rdtype, *wanted))
        return reply
