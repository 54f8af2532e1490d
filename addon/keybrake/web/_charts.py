"""The spend chart: stacked bars per label per hour or day, laid out for an inline SVG."""

from __future__ import annotations

from typing import Any

from keybrake.core.money import MICROS_PER_USD, format_usd

__all__ = ["PALETTE", "axis_ticks", "spend_chart", "tick_label"]

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")


def axis_ticks(peak: int, most: int = 5) -> list[int]:
    """Round ticks for an axis from 0 to at least ``peak`` micro-USD, at most ``most`` steps.

    A step is 1, 2 or 5 times a power of ten (of micro-USD), the smallest that covers
    ``peak`` in ``most`` steps; an empty chart gets one step of $1.

    >>> [t / 1_000_000 for t in axis_ticks(31_000_000)]
    [0.0, 10.0, 20.0, 30.0, 40.0]
    >>> [t / 1_000_000 for t in axis_ticks(2_300_000)]
    [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    >>> axis_ticks(0)
    [0, 1000000]
    """
    if peak <= 0:
        return [0, MICROS_PER_USD]
    power = 1
    while True:
        for mantissa in (1, 2, 5):
            step = mantissa * power
            n = -(-peak // step)  # ceiling division
            if n <= most:
                return [i * step for i in range(n + 1)]
        power *= 10


def tick_label(micros: int, step: int) -> str:
    """A tick's dollar amount with the decimals its axis needs: ``10``, ``0.50``, ``0.005``.

    >>> tick_label(20_000_000, 10_000_000), tick_label(1_500_000, 500_000)
    ('20', '1.50')
    >>> tick_label(4_000, 2_000), tick_label(2_000_000_000, 1_000_000_000)
    ('0.004', '2,000')
    """
    if step % MICROS_PER_USD == 0:
        return f"{micros // MICROS_PER_USD:,}"
    decimals = 2
    while step % 10 ** (6 - decimals):
        decimals += 1
    whole, fraction = divmod(micros, MICROS_PER_USD)
    return f"{whole:,}." + f"{fraction:06d}"[:decimals]


def spend_chart(rows: list[dict[str, Any]], buckets: list[str]) -> dict[str, Any]:
    """Stacked bars of spend per label per bucket, laid out for an inline SVG.

    The top seven labels by spend get their own colour; the rest are summed as "other".
    """
    totals: dict[str, int] = {}
    for r in rows:
        label = r["label"] or "(no key)"
        totals[label] = totals.get(label, 0) + int(r["spent"] or 0)
    ranked = sorted(totals, key=lambda lbl: -totals[lbl])
    top = ranked[:7]
    series = top + (["other"] if len(ranked) > 7 else [])
    cell: dict[tuple[str, str], int] = {}
    for r in rows:
        label = r["label"] or "(no key)"
        name = label if label in top else "other"
        cell[(name, r["bucket"])] = cell.get((name, r["bucket"]), 0) + int(r["spent"] or 0)
    per_bucket = [sum(cell.get((s, b), 0) for s in series) for b in buckets]
    ticks = axis_ticks(max(per_bucket, default=0))
    ceiling = ticks[-1]
    w, h, left, bottom, top_pad = 900, 260, 70, 30, 10
    plot_h = h - bottom - top_pad
    slot = (w - left - 10) / max(1, len(buckets))
    bars = []
    for i, b in enumerate(buckets):
        y = float(h - bottom)
        for j, s in enumerate(series):
            v = cell.get((s, b), 0)
            if not v:
                continue
            bh = max(1.0, v / ceiling * plot_h)
            y -= bh
            bars.append(
                {
                    "x": round(left + i * slot + slot * 0.1, 1),
                    "y": round(y, 1),
                    "w": round(slot * 0.8, 1),
                    "h": round(bh, 1),
                    "color": PALETTE[j % len(PALETTE)],
                    "title": f"{s} {b}: ${format_usd(v)}",
                }
            )
    every = max(1, len(buckets) // 8)
    xlabels = [
        {"x": round(left + i * slot + slot / 2, 1), "label": b[11:13] + "h" if "T" in b else b[5:]}
        for i, b in enumerate(buckets)
        if i % every == 0
    ]
    legend = [
        {"label": s, "color": PALETTE[j % len(PALETTE)], "spent": totals.get(s, 0)}
        for j, s in enumerate(series)
    ]
    if "other" in series:
        legend[-1]["spent"] = sum(totals[lbl] for lbl in ranked[7:])
    per_label = [
        {
            "label": lbl,
            "spent": totals[lbl],
            "calls": sum(int(r["calls"]) for r in rows if (r["label"] or "(no key)") == lbl),
            "refusals": sum(
                int(r["refusals"] or 0) for r in rows if (r["label"] or "(no key)") == lbl
            ),
        }
        for lbl in ranked
    ]
    return {
        "chart": {"w": w, "h": h, "left": left, "base": h - bottom, "bars": bars},
        "ticks": [
            {"y": round(h - bottom - plot_h * t / ceiling, 1), "label": tick_label(t, ticks[1])}
            for t in ticks
        ],
        "xlabels": xlabels,
        "legend": legend,
        "per_label": per_label,
        "total": sum(totals.values()),
    }
