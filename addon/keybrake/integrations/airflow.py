"""Apache Airflow integration: one vault key per DAG run, from an issuer token, revoked at the end.

Seed recipe (``pip install 'keybrake[airflow]'``, Airflow 3)::

    import pendulum
    from airflow.sdk import DAG, task
    from keybrake.integrations.airflow import KeybrakeRunKey

    run_key = KeybrakeRunKey(               # connection "keybrake_default" (see KeybrakeHook)
        vendor="stripe", daily_usd_cap="200", usd_cap="200", expires_in="6h",
        allowed_endpoints=["POST /v1/payment_intents"])

    with DAG("nightly_billing", schedule="@daily", start_date=pendulum.datetime(2026, 1, 1)):
        key = run_key.issue_task()          # a setup task: issues the run's key

        @task(retries=3)
        def charge(invoice, key):
            with run_key.spending(invoice["id"]) as idempotency_key:
                pi = run_key.stripe_client(key).v1.payment_intents.create(
                    params={"amount": invoice["cents"], "currency": "usd", ...},
                    options={"idempotency_key": idempotency_key})
                return pi.id

        charged = charge.partial(key=key).expand(invoice=invoices())
        charged >> run_key.revoke_task(key)  # a teardown task: runs however the run ends

What it does, and where the key lives:

- **The issuer token, never the admin token**, is the password of the Airflow connection
  (`KeybrakeHook`): it may mint keys under its label prefix only, within its limits.
- **A key per DAG run**, labelled ``<prefix>airflow/<dag_id>/<run_id>`` (`run_label`), so
  spend and audit rows group by run, and the run's end can find it without being told its id.
- **XCom never holds the key in clear.** The setup task pushes ``{"key_id", "label",
  "sealed"}``: the vault key encrypted (Fernet) with a key derived from the issuer token and
  the run's label. A task unseals it with the same connection, for its own run only (it
  derives the label from its own context); the sealed value is useless to whoever reads the
  metadata database, rendered templates or logs without the issuer token, which could mint
  keys anyway. The clear key lives only in the memory of the task that uses it.
- **Revoked when the run ends**, succeeded or failed: `revoke_task` is a teardown task
  (it runs after its setup's tasks, whatever their states); `revoke_callback` does the same
  from a DAG's ``on_success_callback``/``on_failure_callback`` where teardowns are not used.
  Revoking goes by the run's label, so a key issued by a setup attempt that died afterwards
  is revoked too. ``expires_in`` is the backstop when nothing runs at all.
- **No retry storms at the cap**: inside `spending`, a refusal that fails the same way every
  time (cap hit, revoked or expired key, endpoint not allowed) becomes Airflow's
  ``AirflowFailException``: the task fails at once, its ``retries`` unused. Vendor errors
  and Stripe's own 429s stay retryable.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:
    from airflow.sdk import BaseHook, get_current_context, setup, task, teardown
    from airflow.sdk.exceptions import AirflowFailException
    from cryptography.fernet import Fernet, InvalidToken
except ImportError as e:  # pragma: no cover - what a worker without the extra sees
    raise ImportError(
        f"keybrake.integrations.airflow needs Apache Airflow 3 ({e}): "
        "pip install 'keybrake[airflow]'"
    ) from e

from keybrake.client import Forbidden, IssuedKey, KeybrakeClient, VaultKey
from keybrake.client._calls import Dollars
from keybrake.integrations import (
    BudgetExhausted,
    call_context,
    is_retryable,
    keybrake_error_code,
    stripe_client,
)
from keybrake.integrations._runkeys import RunKeySpec, issue_run_key, revoke_run_keys, run_label

__all__ = [
    "BudgetExhausted",
    "KeybrakeHook",
    "KeybrakeRunKey",
    "RunKeySpec",
    "SealedKey",
]

log = logging.getLogger("keybrake.airflow")

DEFAULT_CONN_ID = "keybrake_default"
_SEAL_CONTEXT = b"keybrake airflow run key\x00"


@dataclass(frozen=True)
class _Settings:
    admin_url: str
    token: str = ""
    base_url: str = ""
    label_prefix: str = ""
    ca_bundle: str | None = None

    def __repr__(self) -> str:  # never the token
        return f"_Settings(admin_url={self.admin_url!r}, label_prefix={self.label_prefix!r})"


SealedKey = Mapping[str, str]
"""What the setup task pushes to XCom: ``{"key_id", "label", "sealed"}``, never the key."""


class KeybrakeHook(BaseHook):  # type: ignore[misc]
    """The Keybrake admin API through an Airflow connection holding an **issuer token**.

    The connection (``keybrake_default``; any type, e.g. ``http``): ``host`` (and ``schema``,
    ``port``) is the admin URL, or ``extra.admin_url``; ``password`` is the issuer token
    (``kbi_…``); ``extra.label_prefix`` is the issuer's label prefix (the run labels go under
    it); ``extra.base_url`` is where tasks call vendors (default: the admin URL);
    ``extra.ca_bundle`` the CA file of an ``https://`` Keybrake with a private CA. From the
    environment, e.g.::

        AIRFLOW_CONN_KEYBRAKE_DEFAULT='{"conn_type": "http", "host": "http://keybrake:8081",
            "password": "kbi_...", "extra": {"label_prefix": "airflow-prod/"}}'

    or from a secrets backend: the issuer token belongs in one, never in a DAG file.
    """

    conn_name_attr = "keybrake_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "keybrake"
    hook_name = "Keybrake"

    def __init__(self, keybrake_conn_id: str = DEFAULT_CONN_ID) -> None:
        super().__init__()
        self.keybrake_conn_id = keybrake_conn_id
        self._settings: _Settings | None = None

    def settings(self) -> _Settings:
        """The connection's admin URL, issuer token, base URL, label prefix and CA file
        (read once per hook)."""
        if self._settings is None:
            self._settings = self._read_settings()
        return self._settings

    def _read_settings(self) -> _Settings:
        conn = self.get_connection(self.keybrake_conn_id)
        extra: dict[str, Any] = dict(conn.extra_dejson or {})
        admin_url = str(extra.get("admin_url") or "")
        if not admin_url:
            host = str(conn.host or "")
            if not host:
                raise ValueError(f"connection {self.keybrake_conn_id!r} has no host (admin URL)")
            if "://" not in host:
                host = f"{conn.schema or 'http'}://{host}"
            admin_url = f"{host}:{conn.port}" if conn.port else host
        token = str(conn.password or "")
        if not token:
            raise ValueError(
                f"connection {self.keybrake_conn_id!r} has no password (the issuer token)"
            )
        return _Settings(
            admin_url=admin_url.rstrip("/"),
            token=token,
            base_url=str(extra.get("base_url") or admin_url).rstrip("/"),
            label_prefix=str(extra.get("label_prefix") or ""),
            ca_bundle=extra.get("ca_bundle"),
        )

    def get_conn(self) -> KeybrakeClient:
        """A `KeybrakeClient` holding the issuer token (close it, or use it in ``with``)."""
        s = self.settings()
        return KeybrakeClient(s.admin_url, s.token, ca_bundle=s.ca_bundle)

    def run_label(self, dag_id: str, run_id: str) -> str:
        """``<label_prefix>airflow/<dag_id>/<run_id>``."""
        return run_label(self.settings().label_prefix, "airflow", dag_id, run_id)

    def issue_run_key(self, spec: RunKeySpec, label: str) -> IssuedKey:
        """Issue the run's key; any key already live under ``label`` (a retried setup) is
        revoked first, so a run never holds two budgets. `Forbidden` names the label."""
        with self.get_conn() as kb:
            stale = revoke_run_keys(kb, label)
            if stale:
                log.warning("keybrake: revoked %d earlier key(s) of %s", len(stale), label)
            return issue_run_key(kb, spec, label)

    def revoke_run_keys(self, label: str) -> list[VaultKey]:
        """Revoke every live key of the run ``label``."""
        with self.get_conn() as kb:
            return revoke_run_keys(kb, label)

    # -- the sealed key in XCom ----------------------------------------------------------------
    def _fernet(self, label: str) -> Fernet:
        token = self.settings().token.encode()
        derived = hmac.new(token, _SEAL_CONTEXT + label.encode(), hashlib.sha256).digest()
        return Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, key: IssuedKey) -> dict[str, str]:
        """``{"key_id", "label", "sealed"}``: safe to push to XCom."""
        label = key.agent_run_label
        sealed = self._fernet(label).encrypt(key.vault_key.encode()).decode()
        return {"key_id": key.key_id, "label": label, "sealed": sealed}

    def unseal(self, sealed: SealedKey, label: str) -> str:
        """The vault key in ``sealed``, for the run ``label`` only."""
        if not isinstance(sealed, Mapping) or "sealed" not in sealed:
            raise TypeError("pass the value the Keybrake setup task returned (its XComArg)")
        if sealed.get("label") != label:
            raise ValueError(f"this sealed key belongs to another run, not {label!r}")
        try:
            return self._fernet(label).decrypt(str(sealed["sealed"]).encode()).decode()
        except InvalidToken:
            raise ValueError(
                "cannot unseal the run key: it was altered, or belongs to another run, or "
                "the connection's issuer token is not the one that issued it"
            ) from None


def _run_of(context: Mapping[str, Any]) -> tuple[str, str]:
    ti = context["ti"]
    return str(ti.dag_id), str(ti.run_id)


class KeybrakeRunKey:
    """One vault key per DAG run: a setup task issues it, a teardown task revokes it.

    ``spec`` (or its fields as keyword arguments: ``vendor``, ``daily_usd_cap``,
    ``allowed_endpoints``, ``expires_in``, ``usd_cap``, ``max_requests_per_minute``) says
    what the key may do, within the issuer token's limits; ``conn_id`` names the connection
    (`KeybrakeHook`).
    """

    def __init__(
        self,
        spec: RunKeySpec | None = None,
        *,
        conn_id: str = DEFAULT_CONN_ID,
        vendor: str | None = None,
        daily_usd_cap: Dollars | None = None,
        allowed_endpoints: Sequence[str] = (),
        expires_in: str = "1h",
        usd_cap: Dollars | None = None,
        max_requests_per_minute: int | None = None,
    ) -> None:
        if spec is None:
            if vendor is None or daily_usd_cap is None or not allowed_endpoints:
                raise TypeError("give a spec, or vendor, daily_usd_cap and allowed_endpoints")
            spec = RunKeySpec(
                vendor=vendor,
                daily_usd_cap=daily_usd_cap,
                allowed_endpoints=tuple(allowed_endpoints),
                expires_in=expires_in,
                usd_cap=usd_cap,
                max_requests_per_minute=max_requests_per_minute,
            )
        self.spec = spec
        self.conn_id = conn_id

    def hook(self) -> KeybrakeHook:
        return KeybrakeHook(self.conn_id)

    def label(self, context: Mapping[str, Any] | None = None) -> str:
        """The label of the current DAG run's key."""
        dag_id, run_id = _run_of(context or get_current_context())
        return self.hook().run_label(dag_id, run_id)

    # -- the run's ends ------------------------------------------------------------------------
    def issue(self, context: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Issue the current run's key and return it sealed (what `issue_task` pushes).

        A refusal from the issuer's scope fails the task without retries
        (``AirflowFailException`` naming the label and the refused fields).
        """
        hook = self.hook()
        label = hook.run_label(*_run_of(context or get_current_context()))
        try:
            key = hook.issue_run_key(self.spec, label)
        except Forbidden as e:
            raise AirflowFailException(f"keybrake: {e}") from None
        log.info("keybrake: issued %s for %s", key.key_id, label)
        return hook.seal(key)

    def revoke(self, context: Mapping[str, Any] | None = None) -> list[str]:
        """Revoke every live key of the current run; the ids revoked."""
        hook = self.hook()
        label = hook.run_label(*_run_of(context or get_current_context()))
        revoked = [k.key_id for k in hook.revoke_run_keys(label)]
        log.info("keybrake: revoked %s for %s", revoked or "no key", label)
        return revoked

    def issue_task(self, task_id: str = "keybrake_issue_run_key") -> Any:
        """A setup task issuing the run's key; its XComArg is the sealed key for the tasks."""
        helper = self

        @setup  # type: ignore[untyped-decorator]
        # A retry is safe: it revokes what an earlier try issued before issuing again.
        @task(task_id=task_id, retries=2)  # type: ignore[untyped-decorator]
        def issue_run_key() -> dict[str, str]:
            return helper.issue()

        return issue_run_key()

    def revoke_task(self, issued: Any, task_id: str = "keybrake_revoke_run_key") -> Any:
        """A teardown task revoking the run's keys, for ``issued`` (the `issue_task` XComArg):
        it runs once the tasks between them are done, whether they succeeded or failed."""
        helper = self

        @teardown  # type: ignore[untyped-decorator]
        @task(task_id=task_id, retries=2)  # type: ignore[untyped-decorator]
        def revoke_run_key() -> list[str]:
            return helper.revoke()

        return revoke_run_key().as_teardown(setups=issued)

    def revoke_callback(self, context: Mapping[str, Any]) -> None:
        """For a DAG's ``on_success_callback``/``on_failure_callback``: revoke the run's keys
        (logged, never raised: a callback's error changes nothing)."""
        try:
            dag_run = context["dag_run"]
            hook = self.hook()
            hook.revoke_run_keys(hook.run_label(str(dag_run.dag_id), str(dag_run.run_id)))
        except Exception as e:
            log.error("keybrake: could not revoke the run's keys: %s", e)

    # -- in a task -----------------------------------------------------------------------------
    def vault_key(self, sealed: SealedKey, context: Mapping[str, Any] | None = None) -> str:
        """The run's vault key, unsealed in this task's memory (never log or return it)."""
        return self._unseal(self.hook(), sealed, context)

    @staticmethod
    def _unseal(hook: KeybrakeHook, sealed: SealedKey, context: Mapping[str, Any] | None) -> str:
        dag_id, run_id = _run_of(context or get_current_context())
        return hook.unseal(sealed, hook.run_label(dag_id, run_id))

    def base_url(self) -> str:
        """Where tasks call vendors (the connection's ``extra.base_url``, else the admin URL)."""
        return self.hook().settings().base_url

    def stripe_client(self, sealed: SealedKey, **kwargs: Any) -> Any:
        """A ``stripe.StripeClient`` on the run's key through Keybrake's base URL."""
        hook = self.hook()
        settings = hook.settings()
        kwargs.setdefault("ca_bundle", settings.ca_bundle)
        return stripe_client(self._unseal(hook, sealed, None), settings.base_url, **kwargs)

    def idempotency_key(self, item: str = "", context: Mapping[str, Any] | None = None) -> str:
        """``<dag_id>:<run_id>:<task_id>[:<map_index>][:<item>]``: the same on every try of
        the task, so a retried task replays its first answers instead of charging again."""
        ti = (context or get_current_context())["ti"]
        parts = [str(ti.dag_id), str(ti.run_id), str(ti.task_id)]
        map_index = getattr(ti, "map_index", -1)
        if map_index is not None and map_index >= 0:
            parts.append(str(map_index))
        if item:
            parts.append(item)
        return ":".join(parts)

    @contextlib.contextmanager
    def spending(self, item: str = "", context: Mapping[str, Any] | None = None) -> Iterator[str]:
        """Around a task's vendor calls: the audit rows name the task (``X-Keybrake-Actor``:
        ``<dag_id>.<task_id>``, message id: the idempotency key it yields), and a refusal
        that cannot succeed later fails the task at once, its retries unused."""
        ctx = context or get_current_context()
        ti = ctx["ti"]
        key = self.idempotency_key(item, ctx)
        with call_context(actor=f"{ti.dag_id}.{ti.task_id}", message_id=key):
            try:
                yield key
            except Exception as e:
                if is_retryable(e):
                    raise
                code = keybrake_error_code(e) or "refused"
                raise AirflowFailException(f"keybrake refused the call ({code}): {e}") from e
