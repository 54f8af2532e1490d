"""Faults through real proxy processes: Redis outages, kill -9, vendor failures, a read-only
store, a key expiring mid-call. Every case checks the money against the fake's own ledger."""

from __future__ import annotations

import datetime as dt
import errno
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests._redis import PrivateRedis
from tests.conftest import KeybrakeProcess
from tests.fakes import FakeStripe
from tests.reliability.conftest import (
    USD,
    audit_rows,
    charge,
    code_of,
    healthy,
    key_detail,
    usd_micros,
    wait_audit,
    wait_for,
)

pytestmark = pytest.mark.e2e


class Hammer:
    """``threads`` workers sending $1 charges until stopped; keeps every outcome."""

    def __init__(self, kb: KeybrakeProcess, vault_key: str, threads: int = 3) -> None:
        self.kb, self.vk = kb, vault_key
        self.stop_evt = threading.Event()
        self.statuses: list[int] = []
        self.codes: list[str] = []
        self.ids: list[str] = []  # the PaymentIntent of every 200
        self.errors = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop_evt.is_set():
            try:
                r = charge(self.kb, self.vk, 100, timeout=15)
            except httpx.HTTPError:
                with self._lock:
                    self.errors += 1
                time.sleep(0.05)
                continue
            with self._lock:
                self.statuses.append(r.status_code)
                if r.status_code != 200:
                    self.codes.append(code_of(r))
                else:
                    self.ids.append(str(r.json()["id"]))
            time.sleep(0.01)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_evt.set()
        for t in self._threads:
            t.join(30)


# ------------------------------------------------------------------------------- Redis


@pytest.mark.redis
def test_redis_stopped_mid_run_never_forwards_without_reservation(
    keybrake_factory: Any, fake_stripe: FakeStripe, private_redis: PrivateRedis
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=private_redis.url)
    key = kb.issue_key(daily_usd_cap=1000)
    with Hammer(kb, key["vault_key"]) as h:
        wait_for(lambda: h.statuses.count(200) >= 5, 20, "traffic to flow")
        private_redis.stop(save=True)  # an RDB snapshot: this restart keeps the state
        time.sleep(1.5)
        private_redis.start()
        wait_for(lambda: len(h.statuses) >= h.statuses.count(503) + 10, 20, "recovery")
    ok = h.statuses.count(200)
    assert h.statuses.count(503) > 0, "the outage was never seen"
    assert set(h.codes) <= {"store_unavailable"}, h.codes
    assert h.errors == 0
    # Every vendor call carried a reservation: the vendor saw exactly the answered 200s.
    assert len(fake_stripe.ledger) == ok
    assert fake_stripe.charged_usd_micros() == ok * USD
    # With the state restored, the budget still counts every charge (never reset to zero).
    spent = usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"])
    assert spent >= fake_stripe.charged_usd_micros()
    assert spent <= fake_stripe.charged_usd_micros() + 3 * USD  # settles lost mid-outage
    rows = wait_audit(kb, ok + h.statuses.count(503))
    refused = [r for r in rows if r["outcome"] == "refused"]
    assert {r["code"] for r in refused} == {"store_unavailable"}
    assert len(refused) == h.statuses.count(503)
    assert kb.proc is not None and kb.proc.poll() is None


@pytest.mark.redis
def test_redis_restarted_empty_fails_closed_for_lost_keys(
    keybrake_factory: Any, fake_stripe: FakeStripe, private_redis: PrivateRedis
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=private_redis.url)
    key = kb.issue_key(daily_usd_cap=3)
    with Hammer(kb, key["vault_key"], threads=2) as h:
        wait_for(lambda: h.statuses.count(200) >= 2, 20, "traffic to flow")
        private_redis.stop()
        time.sleep(1.0)
        private_redis.start(empty=True)  # nothing persisted: every budget is gone
        wait_for(lambda: "vault_key_unknown" in h.codes, 20, "the proxy to see empty Redis")
    charged = fake_stripe.charged_usd_micros()
    assert len(fake_stripe.ledger) == h.statuses.count(200)
    # The $3 cap held before the outage, and the lost budget never turned into a fresh one.
    assert charged <= 3 * USD
    assert set(h.codes) <= {"store_unavailable", "vault_key_unknown", "cap_exhausted"}
    r = charge(kb, key["vault_key"], 100)
    assert (r.status_code, code_of(r)) == (401, "vault_key_unknown")
    assert len(fake_stripe.ledger) == h.statuses.count(200)
    # A freshly issued key works on the same process.
    fresh = kb.issue_key(daily_usd_cap=2)
    assert charge(kb, fresh["vault_key"], 100).status_code == 200
    assert healthy(kb)


# ------------------------------------------------------------------------------- kill -9


def test_kill_9_under_load_then_restart_is_consistent(
    keybrake_factory: Any, fake_stripe: FakeStripe
) -> None:
    kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe})
    key = kb.issue_key(daily_usd_cap=500)
    vk = key["vault_key"]
    first = charge(kb, vk, 700, idem="reliability-idem-1")
    assert first.status_code == 200, first.text
    fake_stripe.delay_seconds = 0.3
    with Hammer(kb, vk, threads=4) as h:
        wait_for(lambda: len(fake_stripe.ledger) >= 8, 30, "load on the vendor")
        assert kb.stop(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(1.0)  # the vendor finishes what it had started
    fake_stripe.delay_seconds = 0
    charged = fake_stripe.charged_usd_micros()

    kb2: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, data_dir=kb.data_dir)
    detail = key_detail(kb2, key["key_id"])
    spent = usd_micros(detail["spent_today_usd"])
    # Conservative: at least what the vendor charged; consistent: the crash counted once
    # (at most one $1 per client thread that was between reserve and the vendor).
    assert charged <= spent <= charged + 4 * USD, (spent, charged)
    # Every answer a client got before the crash has its audit row: it was committed to the
    # store's outbox before the answer left, and the restarted proxy moves it to the sink.
    answered = [first.json()["id"], *h.ids]
    assert len(answered) == 1 + h.statuses.count(200)

    def ok_rows() -> Counter[str]:
        return Counter(r["vendor_object_id"] for r in audit_rows(kb2) if r["outcome"] == "ok")

    wait_for(lambda: all(ok_rows()[pi] for pi in answered), 10, "a row for every answer")
    rows = audit_rows(kb2)
    assert {r["outcome"] for r in rows} == {"ok"}
    by_pi = ok_rows()
    assert [pi for pi, n in by_pi.items() if n > 1] == []
    # Rows no client saw: calls settled just before the crash whose answer was lost (at
    # most one per client thread), each a charge the vendor made.
    assert len(answered) <= len(rows) <= len(answered) + 4, (len(rows), len(answered))
    assert set(by_pi) <= {e.object_id for e in fake_stripe.ledger}
    assert len({r["event_id"] for r in rows}) == len(rows)
    # Idempotency survives the crash: the pre-crash charge replays, the vendor is not called.
    n = len(fake_stripe.ledger)
    again = charge(kb2, vk, 700, idem="reliability-idem-1")
    assert again.status_code == 200
    assert again.headers.get("X-Keybrake-Replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(fake_stripe.ledger) == n
    # And new money adds to the same ledger.
    r = charge(kb2, vk, 100)
    assert r.status_code == 200
    assert usd_micros(r.headers["X-Keybrake-Spent-Usd"]) == spent + USD


# ------------------------------------------------------------------------ vendor failures

FAULTS = ["500", "502", "reset", "garbage", "truncated", "slow"]


def _arm(fake: FakeStripe, fault: str) -> None:
    if fault in ("500", "502"):
        fake.fail_next(1, int(fault), processed=True)
    elif fault == "reset":
        fake.reset_connection_next(1, processed=True)
    elif fault == "garbage":
        fake.garbage_next(1, processed=True)
    elif fault == "truncated":
        fake.truncate_next(1, processed=True)
    elif fault == "slow":
        fake.delay_seconds = 2.5


def test_vendor_failures_keep_the_estimate_and_the_proxy_healthy(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    """Each failure shape: client gets the vendor's error or a clean 502, the $2 estimate
    stays spent, the audit row says vendor_error/unknown, and the next call works."""
    kb = keybrake_stripe
    seen: dict[str, tuple[int, str, int]] = {}
    answered: dict[str, str | None] = {}  # X-Keybrake-Error of each answer
    for fault in FAULTS:
        key = kb.issue_key(daily_usd_cap=10, agent_run_label=f"fault/{fault}")
        before = len(audit_rows(kb))
        _arm(fake_stripe, fault)
        try:
            r = charge(kb, key["vault_key"], 200, timeout=20)
            status = r.status_code
            answered[fault] = r.headers.get("X-Keybrake-Error")
        except httpx.HTTPError:
            status = -1  # the client saw the connection drop
        fake_stripe.delay_seconds = 0
        label = f"fault/{fault}"
        # Rows arrive in batches: take the first row of this fault's own key (a fresh key).
        wait_for(
            lambda label=label: any(r["label"] == label for r in audit_rows(kb)),  # type: ignore[misc]
            10,
            f"audit row for {label}",
        )
        row = next(r for r in audit_rows(kb)[before:] if r["label"] == label)
        spent = usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"])
        seen[fault] = (status, row["outcome"], spent)
        # Conservative: nothing less than what the vendor charged, and nothing invented.
        assert spent == 2 * USD, (fault, spent)
        assert healthy(kb), fault
        nxt = charge(kb, key["vault_key"], 100)
        assert nxt.status_code == 200, (fault, nxt.text)
    assert seen["500"][:2] == (500, "vendor_error")
    assert seen["502"][:2] == (502, "vendor_error")
    assert seen["slow"][:2] == (200, "ok")
    # No answer from the vendor after it got the request: 502 upstream_failed in the error
    # contract (never mitmproxy's HTML page), the estimate kept.
    for fault in ("reset", "truncated"):
        assert seen[fault][:2] == (502, "unknown"), seen
        assert answered[fault] == "upstream_failed", answered
    assert answered["502"] is None  # the vendor's own 502 passes through unchanged
    # A 200 the proxy cannot read is still a 200 from the vendor: the estimate is kept.
    assert seen["garbage"][0] == 200
    assert seen["garbage"][1] in ("ok", "vendor_error", "unknown")
    assert kb.proc is not None and kb.proc.poll() is None


def test_vendor_slower_than_the_client_keeps_the_estimate_until_it_answers(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    """The client gives up after 1 s; the vendor still charges 4 s later. The proxy never
    lets the budget drop below what the vendor charged: the $3 estimate stays spent, the
    audit row says ``unknown``, and the next call is still capped by it."""
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=5)
    fake_stripe.delay_seconds = 4
    with pytest.raises(httpx.TimeoutException):
        charge(kb, key["vault_key"], 300, timeout=1)
    rows = wait_audit(kb, 1)
    assert (rows[0]["outcome"], rows[0]["actual_micros"]) == ("unknown", 3 * USD)
    assert usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"]) == 3 * USD
    wait_for(lambda: fake_stripe.charged_usd_micros() == 3 * USD, 10, "the late vendor charge")
    fake_stripe.delay_seconds = 0
    over = charge(kb, key["vault_key"], 300)  # $3 more would pass $5: the estimate counts
    assert (over.status_code, code_of(over)) == (429, "cap_exhausted")
    assert charge(kb, key["vault_key"], 200).status_code == 200
    assert fake_stripe.charged_usd_micros() == 5 * USD
    assert usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"]) == 5 * USD
    assert healthy(kb)


# ----------------------------------------------------------------------- read-only store


def test_read_only_store_at_start_fails_closed_without_crash_loop(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    store_dir = tmp_path / "ro-store"
    store_dir.mkdir()
    subprocess.run(["chattr", "+i", str(store_dir)], check=True)
    try:
        # Started anyway (as a supervisor would): `keybrake run` otherwise stops at start.
        kb: KeybrakeProcess = keybrake_factory(
            {"stripe": fake_stripe},
            store=f"sqlite://{store_dir}/state.db",
            env={"KEYBRAKE_WAIT_FOR_STORE": "1"},
        )
        issue = kb.admin(
            "POST",
            "/vault/keys",
            {
                "vendor": "stripe",
                "daily_usd_cap": 5,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "1h",
                "agent_run_label": "reliability/ro-store",
            },
        )
        assert issue.status_code == 503, issue.text
        assert code_of(issue) == "store_unavailable"
        r = charge(kb, "kb_live_" + "A" * 43, 100)
        assert r.status_code in (401, 503), r.text
        assert httpx.get(f"{kb.admin_url}/readyz", timeout=5).status_code == 503
        time.sleep(1.0)
        assert kb.proc is not None and kb.proc.poll() is None, "the proxy must keep running"
        assert fake_stripe.ledger == []
    finally:
        subprocess.run(["chattr", "-i", str(store_dir)], check=True)
    # Fixed disk: the same process recovers.
    wait_for(lambda: healthy(kb), 10, "recovery")
    key = kb.issue_key(daily_usd_cap=5)
    assert charge(kb, key["vault_key"], 100).status_code == 200


def test_store_turning_read_only_mid_run_fails_closed_and_recovers(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=f"sqlite://{store_dir}/state.db"
    )
    key = kb.issue_key(daily_usd_cap=5)
    assert charge(kb, key["vault_key"], 100).status_code == 200
    # The shared-memory index stays writable (an immutable, mmapped -shm file would SIGBUS
    # any SQLite process); the database, its WAL and the directory become immutable.
    frozen = [str(store_dir / "state.db"), str(store_dir / "state.db-wal"), str(store_dir)]
    subprocess.run(["chattr", "+i", *frozen], check=True)
    try:
        for _ in range(3):
            r = charge(kb, key["vault_key"], 100)
            assert (r.status_code, code_of(r)) == (503, "store_unavailable"), r.text
        time.sleep(0.5)
        assert kb.proc is not None and kb.proc.poll() is None, "the proxy must keep running"
        assert len(fake_stripe.ledger) == 1
    finally:
        subprocess.run(["chattr", "-i", *frozen], check=True)
    wait_for(lambda: charge(kb, key["vault_key"], 100).status_code == 200, 10, "recovery")
    assert len(fake_stripe.ledger) == 2
    assert usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"]) == 2 * USD


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system is full; bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        while True:
            written += os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return written


def test_disk_full_fails_closed_and_recovers_without_losing_audit_rows(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """The data dir (store, audit log) lives on a small tmpfs that then fills up: every call
    is either forwarded with a durable reservation or refused 503 without reaching the
    vendor; the proxy keeps running; once space is freed the same process serves again and
    the audit rows held back while the disk was full are written."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        kb: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, data_dir=mnt / "data")
        key = kb.issue_key(daily_usd_cap=100)
        assert charge(kb, key["vault_key"], 100).status_code == 200
        wait_audit(kb, 1)
        filler = mnt / "filler"
        assert _fill(filler) > 0
        answers = [charge(kb, key["vault_key"], 100) for _ in range(40)]
        codes = Counter("ok" if r.status_code == 200 else code_of(r) for r in answers)
        assert set(codes) <= {"ok", "store_unavailable"}, codes
        assert codes["store_unavailable"] > 0, codes  # the full disk was noticed
        assert kb.proc is not None and kb.proc.poll() is None, "the proxy must keep running"
        # Forwarded calls only: one per "ok", none for a refusal.
        assert len(fake_stripe.ledger) == 1 + codes["ok"]
        filler.unlink()
        after: list[httpx.Response] = []
        deadline = time.monotonic() + 15
        while not after or after[-1].status_code != 200:
            assert time.monotonic() < deadline, "no recovery after the disk was freed"
            after.append(charge(kb, key["vault_key"], 100))
        forwarded = len(fake_stripe.ledger)
        assert forwarded == 1 + codes["ok"] + 1
        spent = usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"])
        assert spent == forwarded * USD == fake_stripe.charged_usd_micros()
        # Every answer has its audit row, including those answered while the disk was full.
        answered = 1 + len(answers) + len(after)
        rows = wait_audit(kb, answered, timeout=30)
        assert len(rows) == answered
        refused = codes["store_unavailable"] + len(after) - 1
        assert sum(r["code"] == "store_unavailable" for r in rows) == refused
        kb.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---------------------------------------------------------------------------- clock


def test_key_expiring_in_flight_completes_then_refuses(
    keybrake_stripe: KeybrakeProcess, fake_stripe: FakeStripe
) -> None:
    kb = keybrake_stripe
    key = kb.issue_key(daily_usd_cap=10, expires_in="2s")
    fake_stripe.delay_seconds = 3
    r = charge(kb, key["vault_key"], 300, timeout=20)
    fake_stripe.delay_seconds = 0
    assert r.status_code == 200, r.text
    assert r.headers["X-Keybrake-Spent-Usd"] == "3.00"
    assert fake_stripe.charged_usd_micros() == 3 * USD
    assert usd_micros(key_detail(kb, key["key_id"])["spent_today_usd"]) == 3 * USD
    late = charge(kb, key["vault_key"], 100)
    assert (late.status_code, code_of(late)) == (401, "vault_key_expired")
    assert len(fake_stripe.ledger) == 1
    rows = wait_audit(kb, 2)
    assert [r["outcome"] for r in rows[-2:]] == ["ok", "refused"]


def faketime_env(spec: str = "", *, timestamp_file: Path | None = None) -> dict[str, str]:
    """Environment that runs a proxy on a skewed clock (Debian's libfaketime, installed by
    ``make venv``): ``"-1h"`` an offset, ``"@2030-01-01 23:59:45"`` a start that runs on; or
    the offset in ``timestamp_file`` (e.g. ``+3600.5s``), read again on every call, so a test
    can move the clock of a running proxy. Monotonic clocks stay real, so asyncio's timers
    behave."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert libs, "libfaketime is missing: apt-get install faketime (make venv does)"
    env = {
        "LD_PRELOAD": str(libs[0]),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
    if timestamp_file is not None:
        env["FAKETIME_TIMESTAMP_FILE"] = str(timestamp_file)
    else:
        env["FAKETIME"] = spec
    return env


@pytest.mark.redis
def test_replica_with_a_skewed_clock_refuses_instead_of_judging_expiry(
    keybrake_factory: Any, fake_stripe: FakeStripe, redis_prefix: str
) -> None:
    """Two replicas share Redis; one runs an hour slow. Its clock would still call an
    expired key valid, so it refuses every vendor call (503 clock_skewed) and says so on
    /readyz, while a replica a few seconds off keeps working."""
    store = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    good: KeybrakeProcess = keybrake_factory({"stripe": fake_stripe}, store=store)
    slow: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=store, env=faketime_env("-1h")
    )
    near: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, store=store, env=faketime_env("+5s")
    )
    health = httpx.get(f"{slow.admin_url}/readyz", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "clock_skewed"
    assert -3700 < health.json()["clock_skew_s"] < -3500
    assert httpx.get(f"{near.admin_url}/readyz", timeout=10).status_code == 200

    fresh = good.issue_key(daily_usd_cap=10)
    assert charge(near, fresh["vault_key"], 100).status_code == 200
    r = charge(slow, fresh["vault_key"], 100)
    assert (r.status_code, code_of(r)) == (503, "clock_skewed"), r.text
    assert "behind" in r.json()["error"]["message"]
    short = good.issue_key(daily_usd_cap=10, expires_in="2s")
    time.sleep(2.5)  # expired now, by the shared clock; not yet by the slow replica's
    r = charge(good, short["vault_key"], 100)
    assert (r.status_code, code_of(r)) == (401, "vault_key_expired")
    r = charge(slow, short["vault_key"], 100)
    assert (r.status_code, code_of(r)) == (503, "clock_skewed")
    assert len(fake_stripe.ledger) == 1  # only the near replica's call reached the vendor
    assert "refusing vendor calls: this proxy's clock is" in slow.log()


def test_utc_day_rolls_over_on_a_running_proxy(
    keybrake_factory: Any, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """The proxy's clock is set, once it runs, to 23:59:30 UTC today, then to a few seconds
    before midnight (libfaketime reads its offset from a file the test rewrites): the daily cap
    is spent before midnight, a call in flight across midnight counts on the day it was
    admitted, and the new day starts with the whole cap again. (Today's date, not a far one:
    the certificates the proxy mints on its clock must be valid on the client's.)"""
    today = dt.datetime.now(dt.UTC).date()
    tomorrow = today + dt.timedelta(days=1)
    midnight = dt.datetime.combine(tomorrow, dt.time(), dt.UTC)
    offset = tmp_path / "faketime"

    def set_clock(seconds_to_midnight: float) -> None:
        # The proxy's clock is the real one plus the offset: as far from midnight as asked, now.
        now = dt.datetime.now(dt.UTC)
        ahead = midnight - dt.timedelta(seconds=seconds_to_midnight) - now
        # Replaced whole: libfaketime reads the file on every clock call, never a half-written one.
        staged = offset.with_suffix(".new")
        staged.write_text(f"{ahead.total_seconds():+.3f}s\n")
        staged.replace(offset)

    set_clock(3600)  # while it starts, however long that takes
    kb: KeybrakeProcess = keybrake_factory(
        {"stripe": fake_stripe}, env=faketime_env(timestamp_file=offset)
    )
    set_clock(30)
    key = kb.issue_key(daily_usd_cap=3, expires_in="2h")
    assert key["expires_at"].startswith(f"{tomorrow.isoformat()}T01:59:")
    assert charge(kb, key["vault_key"], 100).status_code == 200
    set_clock(4)
    fake_stripe.delay_seconds = 8  # admitted today, answered tomorrow
    r = charge(kb, key["vault_key"], 200, timeout=60)
    fake_stripe.delay_seconds = 0
    assert r.status_code == 200, r.text
    # Tomorrow now, on the proxy's clock: the cap is whole again.
    detail = key_detail(kb, key["key_id"])
    assert detail["spent_today_usd"] == "0.00", detail
    for _ in range(3):
        assert charge(kb, key["vault_key"], 100).status_code == 200
    over = charge(kb, key["vault_key"], 100)
    assert (over.status_code, code_of(over)) == (429, "cap_exhausted")
    assert key_detail(kb, key["key_id"])["spent_today_usd"] == "3.00"
    rows = [r for r in wait_audit(kb, 6) if r["outcome"] == "ok"]
    assert [r["actual_micros"] for r in rows] == [USD, 2 * USD, USD, USD, USD]
    # Audit rows are stamped when the answer came: the slow call's is tomorrow's.
    assert [r["ts"][:10] for r in rows] == [today.isoformat()] + [tomorrow.isoformat()] * 4
    assert fake_stripe.charged_usd_micros() == 6 * USD
