"""One vault key per orchestrator run, issued and revoked with an issuer token (Python 3.9+).

What the Airflow and Prefect integrations share (`keybrake.integrations.airflow`,
`keybrake.integrations.prefect`): what a run's key may do (`RunKeySpec`), the run's label
(`run_label`: ``<issuer prefix><orchestrator>/<dag or flow>/<run>``), issuing it
(`issue_run_key`, a ``403`` from the issuer's scope re-raised with the label it was for) and
revoking every key of a run by its label (`revoke_run_keys`): the code that ends a run needs
no key id, only the run it ends, so a key issued by a setup step that died before it could
record anything is revoked too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from keybrake.client import Forbidden, IssuedKey, KeybrakeClient, NotFound, VaultKey
from keybrake.client._calls import Dollars

__all__ = [
    "MAX_LABEL",
    "RunKeySpec",
    "issue_run_key",
    "revoke_run_keys",
    "run_label",
]

MAX_LABEL = 128  # what the admin API accepts (keybrake.vault.keyspec)
# The characters a label may hold; anything else in a DAG, flow or run name becomes ``-``.
_NOT_LABEL = re.compile(r"[^A-Za-z0-9 ._:@+=-]")


@dataclass(frozen=True)
class RunKeySpec:
    """What the key of one run may do: the ``POST /vault/keys`` fields but its label.

    The issuer token's limits still apply (vendors, endpoints, largest caps and
    ``expires_in``): a spec beyond them is refused with ``403 issuer_scope``. ``expires_in``
    is a backstop: the run's end revokes the key sooner.
    """

    vendor: str
    daily_usd_cap: Dollars
    allowed_endpoints: Sequence[str]
    expires_in: str = "1h"
    usd_cap: Dollars | None = None
    max_requests_per_minute: int | None = None
    allowed_accounts: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.allowed_endpoints, str):
            raise TypeError("allowed_endpoints must be a list of strings, not one string")
        for amount in (self.daily_usd_cap, self.usd_cap):
            if isinstance(amount, float):
                raise TypeError("dollar amounts must be Decimal, int or str (never float)")


def _segment(value: str) -> str:
    cleaned = _NOT_LABEL.sub("-", value.strip()) or "-"
    return cleaned if cleaned[0].isalnum() else f"x{cleaned}"


def _shorten(part: str, limit: int) -> str:
    if len(part) <= limit:
        return part
    digest = hashlib.sha256(part.encode()).hexdigest()[:8]
    return f"{part[: max(limit - len(digest) - 1, 1)]}-{digest}"


def run_label(prefix: str, orchestrator: str, *parts: str) -> str:
    """``<prefix><orchestrator>/<part>/<part>``: the label of one run's key.

    Characters a label may not hold (``/`` among them: a name is one segment, never more)
    become ``-``. When the whole would pass the API's 128 characters, each too-long part keeps
    its start and ends with a digest of itself, so every segment stays and two runs never
    share a label.

    >>> run_label("pipelines/", "airflow", "nightly_billing", "manual__2026-12-03T13:30:00+00:00")
    'pipelines/airflow/nightly_billing/manual__2026-12-03T13:30:00+00:00'
    """
    head = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
    segments = [_segment(p) for p in (orchestrator, *parts)]
    label = head + "/".join(segments)
    if len(label) <= MAX_LABEL:
        return label
    room = MAX_LABEL - len(head) - len(segments[0]) - len(parts)  # the slashes
    limit = room // max(len(parts), 1)
    if limit >= 12:
        label = head + "/".join([segments[0], *(_shorten(p, limit) for p in segments[1:])])
    if len(label) <= MAX_LABEL:
        return label
    return _shorten(label, MAX_LABEL)  # a prefix too long to leave room: the whole, digested


def issue_run_key(client: KeybrakeClient, spec: RunKeySpec, label: str) -> IssuedKey:
    """Issue the run's key; its ``.vault_key`` is the secret (shown only this once).

    Raises `Forbidden` (``code`` ``issuer_scope``) naming the label and each refused field
    when the issuer token may not mint it: a run whose prefix or limits are wrong stops here,
    before any task spends.
    """
    try:
        return client.issue_key(
            vendor=spec.vendor,
            daily_usd_cap=spec.daily_usd_cap,
            allowed_endpoints=list(spec.allowed_endpoints),
            agent_run_label=label,
            expires_in=spec.expires_in,
            usd_cap=spec.usd_cap,
            max_requests_per_minute=spec.max_requests_per_minute,
            allowed_accounts=list(spec.allowed_accounts),
        )
    except Forbidden as e:
        raw = e.details.get("fields")
        fields = "; ".join(f"{k}: {v}" for k, v in raw.items()) if isinstance(raw, dict) else ""
        message = f"the issuer token may not issue the run key {label!r}: {e.message}"
        raise Forbidden(
            e.code,
            f"{message} ({fields})" if fields and fields not in e.message else message,
            e.status,
            e.details,
        ) from None


def revoke_run_keys(client: KeybrakeClient, label: str) -> list[VaultKey]:
    """Revoke every key of the run ``label`` not revoked yet (repeating it is harmless).

    The issuer token lists only the keys it may see; the answer is what was revoked now.
    """
    revoked: list[VaultKey] = []
    for key in client.list_keys():
        if key.agent_run_label != label or key.revoked_at is not None:
            continue
        try:
            revoked.append(client.revoke_key(key.key_id))
        except NotFound:  # gone meanwhile
            continue
    return revoked
