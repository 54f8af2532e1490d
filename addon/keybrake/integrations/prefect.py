"""Prefect integration: a block giving each flow run its own vault key, revoked at the end.

Seed recipe (``pip install 'keybrake[prefect]'``, Prefect 3)::

    from prefect import flow, task
    from keybrake.integrations.prefect import KeybrakeIssuer

    issuer = KeybrakeIssuer.load("billing")   # saved once: admin URL, issuer token, key spec

    @task(retries=3, retry_condition_fn=KeybrakeIssuer.retry_condition)
    def charge(invoice):
        with issuer.spending(invoice["id"]) as idempotency_key:
            pi = issuer.stripe_client().v1.payment_intents.create(
                params={"amount": invoice["cents"], "currency": "usd", ...},
                options={"idempotency_key": idempotency_key})
            return pi.id

    @flow(**issuer.flow_hooks())              # revoke on completion, failure, crash, cancel
    def nightly_billing(invoices):
        return charge.map(invoices).result()

What it does, and where the key lives:

- **The issuer token, never the admin token**, is the block's ``token`` (a secret field:
  masked in the UI and in ``repr``). It may mint keys under its label prefix only.
- **A key per flow run**, labelled ``<label_prefix>prefect/<flow name>/<flow run id>``
  (a subflow run gets its own), issued on first use in the run (`run_key`, `stripe_client`,
  `spending`), never before.
- **The key lives only in the memory of the process running the flow**: it is never a flow
  or task parameter, never a result and never logged, so Prefect's API, database and UI never
  see it. Tasks on the default thread-pool runner share it; a task runner that ships tasks to
  other processes (Dask, Ray) cannot: there `run_key` refuses (``RuntimeError``) rather than
  issue a second key for the run, which would double its cap.
- **Revoked when the run ends**: `flow_hooks` returns ``on_completion``, ``on_failure``,
  ``on_crashed`` and ``on_cancellation`` hooks that revoke every key of the run by its
  label (and forget it here). ``expires_in`` is the backstop for a process killed outright.
- **No retry storms at the cap**: `retry_condition` as a task's ``retry_condition_fn`` says
  "do not retry" for refusals that fail the same way every time (cap hit, revoked key,
  endpoint not allowed); vendor errors and Stripe's own 429s are retried as usual.
"""

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional

try:
    from prefect.blocks.core import Block
    from pydantic import Field, SecretStr
except ImportError as e:  # pragma: no cover - what a worker without the extra sees
    raise ImportError(
        f"keybrake.integrations.prefect needs Prefect 3 ({e}): pip install 'keybrake[prefect]'"
    ) from e

from keybrake.client import IssuedKey, KeybrakeClient, VaultKey
from keybrake.integrations import (
    BudgetExhausted,
    call_context,
    is_cap_hit,
    is_retryable,
    stripe_client,
)
from keybrake.integrations._runkeys import RunKeySpec, issue_run_key, revoke_run_keys, run_label

__all__ = ["BudgetExhausted", "KeybrakeIssuer", "RunKeySpec"]

# The keys of the flow runs this process runs, by label: the one place a run's key is held.
_RUN_KEYS: dict[str, IssuedKey] = {}
_RUN_KEYS_LOCK = threading.Lock()

FlowHook = Callable[[Any, Any, Any], None]


def _current_run() -> tuple[str, str]:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if not run_id:
        raise RuntimeError("no flow run here: call this inside a Prefect flow or task")
    return str(flow_run.flow_name), str(run_id)


class KeybrakeIssuer(Block):  # type: ignore[misc]
    """An issuer token and the key each flow run gets from it.

    ``admin_url`` is Keybrake's admin API, ``token`` the issuer token (``kbi_…``),
    ``label_prefix`` the issuer's label prefix; ``base_url`` is where tasks call vendors
    (default: the admin URL); ``ca_bundle`` the CA file of an ``https://`` Keybrake with a
    private CA. The rest is what each run's key may do, within the token's limits: dollar
    amounts are strings (``"20"``, ``"12.50"``), never floats.
    """

    _block_type_name = "Keybrake Issuer"
    _block_type_slug = "keybrake-issuer"
    _description = "Issues one Keybrake vault key per flow run from an issuer token."

    admin_url: str = Field(description="Keybrake's admin API, e.g. http://keybrake:8081")
    token: SecretStr = Field(description="The issuer token (kbi_...), never the admin token")
    label_prefix: str = Field(default="", description="The issuer token's label prefix")
    vendor: str = Field(description="The vendor of each run's key, e.g. stripe")
    daily_usd_cap: str = Field(description="Each run key's daily cap in dollars, e.g. '20'")
    allowed_endpoints: list[str] = Field(description="e.g. ['POST /v1/payment_intents']")
    expires_in: str = Field(default="1h", description="Backstop lifetime of a run's key")
    usd_cap: Optional[str] = Field(default=None, description="Lifetime cap in dollars")
    max_requests_per_minute: Optional[int] = Field(default=None)
    base_url: Optional[str] = Field(default=None, description="Where tasks call vendors")
    ca_bundle: Optional[str] = Field(default=None, description="CA file of an https Keybrake")

    # -- the admin API -------------------------------------------------------------------------
    def spec(self) -> RunKeySpec:
        """What each run's key may do."""
        return RunKeySpec(
            vendor=self.vendor,
            daily_usd_cap=self.daily_usd_cap,
            allowed_endpoints=tuple(self.allowed_endpoints),
            expires_in=self.expires_in,
            usd_cap=self.usd_cap,
            max_requests_per_minute=self.max_requests_per_minute,
        )

    def client(self) -> KeybrakeClient:
        """A `KeybrakeClient` holding the issuer token (close it, or use it in ``with``)."""
        return KeybrakeClient(
            self.admin_url, self.token.get_secret_value(), ca_bundle=self.ca_bundle
        )

    def run_label(self, flow_name: str, flow_run_id: str) -> str:
        """``<label_prefix>prefect/<flow name>/<flow run id>``."""
        return run_label(self.label_prefix, "prefect", flow_name, flow_run_id)

    def current_label(self) -> str:
        """The label of the current flow run's key."""
        return self.run_label(*_current_run())

    # -- the key of the current run ------------------------------------------------------------
    def run_key(self) -> str:
        """The current flow run's vault key, issued on first use in the run (raises the
        client's `Forbidden`, naming the label, when the issuer token may not mint it).
        Hold it in memory only: never return, log or pass it as a parameter."""
        label = self.current_label()
        with _RUN_KEYS_LOCK:
            key = _RUN_KEYS.get(label)
            if key is None:
                with self.client() as kb:
                    live = [
                        k.key_id
                        for k in kb.list_keys()
                        if k.agent_run_label == label and k.revoked_at is None
                    ]
                    if live:
                        # Another process of this run holds it: a key per process would
                        # multiply the run's cap, so none is issued here.
                        raise RuntimeError(
                            f"the key of run {label!r} ({live[0]}) was issued in another "
                            "process: run this flow's tasks in its own process (the default "
                            "thread-pool task runner), one key per run"
                        )
                    key = issue_run_key(kb, self.spec(), label)
                _RUN_KEYS[label] = key
        return key.vault_key

    def run_key_id(self) -> str:
        """The id of the current flow run's key (issued on first use): safe to log."""
        self.run_key()
        return _RUN_KEYS[self.current_label()].key_id

    def stripe_client(self, **kwargs: Any) -> Any:
        """A ``stripe.StripeClient`` on the current run's key, through the base URL."""
        kwargs.setdefault("ca_bundle", self.ca_bundle)
        return stripe_client(self.run_key(), self.base_url or self.admin_url, **kwargs)

    def idempotency_key(self, item: str = "") -> str:
        """``<flow run id>:<task run name>[:<item>]``: the same on every retry of the task
        run, so a retry replays its first answers instead of charging again."""
        from prefect.runtime import task_run

        _, run_id = _current_run()
        parts = [run_id, str(task_run.name or task_run.id or "flow")]
        if item:
            parts.append(item)
        return ":".join(parts)

    @contextlib.contextmanager
    def spending(self, item: str = "") -> Iterator[str]:
        """Around a task's vendor calls: audit rows name the flow and task (actor
        ``<flow>.<task>``, message id: the idempotency key it yields), and a cap hit is
        raised as `BudgetExhausted`."""
        from prefect.runtime import task_run

        flow_name, _ = _current_run()
        key = self.idempotency_key(item)
        actor = f"{flow_name}.{task_run.task_name or 'flow'}"
        with call_context(actor=actor, message_id=key):
            try:
                yield key
            except Exception as e:
                if isinstance(e, BudgetExhausted) or not is_cap_hit(e):
                    raise
                raise BudgetExhausted.from_error(e) from e

    # -- the run's end -------------------------------------------------------------------------
    def revoke_run(self, flow_name: str, flow_run_id: str) -> list[VaultKey]:
        """Revoke every live key of a flow run and forget it in this process."""
        label = self.run_label(flow_name, flow_run_id)
        with _RUN_KEYS_LOCK:
            _RUN_KEYS.pop(label, None)
        with self.client() as kb:
            return revoke_run_keys(kb, label)

    def revoke_hook(self) -> FlowHook:
        """A flow state hook ``(flow, flow_run, state)`` revoking the run's keys."""

        def revoke_run_key(flow: Any, flow_run: Any, state: Any) -> None:
            self.revoke_run(str(flow.name), str(flow_run.id))

        return revoke_run_key

    def flow_hooks(self) -> dict[str, list[FlowHook]]:
        """``@flow(**issuer.flow_hooks())``: revoke on completion, failure, crash and
        cancellation."""
        hook = self.revoke_hook()
        return {
            "on_completion": [hook],
            "on_failure": [hook],
            "on_crashed": [hook],
            "on_cancellation": [hook],
        }

    @staticmethod
    def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
        """A task's ``retry_condition_fn``: no retry for refusals that fail the same way every
        time (cap hits, revoked or expired keys, endpoints not allowed)."""
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # a result that cannot be read: the error it raises
            exc = e
        return not isinstance(exc, BaseException) or is_retryable(exc)
