"""mitmproxy entry point: ``mitmdump -s addon/keybrake/addon.py`` (or ``keybrake run``).

Loads Keybrake's addons in order: `Core` (options, policies, store), `Egress` (where the
forward proxy may connect besides vendors: refuses the rest, pins what it allows, and gates
every outgoing connection), `AdminApi` (the admin listener: API, dashboard, metrics),
`VaultGuard` (the checks on every vendor call), `VendorPin` (an admitted call goes to one
checked address of its vendor host), `AuditTrail` (one row per call), `Metrics`
(Prometheus), `Alerts` (thresholds and events to webhooks, from a durable outbox),
`Dashboard` (served through `AdminApi`) and `FlowRedaction` (credentials out of
mitmweb and flow files; flow comments).
The order matters: later addons read what `VaultGuard` left in ``flow.metadata``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import keybrake  # noqa: F401
except ImportError:  # run as a plain script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keybrake.proxy.alerts import Alerts
from keybrake.proxy.audit import AuditTrail
from keybrake.proxy.core import Core, Runtime
from keybrake.proxy.egress import Egress, VendorPin
from keybrake.proxy.guard import VaultGuard
from keybrake.proxy.metrics import Metrics
from keybrake.proxy.redaction import FlowRedaction
from keybrake.web.admin import AdminApi
from keybrake.web.dashboard import Dashboard

runtime = Runtime()
egress = Egress(runtime)
metrics = Metrics(runtime)
dashboard = Dashboard(runtime)
addons = [
    Core(runtime),
    egress,
    AdminApi(runtime, dashboard=dashboard, metrics=metrics),
    VaultGuard(runtime),
    VendorPin(egress),
    AuditTrail(runtime),
    metrics,
    Alerts(runtime, registry=metrics.registry),
    dashboard,
    FlowRedaction(runtime),
]
