"""The orchestrators' run keys (`keybrake.integrations._runkeys`, used by the Airflow and
Prefect integrations) as an attacker who names DAGs, runs or flows sees them: a crafted name
cannot put a run's key under another run's label or outside the issuer's prefix, a run's
end revokes that run's keys only, and a prefix the issuer token does not cover is a clear
403 before anything is issued. Real ``keybrake run`` (SQLite and Redis), real admin API."""

from __future__ import annotations

import pytest
from tests.conftest import KeybrakeProcess

from keybrake.client import Forbidden, KeybrakeClient
from keybrake.integrations._runkeys import (
    MAX_LABEL,
    RunKeySpec,
    issue_run_key,
    revoke_run_keys,
    run_label,
)

PI = "POST /v1/payment_intents"
PREFIX = "pipelines/"
SPEC = RunKeySpec(vendor="stripe", daily_usd_cap="1", usd_cap="1", allowed_endpoints=[PI])

HOSTILE = [
    "../../elsewhere",
    "run/../../other-run",
    "a/b/c",
    "-leading-dash",
    "new\nline\tand\x00nul",
    "ünïcode-ɐ",
    "x" * 300,
    "",
]


def issuer_token(kb: KeybrakeProcess) -> str:
    r = kb.admin(
        "POST",
        "/vault/issuers",
        {
            "name": "orchestrator",
            "vendors": ["stripe"],
            "label_prefix": PREFIX,
            "allowed_endpoints": [PI],
            "max_daily_usd_cap": "5",
            "max_usd_cap": "5",
            "max_expires_in": "2h",
        },
    )
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


@pytest.mark.parametrize("name", HOSTILE)
def test_a_crafted_run_name_stays_one_segment_of_its_own_run(name: str) -> None:
    label = run_label(PREFIX, "airflow", "nightly", name)
    assert label.startswith(f"{PREFIX}airflow/nightly/") and len(label) <= MAX_LABEL
    assert label.count("/") == 3  # prefix / orchestrator / dag / run: no segment added
    assert ".." not in label.split("/")[:3]
    flow = run_label(PREFIX, "prefect", name, "4a127f45-1da6-4b22-99ba-fd1c32c5174d")
    assert flow.count("/") == 3 and flow.startswith(f"{PREFIX}prefect/")


def test_long_run_names_never_share_a_label() -> None:
    a = run_label(PREFIX, "airflow", "d" * 200, "run-1")
    b = run_label(PREFIX, "airflow", "d" * 200, "run-2")
    c = run_label(PREFIX, "airflow", "d" * 200, "r" * 199 + "1")
    d = run_label(PREFIX, "airflow", "d" * 200, "r" * 199 + "2")
    assert len({a, b, c, d}) == 4
    for label in (a, b, c, d):
        assert len(label) <= MAX_LABEL and label.count("/") == 3
    assert a.endswith("/run-1") and a.split("/")[2] == c.split("/")[2]  # the same DAG


def test_crafted_names_are_issued_under_the_prefix_and_revoked_by_run(
    kb: KeybrakeProcess,
) -> None:
    token = issuer_token(kb)
    with KeybrakeClient(kb.admin_url, token) as driver:
        labels = [run_label(PREFIX, "airflow", "nightly", name) for name in HOSTILE]
        keys = {label: issue_run_key(driver, SPEC, label) for label in labels}
        # A run whose label extends another's ("<run>-x", "<run>/x" is not a run label).
        target = run_label(PREFIX, "airflow", "nightly", "run")
        near = [target + "-x", target + "x", run_label(PREFIX, "airflow", "nightly2", "run")]
        mine = issue_run_key(driver, SPEC, target)
        others = [issue_run_key(driver, SPEC, label) for label in near]

        revoked = revoke_run_keys(driver, target)
        assert [k.key_id for k in revoked] == [mine.key_id]
        status = {k.key_id: k.status for k in driver.list_keys()}
        assert status[mine.key_id] == "revoked"
        assert {status[k.key_id] for k in others} == {"active"}
        assert {status[k.key_id] for k in keys.values()} == {"active"}
        assert revoke_run_keys(driver, target) == []  # again: harmless, nothing left
        for label, key in keys.items():
            assert key.agent_run_label == label and key.issuer_id is not None


def test_a_prefix_the_issuer_does_not_cover_is_refused_before_anything_is_issued(
    kb: KeybrakeProcess,
) -> None:
    token = issuer_token(kb)
    outside = run_label("elsewhere/", "prefect", "billing", "run-1")
    with KeybrakeClient(kb.admin_url, token) as driver:
        before = driver.list_keys()
        with pytest.raises(Forbidden) as refused:
            issue_run_key(driver, SPEC, outside)
        e = refused.value
        assert (e.code, e.status) == ("issuer_scope", 403)
        assert f"the issuer token may not issue the run key {outside!r}" in str(e)
        assert "agent_run_label: must be under 'pipelines/'" in str(e)
        assert token not in str(e)
        assert driver.list_keys() == before
        # Neither can a run's end reach keys outside the prefix.
        other = kb.issue_key(agent_run_label=outside)
        assert revoke_run_keys(driver, outside) == []
    assert kb.admin("GET", f"/vault/keys/{other['key_id']}").json()["status"] == "active"


def test_dollar_amounts_are_never_floats() -> None:
    with pytest.raises(TypeError):
        RunKeySpec(vendor="stripe", daily_usd_cap=1.5, allowed_endpoints=[PI])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RunKeySpec(vendor="stripe", daily_usd_cap="1", allowed_endpoints=PI)
