"""What one vendor call costs the proxy process, in instructions and system calls: the ratio to
bare mitmproxy that `bench/run.py` measures in CPU seconds, as a figure this noisy VM repeats.

    make proxy-cost                                    # = .venv/bin/python bench/proxy_cost.py
    .venv/bin/python bench/proxy_cost.py --baseline /tmp/old/addon   # another checkout too
    .venv/bin/python bench/proxy_cost.py --skip-redis --n 200

On a shared 2-vCPU VM `bench/run.py`'s CPU ratio (bare mitmdump's CPU per call over
Keybrake's) moves by ±0.05 from one run to the next, and bare mitmdump's own CPU per call by
up to 1.8x between sessions: the neighbours change the cost of every instruction. This starts
the processes `bench/run.py` starts (the HTTPS stand-in for ``api.stripe.com``, bare mitmdump
doing the same forwarding, ``keybrake run`` on SQLite and on Redis, the same policies and
key), each proxy under ``valgrind --tool=callgrind --instr-atstart=no`` (it starts and warms
up at valgrind's uninstrumented speed), and for each proxy: turns instrumentation on, sends
calls to translate the code they run, measures what it executes idle, opens a keep-alive
tunnel (a call), zeroes the counters, sends ``--n`` calls (``POST /v1/payment_intents``) one
at a time (~40 times slower under callgrind, calls in flight together would share more of
the store's batches than natively) and reads the instructions the process executed (every
thread, user mode), less the idle rate for as long. Then, with each proxy running natively
and ``--concurrency`` keep-alive clients, system calls per call (``perf stat -e
raw_syscalls:sys_enter``, every thread) and user and system CPU per call (``/proc``) over
``--syscall-calls`` calls, medians of ``--rounds``.

The instruction ratio (bare ÷ Keybrake) is what the CPU ratio would be on a dedicated core if
every user-mode instruction cost the same time; the kernel's share is not in it (the system
call column is there for that). Needs ``valgrind`` and, for system calls, ``perf`` (Debian).
Not part of ``make test``: figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "addon"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.load import Connection, throughput  # noqa: E402
from bench.redis_cost import callgrind_control, dumped_total  # noqa: E402
from bench.run import Bench, Target, machine, user_sys_ticks, workdir  # noqa: E402

UPSTREAM = "upstream"
PERF_STAT = ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter"]


class ValgrindBench(Bench):
    """`bench/run.py`'s processes, every proxy under callgrind with instrumentation off."""

    startup_timeout = 600.0

    def spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        if name != UPSTREAM:
            cmd = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={self.out_file(name)}",
                *cmd,
            ]
        return super().spawn(name, cmd, env)

    def out_file(self, name: str) -> Path:
        return self.work / f"{name}.cg"


async def _calls(
    bench: Bench,
    target: Target,
    n: int,
    before: Callable[[], None] = lambda: None,
    concurrency: int | None = None,
) -> Counter[int]:
    """``n`` calls from ``concurrency`` (default ``--concurrency``) tunnels opened (and used
    once each) before ``before`` runs: the handshakes are not counted, as in
    `bench/run.py`'s throughput run."""
    up = ("127.0.0.1", bench.upstream_port)
    ctx = bench.ctx_for(target)
    make = bench.request_factory(target)
    conns = await asyncio.gather(
        *(
            Connection.open(target.proxy, up, ctx)
            for _ in range(concurrency or bench.args.concurrency)
        )
    )
    for conn in conns:
        await conn.send(make(0))
    before()
    counter = itertools.count()
    statuses: Counter[int] = Counter()

    async def worker(conn: Connection) -> None:
        while (i := next(counter)) < n:
            status, _ = await conn.send(make(i))
            statuses[status] += 1

    await asyncio.gather(*(worker(c) for c in conns))
    await asyncio.gather(*(c.close() for c in conns))
    return statuses


def _check(target: Target, statuses: Counter[int]) -> None:
    if set(statuses) != {200}:
        raise RuntimeError(f"{target.name}: not every call succeeded: {dict(statuses)}")


def _warm(bench: Bench, target: Target, n: int) -> None:
    """``n`` calls from ``--concurrency`` clients (connections, caches, policies warm)."""
    up = ("127.0.0.1", bench.upstream_port)
    warm = asyncio.run(
        throughput(
            target.proxy,
            up,
            bench.ctx_for(target),
            bench.request_factory(target),
            n,
            bench.args.concurrency,
        )
    )
    _check(target, warm.statuses)


def instructions(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Instructions per call of each proxy, under callgrind."""
    work.mkdir(parents=True, exist_ok=True)
    bench = ValgrindBench(args, work)
    out: dict[str, float] = {}
    try:
        targets = [t for t in bench.setup() if t.procs]
        for t in targets:
            _warm(bench, t, 100)
            pid = t.procs[0].pid
            callgrind_control(pid, "-i", "on")
            out_file = bench.out_file(t.name.replace(" ", "-"))
            _check(t, asyncio.run(_calls(bench, t, args.translate)))
            # What the process does with nothing to do (timers, periodic tasks) runs ~50 times
            # longer under callgrind than natively: measured, and taken out of the calls' count.
            time.sleep(3)  # what the calls left to do in the background (audit rows) done
            callgrind_control(pid, "-z")
            idle_from = time.monotonic()
            time.sleep(args.idle)
            idle_per_s = dumped_total(pid, out_file) / (time.monotonic() - idle_from)
            zeroed_at = [0.0]

            def zero(pid: int = pid, zeroed_at: list[float] = zeroed_at) -> None:
                callgrind_control(pid, "-z")
                zeroed_at[0] = time.monotonic()

            # One call at a time: under callgrind a proxy runs ~40 times slower, and calls in
            # flight together would share store batches natively unshared.
            statuses = asyncio.run(_calls(bench, t, args.n, before=zero, concurrency=1))
            seconds = time.monotonic() - zeroed_at[0]
            total = dumped_total(pid, out_file)
            _check(t, statuses)
            out[t.name] = (total - idle_per_s * seconds) / args.n
            print(
                f"  {t.name:<18} {out[t.name]:>12,.0f} instructions per call "
                f"({total / args.n:,.0f} before taking out {idle_per_s:,.0f}/s idle "
                f"over {seconds:.0f} s)",
                flush=True,
            )
    finally:
        bench.stop_all()
    return out


def _user_sys(target: Target) -> tuple[float, float]:
    """User and system CPU seconds of the target's proxy process so far (all threads)."""
    user, system = user_sys_ticks(Path(f"/proc/{target.procs[0].pid}/stat"))
    hz = os.sysconf("SC_CLK_TCK")
    return user / hz, system / hz


def native(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """System calls per call of each proxy, natively (``perf stat``), and its user and system
    CPU ms per call (``/proc``; these move with the machine), medians of rounds."""
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    rounds: dict[str, list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        targets = [t for t in bench.setup() if t.procs]
        for t in targets:
            _warm(bench, t, 300)
        for _ in range(args.rounds):
            for t in targets:
                perf: list[subprocess.Popen[str]] = []
                cpu_before: list[tuple[float, float]] = []

                def attach(
                    t: Target = t,
                    perf: list[subprocess.Popen[str]] = perf,
                    cpu_before: list[tuple[float, float]] = cpu_before,
                ) -> None:
                    perf.append(
                        subprocess.Popen(
                            [*PERF_STAT, "-p", str(t.procs[0].pid)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            text=True,
                        )
                    )
                    time.sleep(0.5)  # perf attached before the first counted call
                    # After the tunnels' handshakes, as the count: calls only.
                    cpu_before.append(_user_sys(t))

                statuses = asyncio.run(_calls(bench, t, args.syscall_calls, before=attach))
                cpu_after = _user_sys(t)
                _check(t, statuses)
                perf[0].send_signal(signal.SIGINT)
                for i, kind in enumerate(("user", "sys")):
                    per_call = 1000 * (cpu_after[i] - cpu_before[0][i]) / args.syscall_calls
                    cpu.setdefault((t.name, kind), []).append(per_call)
                _, err = perf[0].communicate(timeout=30)
                counted = [
                    line.split(",")[0]
                    for line in err.splitlines()
                    if "raw_syscalls:sys_enter" in line
                ]
                if not counted or not counted[0].isdigit():
                    raise RuntimeError(f"perf stat counted nothing: {err[-500:]}")
                rounds.setdefault(t.name, []).append(int(counted[0]) / args.syscall_calls)
    finally:
        bench.stop_all()
    # The idle process's own calls while perf is attached (a timer, a poll) are in the count:
    # a few per second against hundreds of calls per second.
    return (
        {name: statistics.median(v) for name, v in rounds.items()},
        {k: statistics.median(v) for k, v in cpu.items()},
    )


def report(
    instr: dict[str, float], sys_calls: dict[str, float], cpu: dict[tuple[str, str], float]
) -> list[str]:
    bare = instr.get("bare mitmdump")
    lines = [
        f"{'proxy':<18}{'instructions/call':>19}{'bare ÷':>9}{'syscalls/call':>15}"
        f"{'user ms':>9}{'sys ms':>8}",
    ]
    for name, count in instr.items():
        ratio = f"{bare / count:.2f}" if bare else "-"
        calls = f"{sys_calls[name]:.1f}" if name in sys_calls else "-"
        user = f"{cpu[name, 'user']:.2f}" if (name, "user") in cpu else "-"
        system = f"{cpu[name, 'sys']:.2f}" if (name, "sys") in cpu else "-"
        lines.append(f"{name:<18}{count:>19,.0f}{ratio:>9}{calls:>15}{user:>9}{system:>8}")
    lines.append(
        "(instructions: user mode, every thread of the proxy process, under callgrind; bare ÷: "
        "bare mitmdump's over this one's, the CPU ratio on a dedicated core if every "
        "instruction cost the same and the kernel nothing; syscalls, user and sys CPU per call: "
        "natively, perf stat and /proc, medians of rounds)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="calls counted per proxy")
    ap.add_argument("--translate", type=int, default=100, help="calls before counting")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds the idle cost is measured")
    ap.add_argument("--concurrency", type=int, default=16, help="keep-alive clients")
    ap.add_argument("--syscall-calls", type=int, default=2000, help="calls per syscall round")
    ap.add_argument("--rounds", type=int, default=3, help="syscall rounds (median)")
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--skip-syscalls", action="store_true")
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="ADDON_DIR",
        help="also measure another checkout's Keybrake (its addon/ directory)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, dumps)")
    args = ap.parse_args(argv)
    # What bench/run.py's Bench reads and this run does not vary.
    args.idempotency_keys = False
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}; Python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}"
    )
    print(
        f"{args.n} calls counted per proxy one at a time; natively {args.syscall_calls} calls "
        f"from {args.concurrency} keep-alive clients x {args.rounds} rounds"
    )
    with workdir(args.keep) as work:
        instr = instructions(args, work / "callgrind")
        sys_calls: dict[str, float] = {}
        cpu: dict[tuple[str, str], float] = {}
        if not args.skip_syscalls and shutil.which("perf") is not None:
            sys_calls, cpu = native(args, work / "native")
    print()
    print("\n".join(report(instr, sys_calls, cpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
