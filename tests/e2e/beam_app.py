"""The Beam seed as a pipeline module, used by ``test_beam.py`` with the DirectRunner.

``ChargeInvoice`` is what a user writes on top of `KeybrakeDoFn`: the element's id and the
one vendor call. ``FlakyChargeInvoice`` adds a worker failure mid-bundle (once per job,
remembered in a marker file) so that the runner retries the bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from keybrake.integrations.beam import KeybrakeDoFn


def invoices(n: int, cents: int = 100) -> list[dict[str, Any]]:
    return [{"id": f"inv_{i:04d}", "cents": cents} for i in range(n)]


class ChargeInvoice(KeybrakeDoFn):
    """Charge one invoice; emits ``(invoice id, payment intent id)``."""

    def element_id(self, element: Any) -> str:
        return str(element["id"])

    def call(self, element: Any, idempotency_key: str) -> Any:
        intent = self.client.v1.payment_intents.create(
            params={
                "amount": element["cents"],
                "currency": "usd",
                "confirm": True,
                "payment_method": "pm_card_visa",
                "metadata": {"invoice": element["id"]},
            },
            options={"idempotency_key": idempotency_key},
        )
        return element["id"], intent.id


class FlakyChargeInvoice(ChargeInvoice):
    """Raises once, right after its ``fail_after``-th charge in a bundle (a lost worker)."""

    def __init__(self, *args: Any, fail_after: int, marker: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_after = fail_after
        self.marker = marker
        self._in_bundle = 0

    def start_bundle(self) -> None:
        self._in_bundle = 0

    def call(self, element: Any, idempotency_key: str) -> Any:
        result = super().call(element, idempotency_key)
        self._in_bundle += 1
        marker = Path(self.marker)
        if self._in_bundle == self.fail_after and not marker.exists():
            marker.write_text(str(element["id"]))
            raise RuntimeError("worker lost mid-bundle (test)")
        return result


def run(
    elements: list[dict[str, Any]],
    dofn: KeybrakeDoFn,
    out_dir: Path,
    options: PipelineOptions,
    runner: Any = None,
) -> Any:
    """Charge ``elements``; write charged ids and budget-stopped invoices under ``out_dir``."""
    pipeline = beam.Pipeline(runner=runner, options=options)
    charged, stopped = (
        pipeline
        | "Invoices" >> beam.Create(elements)
        | "Charge" >> beam.ParDo(dofn).with_outputs(KeybrakeDoFn.BUDGET_EXHAUSTED, main="charged")
    )
    lines = charged | "Format" >> beam.MapTuple(lambda inv, pi: f"{inv} {pi}")
    _ = lines | "WriteCharged" >> beam.io.WriteToText(str(out_dir / "charged"))
    _ = (
        stopped
        | "Ids" >> beam.Map(lambda inv: inv["id"])
        | "WriteStopped" >> beam.io.WriteToText(str(out_dir / "stopped"))
    )
    result = pipeline.run()
    result.wait_until_finish()
    return result


def read_lines(out_dir: Path, prefix: str) -> list[str]:
    lines: list[str] = []
    for f in sorted(out_dir.glob(f"{prefix}*")):
        lines += [line for line in f.read_text().splitlines() if line]
    return lines
