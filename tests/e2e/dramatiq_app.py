"""The Dramatiq seed as a worker module, run by the real CLI in ``test_dramatiq.py``::

    KEYBRAKE_VAULT_KEY=kbv_stripe_... KEYBRAKE_BASE_URL=http://127.0.0.1:8081 \\
        dramatiq tests.e2e.dramatiq_app --processes 2 --threads 4

The worker's whole configuration is its environment: the vault key and Keybrake's base URL
(no Stripe secret anywhere), plus the broker's Redis URL and a key namespace for the test.
``Outcomes`` is test instrumentation: it records every attempt's outcome in Redis so the
test can count executions and retries across worker processes.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import dramatiq
import redis
import stripe
from dramatiq.broker import Broker, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from keybrake.integrations import stripe_client
from keybrake.integrations.dramatiq import BudgetExhausted, KeybrakeMiddleware, current_message_id

REDIS_URL = os.environ.get("KB_DRAMATIQ_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("KB_DRAMATIQ_NAMESPACE", "kbtest-dramatiq")
OUTCOMES = f"{NAMESPACE}:test:outcomes"  # list of JSON: one entry per attempt


class Outcomes(Middleware):
    """Test instrumentation: ``{"id", "actor", "args", "outcome", "result"}`` per attempt."""

    def __init__(self) -> None:
        self.redis = redis.Redis.from_url(REDIS_URL)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        entry = {
            "id": message.message_id,
            "actor": message.actor_name,
            "args": list(message.args),
            "outcome": "ok" if exception is None else type(exception).__name__,
            "result": result if exception is None else None,
        }
        self.redis.rpush(OUTCOMES, json.dumps(entry))


broker = RedisBroker(url=REDIS_URL, namespace=NAMESPACE)
broker.add_middleware(KeybrakeMiddleware())
broker.add_middleware(Outcomes())
dramatiq.set_broker(broker)

_client: stripe.StripeClient | None = None
_client_lock = threading.Lock()


def payments() -> stripe.StripeClient:
    """One StripeClient per worker process, built on first use from the environment."""
    global _client
    with _client_lock:
        if _client is None:
            _client = stripe_client(max_network_retries=1)
        return _client


@dramatiq.actor(max_retries=3, min_backoff=100, max_backoff=400, throws=(BudgetExhausted,))
def charge_customer(customer_id: str, amount_cents: int, previous: str | None = None) -> str:
    """Charge ``amount_cents``; in a pipeline, ``previous`` is the step before's charge id.

    The message id is the idempotency key: a retried message charges at most once.
    """
    intent = payments().v1.payment_intents.create(
        params={
            "amount": amount_cents,
            "currency": "usd",
            "confirm": True,
            "payment_method": "pm_card_visa",
            "metadata": {"customer_id": customer_id, "after": previous or ""},
        },
        options={"idempotency_key": current_message_id()},
    )
    return str(intent.id)
