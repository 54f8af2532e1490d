"""Does the admin-token check leak how much of a guess is right? (a benchmark, not a test)

Times ``Runtime.admin_token_matches`` for guesses that share no prefix, half, or all but the
last character with the real token, plus shorter and longer guesses. Rounds interleave the
variants so drift hits them alike; the medians of per-round means are printed with their
ratio to the no-prefix guess. A leaking comparison (``==``) is timed alongside as a control.

    .venv/bin/python bench/admin_timing.py [--rounds 200] [--per-round 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from keybrake.proxy.core import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--per-round", type=int, default=2000)
    args = ap.parse_args()

    rt = Runtime()
    real = "kba_" + "Q" * 4000  # long, so that a prefix-dependent comparison would show
    rt.admin_token = real
    guesses = {
        "no prefix": "x" * len(real),
        "half right": real[: len(real) // 2] + "x" * (len(real) - len(real) // 2),
        "all but last": real[:-1] + "x",
        "short": "x",
        "longer": real + "x",
    }

    def naive(given: str) -> bool:
        return given == real

    for name, check in (("admin_token_matches", rt.admin_token_matches), ("== (control)", naive)):
        medians = _measure(check, guesses, args.rounds, args.per_round)
        base = medians["no prefix"]
        print(f"{name}: median ns per call over {args.rounds} rounds")
        for g, m in medians.items():
            print(f"  {g:<13} {m:9.1f} ns   x{m / base:5.2f}")


def _measure(
    check: Callable[[str], bool], guesses: dict[str, str], rounds: int, per_round: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {g: [] for g in guesses}
    for _ in range(rounds):
        for g, text in guesses.items():
            t0 = time.perf_counter_ns()
            for _ in range(per_round):
                check(text)
            samples[g].append((time.perf_counter_ns() - t0) / per_round)
    return {g: statistics.median(s) for g, s in samples.items()}


if __name__ == "__main__":
    main()
