"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) of a proxy process.

    .venv/bin/python bench/pyspy_summary.py /tmp/prof/keybrake-sqlite.txt [--rate 250 --requests N]

The event-loop thread (where mitmproxy and every addon hook run, so what bounds throughput)
is reported apart from background threads (e.g. the audit writer, which mostly waits on
SQLite commits with the GIL released). For the event loop: the share of busy samples inside
Keybrake's hooks (inclusive: with everything they call, e.g. sqlite3 or redis-py), the hook
entry points, the Keybrake functions with the most inclusive time and the functions with the
most self time. With ``requests`` (calls the process served while recorded) the shares are
also given as milliseconds of event-loop time per call.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "addon" / "keybrake"
# Files at the root of every stack (the CLI that starts mitmdump) are not "Keybrake time".
_ENTRY_FILES = {"cli.py", "keybrake"}


def _keybrake_files() -> set[str]:
    names = set()
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE)
        names.add(f.name)
        names.add(str(rel))
        names.add(f"keybrake/{rel}")
    return names - _ENTRY_FILES


def _parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def _file(frame: str) -> str:
    inside = frame.rpartition(" (")[2].rstrip(")")
    return inside.rpartition(":")[0]


def _func(frame: str) -> str:
    """``VaultGuard._settle (guard.py:468)`` -> ``VaultGuard._settle (guard.py)``."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rpartition(':')[0]})"


def summarize_profile(
    path: Path, top: int = 12, rate: int = 250, requests: int | None = None
) -> list[str]:
    ours = _keybrake_files()
    stacks = _parse(path)
    loop = [(f, c) for f, c in stacks if not f[0].startswith("Thread._bootstrap")]
    background = [(f, c) for f, c in stacks if f[0].startswith("Thread._bootstrap")]
    total = sum(c for _, c in loop)
    if not total:
        return [f"{path.name}: no samples"]
    in_keybrake = 0
    hooks: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, count in loop:
        self_time[_func(frames[-1])] += count
        seen: set[str] = set()
        first = None
        for frame in frames:
            if _file(frame) in ours:
                f = _func(frame)
                first = first or f
                if f not in seen:
                    inclusive[f] += count
                    seen.add(f)
        if first is not None:
            in_keybrake += count
            hooks[first] += count

    def pct(n: int) -> str:
        share = f"{100 * n / total:5.1f}%"
        if requests:
            share += f" {1000 * n / rate / requests:6.3f} ms/call"
        return share

    busy = f"{total} busy samples"
    if requests:
        busy += f" = {1000 * total / rate / requests:.3f} ms of event-loop time per call"
    lines = [
        f"== {path.name}: event-loop thread: {busy}",
        f"   inside Keybrake hooks: {pct(in_keybrake)}",
        "-- Keybrake entry points (inclusive)",
        *(f"  {pct(n)}  {f}" for f, n in hooks.most_common(top)),
        "-- Keybrake functions (inclusive)",
        *(f"  {pct(n)}  {f}" for f, n in inclusive.most_common(top)),
        "-- self time, all code on the event loop",
        *(f"  {pct(n)}  {f}" for f, n in self_time.most_common(top)),
    ]
    if background:
        leaves: Counter[str] = Counter()
        for frames, count in background:
            leaves[_func(frames[-1])] += count
        lines.append(
            f"-- background threads: {sum(c for _, c in background)} samples "
            "(not on the event loop), top leaves:"
        )
        lines += [f"  {n:6d}  {f}" for f, n in leaves.most_common(5)]
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="+", type=Path)
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--requests", type=int)
    a = ap.parse_args()
    for p in a.profiles:
        print("\n".join(summarize_profile(p, rate=a.rate, requests=a.requests)))
