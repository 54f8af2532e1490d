"""Dramatiq integration: cap hits fail a message instead of retrying, and every vendor call
is recorded with its actor name and message id.

Seed recipe (``pip install keybrake[dramatiq]``)::

    import functools

    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from keybrake.integrations import stripe_client
    from keybrake.integrations.dramatiq import (
        BudgetExhausted, KeybrakeMiddleware, current_message_id)

    broker = RedisBroker(url="redis://127.0.0.1:6379/0")
    broker.add_middleware(KeybrakeMiddleware())
    dramatiq.set_broker(broker)

    @functools.cache                  # built on first use: only workers hold the vault key
    def payments():
        return stripe_client()        # $KEYBRAKE_VAULT_KEY through $KEYBRAKE_BASE_URL/stripe

    @dramatiq.actor(max_retries=3, throws=(BudgetExhausted,))
    def charge_customer(customer_id: str, amount_cents: int) -> str:
        message_id = current_message_id()
        pi = payments().v1.payment_intents.create(
            params={"amount": amount_cents, "currency": "usd", "customer": customer_id, ...},
            options={"idempotency_key": message_id},  # a retried message charges once
        )
        return pi.id

`KeybrakeMiddleware` does two things per message: it opens a `call_context` (actor name +
message id, sent as ``X-Keybrake-Actor``/``X-Keybrake-Message-Id`` by the clients built in
`keybrake.integrations`), and it makes every actor re-raise a cap hit as `BudgetExhausted`,
so ``throws=(BudgetExhausted,)`` fails the message at once: a cap hit is not fixed by
retrying. The vendor's own ``429`` rate limits are not cap hits and are retried as usual.
Without ``throws``, pass ``retry_when=retry_when(max_retries=3)`` to the actor (or to the
``Retries`` middleware): it retries everything except refusals that cannot succeed later.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from keybrake.integrations import _CALL as _CALL_VAR
from keybrake.integrations import (
    BudgetExhausted,
    CallContext,
    current_call,
    is_cap_hit,
    is_retryable,
    translate_cap_hits,
    use_ca_bundle,
)

__all__ = [
    "BudgetExhausted",
    "KeybrakeMiddleware",
    "current_message_id",
    "is_cap_hit",
    "retry_when",
]

_WRAPPED = "__keybrake_translates_cap_hits__"


def retry_when(max_retries: int = 3) -> Callable[[int, BaseException], bool]:
    """A Dramatiq ``retry_when`` predicate: up to ``max_retries`` retries, none for refusals
    that cannot succeed later (cap hits, revoked or expired keys, endpoints not allowed).

    >>> @dramatiq.actor(retry_when=retry_when(max_retries=3))  # doctest: +SKIP
    ... def send_invoice(order_id): ...
    """

    def should_retry(retries: int, exception: BaseException) -> bool:
        return retries < max_retries and is_retryable(exception)

    return should_retry


def current_message_id() -> str:
    """The id of the message being processed in this thread: a natural idempotency key.

    A retried message keeps its id, so ``options={"idempotency_key": current_message_id()}``
    makes a retry replay the first answer instead of charging again (Keybrake replays it for
    free). Raises ``RuntimeError`` outside a message handled under `KeybrakeMiddleware`.
    """
    ctx = current_call()
    if ctx is None or ctx.message_id is None:
        raise RuntimeError("no current message: is KeybrakeMiddleware on the broker?")
    return ctx.message_id


class KeybrakeMiddleware(Middleware):
    """Per message: actor name and message id on every vendor call; cap hits not retried.

    ``translate=False`` leaves actors untouched (then use `retry_when` or raise
    `BudgetExhausted` yourself). The context lives in the worker thread: ``async def``
    actors run on Dramatiq's event loop thread and should open `call_context` themselves.

    ``ca_bundle`` (a CA file, or ``"system"``) is what the clients built by
    `keybrake.integrations` in this worker process trust for an ``https://`` base URL whose
    certificate comes from a private CA (default ``$KEYBRAKE_CA_BUNDLE``).
    """

    def __init__(
        self, *, translate: bool = True, ca_bundle: str | os.PathLike[str] | None = None
    ) -> None:
        self.translate = translate
        self._tokens = threading.local()
        if ca_bundle is not None:
            use_ca_bundle(ca_bundle)

    def after_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        if not self.translate or getattr(actor.fn, _WRAPPED, False):
            return
        fn = actor.fn
        wrapped = functools.wraps(fn)(translate_cap_hits()(fn))
        setattr(wrapped, _WRAPPED, True)
        actor.fn = wrapped

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        token = _CALL_VAR.set(CallContext(message.actor_name, message.message_id))
        self._tokens.token = token

    def _leave(self) -> None:
        token = getattr(self._tokens, "token", None)
        self._tokens.token = None
        if token is None:
            return
        try:
            _CALL_VAR.reset(token)
        except ValueError:  # set in another context (a custom worker): just clear it
            _CALL_VAR.set(None)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._leave()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._leave()
