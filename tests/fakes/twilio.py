"""A fake ``api.twilio.com`` (Programmable Messaging, 2010-04-01 API) for the ``twilio`` SDK.

* Auth: HTTP Basic ``AccountSid:AuthToken`` (or ``SKxxx:secret`` for API keys passed in
  ``api_keys``). Bad/missing credentials, or credentials for another account than the one
  in the URL → 401 ``{"code": 20003, "message": "Authenticate", ...}``.
* ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` (form: ``To``, ``From`` or
  ``MessagingServiceSid``, ``Body``, ``MediaUrl`` (repeatable)) → 201 Message JSON
  (``sid`` SM…/MM…, ``status`` ``queued`` — ``accepted`` with a Messaging Service —,
  ``price`` null, ``num_segments`` as a string computed with GSM-7/UCS-2 rules, RFC 2822
  dates, relative ``uri``/``subresource_uris``).
  As on real Twilio, a message sent through a Messaging Service reports
  ``num_segments: "0"`` at creation; the ledger still records the real segment count.
* ``GET …/Messages.json`` → list, newest first, paged with ``PageSize``/``Page``/``PageToken``;
  ``uri``/``first_page_uri``/``next_page_uri`` are paths relative to the API host, exactly
  like Twilio (the SDK joins them to its ``base_url``). Filters ``To``, ``From``.
* ``GET …/Messages/{sid}.json``; ``DELETE`` → 204.
* Every response: ``Twilio-Request-Id: RQ<32 hex>``, ``Content-Type: application/json``.
* Unknown paths → 404 ``{"code": 20404, ...}``.

Ledger: ``segments`` = billable segments (MMS: 1), ``charged_usd_micros`` =
``segments * price_per_segment_usd_micros`` (SMS, default $0.0079) or
``mms_price_usd_micros`` (MMS, default $0.0200). Twilio prices are sub-cent, so
``amount_charged_minor``/``currency`` stay 0/None — use ``charged_usd_micros``.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlencode

from tests.fakes.base import FakeRequest, FakeResponse, FakeVendor, json_response
from tests.fakes.tls import FakeTLS

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef0123456789abcdef"
DEFAULT_AUTH_TOKEN = "f" * 8 + "0123456789abcdef01234567"
API_VERSION = "2010-04-01"

# GSM 03.38 basic character set (without ESC) and extension table (each costs 2 septets).
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXT = set("^{}\\[~]|€\f")


def sms_encoding(body: str) -> str:
    """``"GSM-7"`` if every character is in the GSM 03.38 sets, else ``"UCS-2"``."""
    return "GSM-7" if all(c in GSM7_BASIC or c in GSM7_EXT for c in body) else "UCS-2"


def _pack(units: list[int], single: int, multi: int) -> int:
    total = sum(units)
    if total <= single:
        return 1
    segments, used = 1, 0
    for u in units:  # never split an escape pair / surrogate pair across segments
        if used + u > multi:
            segments += 1
            used = 0
        used += u
    return segments


def sms_segments(body: str) -> int:
    """Number of SMS segments Twilio bills for ``body``.

    GSM-7: 160 septets in one segment, else 153 per segment (extension characters take
    2 septets). UCS-2: 70 UTF-16 code units in one segment, else 67 per segment.
    An empty body counts as 1 segment.
    """
    if not body:
        return 1
    if sms_encoding(body) == "GSM-7":
        return _pack([2 if c in GSM7_EXT else 1 for c in body], 160, 153)
    return _pack([2 if ord(c) > 0xFFFF else 1 for c in body], 70, 67)


def _rfc2822(ts: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(ts))


class TwilioAPIError(Exception):
    def __init__(self, status: int, code: int, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


class FakeTwilio(FakeVendor):
    name = "twilio"
    request_id_header = "Twilio-Request-Id"
    server_header = "nginx"

    def __init__(
        self,
        tls: FakeTLS | None,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        api_keys: dict[str, str] | None = None,
        price_per_segment_usd_micros: int = 7_900,
        mms_price_usd_micros: int = 20_000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls, host=host, port=port)
        if not re.fullmatch(r"AC[0-9a-f]{32}", account_sid):
            raise ValueError("account_sid must be 'AC' + 32 lowercase hex digits")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_keys: dict[str, str] = dict(api_keys or {})
        self.price_per_segment_usd_micros = price_per_segment_usd_micros
        self.mms_price_usd_micros = mms_price_usd_micros
        self._messages: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []  # oldest first
        self._prices: dict[str, int] = {}  # micro-USD each message costs once sent

    def env(self) -> dict[str, str]:
        return {"TWILIO_ACCOUNT_SID": self.account_sid, "TWILIO_AUTH_TOKEN": self.auth_token}

    def reset_state(self) -> None:
        self._prices.clear()
        self._messages.clear()
        self._order.clear()

    def new_request_id(self) -> str:
        return "RQ" + secrets.token_hex(16)

    # ------------------------------------------------------------------ responses

    def _headers(self) -> list[tuple[str, str]]:
        return [
            ("Twilio-Concurrent-Requests", "1"),
            ("Twilio-Request-Duration", "0.041"),
            ("Access-Control-Allow-Origin", "*"),
            ("X-Powered-By", "AT-5000"),
            ("X-Shenanigans", "none"),
        ]

    def _json(self, status: int, obj: Any, **annotations: Any) -> FakeResponse:
        return json_response(
            status,
            obj,
            self._headers(),
            content_type="application/json; charset=utf-8",
            **annotations,
        )

    def _error(self, err: TwilioAPIError) -> FakeResponse:
        body: dict[str, Any] = {"code": err.code}
        if err.detail:
            body["detail"] = err.detail
        body["message"] = err.message
        body["more_info"] = f"https://www.twilio.com/docs/errors/{err.code}"
        body["status"] = err.status
        resp = self._json(err.status, body)
        if err.status == 401:
            resp.headers.append(("WWW-Authenticate", 'Basic realm="Twilio API"'))
        return resp

    def error_response(self, req: FakeRequest, status: int) -> FakeResponse:
        return self._error(TwilioAPIError(status, 20500, "Internal Server Error"))

    def rate_limit_response(self, req: FakeRequest) -> FakeResponse:
        return self._error(TwilioAPIError(429, 20429, "Too Many Requests"))

    # ------------------------------------------------------------------ dispatch

    def _authenticated_account(self, req: FakeRequest) -> str | None:
        auth = req.header("Authorization") or ""
        scheme, _, cred = auth.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if user == self.account_sid and secrets.compare_digest(password, self.auth_token):
            return self.account_sid
        secret = self.api_keys.get(user)
        if secret is not None and secrets.compare_digest(password, secret):
            return self.account_sid
        return None

    def handle(self, req: FakeRequest) -> FakeResponse:
        path = req.path
        m = re.fullmatch(rf"/{API_VERSION}/Accounts/([^/]+)/Messages(?:/([^/]+))?\.json", path)
        account = self._authenticated_account(req)
        if account is None or (m is not None and m.group(1) != account):
            return self._error(
                TwilioAPIError(
                    401, 20003, "Authenticate", "Your AccountSid or AuthToken was incorrect."
                )
            )
        if m is None:
            return self._not_found(path)
        msg_sid = m.group(2)
        self.wait_delay(req)
        try:
            with self._lock:
                if msg_sid is None and req.method == "POST":
                    return self._create(req)
                if msg_sid is None and req.method == "GET":
                    return self._list(req)
                if msg_sid is not None and req.method == "GET":
                    msg = self._messages.get(msg_sid)
                    if msg is None:
                        return self._not_found(path)
                    return self._json(200, msg, object_id=msg_sid)
                if msg_sid is not None and req.method == "DELETE":
                    if self._messages.pop(msg_sid, None) is None:
                        return self._not_found(path)
                    self._order.remove(msg_sid)
                    return FakeResponse(204, b"", self._headers(), object_id=msg_sid)
                return self._error(TwilioAPIError(405, 20004, "Method not allowed"))
        except TwilioAPIError as err:
            return self._error(err)

    def _not_found(self, path: str) -> FakeResponse:
        return self._error(
            TwilioAPIError(404, 20404, f"The requested resource {path} was not found")
        )

    # ------------------------------------------------------------------ messages

    def _create(self, req: FakeRequest) -> FakeResponse:
        try:
            form = parse_qs(req.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError as exc:
            raise TwilioAPIError(400, 20001, "Invalid body encoding") from exc

        def one(name: str) -> str:
            vals = form.get(name) or []
            return vals[0] if vals else ""

        to = one("To").strip()
        from_ = one("From").strip()
        service = one("MessagingServiceSid").strip()
        body = one("Body")
        media = [u for u in form.get("MediaUrl", []) if u]
        if not to:
            raise TwilioAPIError(400, 21604, "A 'To' phone number is required.")
        if not from_ and not service:
            raise TwilioAPIError(400, 21603, "A 'From' phone number is required.")
        if service and not re.fullmatch(r"MG[0-9a-f]{32}", service):
            raise TwilioAPIError(400, 21701, f"The Messaging Service Sid {service} is invalid.")
        if not body and not media:
            raise TwilioAPIError(400, 21602, "Message body is required.")
        if len(body) > 1600:
            raise TwilioAPIError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if len(media) > 10:
            raise TwilioAPIError(400, 21623, "Number of media files exceeds allowed limit.")
        if not re.fullmatch(r"(whatsapp:|messenger:)?\+?[0-9]{6,15}", to):
            raise TwilioAPIError(400, 21211, f"Invalid 'To' Phone Number: {to}")

        mms = bool(media)
        sid = ("MM" if mms else "SM") + secrets.token_hex(16)
        segments = 1 if mms else sms_segments(body)
        reported_segments = 0 if (service and not from_) else segments
        now = time.time()
        base_uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        msg = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": _rfc2822(now),
            "date_sent": None,
            "date_updated": _rfc2822(now),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_ or None,
            "messaging_service_sid": service or None,
            "num_media": str(len(media)),
            "num_segments": str(reported_segments),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if (service and not from_) else "queued",
            "subresource_uris": {
                "media": f"{base_uri}/Media.json",
                "feedback": f"{base_uri}/Feedback.json",
            },
            "to": to,
            "uri": f"{base_uri}.json",
        }
        self._messages[sid] = msg
        self._order.append(sid)
        micros = self.mms_price_usd_micros if mms else segments * self.price_per_segment_usd_micros
        self._prices[sid] = micros
        return self._json(
            201,
            msg,
            object_id=sid,
            segments=segments,
            charged_usd_micros=micros,
            extra={
                "encoding": sms_encoding(body),
                "num_media": len(media),
                "to": to,
                "messaging_service_sid": service or None,
            },
        )

    def deliver(self, sid: str | None = None) -> list[dict[str, Any]]:
        """The messages are sent (all queued ones, or ``sid``): Twilio then states their price
        (negative, in ``price_unit``), as it does a few seconds after accepting a message."""
        done = []
        with self._lock:
            for msg_sid in [sid] if sid else list(self._order):
                msg = self._messages[msg_sid]
                if msg["price"] is None:
                    msg["status"] = "delivered"
                    msg["date_sent"] = msg["date_updated"] = _rfc2822(time.time())
                    msg["price"] = f"-{self._prices.get(msg_sid, 0) / 1_000_000:.5f}"
                    done.append(dict(msg))
        return done

    def _list(self, req: FakeRequest) -> FakeResponse:
        q = parse_qs(req.query, keep_blank_values=True)

        def one(name: str, default: str = "") -> str:
            vals = q.get(name) or []
            return vals[0] if vals else default

        try:
            page_size = max(1, min(int(one("PageSize", "50")), 1000))
            page = max(0, int(one("Page", "0")))
        except ValueError as exc:
            raise TwilioAPIError(400, 20001, "Invalid paging parameter") from exc
        token = one("PageToken")
        msgs = [self._messages[s] for s in reversed(self._order)]
        for field, key in (("To", "to"), ("From", "from")):
            if one(field):
                msgs = [m for m in msgs if m.get(key) == one(field)]
        start = page * page_size
        if token.startswith("PA") and token[2:] in self._messages:
            sids = [m["sid"] for m in msgs]
            if token[2:] in sids:
                start = sids.index(token[2:]) + 1
        chunk = msgs[start : start + page_size]

        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"
        filters = [(k, one(k)) for k in ("To", "From") if one(k)]

        def uri(pg: int, extra: list[tuple[str, str]] | None = None) -> str:
            return (
                base
                + "?"
                + urlencode([*filters, ("PageSize", page_size), ("Page", pg), *(extra or [])])
            )

        has_next = start + page_size < len(msgs)
        next_uri = (
            uri(page + 1, [("PageToken", "PA" + chunk[-1]["sid"])])
            if (has_next and chunk)
            else None
        )
        prev_uri = uri(page - 1) if page > 0 else None
        body = {
            "end": start + len(chunk) - 1 if chunk else start,
            "first_page_uri": uri(0),
            "messages": chunk,
            "next_page_uri": next_uri,
            "page": page,
            "page_size": page_size,
            "previous_page_uri": prev_uri,
            "start": start,
            "uri": base + ("?" + req.query if req.query else ""),
        }
        return self._json(200, body)
