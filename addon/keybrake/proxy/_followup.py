"""Reading held objects at the vendor until their answer states what was charged.

Some vendors price a call after answering it: Twilio answers a new message with
``"price": null`` and fills the price in once the message is sent. Such a call is held at its
estimate (`keybrake.core.policy.HoldRule`) and the proxy reads the object itself, with the real
secret, a few times over the next hour (``keybrake_followup_delays``); the first answer that
states the charge settles the hold, one that proves nothing was charged releases it. When no
answer ever does, the hold stays: counted, never forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from keybrake.core.policy import VendorPolicy
from keybrake.proxy.core import Runtime
from keybrake.proxy.credentials import Presented, authorization_for

__all__ = ["PriceFollowup"]

log = logging.getLogger("keybrake")

_TIMEOUT_SECONDS = 10.0

# (vendor policy, the path read, the object, the answer) -> True once the hold is finished
Settle = Callable[[VendorPolicy, str, str, dict[str, Any]], Awaitable[bool]]


class PriceFollowup:
    """Schedules and runs the reads; `close` cancels those still waiting."""

    def __init__(self, runtime: Runtime, settle: Settle) -> None:
        self.runtime = runtime
        self._settle = settle
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, policy: VendorPolicy, template: str, object_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(policy, template, object_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, policy: VendorPolicy, template: str, object_id: str) -> None:
        secrets = self.runtime.secrets[policy.vendor]
        path = template.format(account=secrets.account or "", id=object_id)
        base = policy.upstream.url if policy.upstream else f"https://{policy.hosts[0]}"
        bundle = self.runtime.upstream_ca_bundle
        headers = {
            "Authorization": authorization_for(
                Presented(policy.auth.schemes[0], "", username=secrets.account), secrets
            )
        }
        async with httpx.AsyncClient(
            verify=str(bundle) if bundle else True, timeout=_TIMEOUT_SECONDS
        ) as client:
            for delay in self.runtime.followup_delays:
                await asyncio.sleep(delay)
                try:
                    r = await client.get(base + path, headers=headers)
                    data = r.json() if r.status_code == 200 else None
                    if isinstance(data, dict) and await self._settle(policy, path, object_id, data):
                        return
                except Exception as e:  # a later read may work; the hold stays meanwhile
                    log.warning(
                        "keybrake: reading %s at %s failed: %s", object_id, policy.vendor, e
                    )
        log.warning(
            "keybrake: %s %s never stated its charge: its hold stays counted",
            policy.vendor,
            object_id,
        )

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
