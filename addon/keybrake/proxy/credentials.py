"""Presented credentials: find the vault key a worker sent, and put the real secret back.

Which forms a vendor accepts is declarative (`keybrake.core.policy.AuthPolicy.schemes`):
``bearer`` (``Authorization: Bearer KEY``), ``basic_user`` (``Basic base64(KEY:)``, Stripe),
``basic_password`` (``Basic base64(ACCOUNT:KEY)``, Twilio) and ``api_key_header`` (the key
alone in a header of its own, Anthropic's ``x-api-key``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import os
import re

from keybrake.core.errors import Refusal
from keybrake.core.policy import AuthPolicy, VendorPolicy

__all__ = [
    "REDACTED",
    "Presented",
    "VendorSecrets",
    "authorization_for",
    "extract_credential",
    "extract_header_credential",
    "matches_raw_secret",
]


REDACTED = "[redacted by keybrake]"
"""What stands in for a credential header in flows that mitmweb or flow files can show."""


@dataclasses.dataclass(frozen=True, slots=True)
class Presented:
    """The credential found in a request: which scheme carried it, and the Basic username."""

    scheme: str
    credential: str
    username: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class VendorSecrets:
    """The real secrets of one vendor, read from the environment once at start.

    ``repr`` never shows the values.
    """

    vendor: str
    secret: str | None = dataclasses.field(repr=False)
    username: str | None = dataclasses.field(default=None, repr=False)
    account: str | None = dataclasses.field(default=None, repr=False)
    missing: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, policy: VendorPolicy) -> VendorSecrets:
        auth = policy.auth
        # username_env is optional (Twilio API keys): without it the account id is the user.
        names = [n for n in (auth.secret_env, auth.account_env) if n]
        missing = tuple(n for n in names if not os.environ.get(n))
        return cls(
            vendor=policy.vendor,
            secret=os.environ.get(auth.secret_env) or None,
            username=os.environ.get(auth.username_env) if auth.username_env else None,
            account=os.environ.get(auth.account_env) if auth.account_env else None,
            missing=missing,
        )

    def is_real_secret(self, value: str) -> bool:
        if not self.secret:
            return False
        # Header values may carry undecodable bytes as surrogates: compare bytes, never raise.
        return hmac.compare_digest(
            value.encode("utf-8", "surrogateescape"), self.secret.encode("utf-8", "surrogateescape")
        )


def extract_credential(auth: AuthPolicy, header_values: list[str]) -> Presented:
    """The credential in the ``Authorization`` header(s), per the vendor's accepted schemes.

    Refuses when the header is missing, repeated, or in a form the vendor does not use.
    """
    if not header_values:
        raise Refusal(
            "vault_key_missing", "no Authorization header: send the vault key as the API key"
        )
    if len(header_values) > 1:
        raise Refusal("credential_ambiguous", "more than one Authorization header")
    value = header_values[0].strip()
    scheme, _, rest = value.partition(" ")
    rest = rest.strip()
    kind = scheme.lower()
    if kind == "bearer" and "bearer" in auth.schemes and rest:
        return Presented("bearer", rest)
    if (
        kind == "basic"
        and rest
        and ("basic_user" in auth.schemes or "basic_password" in auth.schemes)
    ):
        try:
            decoded = base64.b64decode(rest.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError):  # not base64, not ASCII, or not UTF-8 inside
            raise Refusal("vault_key_unknown", "Basic credentials are not valid base64") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise Refusal("vault_key_unknown", "Basic credentials need a ':'")
        if "basic_user" in auth.schemes and user and not password:
            return Presented("basic_user", user)
        if "basic_password" in auth.schemes and password:
            return Presented("basic_password", password, username=user)
        if "basic_user" in auth.schemes and user:
            return Presented("basic_user", user)
    raise Refusal("vault_key_unknown", "unsupported Authorization scheme for this vendor")


def extract_header_credential(
    auth: AuthPolicy, key_values: list[str], authorization: list[str]
) -> Presented:
    """The key in the vendor's own key header (``x-api-key``), sent once and alone: an
    ``Authorization`` header beside it is refused (the vendor might read that one instead).
    A request without the key header presents its key in ``Authorization`` (the anthropic
    SDK sends ``Bearer``), read by `extract_credential`.
    """
    if authorization:
        raise Refusal(
            "credential_ambiguous",
            f"send the vault key in {auth.key_header} only, without an Authorization header",
        )
    if not key_values:
        raise Refusal(
            "vault_key_missing", f"no {auth.key_header} header: send the vault key as the API key"
        )
    if len(key_values) > 1:
        raise Refusal("credential_ambiguous", f"more than one {auth.key_header} header")
    value = key_values[0].strip()
    if not value:
        raise Refusal("vault_key_missing", f"the {auth.key_header} header is empty")
    return Presented("api_key_header", value)


def authorization_for(presented: Presented, secrets: VendorSecrets) -> str:
    """The ``Authorization`` value that carries the real secret in the presented form."""
    assert secrets.secret is not None
    if presented.scheme == "bearer":
        return f"Bearer {secrets.secret}"
    if presented.scheme == "basic_user":
        raw = f"{secrets.secret}:"
    else:
        user = secrets.username or secrets.account or presented.username or ""
        raw = f"{user}:{secrets.secret}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def matches_raw_secret(auth: AuthPolicy, value: str) -> bool:
    """True when ``value`` looks like a real vendor secret (``sk_live_…``)."""
    return any(re.match(p, value) for p in auth.raw_secret_patterns)
