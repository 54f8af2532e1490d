"""A fake ``api.stripe.com`` good enough for the official ``stripe`` SDK.

Auth: the configured secret (``FakeStripe.secret``), as ``Authorization: Bearer <key>`` or
Basic ``<key>:``. Any other key is Stripe's 401 (the key is masked like Stripe does: prefix
kept, all but the last four characters starred — the full key is never echoed).

The publishable key (``FakeStripe.publishable``, as a Bearer header or, like Stripe.js, a
``key=pk_…`` parameter) may only do what Stripe.js does with a PaymentIntent's
``client_secret``: ``GET /v1/payment_intents/{id}?client_secret=…`` and
``POST /v1/payment_intents/{id}/confirm`` with ``client_secret`` (+ ``payment_method``) in
the body. The answer is the publishable subset of the intent (no ``metadata``, ``customer``,
``amount_received``, ``latest_charge``…). Missing ``client_secret`` → 400
``parameter_missing``; a wrong one → 400 ``payment_intent_invalid_parameter``; an intent with
``confirmation_method=manual`` cannot be confirmed with it (400); any other call → 401 "This
API call cannot be made with a publishable API key". A client-side confirm charges (or, with
``capture_method=manual``, authorises) exactly like a server-side one and is recorded in the
ledger like any request, with ``extra["client_side"] = True``.

Bodies are Stripe form encoding (``a[b][0][c]=v``, ``expand[]=x``/``expand[0]=x``); GET
parameters come from the query string. Every response carries ``Request-Id: req_…``,
``Content-Type: application/json`` and ``Stripe-Version``.

Supported (all objects are kept in memory and can be retrieved with ``GET /v1/<kind>/<id>``
and listed with ``GET /v1/<kind>``):

* PaymentIntents: create (``confirm=true`` + ``payment_method`` charges at once), retrieve,
  update, confirm, capture (``amount_to_capture`` optional), cancel,
  increment_authorization. ``capture_method=manual`` intents become ``requires_capture``
  on confirm (authorisation only, nothing charged) and charge on capture.
* Charges: create (``source=tok_visa`` etc., ``capture=false`` authorises only), capture.
* Refunds (``charge`` or ``payment_intent``; ``amount`` defaults to the unrefunded rest),
  Transfers, Payouts, Topups: create.
* Customers, Products, Prices: create (supporting objects).
* Invoices — the test-friendly recipe, same as real Stripe:
  ``POST /v1/invoices customer=cus_…`` (draft) then
  ``POST /v1/invoiceitems customer=cus_… invoice=in_… amount=1234 currency=usd`` (or
  ``price_data[unit_amount]`` + ``quantity``, or ``pricing[price]``/``price``); or create the
  invoice items first (pending) and pass ``pending_invoice_items_behavior=include`` when
  creating the invoice. ``amount_due`` is the sum of the items. ``POST …/finalize``,
  ``POST …/pay`` (charges ``amount_due``; ``payment_method`` param or the customer's
  ``invoice_settings[default_payment_method]``; ``paid_out_of_band=true`` charges nothing).
  ``DELETE /v1/invoiceitems/{id}`` → ``{"id", "object": "invoiceitem", "deleted": true}``
  for a pending item or one on a draft invoice (removed from its lines); on a finalized
  invoice → 400 ``invoice_not_editable``. A deleted item is gone (404).
* Checkout Sessions: create; ``amount_total`` = Σ ``unit_amount * quantity`` of the line
  items (``price_data`` or ``price``). Creating a session charges nothing.
  ``shipping_options[i][shipping_rate_data][fixed_amount][amount|currency]`` (+
  ``[display_name]``, ``[type]=fixed_amount``) or ``shipping_options[i][shipping_rate]=shr_…``
  → ``shipping_options: [{"shipping_amount", "shipping_rate": "shr_…"}]`` (ShippingRate
  objects, also ``POST /v1/shipping_rates``); ``amount_total`` does not include shipping
  until the customer picks one. ``payment_intent_data[capture_method]=manual`` and
  ``subscription_data[trial_period_days]`` are honoured when the session is paid.
  ``POST …/expire`` (only an ``open`` session, else 400) → ``expired``. The customer paying
  on Stripe's page is :meth:`FakeStripe.complete_checkout` (see "Out of band").
* Subscriptions: create; ``items[i][price_data]`` (or ``price``) * quantity → first invoice
  (``latest_invoice``) with that ``amount_due``. It is paid (and charged) at once when a
  payment method is known (``default_payment_method`` param or the customer's default);
  otherwise, or with ``payment_behavior=default_incomplete``, the subscription is
  ``incomplete`` and nothing is charged. ``trial_period_days`` → ``trialing``, 0 due
  (the trial is the first period). ``add_invoice_items[i][price_data|price]`` * quantity
  → invoice items on that first invoice, charged with it (even during a trial).
  ``cancel_at_period_end`` (create or update) → stored, ``cancel_at`` = end of the current
  period. ``POST /v1/subscriptions/{id}``:
  ``cancel_at_period_end``, ``metadata``, ``description``, ``default_payment_method``,
  ``cancellation_details``, ``trial_end=<future ts>`` (extends) or ``trial_end=now`` (ends
  the trial: the first full period is invoiced and charged in that call); a canceled
  subscription only accepts ``metadata``/``cancellation_details`` (400).
  ``DELETE /v1/subscriptions/{id}`` → ``canceled`` (``canceled_at``/``ended_at``); a
  canceled one → 404 ``resource_missing`` (as Stripe). A trial running out is
  :meth:`FakeStripe.end_trial`.
* ``GET /v1/balance``; SetupIntents and ShippingRates can be retrieved.
* Connect: ``Stripe-Account: acct_…`` is accepted on every call (objects are not
  partitioned per account), echoed in the response headers and recorded in the ledger
  entry's ``extra["stripe_account"]`` (the header itself is in ``headers``).

Out of band (money Stripe moves without an API call to the fake; each is one ledger entry
with ``headers={}``, ``body=b""``, ``request_id=None``, ``extra["out_of_band"] = True``,
``extra["event"]``, and ``charged_usd_micros`` computed as for API calls, so
``charged_minor()``/``charged_usd_micros()`` count it):

* :meth:`FakeStripe.confirm_in_browser` ``(pi_id, payment_method="pm_card_visa",
  client_secret=None)``: a real HTTPS confirm with the publishable key (so an ordinary
  ``POST`` ledger entry), returns the JSON.
* :meth:`FakeStripe.complete_checkout` ``(session_id, shipping_option=None,
  payment_method="pm_card_visa")``: ``BROWSER /checkout/pay/<cs id>``.
* :meth:`FakeStripe.end_trial` ``(sub_id)``: ``STRIPE /subscriptions/<sub id>/trial_end``.
* :meth:`FakeStripe.record_out_of_band` to add such an entry yourself.
* For a fake in another process: ``POST /__fake__/stripe/complete_checkout``
  ``{"session", "shipping_option", "payment_method"}`` and ``POST /__fake__/stripe/end_trial``
  ``{"subscription"}``.

Test payment methods: ``pm_card_visa`` (and any other ``pm_…``) succeed;
``pm_card_chargeDeclined`` → 402 ``card_error``/``card_declined``/``generic_decline``;
``pm_card_chargeDeclinedInsufficientFunds``, ``…Fraudulent``, ``…ExpiredCard``,
``…IncorrectCvc``, ``…ProcessingError`` likewise; the ``tok_…`` equivalents for Charges.

Idempotency (POST only): same ``Idempotency-Key`` + same method/path/params → the stored
response is replayed with ``Idempotent-Replayed: true`` and ``Original-Request: req_…`` and
nothing is executed or charged again; different params → 400 ``idempotency_error``; the
same key while the first request is still executing → 409. Only 2xx and 402 results are
stored (as Stripe: validation failures are not).

Ledger: ``amount_charged_minor``/``currency`` is the money moved by the call (captures,
successful confirms, charges, transfers, payouts, topups, paid invoices); authorisations,
refunds (``amount_refunded_minor``), declines and replays record 0.
``charged_usd_micros = amount * 10 000`` for USD, ``None`` for other currencies.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
from tests.fakes.base import (
    FakeRequest,
    FakeResponse,
    FakeVendor,
    LedgerEntry,
    json_response,
    rand_alnum,
)
from tests.fakes.tls import FakeTLS

DEFAULT_SECRET = "sk_test_fake" + "4eC39HqLyjWDarjtT1zdp7dc"
DEFAULT_PUBLISHABLE = "pk_test_fake" + "TYooMQauvdEDq54NiTphI7jx"
DEFAULT_API_VERSION = "2026-10-28.endive"

ZERO_DECIMAL = {
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga",
    "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
}  # fmt: skip
MIN_CHARGE = {"usd": 50, "eur": 50, "gbp": 30, "cad": 50, "aud": 50, "jpy": 50, "chf": 50}

_DECLINES: dict[str, tuple[str, str | None, str]] = {
    "chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
    "chargeDeclinedExpiredCard": ("expired_card", "expired_card", "Your card has expired."),
    "chargeDeclinedIncorrectCvc": (
        "incorrect_cvc",
        "incorrect_cvc",
        "Your card's security code is incorrect.",
    ),
    "chargeDeclinedProcessingError": (
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
}
_BRANDS = {
    "visa": ("visa", "4242"),
    "visa_debit": ("visa", "5556"),
    "mastercard": ("mastercard", "4444"),
    "amex": ("amex", "8431"),
    "discover": ("discover", "1117"),
}

# kind (as in URL) -> (object name, id prefix)
_KINDS: dict[str, tuple[str, str]] = {
    "payment_intents": ("payment_intent", "pi_"),
    "charges": ("charge", "ch_"),
    "refunds": ("refund", "re_"),
    "transfers": ("transfer", "tr_"),
    "payouts": ("payout", "po_"),
    "topups": ("topup", "tu_"),
    "customers": ("customer", "cus_"),
    "products": ("product", "prod_"),
    "prices": ("price", "price_"),
    "invoiceitems": ("invoiceitem", "ii_"),
    "invoices": ("invoice", "in_"),
    "checkout/sessions": ("checkout.session", "cs_test_"),
    "subscriptions": ("subscription", "sub_"),
    "shipping_rates": ("shipping_rate", "shr_"),
    "setup_intents": ("setup_intent", "seti_"),
}

# What a publishable key sees of a PaymentIntent (the fields Stripe's reference marks
# "retrievable with publishable key"): no metadata, customer, latest_charge, amounts received…
_PUBLISHABLE_PI_FIELDS = (
    "id", "object", "amount", "amount_details", "automatic_payment_methods", "canceled_at",
    "cancellation_reason", "capture_method", "client_secret", "confirmation_method", "created",
    "currency", "description", "excluded_payment_method_types", "last_payment_error",
    "livemode", "next_action", "payment_method", "payment_method_configuration_details",
    "payment_method_types", "processing", "receipt_email", "setup_future_usage", "shipping",
    "source", "status",
)  # fmt: skip
_PUBLISHABLE_KEY_MESSAGE = (
    "This API call cannot be made with a publishable API key. Please use a secret API key. "
    "You can find a list of your API keys at https://dashboard.stripe.com/account/apikeys."
)


# --------------------------------------------------------------------------- form parsing

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SUB_RE = re.compile(r"\[([^\[\]]*)\]")


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        conv = {k: _listify(v) for k, v in node.items()}
        if conv and all(k.isdigit() for k in conv):
            return [conv[k] for k in sorted(conv, key=int)]
        return conv
    return node


def parse_stripe_form(data: str | bytes) -> dict[str, Any]:
    """Decode Stripe's form encoding into nested dicts/lists of strings.

    ``a[b]=1`` → ``{"a": {"b": "1"}}``; ``a[0]=x&a[1]=y`` and ``a[]=x&a[]=y`` → lists;
    ``items[0][price_data][unit_amount]=5`` → ``{"items": [{"price_data": {...}}]}``.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    root: dict[str, Any] = {}
    append_counters: dict[tuple[str, ...], int] = {}
    for raw_key, value in parse_qsl(text, keep_blank_values=True):
        m = _KEY_RE.match(raw_key)
        parts = [m.group(1), *_SUB_RE.findall(m.group(2))] if m else [raw_key]
        node: dict[str, Any] = root
        path: tuple[str, ...] = ()
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":
                idx = append_counters.get(path, 0)
                if last:
                    append_counters[path] = idx + 1
                else:
                    # a[][b]=1&a[][c]=2 : start a new element when the sub-key repeats
                    cur = node.get(str(max(idx - 1, 0)))
                    nxt = parts[i + 1]
                    if idx == 0 or (isinstance(cur, dict) and nxt in cur):
                        append_counters[path] = idx + 1
                    else:
                        idx -= 1
                part = str(idx)
            path = (*path, part)
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    result = _listify(root)
    assert isinstance(result, dict)
    return result


def mask_key(key: str) -> str:
    """Mask an API key the way Stripe's error messages do (``sk_test_****…abcd``)."""
    prefix = ""
    for p in ("sk_test_", "sk_live_", "rk_test_", "rk_live_", "pk_test_", "pk_live_"):
        if key.startswith(p):
            prefix = p
            break
    rest = key[len(prefix) :]
    if len(rest) <= 8:
        return prefix + "*" * len(rest)
    return prefix + "*" * (len(rest) - 4) + rest[-4:]


class StripeAPIError(Exception):
    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.param = param
        self.decline_code = decline_code
        self.extra = extra or {}
        self.headers = headers or []


def _missing(param: str) -> StripeAPIError:
    return StripeAPIError(
        400,
        "invalid_request_error",
        f"Missing required param: {param}.",
        code="parameter_missing",
        param=param,
    )


def _no_such(kind: str, oid: str, param: str = "id") -> StripeAPIError:
    return StripeAPIError(
        404,
        "invalid_request_error",
        f"No such {kind}: '{oid}'",
        code="resource_missing",
        param=param,
    )


def _unexpected_state(message: str) -> StripeAPIError:
    return StripeAPIError(
        400, "invalid_request_error", message, code="payment_intent_unexpected_state"
    )


@dataclass
class _IdemEntry:
    fingerprint: str
    in_flight: bool = True
    status: int = 0
    body: bytes = b""
    headers: list[tuple[str, str]] | None = None
    request_id: str | None = None
    object_id: str | None = None


@dataclass
class _Outcome:
    """What a route handler produced (plus ledger annotations)."""

    obj: dict[str, Any]
    status: int = 200
    object_id: str | None = None
    charged: int = 0
    currency: str | None = None
    refunded: int = 0
    extra: dict[str, Any] | None = None


Route = tuple[str, re.Pattern[str], Callable[..., _Outcome]]


class FakeStripe(FakeVendor):
    name = "stripe"
    request_id_header = "Request-Id"
    server_header = "nginx"

    def __init__(
        self,
        tls: FakeTLS | None,
        secret: str = DEFAULT_SECRET,
        *,
        publishable: str = DEFAULT_PUBLISHABLE,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls, host=host, port=port)
        self.secret = secret
        self.publishable = publishable
        self._objects: dict[str, dict[str, Any]] = {}
        self._order: dict[str, list[str]] = {}
        self._idem: dict[str, _IdemEntry] = {}
        self._pm_ids: dict[str, str] = {}  # generated pm_ id -> test token it came from
        self._cs_private: dict[str, dict[str, Any]] = {}  # checkout session -> hidden state
        self._routes: list[Route] = self._build_routes()

    # ------------------------------------------------------------------ plumbing

    def env(self) -> dict[str, str]:
        return {"STRIPE_SECRET_KEY": self.secret}

    def reset_state(self) -> None:
        self._objects.clear()
        self._order.clear()
        self._idem.clear()
        self._pm_ids.clear()
        self._cs_private.clear()

    # ------------------------------------------------------------------ out of band
    # What happens at Stripe without the merchant's server (or the proxy) making the call:
    # a customer paying in a browser, a trial running out. Each event is one ledger entry.

    def record_out_of_band(
        self,
        method: str,
        path: str,
        *,
        object_id: str | None,
        amount_charged_minor: int = 0,
        currency: str | None = None,
        status: int = 200,
        extra: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Append a ledger entry for money Stripe moved without an API request to this fake
        (``method`` ``"BROWSER"``: a customer on a Stripe-hosted page; ``"STRIPE"``: Stripe's
        own schedule). ``charged_usd_micros`` is computed as for API calls and
        ``extra["out_of_band"]`` is ``True``."""
        entry = LedgerEntry(
            method=method,
            path=path,
            headers={},
            body=b"",
            status=status,
            request_id=None,
            object_id=object_id,
            amount_charged_minor=amount_charged_minor,
            currency=currency,
            charged_usd_micros=self._usd_micros(amount_charged_minor, currency),
            extra={"out_of_band": True, **(extra or {})},
        )
        with self._lock:
            self._ledger.append(entry)
        return entry

    def confirm_in_browser(
        self,
        pi_id: str,
        payment_method: str = "pm_card_visa",
        *,
        client_secret: str | None = None,
    ) -> dict[str, Any]:
        """Confirm a PaymentIntent the way Stripe.js does in the customer's browser: an
        HTTPS ``POST /v1/payment_intents/{id}/confirm`` to this fake with the publishable
        key and the intent's ``client_secret`` (or the one given). Returns the response JSON
        (the publishable view of the intent, or ``{"error": …}``). Recorded in the ledger
        like any request (``extra["client_side"]``)."""
        if client_secret is None:
            with self._lock:
                pi = self._objects.get(pi_id) or {}
                client_secret = str(pi.get("client_secret") or "")
        verify: Any = self.tls.client_context() if self.tls is not None else False
        r = httpx.post(
            f"{self.url}/v1/payment_intents/{pi_id}/confirm",
            data={"client_secret": client_secret, "payment_method": payment_method},
            headers={
                "Authorization": f"Bearer {self.publishable}",
                "Origin": "https://js.stripe.com",
                "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Stripe.js/fake",
            },
            verify=verify,
            timeout=30,
        )
        body: dict[str, Any] = r.json()
        return body

    def complete_checkout(
        self,
        session_id: str,
        shipping_option: int | None = None,
        *,
        payment_method: str = "pm_card_visa",
    ) -> dict[str, Any]:
        """The customer pays an open Checkout Session on Stripe's hosted page.

        ``shipping_option`` indexes the session's ``shipping_options`` (``None``: the first
        one, which the page preselects; no shipping if the session has none). Payment mode:
        a PaymentIntent for items + shipping is confirmed (charged, or only authorised with
        ``payment_intent_data[capture_method]=manual``); subscription mode: a subscription is
        created and its first invoice paid (nothing with a trial); setup mode: a SetupIntent.
        One ledger entry ``BROWSER /checkout/pay/<session id>``. A declining
        ``payment_method`` leaves the session open (entry with status 402, nothing charged).
        Returns the session. Raises ``ValueError`` for an unknown or non-open session or a
        bad ``shipping_option``."""
        with self._lock:
            cs = self._objects.get(session_id)
            if cs is None or cs.get("object") != "checkout.session":
                raise ValueError(f"no such checkout session: {session_id!r}")
            if cs["status"] != "open":
                raise ValueError(
                    f"checkout session {session_id} has status {cs['status']}: only an open "
                    "session can be paid"
                )
            options: list[dict[str, Any]] = cs["shipping_options"]
            if shipping_option is not None and not 0 <= shipping_option < len(options):
                raise ValueError(
                    f"shipping_option {shipping_option} out of range: the session has "
                    f"{len(options)} shipping option(s)"
                )
            chosen = options[shipping_option or 0] if options else None
            shipping = int(chosen["shipping_amount"]) if chosen else 0
            priv = self._cs_private.get(session_id, {})
            mode = cs["mode"]
            path = f"/checkout/pay/{session_id}"
            event: dict[str, Any] = {"event": "complete_checkout", "mode": mode}
            pm = self._resolve_pm(payment_method)
            failure = self._decline_for(pm)
            if failure is not None and mode != "setup":
                self.record_out_of_band(
                    "BROWSER",
                    path,
                    object_id=session_id,
                    currency=cs["currency"],
                    status=402,
                    extra={**event, "decline_code": failure[1] or failure[0]},
                )
                return copy.deepcopy(cs)
            charged = 0
            if mode == "payment":
                total = int(cs["amount_subtotal"]) + shipping
                try:
                    pi = self._pi_obj(
                        {
                            "amount": str(total),
                            "currency": cs["currency"],
                            "capture_method": priv.get("capture_method", "automatic_async"),
                            "payment_method_types": ["card"],
                            "metadata": priv.get("pi_metadata", {}),
                        }
                    )
                except StripeAPIError as err:
                    raise ValueError(err.message) from err
                pi["customer"] = cs["customer"]
                pi["payment_method"] = pm
                self._store(pi)
                out = self._do_confirm(pi)
                charged = out.charged
                cs["payment_intent"] = pi["id"]
                cs["payment_status"] = "paid" if charged else "unpaid"
                event["payment_intent"] = pi["id"]
                if not charged:
                    event["authorized_minor"] = total
            elif mode == "subscription":
                customer = self._objects.get(cs["customer"] or "") or self._new_customer(
                    {"email": cs["customer_email"] or ""}
                )
                priced = [
                    (self._objects[line["price"]], int(line["quantity"]))
                    for line in priv.get("lines", [])
                ]
                out = self._make_subscription(
                    customer,
                    priced,
                    trial_days=int(priv.get("trial_days", 0)),
                    dpm=pm,
                    behavior="allow_incomplete",
                    cancel_at_period_end=False,
                    description=None,
                    metadata=dict(priv.get("sub_metadata", {})),
                    shipping=chosen,
                )
                sub = out.obj
                inv = self._objects[sub["latest_invoice"]]
                charged = out.charged
                total = int(inv["total"])
                shipping = int(inv["amount_shipping"])
                cs["customer"] = customer["id"]
                cs["subscription"] = sub["id"]
                cs["invoice"] = inv["id"]
                cs["payment_status"] = (
                    "no_payment_required" if total == 0 else "paid" if charged else "unpaid"
                )
                event.update(subscription=sub["id"], invoice=inv["id"])
            else:  # setup
                total = 0
                seti = self._setup_intent(cs["customer"], pm)
                cs["setup_intent"] = seti["id"]
                event["setup_intent"] = seti["id"]
            cs["status"] = "complete"
            cs["url"] = None
            cs["amount_total"] = total
            cs["total_details"]["amount_shipping"] = shipping
            if chosen is not None and shipping:
                cs["shipping_cost"] = {
                    "amount_subtotal": shipping,
                    "amount_tax": 0,
                    "amount_total": shipping,
                    "shipping_rate": chosen["shipping_rate"],
                }
            email = cs["customer_email"] or "jenny.rosen@example.com"
            cs["customer_details"] = {
                "address": {
                    "city": "San Francisco",
                    "country": "US",
                    "line1": "510 Townsend St",
                    "line2": None,
                    "postal_code": "94103",
                    "state": "CA",
                },
                "email": email,
                "name": "Jenny Rosen",
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            }
            event.update(amount_total=total, shipping_amount=shipping)
            self.record_out_of_band(
                "BROWSER",
                path,
                object_id=session_id,
                amount_charged_minor=charged,
                currency=cs["currency"],
                extra=event,
            )
            return copy.deepcopy(cs)

    def end_trial(self, sub_id: str) -> dict[str, Any]:
        """A trialing subscription's trial runs out (Stripe's clock, not an API call).

        With ``cancel_at_period_end`` the subscription just ends (``canceled``, nothing
        charged). Otherwise a ``subscription_cycle`` invoice for the full period amount is
        charged to the subscription's (or the customer's) default payment method: ``active``;
        if it declines or there is none, the invoice stays open and the subscription is
        ``past_due``. One ledger entry ``STRIPE /subscriptions/<id>/trial_end``. Returns the
        subscription. Raises ``ValueError`` unless the subscription is ``trialing``."""
        with self._lock:
            sub = self._objects.get(sub_id)
            if sub is None or sub.get("object") != "subscription":
                raise ValueError(f"no such subscription: {sub_id!r}")
            if sub["status"] != "trialing":
                raise ValueError(f"subscription {sub_id} is {sub['status']}, not trialing")
            info = self._finish_trial(sub, natural=True)
            self.record_out_of_band(
                "STRIPE",
                f"/subscriptions/{sub_id}/trial_end",
                object_id=sub_id,
                amount_charged_minor=info["charged"],
                currency=sub["currency"],
                status=info["status"],
                extra={
                    "event": "end_trial",
                    "invoice": info["invoice"],
                    "subscription_status": sub["status"],
                },
            )
            return copy.deepcopy(sub)

    def _setup_intent(self, customer: str | None, pm: str) -> dict[str, Any]:
        sid = self._new_id("seti_")
        seti = {
            "id": sid,
            "object": "setup_intent",
            "application": None,
            "automatic_payment_methods": None,
            "cancellation_reason": None,
            "client_secret": f"{sid}_secret_{rand_alnum(25)}",
            "created": self._now(),
            "customer": customer,
            "description": None,
            "flow_directions": None,
            "last_setup_error": None,
            "latest_attempt": None,
            "livemode": False,
            "mandate": None,
            "metadata": {},
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": pm,
            "payment_method_options": {
                "card": {
                    "mandate_options": None,
                    "network": None,
                    "request_three_d_secure": "automatic",
                }
            },
            "payment_method_types": ["card"],
            "single_use_mandate": None,
            "status": "succeeded",
            "usage": "off_session",
        }
        return self._store(seti)

    def _control(self, req: FakeRequest) -> FakeResponse:
        """Adds, for a fake in another process: ``POST /__fake__/stripe/complete_checkout``
        ``{"session": "cs_…", "shipping_option": 0, "payment_method": "pm_card_visa"}`` and
        ``POST /__fake__/stripe/end_trial`` ``{"subscription": "sub_…"}`` (answer: the
        object, or 400 ``{"ok": false, "error": …}``)."""
        if req.method == "POST" and req.path.startswith("/__fake__/stripe/"):
            spec = req.json() if req.body else {}
            try:
                if req.path == "/__fake__/stripe/complete_checkout":
                    opt = spec.get("shipping_option")
                    return json_response(
                        200,
                        self.complete_checkout(
                            str(spec.get("session", "")),
                            None if opt is None else int(opt),
                            payment_method=str(spec.get("payment_method") or "pm_card_visa"),
                        ),
                    )
                if req.path == "/__fake__/stripe/end_trial":
                    return json_response(200, self.end_trial(str(spec.get("subscription", ""))))
            except ValueError as exc:
                return json_response(400, {"ok": False, "error": str(exc)})
        return super()._control(req)

    def error_response(self, req: FakeRequest, status: int) -> FakeResponse:
        return self._error(
            req,
            StripeAPIError(
                status,
                "api_error",
                "An unknown error occurred. Please try again later.",
            ),
        )

    def rate_limit_response(self, req: FakeRequest) -> FakeResponse:
        return self._error(
            req,
            StripeAPIError(
                429,
                "invalid_request_error",
                "Request rate limit exceeded. Learn more about rate limits here "
                "https://stripe.com/docs/rate-limits.",
                code="rate_limit",
            ),
        )

    def _common_headers(self, req: FakeRequest) -> list[tuple[str, str]]:
        h = [
            ("Access-Control-Allow-Origin", "*"),
            ("Cache-Control", "no-cache, no-store"),
            ("Stripe-Version", req.header("Stripe-Version") or DEFAULT_API_VERSION),
        ]
        if req.method == "POST" and req.header("Idempotency-Key"):
            h.append(("Idempotency-Key", req.header("Idempotency-Key") or ""))
        if req.header("Stripe-Account"):
            h.append(("Stripe-Account", req.header("Stripe-Account") or ""))
        return h

    def _error(self, req: FakeRequest, err: StripeAPIError) -> FakeResponse:
        body: dict[str, Any] = {}
        if err.code:
            body["code"] = err.code
        if err.decline_code:
            body["decline_code"] = err.decline_code
        if err.code:
            body["doc_url"] = "https://stripe.com/docs/error-codes/" + err.code.replace("_", "-")
        body["message"] = err.message
        if err.param:
            body["param"] = err.param
        if err.status != 401 and req.request_id:
            body["request_log_url"] = (
                f"https://dashboard.stripe.com/test/logs/{req.request_id}?t={int(time.time())}"
            )
        body["type"] = err.type
        body.update(err.extra)
        headers = self._common_headers(req) + err.headers
        if err.status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="Stripe"'))
        return json_response(err.status, {"error": body}, headers)

    def _presented_key(self, req: FakeRequest) -> str | None:
        auth = req.header("Authorization")
        if auth is None:
            return None
        scheme, _, cred = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            return cred.strip()
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(cred.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return ""
            return decoded.partition(":")[0]
        return ""

    # ------------------------------------------------------------------ dispatch

    def _form_key(self, req: FakeRequest) -> str | None:
        """Stripe.js sends the publishable key as a ``key`` parameter, not a header."""
        raw = req.body if req.method == "POST" else req.query.encode()
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return None
        for k, v in pairs:
            if k == "key" and v.startswith("pk_"):
                return v
        return None

    def handle(self, req: FakeRequest) -> FakeResponse:
        resp = self._handle_api(req)
        account = req.header("Stripe-Account")
        if account:  # Connect: acting on behalf of a connected account
            resp.extra = {**resp.extra, "stripe_account": account}
        return resp

    def _handle_api(self, req: FakeRequest) -> FakeResponse:
        key = self._presented_key(req)
        if key is None:
            key = self._form_key(req)
        if not key:
            return self._error(
                req,
                StripeAPIError(
                    401,
                    "invalid_request_error",
                    "You did not provide an API key. You need to provide your API key in "
                    "the Authorization header, using Bearer auth (e.g. 'Authorization: "
                    "Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication "
                    "for details, or we can help at https://support.stripe.com/.",
                ),
            )
        publishable = key == self.publishable
        if key != self.secret and not publishable:
            return self._error(
                req,
                StripeAPIError(
                    401,
                    "invalid_request_error",
                    f"Invalid API Key provided: {mask_key(key)}",
                ),
            )

        route = self._match(req)
        if route is None:
            return self._error(
                req,
                StripeAPIError(
                    404,
                    "invalid_request_error",
                    f"Unrecognized request URL ({req.method}: {req.path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/.",
                ),
            )
        fn, groups = route
        if publishable:
            client_route = self._publishable_route(fn, groups)
            if client_route is None:
                return self._error(
                    req, StripeAPIError(401, "invalid_request_error", _PUBLISHABLE_KEY_MESSAGE)
                )
            fn, groups = client_route

        try:
            raw = req.body if req.method == "POST" else req.query.encode()
            params = parse_stripe_form(raw)
        except (UnicodeDecodeError, ValueError):
            return self._error(
                req,
                StripeAPIError(400, "invalid_request_error", "Invalid request body."),
            )

        idem_key = req.header("Idempotency-Key") if req.method == "POST" else None
        fingerprint = json.dumps([req.method, req.path, params], sort_keys=True)
        if idem_key is not None:
            with self._lock:
                ent = self._idem.get(idem_key)
                if ent is not None and ent.fingerprint != fingerprint:
                    return self._error(
                        req,
                        StripeAPIError(
                            400,
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other "
                            f"than '{idem_key}' if you meant to execute a different request.",
                        ),
                    )
                if ent is not None and ent.in_flight:
                    return self._error(
                        req,
                        StripeAPIError(
                            409,
                            "invalid_request_error",
                            "There is currently another in-progress request using this "
                            "Stripe API key (that also used an identical Idempotency-Key). "
                            "Please try again later.",
                            code="idempotency_key_in_use",
                        ),
                    )
                if ent is not None:
                    headers = [*(ent.headers or []), ("Idempotent-Replayed", "true")]
                    if ent.request_id:
                        headers.append(("Original-Request", ent.request_id))
                    return FakeResponse(
                        ent.status,
                        ent.body,
                        headers,
                        object_id=ent.object_id,
                        replayed=True,
                        extra={"original_request": ent.request_id},
                    )
                self._idem[idem_key] = _IdemEntry(fingerprint=fingerprint)

        self.wait_delay(req)
        resp: FakeResponse | None = None
        try:
            with self._lock:
                try:
                    out = fn(req, params, *groups)
                except StripeAPIError as err:
                    if publishable and isinstance(err.extra.get("payment_intent"), dict):
                        err.extra["payment_intent"] = _publishable_view(err.extra["payment_intent"])
                    resp = self._error(req, err)
                else:
                    expand = params.get("expand") or []
                    obj = copy.deepcopy(out.obj)
                    if isinstance(expand, list):
                        for path in expand:
                            self._expand(obj, str(path).split("."))
                    if publishable:
                        obj = _publishable_view(obj)
                    resp = json_response(
                        out.status,
                        obj,
                        self._common_headers(req),
                        object_id=out.object_id or obj.get("id"),
                        amount_charged_minor=out.charged,
                        currency=out.currency,
                        charged_usd_micros=self._usd_micros(out.charged, out.currency),
                        amount_refunded_minor=out.refunded,
                        extra=out.extra or {},
                    )
            return resp
        finally:
            if idem_key is not None:
                with self._lock:
                    if resp is not None and (200 <= resp.status < 300 or resp.status == 402):
                        self._idem[idem_key] = _IdemEntry(
                            fingerprint=fingerprint,
                            in_flight=False,
                            status=resp.status,
                            body=resp.body,
                            headers=list(resp.headers),
                            request_id=req.request_id,
                            object_id=resp.object_id,
                        )
                    else:
                        self._idem.pop(idem_key, None)

    @staticmethod
    def _usd_micros(amount: int, currency: str | None) -> int | None:
        if amount == 0:
            return 0
        if (currency or "").lower() == "usd":
            return amount * 10_000
        return None

    def _match(self, req: FakeRequest) -> tuple[Callable[..., _Outcome], tuple[str, ...]] | None:
        path = req.path.rstrip("/") or "/"
        for method, pattern, fn in self._routes:
            if method != req.method:
                continue
            m = pattern.fullmatch(path)
            if m:
                return fn, m.groups()
        return None

    def _build_routes(self) -> list[Route]:
        ident = r"([A-Za-z0-9_]+)"
        r: list[Route] = []

        def add(method: str, pattern: str, fn: Callable[..., _Outcome]) -> None:
            r.append((method, re.compile(pattern), fn))

        add("POST", r"/v1/payment_intents", self._pi_create)
        add("POST", rf"/v1/payment_intents/{ident}/confirm", self._pi_confirm)
        add("POST", rf"/v1/payment_intents/{ident}/capture", self._pi_capture)
        add("POST", rf"/v1/payment_intents/{ident}/cancel", self._pi_cancel)
        add("POST", rf"/v1/payment_intents/{ident}/increment_authorization", self._pi_increment)
        add("POST", rf"/v1/payment_intents/{ident}", self._pi_update)
        add("POST", r"/v1/charges", self._charge_create)
        add("POST", rf"/v1/charges/{ident}/capture", self._charge_capture)
        add("POST", r"/v1/refunds", self._refund_create)
        add("POST", r"/v1/transfers", self._transfer_create)
        add("POST", r"/v1/payouts", self._payout_create)
        add("POST", r"/v1/topups", self._topup_create)
        add("POST", r"/v1/customers", self._customer_create)
        add("POST", r"/v1/products", self._product_create)
        add("POST", r"/v1/prices", self._price_create)
        add("POST", r"/v1/invoiceitems", self._invoiceitem_create)
        add("POST", r"/v1/invoices", self._invoice_create)
        add("POST", rf"/v1/invoices/{ident}/finalize", self._invoice_finalize)
        add("POST", rf"/v1/invoices/{ident}/pay", self._invoice_pay)
        add("DELETE", rf"/v1/invoiceitems/{ident}", self._invoiceitem_delete)
        add("POST", r"/v1/checkout/sessions", self._checkout_create)
        add("POST", rf"/v1/checkout/sessions/{ident}/expire", self._checkout_expire)
        add("POST", r"/v1/shipping_rates", self._shipping_rate_create)
        add("POST", r"/v1/subscriptions", self._subscription_create)
        add("POST", rf"/v1/subscriptions/{ident}", self._subscription_update)
        add("DELETE", rf"/v1/subscriptions/{ident}", self._subscription_cancel)
        add("GET", r"/v1/balance", self._balance)
        kinds = "|".join(re.escape(k) for k in _KINDS)
        add("GET", rf"/v1/({kinds})/{ident}", self._retrieve)
        add("GET", rf"/v1/({kinds})", self._list)
        return r

    # ------------------------------------------------------------------ publishable key

    def _publishable_route(
        self, fn: Callable[..., _Outcome], groups: tuple[str, ...]
    ) -> tuple[Callable[..., _Outcome], tuple[str, ...]] | None:
        """What a publishable key may do: only what Stripe.js does with a client_secret."""
        if fn == self._retrieve and groups[0] == "payment_intents":
            return self._pk_pi_retrieve, (groups[1],)
        if fn == self._pi_confirm:
            return self._pk_pi_confirm, groups
        return None

    def _check_client_secret(self, p: dict[str, Any], pid: str) -> dict[str, Any]:
        secret = self._str(p, "client_secret", required=True)
        pi = self._get(pid, "payment_intent", "intent")
        if secret != pi["client_secret"]:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "The client_secret provided does not match the client_secret associated "
                "with the PaymentIntent.",
                code="payment_intent_invalid_parameter",
                param="client_secret",
            )
        return pi

    def _pk_pi_retrieve(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        return _Outcome(self._check_client_secret(p, pid), extra={"client_side": True})

    def _pk_pi_confirm(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        pi = self._check_client_secret(p, pid)
        if pi["confirmation_method"] == "manual":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "This PaymentIntent's confirmation_method is manual: it can only be "
                "confirmed with your secret key, on your server.",
                code="payment_intent_invalid_parameter",
            )
        # Only the payment method comes from the browser (no capture_method & co.).
        allowed = {k: v for k, v in p.items() if k == "payment_method"}
        out = self._pi_confirm(req, allowed, pid)
        out.extra = {**(out.extra or {}), "client_side": True}
        return out

    # ------------------------------------------------------------------ helpers

    def _new_id(self, prefix: str) -> str:
        if prefix == "cs_test_":
            return prefix + "a1" + rand_alnum(56)
        return prefix + "1" + rand_alnum(23)

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._objects[obj["id"]] = obj
        self._order.setdefault(obj["object"], []).append(obj["id"])
        return obj

    def _get(self, oid: str, object_name: str, param: str = "id") -> dict[str, Any]:
        obj = self._objects.get(oid)
        if obj is None or obj.get("object") != object_name:
            raise _no_such(object_name, oid, param)
        return obj

    def _expand(self, node: Any, path: list[str]) -> None:
        if not path:
            return
        if isinstance(node, list):
            for item in node:
                self._expand(item, path)
            return
        if not isinstance(node, dict):
            return
        head, rest = path[0], path[1:]
        if head not in node:
            return
        val = node[head]
        if isinstance(val, str) and val in self._objects:
            node[head] = copy.deepcopy(self._objects[val])
            val = node[head]
        self._expand(val, rest)

    @staticmethod
    def _int(p: dict[str, Any], name: str, *, required: bool = False, label: str = "") -> int:
        v = p.get(name)
        label = label or name
        if v is None or v == "":
            if required:
                raise _missing(label)
            return -1
        s = str(v)
        if not re.fullmatch(r"-?\d+", s):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Invalid integer: {s}",
                code="parameter_invalid_integer",
                param=label,
            )
        return int(s)

    @staticmethod
    def _str(p: dict[str, Any], name: str, *, required: bool = False, label: str = "") -> str:
        v = p.get(name)
        if v is None or v == "":
            if required:
                raise _missing(label or name)
            return ""
        if not isinstance(v, str):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Invalid string: {json.dumps(v)}",
                code="parameter_invalid_string",
                param=label or name,
            )
        return v

    @staticmethod
    def _bool(p: dict[str, Any], name: str, default: bool = False) -> bool:
        v = p.get(name)
        if v is None or v == "":
            return default
        return str(v).lower() == "true"

    @staticmethod
    def _meta(p: dict[str, Any]) -> dict[str, Any]:
        m = p.get("metadata")
        return dict(m) if isinstance(m, dict) else {}

    def _currency(self, p: dict[str, Any], *, label: str = "currency") -> str:
        cur = self._str(p, "currency", required=True, label=label).lower()
        if not re.fullmatch(r"[a-z]{3}", cur):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Invalid currency: {cur}. Stripe currently supports these currencies: "
                "usd, aed, afn, ... (fake)",
                param=label,
            )
        return cur

    def _amount(self, p: dict[str, Any], currency: str, *, name: str = "amount") -> int:
        amount = self._int(p, name, required=True)
        if amount < 1:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 1.",
                code="parameter_invalid_integer",
                param=name,
            )
        return amount

    @staticmethod
    def _min_charge(amount: int, currency: str) -> None:
        minimum = MIN_CHARGE.get(currency)
        if minimum is not None and amount < minimum:
            shown = f"{minimum / 100:.2f}" if currency not in ZERO_DECIMAL else str(minimum)
            sym = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency, "")
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Amount must be at least {sym}{shown} {currency}",
                code="amount_too_small",
                param="amount",
            )

    @staticmethod
    def _now() -> int:
        return int(time.time())

    # ------------------------------------------------------------------ payment methods

    def _decline_for(self, pm: str) -> tuple[str, str | None, str] | None:
        token = self._pm_ids.get(pm, pm)
        for prefix in ("pm_card_", "tok_"):
            if token.startswith(prefix):
                return _DECLINES.get(token[len(prefix) :])
        return None

    def _resolve_pm(self, pm: str) -> str:
        """Test tokens (pm_card_visa) become a fresh pm_ id like Stripe does."""
        if pm.startswith("pm_card_") or pm.startswith("tok_"):
            new = self._new_id("pm_")
            self._pm_ids[new] = pm
            return new
        return pm

    def _card_details(self, pm: str) -> dict[str, Any]:
        token = self._pm_ids.get(pm, pm)
        name = token.removeprefix("pm_card_").removeprefix("tok_")
        brand, last4 = _BRANDS.get(name, ("visa", "4242"))
        return {
            "amount_authorization": None,
            "brand": brand,
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US",
            "exp_month": 12,
            "exp_year": 2034,
            "extended_authorization": {"status": "disabled"},
            "fingerprint": rand_alnum(16),
            "funding": "credit",
            "incremental_authorization": {"status": "available"},
            "installments": None,
            "last4": last4,
            "mandate": None,
            "multicapture": {"status": "unavailable"},
            "network": brand,
            "network_token": {"used": False},
            "overcapture": {"maximum_amount_capturable": 0, "status": "unavailable"},
            "three_d_secure": None,
            "wallet": None,
        }

    def _pm_object(self, pm: str) -> dict[str, Any]:
        card = self._card_details(pm)
        return {
            "id": pm,
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": _empty_billing(),
            "card": {
                "brand": card["brand"],
                "checks": card["checks"],
                "country": "US",
                "display_brand": card["brand"],
                "exp_month": 12,
                "exp_year": 2034,
                "fingerprint": card["fingerprint"],
                "funding": "credit",
                "generated_from": None,
                "last4": card["last4"],
                "networks": {"available": [card["brand"]], "preferred": None},
                "regulated_status": "unregulated",
                "three_d_secure_usage": {"supported": True},
                "wallet": None,
            },
            "created": self._now(),
            "customer": None,
            "livemode": False,
            "metadata": {},
            "type": "card",
        }

    def _charge_obj(
        self,
        *,
        amount: int,
        currency: str,
        pm: str,
        captured: bool,
        payment_intent: str | None,
        customer: str | None,
        description: str | None,
        metadata: dict[str, Any],
        failure: tuple[str, str | None, str] | None = None,
    ) -> dict[str, Any]:
        cid = self._new_id("ch_")
        ok = failure is None
        fail_code, fail_reason, fail_message = failure if failure is not None else (None,) * 3
        seller_message = (
            "Payment complete."
            if ok
            else "The bank did not return any further details with this decline."
        )
        charge = {
            "id": cid,
            "object": "charge",
            "amount": amount,
            "amount_captured": amount if (ok and captured) else 0,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": ("txn_" + "1" + rand_alnum(23)) if (ok and captured) else None,
            "billing_details": _empty_billing(),
            "calculated_statement_descriptor": "KEYBRAKE FAKE",
            "captured": bool(ok and captured),
            "created": self._now(),
            "currency": currency,
            "customer": customer,
            "description": description,
            "destination": None,
            "dispute": None,
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": fail_code,
            "failure_message": fail_message,
            "fraud_details": {},
            "livemode": False,
            "metadata": metadata,
            "on_behalf_of": None,
            "order": None,
            "outcome": {
                "advice_code": None,
                "network_advice_code": None,
                "network_decline_code": None,
                "network_status": "approved_by_network" if ok else "declined_by_network",
                "reason": fail_reason,
                "risk_level": "normal",
                "risk_score": 21,
                "seller_message": seller_message,
                "type": "authorized" if ok else "issuer_declined",
            },
            "paid": ok,
            "payment_intent": payment_intent,
            "payment_method": pm,
            "payment_method_details": {"card": self._card_details(pm), "type": "card"},
            "radar_options": {},
            "receipt_email": None,
            "receipt_number": None,
            "receipt_url": f"https://pay.stripe.com/receipts/payment/{rand_alnum(60)}"
            if ok
            else None,
            "refunded": False,
            "review": None,
            "shipping": None,
            "source": None,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "succeeded" if ok else "failed",
            "transfer_data": None,
            "transfer_group": None,
        }
        return self._store(charge)

    def _card_error(
        self,
        failure: tuple[str, str | None, str],
        *,
        charge_id: str | None,
        pi: dict[str, Any] | None,
        pm: str | None,
    ) -> StripeAPIError:
        code, decline_code, message = failure
        extra: dict[str, Any] = {}
        if charge_id:
            extra["charge"] = charge_id
        if pi is not None:
            extra["payment_intent"] = copy.deepcopy(pi)
        if pm:
            extra["payment_method"] = self._pm_object(pm)
        return StripeAPIError(
            402,
            "card_error",
            message,
            code=code,
            decline_code=decline_code,
            extra=extra,
        )

    # ------------------------------------------------------------------ payment intents

    def _pi_obj(self, p: dict[str, Any]) -> dict[str, Any]:
        currency = self._currency(p)
        amount = self._amount(p, currency)
        self._min_charge(amount, currency)
        capture_method = self._str(p, "capture_method") or "automatic_async"
        if capture_method not in ("automatic", "automatic_async", "manual"):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Invalid capture_method: must be one of automatic, automatic_async, or manual",
                param="capture_method",
            )
        pid = self._new_id("pi_")
        pmt = p.get("payment_method_types")
        apm = p.get("automatic_payment_methods")
        if isinstance(pmt, list):
            types = [str(t) for t in pmt]
            auto = None
        else:
            types = ["card"]
            auto = {"allow_redirects": "always", "enabled": True}
            if isinstance(apm, dict) and str(apm.get("enabled", "true")).lower() == "false":
                auto = None
        return {
            "id": pid,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": auto,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": capture_method,
            "client_secret": f"{pid}_secret_{rand_alnum(25)}",
            "confirmation_method": self._str(p, "confirmation_method") or "automatic",
            "created": self._now(),
            "currency": currency,
            "customer": self._str(p, "customer") or None,
            "description": self._str(p, "description") or None,
            "excluded_payment_method_types": None,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": self._meta(p),
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": None,
            "payment_method_configuration_details": None,
            "payment_method_options": {
                "card": {
                    "installments": None,
                    "mandate_options": None,
                    "network": None,
                    "request_three_d_secure": "automatic",
                }
            },
            "payment_method_types": types,
            "processing": None,
            "receipt_email": self._str(p, "receipt_email") or None,
            "review": None,
            "setup_future_usage": self._str(p, "setup_future_usage") or None,
            "shipping": None,
            "source": None,
            "statement_descriptor": self._str(p, "statement_descriptor") or None,
            "statement_descriptor_suffix": None,
            "status": "requires_payment_method",
            "transfer_data": None,
            "transfer_group": self._str(p, "transfer_group") or None,
        }

    def _pi_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        pi = self._pi_obj(p)
        pm = self._str(p, "payment_method")
        if pm:
            pi["payment_method"] = self._resolve_pm(pm)
            pi["status"] = "requires_confirmation"
        self._store(pi)
        if self._bool(p, "confirm"):
            return self._do_confirm(pi)
        return _Outcome(pi)

    def _pi_update(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        pi = self._get(pid, "payment_intent", "intent")
        if pi["status"] in ("succeeded", "canceled", "processing", "requires_capture") and (
            "amount" in p or "currency" in p
        ):
            raise _unexpected_state(
                f"This PaymentIntent's amount could not be updated because it has a status "
                f"of {pi['status']}."
            )
        if "currency" in p:
            pi["currency"] = self._currency(p)
        if "amount" in p:
            pi["amount"] = self._amount(p, pi["currency"])
        if "payment_method" in p:
            pi["payment_method"] = self._resolve_pm(self._str(p, "payment_method"))
            if pi["status"] == "requires_payment_method":
                pi["status"] = "requires_confirmation"
        for k in ("description", "receipt_email", "customer"):
            if k in p:
                pi[k] = self._str(p, k) or None
        if "metadata" in p:
            pi["metadata"].update(self._meta(p))
        return _Outcome(pi)

    def _pi_confirm(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        pi = self._get(pid, "payment_intent", "intent")
        if pi["status"] not in (
            "requires_payment_method",
            "requires_confirmation",
            "requires_action",
        ):
            raise _unexpected_state(
                f"You cannot confirm this PaymentIntent because it has a status of "
                f"{pi['status']}. Only a PaymentIntent with one of the following statuses "
                "may be confirmed: requires_confirmation, requires_action, "
                "requires_payment_method."
            )
        pm = self._str(p, "payment_method")
        if pm:
            pi["payment_method"] = self._resolve_pm(pm)
        if "capture_method" in p:
            pi["capture_method"] = self._str(p, "capture_method")
        return self._do_confirm(pi)

    def _do_confirm(self, pi: dict[str, Any]) -> _Outcome:
        pm = pi.get("payment_method")
        if not pm:
            raise _unexpected_state(
                "You cannot confirm this PaymentIntent because it's missing a payment "
                "method. You can either update the PaymentIntent with a payment method and "
                "then confirm it again, or confirm it again directly with a payment method "
                "or ConfirmationToken."
            )
        failure = self._decline_for(pm)
        manual = pi["capture_method"] == "manual"
        charge = self._charge_obj(
            amount=pi["amount"],
            currency=pi["currency"],
            pm=pm,
            captured=not manual,
            payment_intent=pi["id"],
            customer=pi["customer"],
            description=pi["description"],
            metadata=dict(pi["metadata"]),
            failure=failure,
        )
        pi["latest_charge"] = charge["id"]
        if failure is not None:
            code, decline_code, message = failure
            pi["status"] = "requires_payment_method"
            pi["payment_method"] = None
            pi["last_payment_error"] = {
                "charge": charge["id"],
                "code": code,
                "decline_code": decline_code,
                "doc_url": "https://stripe.com/docs/error-codes/" + code.replace("_", "-"),
                "message": message,
                "payment_method": self._pm_object(pm),
                "type": "card_error",
            }
            raise self._card_error(failure, charge_id=charge["id"], pi=pi, pm=pm)
        pi["last_payment_error"] = None
        if manual:
            pi["status"] = "requires_capture"
            pi["amount_capturable"] = pi["amount"]
            return _Outcome(
                pi,
                currency=pi["currency"],
                extra={"authorized_minor": pi["amount"], "charge": charge["id"]},
            )
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
        return _Outcome(
            pi,
            charged=pi["amount"],
            currency=pi["currency"],
            extra={"charge": charge["id"]},
        )

    def _pi_capture(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        pi = self._get(pid, "payment_intent", "intent")
        if pi["status"] != "requires_capture":
            raise _unexpected_state(
                f"This PaymentIntent could not be captured because it has a status of "
                f"{pi['status']}. Only a PaymentIntent with one of the following statuses "
                "may be captured: requires_capture."
            )
        amount = self._int(p, "amount_to_capture")
        if amount < 0:
            amount = pi["amount_capturable"]
        if amount > pi["amount_capturable"] or amount < 1:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "The amount to capture must be a positive integer less than or equal to "
                f"the amount capturable ({pi['amount_capturable']}).",
                code="amount_too_large" if amount > 0 else "parameter_invalid_integer",
                param="amount_to_capture",
            )
        self._capture(pi, amount)
        return _Outcome(pi, charged=amount, currency=pi["currency"])

    def _capture(self, pi: dict[str, Any], amount: int) -> None:
        pi["status"] = "succeeded"
        pi["amount_received"] = amount
        pi["amount_capturable"] = 0
        ch = self._objects.get(pi.get("latest_charge") or "")
        if ch is not None:
            ch["captured"] = True
            ch["amount_captured"] = amount
            ch["amount_refunded"] = ch["amount"] - amount  # the uncaptured rest is released
            ch["balance_transaction"] = "txn_1" + rand_alnum(23)

    def _pi_cancel(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        pi = self._get(pid, "payment_intent", "intent")
        if pi["status"] in ("succeeded", "canceled"):
            raise _unexpected_state(
                f"You cannot cancel this PaymentIntent because it has a status of "
                f"{pi['status']}. Only a PaymentIntent with one of the following statuses "
                "may be canceled: requires_payment_method, requires_capture, "
                "requires_confirmation, requires_action, processing."
            )
        pi["status"] = "canceled"
        pi["canceled_at"] = self._now()
        pi["cancellation_reason"] = self._str(p, "cancellation_reason") or "requested_by_customer"
        pi["amount_capturable"] = 0
        return _Outcome(pi)

    def _pi_increment(self, req: FakeRequest, p: dict[str, Any], pid: str) -> _Outcome:
        pi = self._get(pid, "payment_intent", "intent")
        if pi["status"] != "requires_capture":
            raise _unexpected_state(
                "This PaymentIntent's amount could not be updated because it has a status of "
                f"{pi['status']}. Only PaymentIntents with status requires_capture can be "
                "incrementally authorized."
            )
        amount = self._int(p, "amount", required=True)
        if amount <= pi["amount"]:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "The new amount must be greater than the currently authorized amount "
                f"({pi['amount']}).",
                param="amount",
            )
        pi["amount"] = amount
        pi["amount_capturable"] = amount
        ch = self._objects.get(pi.get("latest_charge") or "")
        if ch is not None:
            ch["amount"] = amount
        return _Outcome(pi, currency=pi["currency"], extra={"authorized_minor": amount})

    # ------------------------------------------------------------------ charges & refunds

    def _charge_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        currency = self._currency(p)
        amount = self._amount(p, currency)
        self._min_charge(amount, currency)
        source = self._str(p, "source")
        customer = self._str(p, "customer") or None
        if not source and not customer:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Must provide source or customer.",
                code="missing",
            )
        pm = self._resolve_pm(source) if source else "pm_1" + rand_alnum(23)
        capture = self._bool(p, "capture", True)
        failure = self._decline_for(pm)
        ch = self._charge_obj(
            amount=amount,
            currency=currency,
            pm=pm,
            captured=capture,
            payment_intent=None,
            customer=customer,
            description=self._str(p, "description") or None,
            metadata=self._meta(p),
            failure=failure,
        )
        if failure is not None:
            raise self._card_error(failure, charge_id=ch["id"], pi=None, pm=None)
        if not capture:
            return _Outcome(ch, currency=currency, extra={"authorized_minor": amount})
        return _Outcome(ch, charged=amount, currency=currency)

    def _charge_capture(self, req: FakeRequest, p: dict[str, Any], cid: str) -> _Outcome:
        ch = self._get(cid, "charge", "charge")
        if ch["captured"] or ch["status"] != "succeeded":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Charge {cid} has already been captured.",
                code="charge_already_captured",
            )
        amount = self._int(p, "amount")
        if amount < 0:
            amount = ch["amount"]
        if amount < 1 or amount > ch["amount"]:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Amount must be no more than {ch['amount']}.",
                code="amount_too_large",
                param="amount",
            )
        if ch.get("payment_intent"):
            pi = self._objects[ch["payment_intent"]]
            self._capture(pi, amount)
        else:
            ch["captured"] = True
            ch["amount_captured"] = amount
            ch["amount_refunded"] = ch["amount"] - amount
            ch["balance_transaction"] = "txn_1" + rand_alnum(23)
        return _Outcome(ch, charged=amount, currency=ch["currency"])

    def _refund_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        charge_id = self._str(p, "charge")
        pi_id = self._str(p, "payment_intent")
        if not charge_id and not pi_id:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "One of the following params should be provided for this request: "
                "payment_intent or charge.",
                code="parameter_missing",
            )
        if pi_id:
            pi = self._get(pi_id, "payment_intent", "payment_intent")
            if not pi.get("latest_charge") or pi["status"] != "succeeded":
                raise StripeAPIError(
                    400,
                    "invalid_request_error",
                    f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                    param="payment_intent",
                )
            charge_id = pi["latest_charge"]
        ch = self._get(charge_id, "charge", "charge")
        refundable = ch["amount"] - ch["amount_refunded"] if ch["captured"] else 0
        if refundable <= 0:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Charge {ch['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        amount = self._int(p, "amount")
        if amount < 0:
            amount = refundable
        if amount < 1 or amount > refundable:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                f"({refundable})",
                code="amount_too_large",
                param="amount",
            )
        ch["amount_refunded"] += amount
        ch["refunded"] = ch["amount_refunded"] >= ch["amount"]
        refund = {
            "id": self._new_id("re_"),
            "object": "refund",
            "amount": amount,
            "balance_transaction": "txn_1" + rand_alnum(23),
            "charge": ch["id"],
            "created": self._now(),
            "currency": ch["currency"],
            "destination_details": {
                "card": {
                    "reference_status": "pending",
                    "reference_type": "acquirer_reference_number",
                    "type": "refund",
                },
                "type": "card",
            },
            "metadata": self._meta(p),
            "payment_intent": ch.get("payment_intent"),
            "reason": self._str(p, "reason") or None,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": "succeeded",
            "transfer_reversal": None,
        }
        self._store(refund)
        return _Outcome(refund, currency=ch["currency"], refunded=amount)

    # ------------------------------------------------------------------ money out/in

    def _transfer_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        currency = self._currency(p)
        amount = self._amount(p, currency)
        dest = self._str(p, "destination", required=True)
        if not dest.startswith("acct_"):
            raise _no_such("destination", dest, "destination")
        tid = self._new_id("tr_")
        tr = {
            "id": tid,
            "object": "transfer",
            "amount": amount,
            "amount_reversed": 0,
            "balance_transaction": "txn_1" + rand_alnum(23),
            "created": self._now(),
            "currency": currency,
            "description": self._str(p, "description") or None,
            "destination": dest,
            "destination_payment": "py_1" + rand_alnum(23),
            "livemode": False,
            "metadata": self._meta(p),
            "reversals": {
                "object": "list",
                "data": [],
                "has_more": False,
                "total_count": 0,
                "url": f"/v1/transfers/{tid}/reversals",
            },
            "reversed": False,
            "source_transaction": self._str(p, "source_transaction") or None,
            "source_type": "card",
            "transfer_group": self._str(p, "transfer_group") or None,
        }
        self._store(tr)
        return _Outcome(tr, charged=amount, currency=currency)

    def _payout_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        currency = self._currency(p)
        amount = self._amount(p, currency)
        now = self._now()
        po = {
            "id": self._new_id("po_"),
            "object": "payout",
            "amount": amount,
            "application_fee": None,
            "application_fee_amount": None,
            "arrival_date": now + 2 * 86400,
            "automatic": False,
            "balance_transaction": "txn_1" + rand_alnum(23),
            "created": now,
            "currency": currency,
            "description": self._str(p, "description") or None,
            "destination": self._str(p, "destination") or "ba_1" + rand_alnum(23),
            "failure_balance_transaction": None,
            "failure_code": None,
            "failure_message": None,
            "livemode": False,
            "metadata": self._meta(p),
            "method": self._str(p, "method") or "standard",
            "original_payout": None,
            "payout_method": None,
            "reconciliation_status": "not_applicable",
            "reversed_by": None,
            "source_type": self._str(p, "source_type") or "card",
            "statement_descriptor": self._str(p, "statement_descriptor") or None,
            "status": "pending",
            "trace_id": {"status": "pending", "value": None},
            "type": "bank_account",
        }
        self._store(po)
        return _Outcome(po, charged=amount, currency=currency)

    def _topup_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        currency = self._currency(p)
        amount = self._amount(p, currency)
        now = self._now()
        tu = {
            "id": self._new_id("tu_"),
            "object": "topup",
            "amount": amount,
            "balance_transaction": None,
            "created": now,
            "currency": currency,
            "description": self._str(p, "description") or None,
            "expected_availability_date": now + 5 * 86400,
            "failure_code": None,
            "failure_message": None,
            "livemode": False,
            "metadata": self._meta(p),
            "source": None,
            "statement_descriptor": self._str(p, "statement_descriptor") or None,
            "status": "pending",
            "transfer_group": self._str(p, "transfer_group") or None,
        }
        self._store(tu)
        return _Outcome(tu, charged=amount, currency=currency)

    def _balance(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        return _Outcome(
            {
                "object": "balance",
                "available": [
                    {"amount": 1_000_000, "currency": "usd", "source_types": {"card": 1_000_000}}
                ],
                "connect_reserved": [{"amount": 0, "currency": "usd"}],
                "livemode": False,
                "pending": [{"amount": 0, "currency": "usd", "source_types": {"card": 0}}],
            }
        )

    # ------------------------------------------------------------------ catalog & customers

    def _customer_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        return _Outcome(self._new_customer(p))

    def _new_customer(self, p: dict[str, Any]) -> dict[str, Any]:
        raw_inv = p.get("invoice_settings")
        inv: dict[str, Any] = raw_inv if isinstance(raw_inv, dict) else {}
        default_pm = str(inv.get("default_payment_method") or "") or self._str(p, "payment_method")
        cus: dict[str, Any] = {
            "id": self._new_id("cus_"),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": self._now(),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": self._str(p, "description") or None,
            "discount": None,
            "email": self._str(p, "email") or None,
            "invoice_prefix": rand_alnum(8).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": self._resolve_pm(default_pm) if default_pm else None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": self._meta(p),
            "name": self._str(p, "name") or None,
            "next_invoice_sequence": 1,
            "phone": self._str(p, "phone") or None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        return self._store(cus)

    def _product(self, name: str, p: dict[str, Any] | None = None) -> dict[str, Any]:
        now = self._now()
        prod = {
            "id": self._new_id("prod_"),
            "object": "product",
            "active": True,
            "created": now,
            "default_price": None,
            "description": None,
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": self._meta(p or {}),
            "name": name,
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "unit_label": None,
            "updated": now,
            "url": None,
        }
        return self._store(prod)

    def _product_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        return _Outcome(self._product(self._str(p, "name", required=True), p))

    def _price(self, d: dict[str, Any], label: str) -> dict[str, Any]:
        """Build (and store) a price from ``POST /v1/prices`` params or inline price_data."""
        currency = self._currency(d, label=_lbl(label, "currency"))
        if d.get("unit_amount") not in (None, ""):
            unit = self._int(d, "unit_amount", label=_lbl(label, "unit_amount"))
        elif d.get("unit_amount_decimal") not in (None, ""):
            unit = round(float(str(d["unit_amount_decimal"])))
        else:
            raise _missing(_lbl(label, "unit_amount"))
        product = d.get("product")
        if not product:
            pdata = d.get("product_data")
            if not isinstance(pdata, dict) or not pdata.get("name"):
                raise _missing(_lbl(label, "product"))
            product = self._product(str(pdata["name"]))["id"]
        rec = d.get("recurring")
        recurring = None
        if isinstance(rec, dict):
            recurring = {
                "interval": str(rec.get("interval") or "month"),
                "interval_count": int(str(rec.get("interval_count") or 1)),
                "meter": None,
                "trial_period_days": None,
                "usage_type": "licensed",
            }
        price = {
            "id": self._new_id("price_"),
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": self._now(),
            "currency": currency,
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": None,
            "metadata": self._meta(d),
            "nickname": None,
            "product": str(product),
            "recurring": recurring,
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring" if recurring else "one_time",
            "unit_amount": unit,
            "unit_amount_decimal": str(unit),
        }
        options = d.get("currency_options")
        if isinstance(options, dict):
            # Prices in other currencies: Checkout charges the customer's one of them.
            price["currency_options"] = {
                str(code).lower(): {
                    "custom_unit_amount": None,
                    "tax_behavior": "unspecified",
                    "unit_amount": self._int(
                        opt, "unit_amount", required=True, label=f"currency_options[{code}]"
                    ),
                    "unit_amount_decimal": str(opt.get("unit_amount")),
                }
                for code, opt in options.items()
                if isinstance(opt, dict)
            }
        return self._store(price)

    def _price_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        return _Outcome(self._price(p, ""))

    def _line_price(self, item: dict[str, Any], label: str) -> tuple[dict[str, Any], int]:
        qty = self._int(item, "quantity", label=f"{label}[quantity]")
        qty = 1 if qty < 0 else qty
        price_id = item.get("price")
        if isinstance(price_id, str) and price_id:
            return self._get(price_id, "price", f"{label}[price]"), qty
        pdata = item.get("price_data")
        if isinstance(pdata, dict):
            return self._price(pdata, f"{label}[price_data]"), qty
        raise _missing(f"{label}[price]")

    # ------------------------------------------------------------------ invoices

    def _invoice_obj(
        self,
        customer: dict[str, Any],
        currency: str,
        *,
        description: str | None,
        metadata: dict[str, Any],
        billing_reason: str,
        subscription: str | None = None,
    ) -> dict[str, Any]:
        now = self._now()
        iid = self._new_id("in_")
        inv = {
            "id": iid,
            "object": "invoice",
            "account_country": "US",
            "account_name": "Keybrake Fake",
            "account_tax_ids": None,
            "amount_due": 0,
            "amount_overpaid": 0,
            "amount_paid": 0,
            "amount_remaining": 0,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 0,
            "attempted": False,
            "auto_advance": False,
            "automatic_tax": {
                "disabled_reason": None,
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "automatically_finalizes_at": None,
            "billing_reason": billing_reason,
            "collection_method": "charge_automatically",
            "created": now,
            "currency": currency,
            "custom_fields": None,
            "customer": customer["id"],
            "customer_address": None,
            "customer_email": customer.get("email"),
            "customer_name": customer.get("name"),
            "customer_phone": None,
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": description,
            "discounts": [],
            "due_date": None,
            "effective_at": None,
            "ending_balance": None,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": {
                "object": "list",
                "data": [],
                "has_more": False,
                "total_count": 0,
                "url": f"/v1/invoices/{iid}/lines",
            },
            "livemode": False,
            "metadata": metadata,
            "next_payment_attempt": None,
            "number": None,
            "on_behalf_of": None,
            "parent": (
                {
                    "quote_details": None,
                    "subscription_details": {"metadata": {}, "subscription": subscription},
                    "type": "subscription_details",
                }
                if subscription
                else None
            ),
            "payment_settings": {
                "default_mandate": None,
                "payment_method_options": None,
                "payment_method_types": None,
            },
            "period_end": now,
            "period_start": now,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": 0,
            "statement_descriptor": None,
            "status": "draft",
            "status_transitions": {
                "finalized_at": None,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "subtotal": 0,
            "subtotal_excluding_tax": 0,
            "test_clock": None,
            "total": 0,
            "total_discount_amounts": [],
            "total_excluding_tax": 0,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": None,
        }
        return self._store(inv)

    def _add_line(
        self,
        inv: dict[str, Any],
        *,
        amount: int,
        currency: str,
        description: str | None,
        quantity: int,
        price: dict[str, Any] | None,
        invoice_item: str | None = None,
        subscription_item: str | None = None,
    ) -> None:
        now = self._now()
        line = {
            "id": "il_1" + rand_alnum(23),
            "object": "line_item",
            "amount": amount,
            "currency": currency,
            "description": description,
            "discount_amounts": [],
            "discountable": True,
            "discounts": [],
            "invoice": inv["id"],
            "livemode": False,
            "metadata": {},
            "parent": (
                {
                    "invoice_item_details": {
                        "invoice_item": invoice_item,
                        "proration": False,
                        "proration_details": {"credited_items": None},
                        "subscription": None,
                    },
                    "subscription_item_details": None,
                    "type": "invoice_item_details",
                }
                if invoice_item
                else {
                    "invoice_item_details": None,
                    "subscription_item_details": {
                        "invoice_item": None,
                        "proration": False,
                        "proration_details": {"credited_items": None},
                        "subscription": inv["parent"]["subscription_details"]["subscription"]
                        if inv.get("parent")
                        else None,
                        "subscription_item": subscription_item,
                    },
                    "type": "subscription_item_details",
                }
            ),
            "period": {"end": now, "start": now},
            "pretax_credit_amounts": [],
            "pricing": (
                {
                    "price_details": {"price": price["id"], "product": price["product"]},
                    "type": "price_details",
                    "unit_amount_decimal": price["unit_amount_decimal"],
                }
                if price
                else None
            ),
            "quantity": quantity,
            "taxes": [],
        }
        inv["lines"]["data"].append(line)
        self._recompute_invoice(inv)

    @staticmethod
    def _recompute_invoice(inv: dict[str, Any]) -> None:
        """Totals of a draft invoice from its lines (+ shipping, which is not in subtotal)."""
        inv["lines"]["total_count"] = len(inv["lines"]["data"])
        subtotal = sum(int(line_["amount"]) for line_ in inv["lines"]["data"])
        total = subtotal + int(inv.get("amount_shipping") or 0)
        inv["subtotal"] = inv["subtotal_excluding_tax"] = subtotal
        inv["total"] = inv["total_excluding_tax"] = total
        inv["amount_due"] = inv["amount_remaining"] = total

    def _invoiceitem_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        customer = self._get(self._str(p, "customer", required=True), "customer", "customer")
        qty = self._int(p, "quantity")
        qty = 1 if qty < 0 else qty
        price: dict[str, Any] | None = None
        raw_pricing = p.get("pricing")
        pricing: dict[str, Any] = raw_pricing if isinstance(raw_pricing, dict) else {}
        price_id = str(pricing.get("price") or "") or self._str(p, "price")
        if price_id:
            price = self._get(price_id, "price", "pricing[price]")
        elif isinstance(p.get("price_data"), dict):
            price = self._price(p["price_data"], "price_data")
        if price is not None:
            currency = price["currency"]
            amount = int(price["unit_amount"]) * qty
        elif p.get("unit_amount") not in (None, "") or p.get("unit_amount_decimal"):
            currency = self._currency(p)
            unit = (
                self._int(p, "unit_amount")
                if p.get("unit_amount") not in (None, "")
                else round(float(str(p["unit_amount_decimal"])))
            )
            amount = unit * qty
        else:
            currency = self._currency(p)
            amount = self._int(p, "amount", required=True)
        invoice_id = self._str(p, "invoice") or None
        ii = self._invoiceitem_obj(
            customer["id"],
            amount=amount,
            currency=currency,
            price=price,
            quantity=qty,
            description=self._str(p, "description") or None,
            invoice_id=invoice_id,
            metadata=self._meta(p),
        )
        if invoice_id:
            inv = self._get(invoice_id, "invoice", "invoice")
            if inv["status"] != "draft":
                raise StripeAPIError(
                    400,
                    "invalid_request_error",
                    f"You can only add invoice items to draft invoices. Invoice {invoice_id} "
                    f"has status {inv['status']}.",
                    param="invoice",
                )
            self._add_line(
                inv,
                amount=amount,
                currency=currency,
                description=ii["description"],
                quantity=qty,
                price=price,
                invoice_item=ii["id"],
            )
        self._store(ii)
        return _Outcome(ii)

    def _invoiceitem_obj(
        self,
        customer_id: str,
        *,
        amount: int,
        currency: str,
        price: dict[str, Any] | None,
        quantity: int,
        description: str | None,
        invoice_id: str | None,
        metadata: dict[str, Any],
    ) -> dict[str, Any]:
        """A new (not yet stored) invoice item."""
        now = self._now()
        qty = quantity
        return {
            "id": self._new_id("ii_"),
            "object": "invoiceitem",
            "amount": amount,
            "currency": currency,
            "customer": customer_id,
            "date": now,
            "description": description,
            "discountable": True,
            "discounts": [],
            "invoice": invoice_id,
            "livemode": False,
            "metadata": metadata,
            "net_amount": amount,
            "parent": None,
            "period": {"end": now, "start": now},
            "pricing": (
                {
                    "price_details": {"price": price["id"], "product": price["product"]},
                    "type": "price_details",
                    "unit_amount_decimal": price["unit_amount_decimal"],
                }
                if price
                else None
            ),
            "proration": False,
            "quantity": qty,
            "tax_rates": [],
            "test_clock": None,
        }

    def _invoiceitem_delete(self, req: FakeRequest, p: dict[str, Any], iid: str) -> _Outcome:
        ii = self._get(iid, "invoiceitem")
        inv = self._objects.get(ii["invoice"] or "")
        if inv is not None:
            if inv["status"] != "draft":
                raise StripeAPIError(
                    400,
                    "invalid_request_error",
                    f"Invoice items can only be deleted while they are pending or attached to "
                    f"a draft invoice. This invoice item is on invoice {inv['id']}, which has "
                    f"status {inv['status']} and is no longer editable.",
                    code="invoice_not_editable",
                )
            inv["lines"]["data"] = [
                line
                for line in inv["lines"]["data"]
                if ((line.get("parent") or {}).get("invoice_item_details") or {}).get(
                    "invoice_item"
                )
                != iid
            ]
            self._recompute_invoice(inv)
        del self._objects[iid]
        self._order["invoiceitem"].remove(iid)
        return _Outcome({"id": iid, "object": "invoiceitem", "deleted": True})

    def _invoice_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        customer = self._get(self._str(p, "customer", required=True), "customer", "customer")
        currency = (self._str(p, "currency") or "usd").lower()
        inv = self._invoice_obj(
            customer,
            currency,
            description=self._str(p, "description") or None,
            metadata=self._meta(p),
            billing_reason="manual",
        )
        inv["auto_advance"] = self._bool(p, "auto_advance", False)
        dpm = self._str(p, "default_payment_method")
        if dpm:
            inv["default_payment_method"] = self._resolve_pm(dpm)
        if self._str(p, "pending_invoice_items_behavior") == "include":
            for iid in self._order.get("invoiceitem", []):
                ii = self._objects[iid]
                if ii["customer"] == customer["id"] and ii["invoice"] is None:
                    ii["invoice"] = inv["id"]
                    price_id = (ii.get("pricing") or {}).get("price_details", {}).get("price")
                    self._add_line(
                        inv,
                        amount=ii["amount"],
                        currency=ii["currency"],
                        description=ii["description"],
                        quantity=ii["quantity"],
                        price=self._objects.get(price_id) if price_id else None,
                        invoice_item=ii["id"],
                    )
        return _Outcome(inv)

    def _finalize(self, inv: dict[str, Any]) -> None:
        if inv["status"] != "draft":
            return
        inv["status"] = "open"
        inv["number"] = f"{rand_alnum(8).upper()}-0001"
        inv["status_transitions"]["finalized_at"] = self._now()
        inv["effective_at"] = self._now()
        inv["hosted_invoice_url"] = f"https://invoice.stripe.com/i/acct_fake/test_{rand_alnum(40)}"
        inv["invoice_pdf"] = f"https://pay.stripe.com/invoice/acct_fake/test_{rand_alnum(40)}/pdf"
        inv["ending_balance"] = 0

    def _invoice_finalize(self, req: FakeRequest, p: dict[str, Any], iid: str) -> _Outcome:
        inv = self._get(iid, "invoice", "invoice")
        if inv["status"] != "draft":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
            )
        self._finalize(inv)
        return _Outcome(inv)

    def _pay_invoice(self, inv: dict[str, Any], pm: str | None) -> _Outcome:
        """Charge an open invoice; raises a card error on decline."""
        self._finalize(inv)
        amount = int(inv["amount_due"])
        if amount == 0:
            self._mark_paid(inv, 0)
            return _Outcome(inv)
        if not pm:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "This customer has no attached payment source or default payment method. "
                "Please consider adding a default payment method. For more information, "
                "visit https://stripe.com/docs/billing/subscriptions/payment-methods-setting"
                "#payment-method-priority.",
            )
        inv["attempt_count"] += 1
        inv["attempted"] = True
        failure = self._decline_for(pm)
        ch = self._charge_obj(
            amount=amount,
            currency=inv["currency"],
            pm=pm,
            captured=True,
            payment_intent=None,
            customer=inv["customer"],
            description=f"Payment for Invoice {inv['number']}",
            metadata={},
            failure=failure,
        )
        if failure is not None:
            raise self._card_error(failure, charge_id=ch["id"], pi=None, pm=pm)
        self._mark_paid(inv, amount)
        return _Outcome(inv, charged=amount, currency=inv["currency"], extra={"charge": ch["id"]})

    def _mark_paid(self, inv: dict[str, Any], amount: int) -> None:
        inv["status"] = "paid"
        inv["amount_paid"] = amount
        inv["amount_remaining"] = 0
        inv["status_transitions"]["paid_at"] = self._now()

    def _customer_pm(self, customer_id: str) -> str | None:
        cus = self._objects.get(customer_id) or {}
        return (cus.get("invoice_settings") or {}).get("default_payment_method")

    def _invoice_pay(self, req: FakeRequest, p: dict[str, Any], iid: str) -> _Outcome:
        inv = self._get(iid, "invoice", "invoice")
        if inv["status"] == "paid":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Invoice is already paid",
                code="invoice_already_paid",
            )
        if inv["status"] not in ("draft", "open"):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"You can only pay an invoice that is open (status is {inv['status']}).",
            )
        if self._bool(p, "paid_out_of_band"):
            self._finalize(inv)
            self._mark_paid(inv, 0)
            inv["amount_paid"] = 0
            return _Outcome(inv, extra={"paid_out_of_band": True})
        pm_param = self._str(p, "payment_method")
        pm = (
            self._resolve_pm(pm_param)
            if pm_param
            else inv.get("default_payment_method") or self._customer_pm(inv["customer"])
        )
        return self._pay_invoice(inv, pm)

    # ------------------------------------------------------------------ checkout & subs

    def _checkout_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        mode = self._str(p, "mode", required=True)
        if mode not in ("payment", "subscription", "setup"):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Invalid mode: must be one of payment, setup, or subscription",
                param="mode",
            )
        items = p.get("line_items")
        total = 0
        currency: str | None = None
        lines: list[dict[str, Any]] = []
        if mode != "setup":
            if not isinstance(items, list) or not items:
                raise _missing("line_items")
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise _missing(f"line_items[{i}][price]")
                price, qty = self._line_price(item, f"line_items[{i}]")
                total += int(price["unit_amount"]) * qty
                currency = currency or price["currency"]
                lines.append({"price": price["id"], "quantity": qty})
        shipping_options = self._checkout_shipping_options(p, mode, currency)
        raw_pid = p.get("payment_intent_data")
        pi_data: dict[str, Any] = raw_pid if isinstance(raw_pid, dict) else {}
        capture_method = self._str(
            pi_data, "capture_method", label="payment_intent_data[capture_method]"
        )
        if capture_method and capture_method not in ("automatic", "automatic_async", "manual"):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Invalid payment_intent_data[capture_method]: must be one of automatic, "
                "automatic_async, or manual",
                param="payment_intent_data[capture_method]",
            )
        raw_sd = p.get("subscription_data")
        sub_data: dict[str, Any] = raw_sd if isinstance(raw_sd, dict) else {}
        trial_days = self._int(
            sub_data, "trial_period_days", label="subscription_data[trial_period_days]"
        )
        sid = self._new_id("cs_test_")
        now = self._now()
        cs = {
            "id": sid,
            "object": "checkout.session",
            "adaptive_pricing": {"enabled": False},
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": total,
            "amount_total": total,
            "automatic_tax": {
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "billing_address_collection": None,
            "cancel_url": self._str(p, "cancel_url") or None,
            "client_reference_id": self._str(p, "client_reference_id") or None,
            "client_secret": None,
            "consent": None,
            "consent_collection": None,
            "created": now,
            "currency": currency or (self._str(p, "currency") or None),
            "currency_conversion": None,
            "custom_fields": [],
            "custom_text": {
                "after_submit": None,
                "shipping_address": None,
                "submit": None,
                "terms_of_service_acceptance": None,
            },
            "customer": self._str(p, "customer") or None,
            "customer_creation": "if_required" if mode == "payment" else None,
            "customer_details": None,
            "customer_email": self._str(p, "customer_email") or None,
            "discounts": [],
            "expires_at": now + 86400,
            "invoice": None,
            "invoice_creation": None,
            "livemode": False,
            "locale": None,
            "metadata": self._meta(p),
            "mode": mode,
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "if_required",
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "payment_status": "unpaid" if mode != "setup" else "no_payment_required",
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "saved_payment_method_options": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_options": shipping_options,
            "status": "open",
            "submit_type": None,
            "subscription": None,
            "success_url": self._str(p, "success_url") or None,
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": self._str(p, "ui_mode") or "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{sid}#{rand_alnum(40)}",
        }
        self._store(cs)
        self._cs_private[sid] = {
            "lines": lines,
            "capture_method": capture_method or "automatic_async",
            "pi_metadata": self._meta(pi_data),
            "trial_days": max(trial_days, 0),
            "sub_metadata": self._meta(sub_data),
        }
        extra: dict[str, Any] = {"amount_total": total, "line_items": lines}
        if shipping_options:
            extra["shipping_amounts"] = [o["shipping_amount"] for o in shipping_options]
        return _Outcome(cs, currency=currency, extra=extra)

    def _shipping_rate(self, d: dict[str, Any], label: str) -> dict[str, Any]:
        """Build (and store) a ShippingRate from ``POST /v1/shipping_rates`` params or
        inline ``shipping_rate_data``."""
        type_ = self._str(d, "type", label=_lbl(label, "type")) or "fixed_amount"
        if type_ != "fixed_amount":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"Invalid {_lbl(label, 'type')}: must be fixed_amount",
                param=_lbl(label, "type"),
            )
        name = self._str(d, "display_name", required=True, label=_lbl(label, "display_name"))
        fa_label = _lbl(label, "fixed_amount")
        fixed = d.get("fixed_amount")
        if not isinstance(fixed, dict):
            raise _missing(fa_label)
        amount = self._int(fixed, "amount", required=True, label=f"{fa_label}[amount]")
        if amount < 0:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 0.",
                code="parameter_invalid_integer",
                param=f"{fa_label}[amount]",
            )
        currency = self._currency(fixed, label=f"{fa_label}[currency]")
        fixed_amount: dict[str, Any] = {"amount": amount, "currency": currency}
        raw_opts = fixed.get("currency_options")
        if isinstance(raw_opts, dict):  # shown in those currencies; charged in `currency` here
            fixed_amount["currency_options"] = {
                str(code).lower(): {
                    "amount": self._int(
                        opt, "amount", required=True, label=f"{fa_label}[currency_options]"
                    ),
                    "tax_behavior": str(opt.get("tax_behavior") or "unspecified"),
                }
                for code, opt in raw_opts.items()
                if isinstance(opt, dict)
            }
        rate = {
            "id": self._new_id("shr_"),
            "object": "shipping_rate",
            "active": True,
            "created": self._now(),
            "delivery_estimate": None,
            "display_name": name,
            "fixed_amount": fixed_amount,
            "livemode": False,
            "metadata": self._meta(d),
            "tax_behavior": self._str(d, "tax_behavior") or "unspecified",
            "tax_code": self._str(d, "tax_code") or None,
            "type": "fixed_amount",
        }
        return self._store(rate)

    def _shipping_rate_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        return _Outcome(self._shipping_rate(p, ""))

    def _checkout_shipping_options(
        self, p: dict[str, Any], mode: str, currency: str | None
    ) -> list[dict[str, Any]]:
        raw = p.get("shipping_options")
        if raw in (None, ""):
            return []
        if not isinstance(raw, list):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Invalid array",
                param="shipping_options",
            )
        if mode == "setup":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "`shipping_options` can only be used in `payment` or `subscription` mode.",
                param="shipping_options",
            )
        if len(raw) > 5:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "You can only pass up to 5 shipping options.",
                param="shipping_options",
            )
        out: list[dict[str, Any]] = []
        for i, opt in enumerate(raw):
            label = f"shipping_options[{i}]"
            if not isinstance(opt, dict):
                raise _missing(f"{label}[shipping_rate]")
            rate_id = opt.get("shipping_rate")
            data = opt.get("shipping_rate_data")
            if isinstance(rate_id, str) and rate_id:
                rate = self._get(rate_id, "shipping_rate", f"{label}[shipping_rate]")
            elif isinstance(data, dict):
                rate = self._shipping_rate(data, f"{label}[shipping_rate_data]")
            else:
                raise _missing(f"{label}[shipping_rate]")
            rate_cur = rate["fixed_amount"]["currency"]
            if currency is not None and rate_cur != currency:
                raise StripeAPIError(
                    400,
                    "invalid_request_error",
                    f"The currency of {label} ({rate_cur}) must match the currency of the "
                    f"line items ({currency}).",
                    param=label,
                )
            out.append(
                {"shipping_amount": rate["fixed_amount"]["amount"], "shipping_rate": rate["id"]}
            )
        return out

    def _checkout_expire(self, req: FakeRequest, p: dict[str, Any], sid: str) -> _Outcome:
        cs = self._get(sid, "checkout.session", "session")
        if cs["status"] != "open":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                'Only Checkout Sessions with a status in ["open"] can be expired. This '
                f"Checkout Session has a status of `{cs['status']}`.",
            )
        cs["status"] = "expired"
        cs["url"] = None
        return _Outcome(cs)

    def _subscription_create(self, req: FakeRequest, p: dict[str, Any]) -> _Outcome:
        customer = self._get(self._str(p, "customer", required=True), "customer", "customer")
        items = p.get("items")
        if not isinstance(items, list) or not items:
            raise _missing("items")
        priced: list[tuple[dict[str, Any], int]] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _missing(f"items[{i}][price]")
            priced.append(self._line_price(item, f"items[{i}]"))
        one_off: list[tuple[dict[str, Any], int]] = []
        extra_items = p.get("add_invoice_items")
        if extra_items not in (None, ""):
            if not isinstance(extra_items, list):
                raise _missing("add_invoice_items[0][price]")
            for i, item in enumerate(extra_items):
                if not isinstance(item, dict):
                    raise _missing(f"add_invoice_items[{i}][price]")
                one_off.append(self._line_price(item, f"add_invoice_items[{i}]"))
        dpm_param = self._str(p, "default_payment_method")
        return self._make_subscription(
            customer,
            priced,
            one_off=one_off,
            trial_days=self._int(p, "trial_period_days"),
            dpm=self._resolve_pm(dpm_param) if dpm_param else None,
            behavior=self._str(p, "payment_behavior") or "allow_incomplete",
            cancel_at_period_end=self._bool(p, "cancel_at_period_end"),
            description=self._str(p, "description") or None,
            metadata=self._meta(p),
        )

    def _make_subscription(
        self,
        customer: dict[str, Any],
        priced: list[tuple[dict[str, Any], int]],
        *,
        one_off: list[tuple[dict[str, Any], int]] | None = None,
        trial_days: int,
        dpm: str | None,
        behavior: str,
        cancel_at_period_end: bool,
        description: str | None,
        metadata: dict[str, Any],
        shipping: dict[str, Any] | None = None,
    ) -> _Outcome:
        sid = self._new_id("sub_")
        now = self._now()
        currency = priced[0][0]["currency"]
        trial_end = now + trial_days * 86400 if trial_days > 0 else None
        period_end = trial_end or now + 30 * 86400  # a trial is the first period
        sub_items: list[dict[str, Any]] = [
            {
                "id": "si_" + rand_alnum(14),
                "object": "subscription_item",
                "billing_thresholds": None,
                "created": now,
                "current_period_end": period_end,
                "current_period_start": now,
                "discounts": [],
                "metadata": {},
                "plan": None,
                "price": copy.deepcopy(price),
                "quantity": qty,
                "subscription": sid,
                "tax_rates": [],
            }
            for price, qty in priced
        ]
        inv = self._invoice_obj(
            customer,
            currency,
            description=None,
            metadata={},
            billing_reason="subscription_create",
            subscription=sid,
        )
        for si in sub_items:
            price, qty = si["price"], si["quantity"]
            self._add_line(
                inv,
                amount=0 if trial_end else int(price["unit_amount"]) * qty,
                currency=currency,
                description=f"{qty} x {price['product']}",
                quantity=qty,
                price=price,
                subscription_item=si["id"],
            )
        for price, qty in one_off or []:  # add_invoice_items: on the first invoice, even in a trial
            ii = self._invoiceitem_obj(
                customer["id"],
                amount=int(price["unit_amount"]) * qty,
                currency=price["currency"],
                price=price,
                quantity=qty,
                description=None,
                invoice_id=inv["id"],
                metadata={},
            )
            ii["parent"] = {
                "subscription_details": {"subscription": sid, "subscription_item": None},
                "type": "subscription_details",
            }
            self._store(ii)
            self._add_line(
                inv,
                amount=ii["amount"],
                currency=ii["currency"],
                description=None,
                quantity=qty,
                price=price,
                invoice_item=ii["id"],
            )
        if shipping is not None and not trial_end:
            self._invoice_shipping(inv, int(shipping["shipping_amount"]), shipping["shipping_rate"])
        pm = dpm or self._customer_pm(customer["id"])
        sub = {
            "id": sid,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": period_end if trial_end else now,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": None, "type": "classic"},
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": now,
            "currency": currency,
            "customer": customer["id"],
            "days_until_due": None,
            "default_payment_method": dpm,
            "default_source": None,
            "default_tax_rates": [],
            "description": description,
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {
                "object": "list",
                "data": sub_items,
                "has_more": False,
                "total_count": len(sub_items),
                "url": f"/v1/subscription_items?subscription={sid}",
            },
            "latest_invoice": inv["id"],
            "livemode": False,
            "metadata": metadata,
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "schedule": None,
            "start_date": now,
            "status": "incomplete",
            "test_clock": None,
            "transfer_data": None,
            "trial_end": trial_end,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": now if trial_end else None,
        }
        self._set_cancel_at_period_end(sub, cancel_at_period_end)
        self._store(sub)
        settled = "trialing" if trial_end else "active"
        amount_due = int(inv["amount_due"])
        extra = {"amount_due": amount_due, "invoice": inv["id"]}
        if amount_due == 0:
            self._finalize(inv)
            self._mark_paid(inv, 0)
            sub["status"] = settled
            return _Outcome(sub, extra=extra)
        if behavior == "default_incomplete" or not pm:
            self._finalize(inv)
            return _Outcome(sub, extra=extra)
        try:
            out = self._pay_invoice(inv, pm)
        except StripeAPIError:
            if behavior == "error_if_incomplete":
                raise
            return _Outcome(sub, extra=extra)
        sub["status"] = settled
        return _Outcome(sub, charged=out.charged, currency=out.currency, extra=extra)

    def _invoice_shipping(self, inv: dict[str, Any], amount: int, rate_id: str) -> None:
        inv["amount_shipping"] = amount
        inv["shipping_cost"] = {
            "amount_subtotal": amount,
            "amount_tax": 0,
            "amount_total": amount,
            "shipping_rate": rate_id,
            "taxes": [],
        }
        self._recompute_invoice(inv)

    @staticmethod
    def _period_end(sub: dict[str, Any]) -> int:
        return int(sub["items"]["data"][0]["current_period_end"])

    def _set_cancel_at_period_end(self, sub: dict[str, Any], flag: bool) -> None:
        sub["cancel_at_period_end"] = flag
        sub["cancel_at"] = self._period_end(sub) if flag else None
        sub["cancellation_details"]["reason"] = "cancellation_requested" if flag else None

    def _subscription_update(self, req: FakeRequest, p: dict[str, Any], sid: str) -> _Outcome:
        sub = self._get(sid, "subscription")
        if sub["status"] in ("canceled", "incomplete_expired") and (
            set(p) - {"cancellation_details", "metadata", "expand"}
        ):
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        if "metadata" in p:
            sub["metadata"].update(self._meta(p))
        if "description" in p:
            sub["description"] = self._str(p, "description") or None
        if "default_payment_method" in p:
            dpm = self._str(p, "default_payment_method")
            sub["default_payment_method"] = self._resolve_pm(dpm) if dpm else None
        details = p.get("cancellation_details")
        if isinstance(details, dict):
            for k in ("comment", "feedback"):
                if k in details:
                    sub["cancellation_details"][k] = str(details[k]) or None
        if "cancel_at_period_end" in p:
            self._set_cancel_at_period_end(sub, self._bool(p, "cancel_at_period_end"))
        trial_end = self._str(p, "trial_end")
        if trial_end == "now" and sub["status"] == "trialing":
            # Ends the trial at once: a new period starts and its invoice is charged now.
            info = self._finish_trial(sub, natural=False)
            extra = {"trial_ended": True, "invoice": info["invoice"]}
            if info["charged"]:
                return _Outcome(sub, charged=info["charged"], currency=sub["currency"], extra=extra)
            return _Outcome(sub, extra=extra)
        if trial_end.isdigit() and sub["status"] == "trialing":
            new_end = int(trial_end)
            if new_end <= self._now():
                raise StripeAPIError(
                    400,
                    "invalid_request_error",
                    "Invalid timestamp: must be an integer Unix timestamp in the future.",
                    param="trial_end",
                )
            sub["trial_end"] = new_end
            sub["billing_cycle_anchor"] = new_end
            for item in sub["items"]["data"]:
                item["current_period_end"] = new_end
            if sub["cancel_at_period_end"]:
                sub["cancel_at"] = new_end
        return _Outcome(sub)

    def _subscription_cancel(self, req: FakeRequest, p: dict[str, Any], sid: str) -> _Outcome:
        sub = self._get(sid, "subscription")
        if sub["status"] in ("canceled", "incomplete_expired"):
            # Stripe treats a canceled subscription as gone for this call.
            raise _no_such("subscription", sid)
        now = self._now()
        sub["status"] = "canceled"
        sub["canceled_at"] = now
        sub["ended_at"] = now
        sub["cancellation_details"]["reason"] = "cancellation_requested"
        details = p.get("cancellation_details")
        if isinstance(details, dict):
            for k in ("comment", "feedback"):
                if k in details:
                    sub["cancellation_details"][k] = str(details[k]) or None
        return _Outcome(sub)

    def _finish_trial(self, sub: dict[str, Any], *, natural: bool) -> dict[str, Any]:
        """End a trialing subscription's trial. ``natural``: the trial ran out (a
        ``cancel_at_period_end`` subscription then just ends); otherwise ``trial_end=now``.
        Returns ``{"charged", "status", "invoice", "canceled"}`` (status 200/402/400)."""
        now = self._now()
        if natural and sub["cancel_at"] is not None and sub["cancel_at"] <= self._period_end(sub):
            sub["status"] = "canceled"
            sub["canceled_at"] = sub["canceled_at"] or now
            sub["ended_at"] = now
            sub["trial_end"] = now
            return {"charged": 0, "status": 200, "invoice": None, "canceled": True}
        customer = self._objects[sub["customer"]]
        inv = self._invoice_obj(
            customer,
            sub["currency"],
            description=None,
            metadata={},
            billing_reason="subscription_cycle" if natural else "subscription_update",
            subscription=sub["id"],
        )
        period_end = now + 30 * 86400
        for item in sub["items"]["data"]:
            price, qty = item["price"], int(item["quantity"])
            self._add_line(
                inv,
                amount=int(price["unit_amount"]) * qty,
                currency=sub["currency"],
                description=f"{qty} x {price['product']}",
                quantity=qty,
                price=price,
                subscription_item=item["id"],
            )
            item["current_period_start"] = now
            item["current_period_end"] = period_end
        sub["trial_end"] = now
        sub["billing_cycle_anchor"] = now
        sub["latest_invoice"] = inv["id"]
        if sub["cancel_at_period_end"]:
            sub["cancel_at"] = period_end
        pm = sub["default_payment_method"] or self._customer_pm(customer["id"])
        try:
            out = self._pay_invoice(inv, pm)
        except StripeAPIError as err:
            sub["status"] = "past_due"
            return {"charged": 0, "status": err.status, "invoice": inv["id"], "canceled": False}
        sub["status"] = "active"
        return {"charged": out.charged, "status": 200, "invoice": inv["id"], "canceled": False}

    # ------------------------------------------------------------------ generic reads

    def _retrieve(self, req: FakeRequest, p: dict[str, Any], kind: str, oid: str) -> _Outcome:
        object_name, _ = _KINDS[kind]
        return _Outcome(self._get(oid, object_name))

    def _list(self, req: FakeRequest, p: dict[str, Any], kind: str) -> _Outcome:
        object_name, _ = _KINDS[kind]
        ids = list(reversed(self._order.get(object_name, [])))
        limit = self._int(p, "limit")
        limit = 10 if limit < 0 else max(1, min(limit, 100))
        after = self._str(p, "starting_after")
        if after and after in ids:
            ids = ids[ids.index(after) + 1 :]
        filters = {k: v for k, v in p.items() if k in ("customer", "payment_intent", "charge")}
        objs = [
            self._objects[i]
            for i in ids
            if all(self._objects[i].get(k) == v for k, v in filters.items())
        ]
        return _Outcome(
            {
                "object": "list",
                "data": objs[:limit],
                "has_more": len(objs) > limit,
                "url": f"/v1/{kind}",
            }
        )


def _publishable_view(pi: dict[str, Any]) -> dict[str, Any]:
    """The subset of a PaymentIntent a publishable key (Stripe.js) gets back."""
    return {k: v for k, v in pi.items() if k in _PUBLISHABLE_PI_FIELDS}


def _empty_billing() -> dict[str, Any]:
    return {
        "address": {
            "city": None,
            "country": None,
            "line1": None,
            "line2": None,
            "postal_code": None,
            "state": None,
        },
        "email": None,
        "name": None,
        "phone": None,
        "tax_id": None,
    }


def _lbl(prefix: str, name: str) -> str:
    return f"{prefix}[{name}]" if prefix else name
