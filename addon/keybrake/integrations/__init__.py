"""What worker frameworks share: the call context, cap-hit detection and vendor HTTP clients.

A worker holds a vault key and calls the vendor through Keybrake's base URL
(``KEYBRAKE_BASE_URL``, e.g. ``http://127.0.0.1:8081``; the vendor is the first path segment).
This module gives every framework integration (`keybrake.integrations.dramatiq`,
`keybrake.integrations.beam`) the same three things:

- a **call context** (`call_context`): who is calling (actor or step name) and for which
  message or element; HTTP clients built here send it as ``X-Keybrake-Actor`` and
  ``X-Keybrake-Message-Id`` (the proxy records both in the audit log and strips them);
- **cap-hit detection** (`is_cap_hit`, `BudgetExhausted`, `translate_cap_hits`): a refusal
  with ``X-Keybrake-Cap-Hit: true`` means "no money left in this budget", which retrying
  cannot fix, unlike the vendor's own ``429`` rate limits, which stay retryable;
- **vendor clients** that carry the context: `stripe_client` / `stripe_http_client`,
  `openai_client` and `anthropic_client` (AI agents) and, for SDKs built on ``requests``
  (twilio), `requests_session`.

Example (any framework, or none)::

    from keybrake.integrations import call_context, stripe_client, translate_cap_hits

    stripe = stripe_client()               # $KEYBRAKE_VAULT_KEY via $KEYBRAKE_BASE_URL/stripe
    with call_context(actor="nightly_billing", message_id=order_id), translate_cap_hits():
        stripe.v1.payment_intents.create(params={...}, options={"idempotency_key": order_id})
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from keybrake.wire import (
    ACTOR_HEADER,
    CAP_HIT_HEADER,
    ERROR_HEADER,
    MESSAGE_ID_HEADER,
    RETRYABLE_CODES,
)

if TYPE_CHECKING:
    import requests
    import stripe

__all__ = [
    "ACTOR_HEADER",
    "CAP_HIT_HEADER",
    "ERROR_HEADER",
    "MESSAGE_ID_HEADER",
    "RETRYABLE_CODES",
    "BudgetExhausted",
    "CallContext",
    "anthropic_client",
    "base_url",
    "ca_bundle",
    "call_context",
    "current_call",
    "is_cap_hit",
    "is_retryable",
    "keybrake_error_code",
    "keybrake_headers",
    "openai_client",
    "requests_session",
    "stripe_client",
    "stripe_http_client",
    "translate_cap_hits",
    "use_ca_bundle",
    "vault_key",
]

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8081"


@dataclass(frozen=True)
class CallContext:
    """Who is spending: the actor (task, step) and the message (element) it works on."""

    actor: str | None = None
    message_id: str | None = None


_CALL: ContextVar[CallContext | None] = ContextVar("keybrake_call", default=None)
# (status, code) of the last Keybrake refusal a `requests_session` saw in this context: for
# SDKs whose exceptions keep no response headers (twilio's TwilioRestException).
_LAST_REFUSAL: ContextVar[tuple[int, str] | None] = ContextVar(
    "keybrake_last_refusal", default=None
)


@contextlib.contextmanager
def call_context(actor: str | None = None, message_id: str | None = None) -> Iterator[CallContext]:
    """Attach ``actor``/``message_id`` to every vendor call made inside the block.

    >>> with call_context(actor="charge_customer", message_id="7b0c9a"):
    ...     keybrake_headers()
    {'X-Keybrake-Actor': 'charge_customer', 'X-Keybrake-Message-Id': '7b0c9a'}
    """
    ctx = CallContext(actor, message_id)
    token = _CALL.set(ctx)
    try:
        yield ctx
    finally:
        _CALL.reset(token)


def current_call() -> CallContext | None:
    """The innermost `call_context` of this thread or task, if any."""
    return _CALL.get()


def keybrake_headers() -> dict[str, str]:
    """The ``X-Keybrake-*`` headers for the current call context (empty outside one).

    For SDKs that take extra headers per request, e.g.
    ``client.emails.send(params, {"headers": keybrake_headers()})``.
    """
    ctx = _CALL.get()
    if ctx is None:
        return {}
    out: dict[str, str] = {}
    if ctx.actor:
        out[ACTOR_HEADER] = ctx.actor
    if ctx.message_id:
        out[MESSAGE_ID_HEADER] = ctx.message_id
    return out


def vault_key(value: str | None = None) -> str:
    """``value``, else ``$KEYBRAKE_VAULT_KEY``; the vault key is all a worker ever holds."""
    key = value or os.environ.get("KEYBRAKE_VAULT_KEY", "")
    if not key:
        raise ValueError("no vault key: pass one or set KEYBRAKE_VAULT_KEY")
    return key


# The CA bundle clients built here trust when none is given (set by `use_ca_bundle`).
_DEFAULT_CA_BUNDLE: list[str | None] = [None]


def use_ca_bundle(value: str | os.PathLike[str] | None) -> None:
    """Make ``value`` the CA bundle of every client this module builds from now on in this
    process (``KeybrakeMiddleware(ca_bundle=…)`` calls it); ``None`` goes back to
    ``$KEYBRAKE_CA_BUNDLE``."""
    _DEFAULT_CA_BUNDLE[0] = os.fspath(value) if value is not None else None


def ca_bundle(value: str | os.PathLike[str] | None = None) -> str | None:
    """The CA file clients built here trust for an ``https://`` base URL: ``value``, else
    `use_ca_bundle`'s, else ``$KEYBRAKE_CA_BUNDLE``; ``"system"`` is the operating system's
    store; ``None``: the SDK's own default (certifi).

    Needed when the proxy's certificate comes from a private CA (the operator's, or the
    Keybrake CA). For clients you build yourself, the variables the SDKs read: stripe none
    (``stripe.ca_bundle_path``), requests-based SDKs (twilio, resend)
    ``REQUESTS_CA_BUNDLE``, httpx ``SSL_CERT_FILE``.
    """
    from keybrake.client import ca_bundle_path

    given = value if value is not None else _DEFAULT_CA_BUNDLE[0]
    return ca_bundle_path(given)


def base_url(value: str | None = None) -> str:
    """``value``, else ``$KEYBRAKE_BASE_URL``, else ``http://127.0.0.1:8081`` (no slash)."""
    return (value or os.environ.get("KEYBRAKE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


# -- recognising refusals ----------------------------------------------------------------------


def _header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    try:
        items = headers.items()
    except AttributeError:
        return None
    lname = name.lower()
    for k, v in items:
        if str(k).lower() == lname:
            return str(v)
    return None


def _headers_of(exc: BaseException) -> Any:
    for candidate in (
        getattr(exc, "headers", None),  # stripe.StripeError, resend.ResendError
        getattr(getattr(exc, "response", None), "headers", None),  # httpx, requests
    ):
        if candidate:
            return candidate
    return None


def _status_of(exc: BaseException) -> int | None:
    for attr in ("http_status", "status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _body_code(exc: BaseException) -> str | None:
    error = _refusal_body(exc)
    if isinstance(error, dict) and error.get("type") == "keybrake_error":
        code = error.get("code")
        return str(code) if code else None
    return None


def _refusal_body(exc: BaseException) -> dict[str, Any] | None:
    """The ``error`` object of a Keybrake refusal as the SDK parsed it: stripe's
    ``json_body``, or ``body`` (openai and anthropic: the whole answer or its ``error``)."""
    for body in (getattr(exc, "json_body", None), getattr(exc, "body", None)):
        if not isinstance(body, dict):
            continue
        error = body.get("error")
        if isinstance(error, dict):
            return error
        if body.get("type") == "keybrake_error":
            return body
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def keybrake_error_code(exc: BaseException) -> str | None:
    """The Keybrake refusal code behind a vendor SDK error (``None``: not a Keybrake refusal).

    Reads ``X-Keybrake-Error`` from the error's response headers (stripe, resend, httpx,
    requests), the refusal body, or, for SDKs whose errors keep no headers (twilio), what a
    `requests_session` saw last in this context for a response with the same status.

    >>> keybrake_error_code(stripe_rate_limit_error)  # doctest: +SKIP
    'cap_exhausted'
    """
    for e in _chain(exc):
        if isinstance(e, BudgetExhausted):
            return e.code
        code = _header(_headers_of(e), ERROR_HEADER) or _body_code(e)
        if code:
            return code
        if _header(_headers_of(e), CAP_HIT_HEADER) == "true":
            return "cap_exhausted"
    last = _LAST_REFUSAL.get()
    if last is not None and last[0] == _status_of(exc):
        return last[1]
    return None


def is_cap_hit(exc: BaseException) -> bool:
    """True when ``exc`` is (or was caused by) a Keybrake cap refusal; never for vendor 429s.

    >>> try:
    ...     client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    ... except stripe.RateLimitError as e:  # doctest: +SKIP
    ...     is_cap_hit(e)   # True: X-Keybrake-Cap-Hit; False: Stripe's own rate limit
    """
    for e in _chain(exc):
        if isinstance(e, BudgetExhausted) or _header(_headers_of(e), CAP_HIT_HEADER) == "true":
            return True
    return keybrake_error_code(exc) == "cap_exhausted"


def is_retryable(exc: BaseException) -> bool:
    """False for refusals that fail the same way on every retry (cap hits, revoked keys, ...).

    Anything that is not a Keybrake refusal (a vendor 429 or 5xx, a timeout) is retryable.
    """
    code = keybrake_error_code(exc)
    return code is None or code in RETRYABLE_CODES


class BudgetExhausted(Exception):
    """A Keybrake budget has no room for this call: stop spending, do not retry.

    ``details`` holds what the proxy said (``budget``, ``window``, ``cap_usd``,
    ``remaining_usd``, ``needed_usd`` when known); ``__cause__`` is the vendor SDK's error.
    """

    code: Final = "cap_exhausted"

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    @classmethod
    def from_error(cls, exc: BaseException) -> BudgetExhausted:
        """Build one from a vendor SDK error that `is_cap_hit`."""
        error = _refusal_body(exc)
        if isinstance(error, dict):
            details = {k: v for k, v in error.items() if k not in ("type", "code", "message")}
            return cls(str(error.get("message") or "spend cap reached"), details)
        return cls(f"spend cap reached: {exc}")


class _CapHitTranslator(contextlib.ContextDecorator):
    def __enter__(self) -> _CapHitTranslator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, BudgetExhausted) and is_cap_hit(exc):
            raise BudgetExhausted.from_error(exc) from exc


def translate_cap_hits() -> contextlib.ContextDecorator:
    """Re-raise vendor SDK errors that are Keybrake cap hits as `BudgetExhausted`.

    A context manager and a decorator; other errors pass through unchanged::

        @translate_cap_hits()
        def charge(order): ...
    """
    return _CapHitTranslator()


# -- vendor HTTP clients that carry the context ------------------------------------------------


def _remember_refusal(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    code = response.headers.get(ERROR_HEADER)
    _LAST_REFUSAL.set((response.status_code, code) if code else None)


@functools.cache
def _session_class() -> type[requests.Session]:
    import requests

    class KeybrakeSession(requests.Session):
        """Adds the call context headers to every request; remembers Keybrake refusals;
        trusts ``ca_bundle`` (when given) whatever a caller passes as ``verify``."""

        def __init__(self, ca_bundle: str | None = None) -> None:
            super().__init__()
            self.hooks["response"].append(_remember_refusal)
            self.ca_bundle = ca_bundle
            if ca_bundle is not None:
                self.verify = ca_bundle

        def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
            # stripe passes verify=stripe.ca_bundle_path (a process-wide setting) per call.
            if self.ca_bundle is not None and kwargs.get("verify") is not False:
                kwargs["verify"] = self.ca_bundle
            return super().request(method, url, *args, **kwargs)

        def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
            prepared = super().prepare_request(request)
            prepared.headers.update(keybrake_headers())
            return prepared

    return KeybrakeSession


def requests_session(ca_bundle: str | os.PathLike[str] | None = None) -> requests.Session:
    """A ``requests.Session`` that sends the call context; for SDKs built on requests.

    ``ca_bundle``: see `ca_bundle` (default ``$KEYBRAKE_CA_BUNDLE``).

    Twilio through the base URL (the supported way for twilio 9: the API domain's base URL)::

        from twilio.http.http_client import TwilioHttpClient
        from twilio.rest import Client

        http = TwilioHttpClient()
        http.session = requests_session()
        client = Client("AC" + "0" * 32, vault_key(), http_client=http)  # any Account SID
        client.api.base_url = f"{base_url()}/twilio"  # relative next_page_uri stay on it
    """
    return _session_class()(ca_bundle_of(ca_bundle))  # type: ignore[call-arg]


@functools.cache
def _stripe_client_class() -> type[stripe.RequestsClient]:
    import stripe

    def with_context(headers: Mapping[str, str] | None) -> dict[str, str]:
        return {**(headers or {}), **keybrake_headers()}

    class KeybrakeStripeClient(stripe.RequestsClient):
        """stripe's requests client, adding the call context headers to each request.

        The context is read once per API call, before the SDK's own network retries, so a
        retried request carries the same actor and message id.
        """

        def request_with_retries(
            self,
            method: str,
            url: str,
            headers: Mapping[str, str],
            post_data: Any = None,
            max_network_retries: int | None = None,
            *,
            _usage: list[str] | None = None,
        ) -> tuple[str, int, Mapping[str, str]]:
            return super().request_with_retries(
                method, url, with_context(headers), post_data, max_network_retries, _usage=_usage
            )

        def request_stream_with_retries(
            self,
            method: str,
            url: str,
            headers: Mapping[str, str],
            post_data: Any = None,
            max_network_retries: int | None = None,
            *,
            _usage: list[str] | None = None,
        ) -> tuple[Any, int, Mapping[str, str]]:
            return super().request_stream_with_retries(
                method, url, with_context(headers), post_data, max_network_retries, _usage=_usage
            )

    return KeybrakeStripeClient


def openai_client(key: str | None = None, url: str | None = None, **kwargs: Any) -> Any:
    """An ``openai.OpenAI`` (``asynchronous=True``: ``AsyncOpenAI``) on the vault key, through
    Keybrake's base URL (``<url>/openai/v1``), sending the call context of the moment it is
    made (per call: ``extra_headers=keybrake_headers()``).

    >>> client = openai_client()  # doctest: +SKIP
    >>> client.chat.completions.create(model="gpt-4o-mini", messages=[...], max_tokens=500)
    """
    openai = importlib.import_module("openai")
    factory = openai.AsyncOpenAI if kwargs.pop("asynchronous", False) else openai.OpenAI
    headers = {**keybrake_headers(), **kwargs.pop("default_headers", {})}
    return factory(
        api_key=vault_key(key),
        base_url=f"{base_url(url)}/openai/v1",
        default_headers=headers,
        **kwargs,
    )


def anthropic_client(key: str | None = None, url: str | None = None, **kwargs: Any) -> Any:
    """An ``anthropic.Anthropic`` (``asynchronous=True``: ``AsyncAnthropic``) on the vault key,
    through Keybrake's base URL (``<url>/anthropic``), like `openai_client`.

    >>> client = anthropic_client()  # doctest: +SKIP
    >>> client.messages.create(model="claude-haiku-4-5", max_tokens=500, messages=[...])
    """
    anthropic = importlib.import_module("anthropic")
    factory = anthropic.AsyncAnthropic if kwargs.pop("asynchronous", False) else anthropic.Anthropic
    headers = {**keybrake_headers(), **kwargs.pop("default_headers", {})}
    return factory(
        api_key=vault_key(key),
        base_url=f"{base_url(url)}/anthropic",
        default_headers=headers,
        **kwargs,
    )


def stripe_http_client(
    timeout: float = 80, ca_bundle: str | os.PathLike[str] | None = None
) -> stripe.HTTPClient:
    """A ``stripe`` HTTP client that sends the call context headers (thread-safe).

    For module-style code: ``stripe.default_http_client = stripe_http_client()``.
    ``ca_bundle`` (default ``$KEYBRAKE_CA_BUNDLE``): the CA of an ``https://`` base URL, for
    this client only (``stripe.ca_bundle_path`` would change it for the whole process).
    """
    bundle = ca_bundle_of(ca_bundle)
    if bundle is None:
        return _stripe_client_class()(timeout=timeout)
    return _stripe_client_class()(timeout=timeout, session=requests_session(bundle))


def stripe_client(
    key: str | None = None,
    url: str | None = None,
    *,
    max_network_retries: int = 2,
    ca_bundle: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> stripe.StripeClient:
    """A ``stripe.StripeClient`` on the vault key, through Keybrake's base URL, with context.

    ``key`` defaults to ``$KEYBRAKE_VAULT_KEY`` and ``url`` to ``$KEYBRAKE_BASE_URL``; no CA
    configuration is needed for an ``http://`` base URL on loopback. For an ``https://`` one
    whose certificate comes from a private CA, ``ca_bundle`` names that CA's file (default
    ``$KEYBRAKE_CA_BUNDLE``; ``"system"``: the operating system's store).

    >>> client = stripe_client()  # doctest: +SKIP
    >>> client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    """
    import stripe

    return stripe.StripeClient(
        vault_key(key),
        base_addresses={"api": f"{base_url(url)}/stripe"},
        http_client=stripe_http_client(ca_bundle=ca_bundle),
        max_network_retries=max_network_retries,
        **kwargs,
    )


ca_bundle_of = ca_bundle  # for functions whose own parameter is named ``ca_bundle``
