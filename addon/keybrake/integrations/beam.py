"""Apache Beam integration: a DoFn base that spends through Keybrake and stops cleanly at the cap.

Seed recipe (``pip install keybrake[beam]``)::

    import apache_beam as beam
    from keybrake.integrations.beam import KeybrakeDoFn, KeybrakeOptions

    class ChargeInvoice(KeybrakeDoFn):
        def element_id(self, invoice):
            return invoice["id"]

        def call(self, invoice, idempotency_key):
            pi = self.client.v1.payment_intents.create(
                params={"amount": invoice["cents"], "currency": "usd", ...},
                options={"idempotency_key": idempotency_key},
            )
            return pi.id

    options = KeybrakeOptions()  # --keybrake_vault_key, --keybrake_base_url, --keybrake_job_id
    with beam.Pipeline(options=options) as p:
        charged, unpaid = (
            p | beam.Create(invoices)
              | beam.ParDo(ChargeInvoice(options=options)).with_outputs(
                    KeybrakeDoFn.BUDGET_EXHAUSTED, main="charged")
        )
        unpaid | beam.io.WriteToText("unpaid")     # what the cap stopped, for a later run

What the base class does:

- **Vault key only**: the key comes from the constructor, `KeybrakeOptions` or
  ``$KEYBRAKE_VAULT_KEY`` on the worker; the vendor client is built in ``setup()`` (never
  pickled) by `create_client` (a stripe client through ``<base URL>/stripe`` by default).
- **Idempotency** from job id + element id: a bundle that fails and is retried sends the
  same keys, Keybrake replays the first answers, and replays are free (no double charge, no
  budget used twice). The job id is fixed when the pipeline is built (``--keybrake_job_id``,
  else ``--job_name``, else random), so a re-run with the same job id charges nothing twice.
- **Clean stop at the cap**: the first cap refusal marks the budget exhausted in this worker
  process; that element and every later one go to the ``budget_exhausted`` output without
  calling the vendor. Nothing is raised, so no bundle is retried into the same wall. The
  ``keybrake:budget_exhausted`` counter says how many elements were left unprocessed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import apache_beam as beam
from apache_beam.metrics.metric import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.pvalue import TaggedOutput

from keybrake.integrations import (
    BudgetExhausted,
    base_url,
    call_context,
    is_cap_hit,
    stripe_client,
    vault_key,
)

__all__ = ["BudgetExhausted", "KeybrakeDoFn", "KeybrakeOptions"]

log = logging.getLogger("keybrake.beam")

# Budgets found exhausted in this worker process, by job id and vault key: every DoFn instance
# of the job stops calling the vendor once one of them hit the cap (a new key starts afresh).
_EXHAUSTED: set[str] = set()
_EXHAUSTED_LOCK = threading.Lock()


class KeybrakeOptions(PipelineOptions):
    """``--keybrake_vault_key``, ``--keybrake_base_url`` and ``--keybrake_job_id``.

    >>> KeybrakeOptions(["--keybrake_vault_key", "kbv_stripe_..."]).keybrake_vault_key
    'kbv_stripe_...'
    """

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--keybrake_vault_key",
            default=None,
            help="Vault key the workers spend with (default: $KEYBRAKE_VAULT_KEY on workers).",
        )
        parser.add_argument(
            "--keybrake_base_url",
            default=None,
            help="Keybrake base URL, e.g. http://keybrake:8081 (default: $KEYBRAKE_BASE_URL).",
        )
        parser.add_argument(
            "--keybrake_job_id",
            default=None,
            help="Prefix of idempotency keys; reuse it to re-run a job without double charges "
            "(default: --job_name, else random per pipeline).",
        )


class KeybrakeDoFn(beam.DoFn):
    """Base DoFn: subclasses implement `call` (and usually `element_id`).

    ``vault_key``/``base_url`` override the options; ``actor`` names the step in the audit
    log (default: the class name). ``self.client`` is what `create_client` built in setup.
    """

    BUDGET_EXHAUSTED: ClassVar[str] = "budget_exhausted"

    def __init__(
        self,
        vault_key: str | None = None,
        base_url: str | None = None,
        *,
        job_id: str | None = None,
        options: PipelineOptions | None = None,
        actor: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if options is not None:
            kopts = options.view_as(KeybrakeOptions)
            vault_key = vault_key or kopts.keybrake_vault_key
            base_url = base_url or kopts.keybrake_base_url
            job_id = job_id or kopts.keybrake_job_id or options.view_as(GoogleCloudOptions).job_name
        self._vault_key = vault_key
        self._base_url = base_url
        self.job_id: str = job_id or uuid.uuid4().hex
        self.actor = actor or type(self).__name__
        self.client: Any = None
        self._budget = ""
        self._exhausted_counter = Metrics.counter("keybrake", "budget_exhausted")
        self._calls_counter = Metrics.counter("keybrake", "calls")

    # -- for subclasses ------------------------------------------------------------------------
    def create_client(self, vault_key: str, base_url: str) -> Any:
        """The vendor client, built once per DoFn instance in ``setup()``. Default: stripe."""
        return stripe_client(vault_key, base_url)

    def element_id(self, element: Any) -> str:
        """A stable id of ``element`` within the job (the idempotency key's second half).

        Default: the key of a ``(key, value)`` pair, ``element["id"]`` of a mapping, else a
        hash of ``repr(element)``. Override it when elements carry their own id.
        """
        if isinstance(element, tuple) and len(element) == 2:
            return str(element[0])
        if isinstance(element, Mapping) and "id" in element:
            return str(element["id"])
        return hashlib.sha256(repr(element).encode()).hexdigest()[:32]

    def idempotency_key(self, element: Any) -> str:
        """``<job id>:<element id>``: the same on every retry of the element's bundle."""
        return f"{self.job_id}:{self.element_id(element)}"

    def call(self, element: Any, idempotency_key: str) -> Any:
        """Make the vendor call for ``element``; the return value (unless None) is emitted."""
        raise NotImplementedError("KeybrakeDoFn subclasses implement call(element, key)")

    # -- Beam lifecycle ------------------------------------------------------------------------
    def setup(self) -> None:
        key = vault_key(self._vault_key)
        self._budget = f"{self.job_id}:{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        self.client = self.create_client(key, base_url(self._base_url))

    @property
    def exhausted(self) -> bool:
        """True once any DoFn of this job in this process hit the cap."""
        return self._budget in _EXHAUSTED

    def process(self, element: Any) -> Iterator[Any]:
        if self.exhausted:
            self._exhausted_counter.inc()  # type: ignore[no-untyped-call]
            yield TaggedOutput(self.BUDGET_EXHAUSTED, element)
            return
        key = self.idempotency_key(element)
        try:
            with call_context(actor=self.actor, message_id=key):
                result = self.call(element, key)
        except Exception as e:
            if not is_cap_hit(e):
                raise
            with _EXHAUSTED_LOCK:
                first = self._budget not in _EXHAUSTED
                _EXHAUSTED.add(self._budget)
            if first:
                log.warning("keybrake: budget exhausted in job %s: %s", self.job_id, e)
            self._exhausted_counter.inc()  # type: ignore[no-untyped-call]
            yield TaggedOutput(self.BUDGET_EXHAUSTED, element)
            return
        self._calls_counter.inc()  # type: ignore[no-untyped-call]
        if result is not None:
            yield result
