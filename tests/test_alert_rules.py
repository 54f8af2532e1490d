"""Alert rules without a proxy: which budget nodes are checked, the exact threshold test
(integer micro-dollars, no floats), which thresholds apply to a node, the windows' ends and
the alerts file's parsing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from keybrake.proxy._alert_rules import (
    NODE_KINDS,
    AlertConfig,
    AlertConfigError,
    Node,
    crossed,
    load_alert_config,
    nodes_of,
    parse_thresholds,
    threshold_alert,
    window_end,
)
from keybrake.store import BudgetState


def test_every_budget_with_a_cap_is_a_node_and_new_kinds_plug_in_by_scope() -> None:
    budgets = [
        BudgetState("key:k1", "2030-01-01", 10_000_000, 6_000_000, 3_000_000),
        BudgetState("key-lifetime:k1", "lifetime", None, 6_000_000, 0),  # no cap: no node
        BudgetState("label:beam/run:1", "2030-01-01", 50_000_000, 1, 0),
        BudgetState("issuer:iss_1", "2030-01-01", 5, 5, 0),
        BudgetState("something-new:x", "2030-01-01", 5, 5, 0),  # unknown kind: skipped
    ]
    assert nodes_of(budgets) == [
        Node("key_day", "k1", "2030-01-01", 10_000_000, 6_000_000),
        Node("label_day", "beam/run:1", "2030-01-01", 50_000_000, 1),
        Node("issuer_day", "iss_1", "2030-01-01", 5, 5),
    ]
    # Spent, not spent + reserved (the filter's upper bound asks for the latter).
    assert nodes_of(budgets[:1], plus_reserved=True)[0].spent_micros == 9_000_000
    assert set(NODE_KINDS.values()) >= {"key_day", "key_lifetime", "label_day"}


def test_a_threshold_is_reached_exactly_at_its_micro_dollar() -> None:
    cap = 3_000_001  # 50 % of it is 1_500_000.5 micro-dollars
    assert crossed(Node("key_day", "k", "d", cap, 1_500_000), [50]) == []
    assert crossed(Node("key_day", "k", "d", cap, 1_500_001), [50]) == [50]
    assert crossed(Node("key_day", "k", "d", 10, 10), [50, 80, 100, 120]) == [50, 80, 100]
    assert crossed(Node("key_day", "k", "d", 10, 0), [1]) == []


def test_a_keys_thresholds_then_its_labels_longest_prefix_then_the_default() -> None:
    config = AlertConfig(
        default=(50, 100),
        by_label=(("beam/", (10,)), ("beam/billing/", (20, 90))),
        by_key=(("k1", (75,)),),
    )
    key_node = Node("key_day", "k1", "d", 1, 0)
    label_node = Node("label_day", "beam/billing/run", "d", 1, 0)
    assert config.thresholds_for(key_node, "beam/billing/run", "k1") == (75,)
    # The key's own thresholds are for its own nodes, not its label's.
    assert config.thresholds_for(label_node, "beam/billing/run", "k1") == (20, 90)
    assert config.thresholds_for(key_node, "beam/other", "k2") == (10,)
    assert config.thresholds_for(key_node, "dramatiq/x", "k2") == (50, 100)


def test_daily_windows_end_after_their_day_and_lifetime_ones_never() -> None:
    assert window_end("2030-01-01") == dt.datetime(2030, 1, 3, tzinfo=dt.UTC)
    assert window_end("lifetime") is None


@pytest.mark.parametrize("bad", ["", "50,x", "0", "1001", "50.5", [True], [50.0], "abc"])
def test_thresholds_are_whole_percents(bad: object) -> None:
    if bad == "":
        assert parse_thresholds(bad, "t") == ()
        return
    with pytest.raises(AlertConfigError):
        parse_thresholds(bad, "t")


def test_thresholds_are_sorted_and_unique() -> None:
    assert parse_thresholds("100, 50,80,50", "t") == (50, 80, 100)
    assert parse_thresholds([100, "80"], "t") == (80, 100)


def test_the_alerts_file(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    (tmp_path / "secret").write_text("s3cret\n")
    path.write_text(
        """
[thresholds]
default = [25, 100]
labels = { "beam/" = [90] }

[[webhooks]]
name = "ops"
url = "https://alerts.example.com/kb"
format = "json"
secret_file = "SECRET_FILE"
events = ["threshold"]

[[webhooks]]
name = "pd"
url = "https://events.pagerduty.com/v2/enqueue"
format = "pagerduty"
routing_key_env = "RK"

[delivery]
max_attempts = 3
""".replace("SECRET_FILE", str(tmp_path / "secret"))
    )
    config = load_alert_config(str(path), (50,), env={"RK": "rk-1"})
    assert config.default == (25, 100) and config.by_label == (("beam/", (90,)),)
    ops, pd = config.webhooks
    assert ops.secret == "s3cret" and ops.events == ("threshold", "test")
    assert pd.routing_key == "rk-1" and pd.secret == "" and config.max_attempts == 3
    assert config.public()["webhooks"][0]["url"] == "https://alerts.example.com/…"
    assert "s3cret" not in repr(config) and "rk-1" not in repr(config)
    assert load_alert_config("", (50, 80)).default == (50, 80)
    for text, problem in (
        ("[nope]\n", "unknown section"),
        ('[[webhooks]]\nname = "a"\nurl = "ftp://x/"\n', "https"),
        ('[[webhooks]]\nname = "a"\nurl = "https://x/"\nformat = "teams"\n', "format"),
        ('[[webhooks]]\nname = "a"\nurl = "https://x/"\nformat = "pagerduty"\n', "routing_key"),
        (
            '[[webhooks]]\nname = "a"\nurl = "https://x/"\nformat = "slack"\nevents = ["x"]\n',
            "events",
        ),
        ('[[webhooks]]\nname = "a"\nurl = "https://x/"\nformat = "slack"\nhost = 1\n', "unknown"),
        ("[thresholds]\ndefault = [0]\n", "percent"),
    ):
        path.write_text(text)
        with pytest.raises(AlertConfigError, match=problem):
            load_alert_config(str(path), (50,), env={})


def test_a_threshold_alert_says_what_and_how_much_exactly() -> None:
    alert = threshold_alert(
        Node("label_day", "beam/run", "2030-01-01", 10_000_000, 8_500_001), 80, "beam/run", "stripe"
    )
    assert alert["severity"] == "warning" and alert["threshold_percent"] == 80
    assert alert["spent_micros"] == 8_500_001 and alert["cap_micros"] == 10_000_000
    assert "label_day beam/run reached 80%" in alert["summary"]
    assert "$8.500001 of $10.00 spent" in alert["summary"]  # exact, never rounded
