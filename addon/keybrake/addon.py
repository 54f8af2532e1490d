"""mitmproxy entry point: ``mitmdump -s addon/keybrake/addon.py`` (or ``keybrake run``).

Loads Keybrake's addons in order: `Core` (options, policies, store), `AdminApi` (the admin
listener) and `VaultGuard` (the checks on every vendor call) and `AuditTrail` (one row per call).
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
from keybrake.guard import VaultGuard

runtime = Runtime()
addons = [Core(runtime), AdminApi(runtime), VaultGuard(runtime), AuditTrail(runtime)]
