"""What one vendor call costs the Redis server, in instructions: a figure this noisy VM repeats.

    make redis-cost                                   # = .venv/bin/python bench/redis_cost.py
    .venv/bin/python bench/redis_cost.py --baseline /tmp/old/addon   # another checkout too

Redis CPU per call (`bench/fleet.py`) moves by ±20 % from one hour to the next here, more than
most changes to the scripts do. This runs a private ``redis-server`` under ``valgrind
--tool=callgrind`` (instructions, not seconds: the same count for the same work, whatever the
neighbours do) and makes the calls `bench/store_ops.py` makes, one `Store.admit` and one
`Store.settle_call` of a paid ``POST /v1/payment_intents`` with a rate limit, an object quota,
an idempotency claim, a label and an audit row, for a fresh object each, then moves the audit
rows out of the outbox as the replicas' pumps do under load (batches of `AUDIT_BATCH`). It
prints the server's instructions per admission, per settlement, per audit row moved and per
call, and the commands each call ran (``INFO commandstats``). With ``--baseline DIR`` it
measures that checkout's ``addon/`` too, on a server of its own, and prints the ratio. Needs
``valgrind`` (Debian). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Rows per batch a replica's audit pump moves under `make fleet`'s load (about 350 calls/s per
# replica, a batch every 0.1 s).
AUDIT_BATCH = 35


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def callgrind_control(pid: int, *flags: str) -> None:
    """``callgrind_control FLAGS PID``: e.g. ``-z`` (zero the counters), ``-d`` (dump them),
    ``-i on`` (start instrumenting a process started with ``--instr-atstart=no``)."""
    subprocess.run(["callgrind_control", *flags, str(pid)], capture_output=True, check=True)


def dumped_total(pid: int, out_file: Path) -> int:
    """Dump the counters of the process under callgrind (``--callgrind-out-file=out_file``)
    and return the instructions counted since they were last zeroed."""
    before = set(out_file.parent.glob(f"{out_file.name}.*"))
    callgrind_control(pid, "-d")
    deadline = time.monotonic() + 30
    while True:
        for dump in set(out_file.parent.glob(f"{out_file.name}.*")) - before:
            for line in dump.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        if time.monotonic() > deadline:
            raise RuntimeError(f"no totals in a dump of {out_file}")
        time.sleep(0.2)


class Callgrind:
    """A private redis-server under callgrind; `count` is the instructions since `zero`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={work}/cg.out",
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("redis-server under valgrind did not start")

    def zero(self) -> None:
        callgrind_control(self.proc.pid, "-z")

    def count(self) -> int:
        return dumped_total(self.proc.pid, self.work / "cg.out")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def _measure(addon: Path, n: int, work: Path) -> dict[str, object]:
    sys.path.insert(0, str(addon))
    sys.path.insert(0, str(ROOT))
    import redis

    # store_ops puts the same checkout first (this run's --addon) before it imports keybrake.
    from bench.store_ops import bench_key, paid_admission, paid_settlement
    from keybrake.store import Admission, open_store

    server = Callgrind(work)
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        store = open_store(url)
        await store.open()
        info = redis.Redis.from_url(url)
        key = bench_key()
        await store.create_key(key)
        await store.set_label_budget("bench", 10**15)
        sha = "fp" * 32

        async def admit(i: int) -> tuple[str, str, Admission]:
            rid, scope = f"res_{uuid.uuid4().hex}", f"POST /v1/payment_intents idem-{i}"
            admission = await store.admit(paid_admission(key, rid, scope, sha))
            assert admission.status == "admitted", admission
            return rid, scope, admission

        async def settle(i: int, rid: str, scope: str, admission: Admission) -> None:
            object_id = f"pi_{uuid.uuid4().hex[:24]}"
            await store.settle_call(
                paid_settlement(key, rid, scope, sha, admission, object_id, 1_000_000)
            )

        async def move_audit_rows(per_batch: int) -> int:
            """What each replica's audit pump does (`AuditPump._run`), until the outbox is
            empty: claim a batch, acknowledge it (the sink's write is not Redis's), read the
            backlog. Returns the rows moved."""
            moved = 0
            while batch := await store.audit_batch("bench", per_batch):
                await store.audit_ack([i for i, _ in batch])
                await store.audit_backlog()
                moved += len(batch)
            return moved

        for i in range(20):  # scripts loaded, TTLs set, connections open
            await settle(i, *(await admit(i)))
        await move_audit_rows(AUDIT_BATCH)
        figures: dict[str, object] = {}
        info.config_resetstat()
        server.zero()
        admitted = [await admit(1000 + i) for i in range(n)]
        figures["admit"] = server.count() / n
        server.zero()
        for i, got in enumerate(admitted):
            await settle(1000 + i, *got)
        figures["settle_call"] = server.count() / n
        server.zero()
        moved = await move_audit_rows(AUDIT_BATCH)
        figures["audit_rows"] = server.count() / moved
        stats = info.info("commandstats")
        figures["commands"] = {
            name.removeprefix("cmdstat_"): round(int(v["calls"]) / n, 2)
            for name, v in stats.items()
            if int(v["calls"]) >= n // 10 and name not in ("cmdstat_config|resetstat",)
        }
        info.close()
        await store.close()
        return figures
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="calls measured")
    ap.add_argument("--baseline", help="another checkout's addon/ directory, measured too")
    ap.add_argument("--addon", help=argparse.SUPPRESS)  # the child run's addon/
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    if args.addon:
        with tempfile.TemporaryDirectory(prefix="kb-redis-cost-") as work:
            figures = asyncio.run(_measure(Path(args.addon), args.n, Path(work)))
        print(json.dumps(figures))
        return
    runs: list[tuple[str, dict[str, object]]] = []
    for name, addon in (("baseline", args.baseline), ("this checkout", str(ROOT / "addon"))):
        if addon is None:
            continue
        out = subprocess.run(
            [sys.executable, __file__, "--addon", addon, "--n", str(args.n)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs.append((name, json.loads(out.strip().splitlines()[-1])))
    print(
        f"Redis server instructions per vendor call ({args.n} calls, callgrind; the audit row "
        f"moved in batches of {AUDIT_BATCH}, as a replica's pump does under load):"
    )

    def per_call(f: dict[str, object]) -> float:
        return sum(float(f.get(part, 0)) for part in ("admit", "settle_call", "audit_rows"))  # type: ignore[arg-type]

    for name, f in runs:
        print(
            f"  {name:14s} admit {f['admit']:>9,.0f}  settle_call {f['settle_call']:>9,.0f}"
            f"  audit row {float(f.get('audit_rows', 0)):>7,.0f}"  # type: ignore[arg-type]
            f"  per call {per_call(f):>9,.0f}"
        )
        print(f"  {'':14s} commands per call: {f['commands']}")
    if len(runs) == 2:
        print(f"  this checkout / baseline: {per_call(runs[1][1]) / per_call(runs[0][1]):.3f}")


if __name__ == "__main__":
    main()
