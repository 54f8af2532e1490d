"""Apache Beam integration: a DoFn base that spends through Keybrake and stops cleanly at the cap.

Seed recipe (``pip install keybrake[beam]``)::

    import apache_beam as beam
    from keybrake.integrations.beam import KeybrakeDoFn, KeybrakeOptions, from_file

    class ChargeInvoice(KeybrakeDoFn):
        def element_id(self, invoice):
            return invoice["id"]

        def call(self, invoice, idempotency_key):
            pi = self.client.v1.payment_intents.create(
                params={"amount": invoice["cents"], "currency": "usd", ...},
                options={"idempotency_key": idempotency_key},
            )
            return pi.id

    options = KeybrakeOptions()  # --keybrake_base_url, --keybrake_ca_bundle, --keybrake_job_id
    with beam.Pipeline(options=options) as p:
        charged, unpaid = (
            p | beam.Create(invoices)
              | beam.ParDo(ChargeInvoice(from_file("/var/run/secrets/keybrake/vault-key"),
                                         options=options)).with_outputs(
                    KeybrakeDoFn.BUDGET_EXHAUSTED, main="charged")
        )
        unpaid | beam.io.WriteToText("unpaid")     # what the cap stopped, for a later run

What the base class does:

- **The vault key never travels with the pipeline.** The DoFn holds a *key source*: a
  zero-argument callable run on the worker in ``setup()`` (`from_env`, the default, reads
  ``$KEYBRAKE_VAULT_KEY``; `from_file` reads a mounted secret). The DoFn is pickled into the
  pipeline graph and its options are shown in the Dataflow job page: neither holds the key.
  A vault key given as a string, or in ``--keybrake_vault_key``, is refused. From a secret
  manager, a few lines::

      class FromSecretManager:
          def __init__(self, name):            # "projects/p/secrets/kb-vault-key/versions/latest"
              self.name = name
          def __call__(self):
              from google.cloud import secretmanager
              client = secretmanager.SecretManagerServiceClient()
              return client.access_secret_version(name=self.name).payload.data.decode()

- **Fresh keys in long runs**: with ``refresh_seconds``, the key source is asked again at
  the start of a bundle once that long has passed; a different key gets a new client (calls
  in flight finish on the old one). Issue a key per window and hand it out through the file
  or secret the key source reads.
- **Idempotency** from job id + element id: a bundle that fails and is retried sends the
  same keys, Keybrake replays the first answers, and replays are free (no double charge, no
  budget used twice). The job id is fixed when the pipeline is built (``--keybrake_job_id``,
  else ``--job_name``, else random), so a re-run with the same job id charges nothing twice.
- **Clean stop at the cap**: the first cap refusal marks the budget exhausted in this worker
  process; that element and every later one go to the ``budget_exhausted`` output without
  calling the vendor. Nothing is raised, so no bundle is retried into the same wall. The
  ``keybrake:budget_exhausted`` counter says how many elements were left unprocessed.
- **A private CA** for an ``https://`` base URL: ``ca_bundle=`` (or ``--keybrake_ca_bundle``,
  or ``$KEYBRAKE_CA_BUNDLE`` on the workers), a path in the worker image, or ``"system"``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
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
)

__all__ = [
    "BudgetExhausted",
    "FromEnv",
    "FromFile",
    "KeySource",
    "KeybrakeDoFn",
    "KeybrakeOptions",
    "from_env",
    "from_file",
]

log = logging.getLogger("keybrake.beam")

# Budgets found exhausted in this worker process, by job id and vault key: every DoFn instance
# of the job stops calling the vendor once one of them hit the cap (a new key starts afresh).
_EXHAUSTED: set[str] = set()
_EXHAUSTED_LOCK = threading.Lock()


KeySource = Callable[[], str]
"""A zero-argument callable returning the vault key, run on the worker (never pickled with
a key inside: it holds where the key is, not the key)."""


class FromEnv:
    """Key source: the vault key in an environment variable of the worker.

    >>> FromEnv("KEYBRAKE_VAULT_KEY")  # doctest: +ELLIPSIS
    FromEnv('KEYBRAKE_VAULT_KEY')
    """

    def __init__(self, name: str = "KEYBRAKE_VAULT_KEY") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"FromEnv({self.name!r})"

    def __call__(self) -> str:
        key = os.environ.get(self.name, "").strip()
        if not key:
            raise ValueError(f"no vault key: ${self.name} is not set on this worker")
        return key


class FromFile:
    """Key source: the vault key in a file on the worker (a mounted secret), read each time
    it is asked, so a rotated file gives the next key."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"FromFile({self.path!r})"

    def __call__(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise ValueError(f"no vault key: cannot read {self.path} ({e.strerror})") from None
        if not key:
            raise ValueError(f"no vault key: {self.path} is empty")
        return key


def from_env(name: str = "KEYBRAKE_VAULT_KEY") -> FromEnv:
    """A key source reading ``$name`` on the worker."""
    return FromEnv(name)


def from_file(path: str | os.PathLike[str]) -> FromFile:
    """A key source reading a mounted secret file on the worker."""
    return FromFile(path)


class KeybrakeOptions(PipelineOptions):
    """``--keybrake_base_url``, ``--keybrake_ca_bundle``, ``--keybrake_job_id`` and where the
    workers find the vault key (``--keybrake_vault_key_file`` or ``--keybrake_vault_key_env``),
    never the key itself.

    >>> KeybrakeOptions(["--keybrake_vault_key_file", "/run/kb/key"]).keybrake_vault_key_file
    '/run/kb/key'
    """

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--keybrake_vault_key",
            default=None,
            help="Refused: pipeline options are shown in the job's page and saved with it. "
            "Use --keybrake_vault_key_file or --keybrake_vault_key_env.",
        )
        parser.add_argument(
            "--keybrake_vault_key_file",
            default=None,
            help="File on the workers holding the vault key (a mounted secret).",
        )
        parser.add_argument(
            "--keybrake_vault_key_env",
            default=None,
            help="Environment variable on the workers holding the vault key (default: "
            "KEYBRAKE_VAULT_KEY).",
        )
        parser.add_argument(
            "--keybrake_base_url",
            default=None,
            help="Keybrake base URL, e.g. https://keybrake.internal:8443 (default: "
            "$KEYBRAKE_BASE_URL).",
        )
        parser.add_argument(
            "--keybrake_ca_bundle",
            default=None,
            help="CA file on the workers for an https:// base URL with a private CA, or "
            "'system' (default: $KEYBRAKE_CA_BUNDLE).",
        )
        parser.add_argument(
            "--keybrake_job_id",
            default=None,
            help="Prefix of idempotency keys; reuse it to re-run a job without double charges "
            "(default: --job_name, else random per pipeline).",
        )


class KeybrakeDoFn(beam.DoFn):
    """Base DoFn: subclasses implement `call` (and usually `element_id`).

    ``key_source`` (default: ``--keybrake_vault_key_file``/``_env`` from ``options``, else
    `from_env`) is called on the worker in ``setup()``; ``base_url`` and ``ca_bundle``
    override the options; ``refresh_seconds`` asks the key source again that often (at a
    bundle's start); ``actor`` names the step in the audit log (default: the class name).
    ``self.client`` is what `create_client` built in setup.
    """

    BUDGET_EXHAUSTED: ClassVar[str] = "budget_exhausted"

    def __init__(
        self,
        key_source: KeySource | None = None,
        base_url: str | None = None,
        *,
        ca_bundle: str | None = None,
        refresh_seconds: float | None = None,
        job_id: str | None = None,
        options: PipelineOptions | None = None,
        actor: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if isinstance(key_source, (str, bytes)):
            raise TypeError(
                "KeybrakeDoFn takes a key source, not the vault key: a key given here is "
                "pickled into the pipeline graph. Use from_file(path) or from_env(name)."
            )
        if key_source is not None and not callable(key_source):
            raise TypeError("key_source must be a zero-argument callable returning the key")
        if options is not None:
            kopts = options.view_as(KeybrakeOptions)
            if kopts.keybrake_vault_key:
                raise ValueError(
                    "--keybrake_vault_key puts the vault key in the pipeline options (shown "
                    "in the job's page, saved with it): use --keybrake_vault_key_file or "
                    "--keybrake_vault_key_env"
                )
            if key_source is None and kopts.keybrake_vault_key_file:
                key_source = FromFile(kopts.keybrake_vault_key_file)
            if key_source is None and kopts.keybrake_vault_key_env:
                key_source = FromEnv(kopts.keybrake_vault_key_env)
            base_url = base_url or kopts.keybrake_base_url
            ca_bundle = ca_bundle or kopts.keybrake_ca_bundle
            job_id = job_id or kopts.keybrake_job_id or options.view_as(GoogleCloudOptions).job_name
        self.key_source: KeySource = key_source or FromEnv()
        self._base_url = base_url
        self.ca_bundle = ca_bundle
        self.refresh_seconds = refresh_seconds
        self.job_id: str = job_id or uuid.uuid4().hex
        self.actor = actor or type(self).__name__
        self.client: Any = None
        self._budget = ""
        self._key_digest = ""
        self._key_read_at = 0.0
        self._exhausted_counter = Metrics.counter("keybrake", "budget_exhausted")
        self._calls_counter = Metrics.counter("keybrake", "calls")

    def __getstate__(self) -> dict[str, Any]:
        # What is pickled: never a client (it holds the key), whatever a subclass put there.
        state = dict(self.__dict__)
        state["client"] = None
        state["_budget"] = state["_key_digest"] = ""
        return state

    # -- for subclasses ------------------------------------------------------------------------
    def create_client(self, vault_key: str, base_url: str) -> Any:
        """The vendor client, built on the worker in ``setup()`` (and again when the key
        source hands out a new key). Default: stripe, trusting ``ca_bundle``."""
        return stripe_client(vault_key, base_url, ca_bundle=self.ca_bundle)

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
        self._use_key(self.key_source())

    def start_bundle(self) -> None:
        due = self.refresh_seconds is not None
        if due and time.monotonic() - self._key_read_at >= (self.refresh_seconds or 0.0):
            self._use_key(self.key_source())

    def _use_key(self, key: str) -> None:
        """Build a client for ``key`` unless it is the one in use (calls already made with
        the old client keep it until they finish)."""
        self._key_read_at = time.monotonic()
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        if digest == self._key_digest and self.client is not None:
            return
        self.client = self.create_client(key, base_url(self._base_url))
        self._key_digest = digest
        self._budget = f"{self.job_id}:{digest}"

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
