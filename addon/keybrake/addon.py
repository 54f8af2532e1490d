"""mitmproxy entry point: ``mitmdump -s addon/keybrake/addon.py`` (or ``keybrake run``).

Loads Keybrake's addons in order: `Core` (options, policies, store), `AdminApi` (the admin
listener: API, dashboard, metrics), `VaultGuard` (the checks on every vendor call),
`AuditTrail` (one row per call), `Metrics` (Prometheus), `Dashboard` (served through
`AdminApi`) and `FlowRedaction` (credentials out of mitmweb and flow files; flow comments).
The order matters: later addons read what `VaultGuard` left in ``flow.metadata``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import keybrake  # noqa: F401
except ImportError:  # run as a plain script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keybrake.admin import AdminApi
from keybrake.audit import AuditTrail
from keybrake.core import Core, Runtime
from keybrake.dashboard import Dashboard
from keybrake.guard import VaultGuard
from keybrake.metrics import Metrics
from keybrake.redaction import FlowRedaction

runtime = Runtime()
metrics = Metrics(runtime)
dashboard = Dashboard(runtime)
addons = [
    Core(runtime),
    AdminApi(runtime, dashboard=dashboard, metrics=metrics),
    VaultGuard(runtime),
    AuditTrail(runtime),
    metrics,
    dashboard,
    FlowRedaction(runtime),
]
