"""How long ``keybrake run`` takes to start and to stop, beside bare mitmdump, in the same run.

    .venv/bin/python bench/start_stop.py [--rounds 5] [--baseline /tmp/old/addon]

Each round starts, one after the other: bare ``mitmdump`` (a forward proxy, the same
``confdir``), ``keybrake run`` on the default SQLite store with the shipped policies, and with
``--baseline DIR`` another checkout's ``addon/`` the same way. For each: **start**, from the
process's spawn until its proxy port accepts connections (and, for Keybrake, ``/healthz``
answers); **stop**, from ``SIGTERM`` until the process has exited; **CPU**, the process's
user+system time over its whole life (``wait4``). Medians over the rounds.

A stop is what a supervisor (Kubernetes, systemd, a test suite) waits for on every rollout and
restart; the test suite starts and stops a few hundred proxies.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import BIN, STRIPE_SECRET, free_port  # noqa: E402


def _ready(port: int, healthz: str | None) -> bool:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return False
    if healthz is None:
        return True
    try:
        return httpx.get(healthz, timeout=1).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def lifecycle(
    cmd: list[str], env: dict[str, str], port: int, healthz: str | None, log: Path
) -> tuple[float, float, float]:
    """(start s, stop s, CPU s) of one process: spawned, ready, ``SIGTERM``, exited."""
    with log.open("ab") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while not _ready(port, healthz):
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        t2 = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} stopped with {proc.returncode}:\n{log.read_text()[-2000:]}")
    return t1 - t0, t2 - t1, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another checkout's addon/ directory")
    args = ap.parse_args()
    base_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    figures: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="keybrake-start-stop-") as tmp:
        work = Path(tmp)
        targets = ["bare mitmdump", "keybrake run"]
        if args.baseline is not None:
            targets.append("baseline run")
        for r in range(args.rounds):
            for name in targets:
                port = free_port()
                slug = name.replace(" ", "-")
                env = dict(base_env)
                healthz = None
                if name == "bare mitmdump":
                    cmd = [
                        str(BIN / "mitmdump"),
                        "--mode", f"regular@127.0.0.1:{port}",
                        "--set", f"confdir={work / 'certs'}",
                    ]  # fmt: skip
                else:
                    admin = free_port()
                    cmd = [
                        str(BIN / "keybrake"), "run",
                        "--proxy-port", str(port),
                        "--admin-port", str(admin),
                        "--data-dir", str(work / slug / f"data-{r}"),
                        "--policies", str(ROOT / "policies"),
                        "--certs-dir", str(work / "certs"),
                    ]  # fmt: skip
                    env["KEYBRAKE_ADMIN_TOKEN"] = f"kba_bench_{uuid.uuid4().hex}"
                    env["STRIPE_SECRET_KEY"] = STRIPE_SECRET
                    if name == "baseline run":
                        env["PYTHONPATH"] = str(args.baseline)
                    healthz = f"http://127.0.0.1:{admin}/healthz"
                got = lifecycle(cmd, env, port, healthz, work / f"{slug}.log")
                figures.setdefault(name, []).append(got)
                print(
                    f"  round {r + 1}/{args.rounds} {name:<14} start {got[0]:5.2f} s  "
                    f"stop {got[1]:5.2f} s  CPU {got[2]:5.2f} s",
                    flush=True,
                )
    print(f"medians of {args.rounds} rounds:")
    print(f"{'target':<16}{'start s':>9}{'stop s':>9}{'CPU s':>9}")
    for name, rows in figures.items():
        start, stop, cpu = (statistics.median(col) for col in zip(*rows, strict=True))
        print(f"{name:<16}{start:>9.2f}{stop:>9.2f}{cpu:>9.2f}")


if __name__ == "__main__":
    main()
