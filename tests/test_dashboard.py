"""The dashboard's pure parts: the spend chart's round axis (the browser tests are in e2e/)."""

from __future__ import annotations

import itertools

import pytest

from keybrake.web._charts import axis_ticks, spend_chart, tick_label

USD = 1_000_000


@pytest.mark.parametrize(
    ("peak", "ticks"),
    [
        (0, [0, USD]),
        (1, [0, 1]),
        (7_900, [0, 2_000, 4_000, 6_000, 8_000]),  # a Twilio SMS: $0.0079
        (USD, [0, USD // 5, 2 * USD // 5, 3 * USD // 5, 4 * USD // 5, USD]),
        (2_300_000, [0, USD // 2, USD, 3 * USD // 2, 2 * USD, 5 * USD // 2]),
        (20 * USD, [0, 5 * USD, 10 * USD, 15 * USD, 20 * USD]),
        (23 * USD, [0, 5 * USD, 10 * USD, 15 * USD, 20 * USD, 25 * USD]),
        (31 * USD, [0, 10 * USD, 20 * USD, 30 * USD, 40 * USD]),
        (99 * USD, [0, 20 * USD, 40 * USD, 60 * USD, 80 * USD, 100 * USD]),
        (101 * USD, [0, 50 * USD, 100 * USD, 150 * USD]),
        (4_321 * USD, [0, 1_000 * USD, 2_000 * USD, 3_000 * USD, 4_000 * USD, 5_000 * USD]),
    ],
)
def test_axis_ticks_are_round_and_cover_the_peak(peak: int, ticks: list[int]) -> None:
    assert axis_ticks(peak) == ticks


@pytest.mark.parametrize("peak", [1, 3, 7, 10, 999, 12_345, 10**6 + 1, 77 * 10**9])
def test_axis_ticks_shape(peak: int) -> None:
    ticks = axis_ticks(peak)
    step = ticks[1]
    assert ticks[0] == 0 and ticks[-1] >= peak > ticks[-2]
    assert 2 <= len(ticks) <= 6
    assert all(b - a == step for a, b in itertools.pairwise(ticks))
    assert str(step).rstrip("0") in ("1", "2", "5")


@pytest.mark.parametrize(
    ("micros", "step", "label"),
    [
        (0, 10 * USD, "0"),
        (30 * USD, 10 * USD, "30"),
        (2_000 * USD, 1_000 * USD, "2,000"),
        (0, USD // 2, "0.00"),
        (USD // 2, USD // 2, "0.50"),
        (3 * USD // 2, USD // 2, "1.50"),
        (40_000, 20_000, "0.04"),
        (6_000, 2_000, "0.006"),
        (5, 1, "0.000005"),
    ],
)
def test_tick_labels_have_the_decimals_the_step_needs(micros: int, step: int, label: str) -> None:
    assert tick_label(micros, step) == label


def test_the_chart_is_scaled_to_the_top_tick() -> None:
    buckets = ["2024-05-01T10", "2024-05-01T11"]
    rows = [
        {"label": "a", "bucket": buckets[0], "spent": 23 * USD, "calls": 2, "refusals": 0},
        {"label": "b", "bucket": buckets[1], "spent": 10 * USD, "calls": 1, "refusals": 1},
    ]
    chart = spend_chart(rows, buckets)
    assert [t["label"] for t in chart["ticks"]] == ["0", "5", "10", "15", "20", "25"]
    base = chart["chart"]["base"]
    top = chart["ticks"][-1]["y"]
    assert chart["ticks"][0]["y"] == base
    heights = [bar["h"] for bar in chart["chart"]["bars"]]
    plot = base - top
    assert heights == [pytest.approx(plot * v / 25, abs=0.1) for v in (23, 10)]


def test_the_refresh_interval_is_an_option_written_into_every_page() -> None:
    """``keybrake_dashboard_refresh`` (seconds) reaches the page as ``data-refresh-ms``, which
    dashboard.js polls at; out of range it stops the start."""
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    from keybrake.proxy.core import Runtime
    from keybrake.web.dashboard import Dashboard

    def refresh_ms(dash: Dashboard) -> str:
        page = dash._page("login.html", {"error": None}).get_text() or ""
        return page.split('data-refresh-ms="', 1)[1].split('"', 1)[0]

    dash = Dashboard(Runtime())
    with taddons.context(dash) as tctx:
        assert refresh_ms(dash) == "5000"
        tctx.configure(dash, keybrake_dashboard_refresh=2)
        assert refresh_ms(dash) == "2000"
        for bad in (0, 3601):
            with pytest.raises(exceptions.OptionsError, match="give 1 to 3600 seconds"):
                tctx.configure(dash, keybrake_dashboard_refresh=bad)
        assert refresh_ms(dash) == "2000"
