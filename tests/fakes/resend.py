"""A fake ``api.resend.com`` (emails API) for the ``resend`` SDK.

* Auth: ``Authorization: Bearer <api_key>``; missing → 401 ``missing_api_key``, wrong →
  403 ``invalid_api_key``.
* ``POST /emails`` (JSON ``from``, ``to``, ``subject``, ``html``/``text``, ``cc``, ``bcc``,
  ``reply_to``, ``tags``, ``headers``, ``attachments``, ``scheduled_at``) → 200 ``{"id": uuid}``.
* ``POST /emails/batch`` (JSON list, 1..100 e-mails) → 200 ``{"data": [{"id": …}, …]}``.
  Strict validation by default (one bad e-mail fails the batch); with header
  ``x-batch-validation: permissive`` the valid ones are sent and ``errors`` lists
  ``{"index", "message"}`` for the others.
* ``GET /emails/{id}`` → the e-mail object (``"object": "email"``, ``last_event`` …);
  ``GET /emails`` → ``{"object": "list", "has_more": false, "data": [...]}``.
* Errors are Resend's shape: ``{"statusCode": 422, "name": "validation_error", "message": …}``
  (``missing_required_field`` for missing ``from``/``to``/``subject``).
* ``Idempotency-Key`` on POST: same key + same JSON payload → the first response is replayed
  (nothing sent again, ledger ``replayed=True``); same key + other payload → 409
  ``invalid_idempotent_request``; same key while the first is running → 409
  ``concurrent_idempotent_requests``; key longer than 256 → 400 ``invalid_idempotency_key``.
* Every response carries ``ratelimit-*`` headers and a ``cf-ray`` id (Resend sits behind
  Cloudflare; the ledger's ``request_id`` is that ``cf-ray`` value).

Ledger: ``recipients`` = Σ (to + cc + bcc) over the e-mails actually accepted,
``extra["recipients_per_email"]`` the per-e-mail list, ``extra["emails"]`` their number,
``charged_usd_micros = recipients * price_per_recipient_usd_micros`` (default 400 = $0.40 per
1 000 recipients).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from tests.fakes.base import FakeRequest, FakeResponse, FakeVendor, json_response
from tests.fakes.tls import FakeTLS

DEFAULT_API_KEY = "re_fake" + "123456789_abcdefghijklmnopqrstuv"
MAX_BATCH = 100
MAX_RECIPIENTS = 50

_ADDR_RE = re.compile(
    r"^(?:[^<>]*<\s*([^<>\s@]+@[^<>\s@]+\.[^<>\s@]+)\s*>|([^<>\s@]+@[^<>\s@]+\.[^<>\s@]+))$"
)
_FORMAT_HINT = (
    "The email address needs to follow the `email@example.com` or "
    "`Name <email@example.com>` format."
)


class ResendAPIError(Exception):
    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message


@dataclass
class _IdemEntry:
    fingerprint: str
    in_flight: bool = True
    status: int = 0
    body: bytes = b""
    object_id: str | None = None


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [str(x) for x in v]
    raise TypeError(type(v).__name__)


class FakeResend(FakeVendor):
    name = "resend"
    request_id_header = "cf-ray"
    server_header = "cloudflare"

    def __init__(
        self,
        tls: FakeTLS | None,
        api_key: str = DEFAULT_API_KEY,
        *,
        price_per_recipient_usd_micros: int = 400,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls, host=host, port=port)
        self.api_key = api_key
        self.price_per_recipient_usd_micros = price_per_recipient_usd_micros
        self._emails: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._idem: dict[str, _IdemEntry] = {}

    def env(self) -> dict[str, str]:
        return {"RESEND_API_KEY": self.api_key}

    def reset_state(self) -> None:
        self._emails.clear()
        self._order.clear()
        self._idem.clear()

    def new_request_id(self) -> str:
        return secrets.token_hex(8) + "-SJC"

    # ------------------------------------------------------------------ responses

    @staticmethod
    def _rl_headers() -> list[tuple[str, str]]:
        return [
            ("ratelimit-limit", "2"),
            ("ratelimit-remaining", "1"),
            ("ratelimit-reset", "1"),
            ("ratelimit-policy", "2;w=1"),
        ]

    def _json(self, status: int, obj: Any, **annotations: Any) -> FakeResponse:
        return json_response(
            status,
            obj,
            self._rl_headers(),
            content_type="application/json; charset=utf-8",
            **annotations,
        )

    def _error(self, err: ResendAPIError) -> FakeResponse:
        resp = self._json(
            err.status, {"statusCode": err.status, "message": err.message, "name": err.name}
        )
        if err.status == 429:
            resp.headers = [(k, "0" if k == "ratelimit-remaining" else v) for k, v in resp.headers]
            resp.headers.append(("retry-after", "1"))
        return resp

    def error_response(self, req: FakeRequest, status: int) -> FakeResponse:
        return self._error(
            ResendAPIError(status, "application_error", "An unexpected error occurred.")
        )

    def rate_limit_response(self, req: FakeRequest) -> FakeResponse:
        return self._error(
            ResendAPIError(
                429,
                "rate_limit_exceeded",
                "Too many requests. You can only make 2 requests per second. See rate limit "
                "response headers for more information. Or contact support to increase rate "
                "limit.",
            )
        )

    # ------------------------------------------------------------------ dispatch

    def handle(self, req: FakeRequest) -> FakeResponse:
        auth = req.header("Authorization") or ""
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._error(
                ResendAPIError(
                    401,
                    "missing_api_key",
                    "Missing API key in the authorization header. Include the following "
                    "header in the request: Authorization: Bearer YOUR_API_KEY",
                )
            )
        if not secrets.compare_digest(token.strip(), self.api_key):
            return self._error(ResendAPIError(403, "invalid_api_key", "API key is invalid"))

        path = req.path.rstrip("/")
        try:
            if req.method == "POST" and path in ("/emails", "/emails/batch"):
                return self._post(req, batch=path.endswith("/batch"))
            m = re.fullmatch(r"/emails/([^/]+)", path)
            if req.method == "GET" and m:
                self.wait_delay(req)
                with self._lock:
                    email = self._emails.get(m.group(1))
                if email is None:
                    raise ResendAPIError(404, "not_found", "Email not found")
                return self._json(200, email, object_id=email["id"])
            if req.method == "GET" and path == "/emails":
                self.wait_delay(req)
                with self._lock:
                    data = [self._emails[i] for i in reversed(self._order)]
                return self._json(200, {"object": "list", "has_more": False, "data": data})
            if path.startswith("/emails"):
                raise ResendAPIError(
                    405, "method_not_allowed", "Method is not allowed for the requested path."
                )
            raise ResendAPIError(404, "not_found", "The requested endpoint does not exist.")
        except ResendAPIError as err:
            return self._error(err)

    def _post(self, req: FakeRequest, *, batch: bool) -> FakeResponse:
        try:
            payload = json.loads(req.body.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResendAPIError(
                400, "validation_error", "Invalid JSON in the request body."
            ) from exc

        key = req.header("Idempotency-Key")
        fingerprint = json.dumps([req.path, payload], sort_keys=True)
        if key is not None:
            if not 1 <= len(key) <= 256:
                raise ResendAPIError(
                    400, "invalid_idempotency_key", "The key must be between 1-256 chars."
                )
            with self._lock:
                ent = self._idem.get(key)
                if ent is not None and ent.fingerprint != fingerprint:
                    raise ResendAPIError(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different request payload. Change "
                        "your idempotency key or payload.",
                    )
                if ent is not None and ent.in_flight:
                    raise ResendAPIError(
                        409,
                        "concurrent_idempotent_requests",
                        "Same idempotency key used while original request is still in "
                        "progress. Try the request again later.",
                    )
                if ent is not None:
                    return FakeResponse(
                        ent.status,
                        ent.body,
                        [("Content-Type", "application/json; charset=utf-8"), *self._rl_headers()],
                        object_id=ent.object_id,
                        replayed=True,
                    )
                self._idem[key] = _IdemEntry(fingerprint=fingerprint)

        self.wait_delay(req)
        resp: FakeResponse | None = None
        try:
            try:
                resp = self._send_batch(req, payload) if batch else self._send_one(payload)
            except ResendAPIError as err:
                resp = self._error(err)
            return resp
        finally:
            if key is not None:
                with self._lock:
                    if resp is not None and 200 <= resp.status < 300:
                        self._idem[key] = _IdemEntry(
                            fingerprint=fingerprint,
                            in_flight=False,
                            status=resp.status,
                            body=resp.body,
                            object_id=resp.object_id,
                        )
                    else:
                        self._idem.pop(key, None)

    # ------------------------------------------------------------------ e-mails

    def _validate(self, e: Any, *, in_batch: bool) -> tuple[dict[str, Any], int]:
        """Return the stored e-mail object (not yet saved) and its recipient count."""
        if not isinstance(e, dict):
            raise ResendAPIError(422, "validation_error", "Invalid email object.")
        for field in ("from", "to", "subject"):
            if e.get(field) in (None, "", []):
                raise ResendAPIError(422, "missing_required_field", f"Missing `{field}` field.")
        if in_batch:
            for field in ("attachments", "scheduled_at"):
                if e.get(field) is not None:
                    raise ResendAPIError(
                        422,
                        "validation_error",
                        f"The `{field}` field is not supported for batch emails.",
                    )
        lists: dict[str, list[str]] = {}
        for field in ("from", "to", "cc", "bcc", "reply_to"):
            try:
                vals = _as_list(e.get(field))
            except TypeError as exc:
                raise ResendAPIError(
                    422, "validation_error", f"Invalid `{field}` field. {_FORMAT_HINT}"
                ) from exc
            for addr in vals:
                if not _ADDR_RE.match(addr.strip()):
                    raise ResendAPIError(
                        422, "validation_error", f"Invalid `{field}` field. {_FORMAT_HINT}"
                    )
            lists[field] = vals
        if len(lists["from"]) != 1:
            raise ResendAPIError(422, "validation_error", f"Invalid `from` field. {_FORMAT_HINT}")
        if len(lists["to"]) > MAX_RECIPIENTS:
            raise ResendAPIError(
                422,
                "validation_error",
                f"Invalid `to` field. The maximum number of recipients is {MAX_RECIPIENTS}.",
            )
        recipients = len(lists["to"]) + len(lists["cc"]) + len(lists["bcc"])
        now = dt.datetime.now(dt.UTC)
        email = {
            "object": "email",
            "id": str(uuid.uuid4()),
            "to": lists["to"],
            "from": lists["from"][0],
            "created_at": now.strftime("%Y-%m-%d %H:%M:%S.%f+00"),
            "subject": str(e.get("subject")),
            "html": e.get("html"),
            "text": e.get("text"),
            "bcc": lists["bcc"] or None,
            "cc": lists["cc"] or None,
            "reply_to": lists["reply_to"] or None,
            "last_event": "scheduled" if e.get("scheduled_at") else "delivered",
            "scheduled_at": e.get("scheduled_at"),
            "tags": e.get("tags") if isinstance(e.get("tags"), list) else None,
        }
        return email, recipients

    def _store(self, email: dict[str, Any]) -> None:
        with self._lock:
            self._emails[email["id"]] = email
            self._order.append(email["id"])

    def _send_one(self, payload: Any) -> FakeResponse:
        email, recipients = self._validate(payload, in_batch=False)
        self._store(email)
        return self._json(
            200,
            {"id": email["id"]},
            object_id=email["id"],
            recipients=recipients,
            charged_usd_micros=recipients * self.price_per_recipient_usd_micros,
            extra={"emails": 1, "recipients_per_email": [recipients]},
        )

    def _send_batch(self, req: FakeRequest, payload: Any) -> FakeResponse:
        if not isinstance(payload, list):
            raise ResendAPIError(
                422, "validation_error", "The request body must be an array of emails."
            )
        if not payload:
            raise ResendAPIError(
                422, "validation_error", "The batch must contain at least 1 email."
            )
        if len(payload) > MAX_BATCH:
            raise ResendAPIError(
                422,
                "validation_error",
                f"Too many emails in the batch. The maximum is {MAX_BATCH}.",
            )
        permissive = (req.header("x-batch-validation") or "").lower() == "permissive"
        accepted: list[tuple[dict[str, Any], int]] = []
        errors: list[dict[str, Any]] = []
        for i, e in enumerate(payload):
            try:
                accepted.append(self._validate(e, in_batch=True))
            except ResendAPIError as err:
                if not permissive:
                    raise
                errors.append({"index": i, "message": err.message})
        for email, _ in accepted:
            self._store(email)
        per_email = [n for _, n in accepted]
        body: dict[str, Any] = {"data": [{"id": email["id"]} for email, _ in accepted]}
        if permissive:
            body["errors"] = errors
        return self._json(
            200,
            body,
            object_id=accepted[0][0]["id"] if accepted else None,
            recipients=sum(per_email),
            charged_usd_micros=sum(per_email) * self.price_per_recipient_usd_micros,
            extra={
                "emails": len(accepted),
                "recipients_per_email": per_email,
                "ids": [email["id"] for email, _ in accepted],
                "errors": errors,
            },
        )
