"""Shared helpers of the reliability suite: charges and audit rows (the private redis-server
is the root conftest's `private_redis`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from tests.conftest import KeybrakeProcess, audit_query

STRIPE = "https://api.stripe.com"
USD = 1_000_000


def charge(
    kb: KeybrakeProcess,
    vault_key: str,
    amount: int,
    *,
    idem: str | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """One confirmed $amount/100 Stripe PaymentIntent through the forward proxy."""
    headers = {"Authorization": f"Bearer {vault_key}"}
    if idem:
        headers["Idempotency-Key"] = idem
    return httpx.post(
        STRIPE + "/v1/payment_intents",
        data={
            "amount": str(amount),
            "currency": "usd",
            "confirm": "true",
            "payment_method": "pm_card_visa",
        },
        headers=headers,
        proxy=kb.proxy_url,
        verify=kb.ssl_context(),
        timeout=timeout,
    )


def code_of(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{r.status_code}"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def audit_rows(kb: KeybrakeProcess) -> list[dict[str, Any]]:
    return audit_query(kb.data_dir / "audit.db")


def wait_audit(kb: KeybrakeProcess, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The audit rows once at least ``n`` were written (the writer flushes in batches)."""
    wait_for(lambda: len(audit_rows(kb)) >= n, timeout, f"{n} audit rows")
    return audit_rows(kb)


def key_detail(kb: KeybrakeProcess, key_id: str) -> dict[str, Any]:
    r = kb.admin("GET", f"/vault/keys/{key_id}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def usd_micros(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * USD + int((frac + "000000")[:6])


def healthy(kb: KeybrakeProcess) -> bool:
    try:
        return httpx.get(f"{kb.admin_url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------- hostile-input fixtures
@pytest.fixture
def kb(keybrake_stripe: KeybrakeProcess) -> KeybrakeProcess:
    return keybrake_stripe


@pytest.fixture
def vk(kb: KeybrakeProcess) -> str:
    key: dict[str, Any] = kb.issue_key(
        daily_usd_cap=100,
        allowed_endpoints=["POST /v1/payment_intents", "GET /v1/payment_intents/{id}"],
    )
    return str(key["vault_key"])


class ChargeLoad[T]:
    """Client threads sending $1 charges through ``kb`` until stopped: thread ``i`` uses
    ``vault_keys[i % len(vault_keys)]``. Every answer is kept as ``record(index, response)``;
    a request that got no answer (a replica or a store master died under it) counts in
    ``lost``."""

    def __init__(
        self,
        kb: KeybrakeProcess,
        vault_keys: list[str],
        threads: int,
        record: Callable[[int, httpx.Response], T],
        *,
        pause: float = 0.01,
        pause_after_loss: float = 0.05,
    ) -> None:
        self.kb, self.vks, self.record = kb, vault_keys, record
        self.pause, self.pause_after_loss = pause, pause_after_loss
        self.stop_evt = threading.Event()
        self.answers: list[T] = []
        self.lost = 0
        self.in_flight = 0  # requests sent and not yet answered (or lost), now
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i % len(vault_keys),)) for i in range(threads)
        ]

    def _run(self, index: int) -> None:
        while not self.stop_evt.is_set():
            with self._lock:
                self.in_flight += 1
            try:
                r = charge(self.kb, self.vks[index], 100, timeout=15)
            except httpx.HTTPError:
                with self._lock:
                    self.lost += 1
                time.sleep(self.pause_after_loss)
                continue
            finally:
                with self._lock:
                    self.in_flight -= 1
            answer = self.record(index, r)
            with self._lock:
                self.answers.append(answer)
            time.sleep(self.pause)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def start(self) -> ChargeLoad[T]:
        for t in self._threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop_evt.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"
