"""Budget trees on every backend: on a Redis Cluster each tree (a key and its label) lives under
one of 16 hash tags, so several labels share a tag and labels are the operator's text, braces
included. Neither may merge, split or escape a budget: each label and each key keeps its own."""

from __future__ import annotations

import datetime as dt

from tests.store.conftest import USD, make_key

from keybrake.store import AdmissionRequest, Store

NOON = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
# Labels that look like hash tags, or like the store's own (``{t0}``), or would end one early.
BRACED = ["{t0}", "t0", "}{t0", "a}b", "{", "}", "{}", "x{t3}y", "keybrake:{t3}usage"]


def paid(key_id: str, rid: str, micros: int) -> AdmissionRequest:
    return AdmissionRequest(key_id, NOON, reservation_id=rid, estimate_micros=micros)


async def test_more_labels_than_tags_keep_their_own_caps(store: Store) -> None:
    labels = [f"team-{i}" for i in range(24)] + BRACED  # more than 16: tags are shared
    for i, label in enumerate(labels):
        await store.create_key(make_key(f"kb_{i}", label=label, daily=10 * USD))
        await store.set_label_budget(label, 2 * USD)
    for i in range(len(labels)):
        assert (await store.admit(paid(f"kb_{i}", f"res_{i}_a", 2 * USD))).status == "admitted"
    for i in range(len(labels)):
        refused = await store.admit(paid(f"kb_{i}", f"res_{i}_b", 1))
        assert (refused.status, refused.code) == ("refused", "cap_exhausted"), labels[i]
        assert refused.exceeded is not None and refused.exceeded.scope == f"label:{labels[i]}"
    for label in labels:
        assert await store.get_label_budget(label) == 2 * USD


async def test_keys_of_one_label_share_its_cap_whatever_their_ids(store: Store) -> None:
    label = "}{t0"
    ids = ["kb_{t0}", "kb_}", "kb_plain", "kb_{t10}x"]
    for key_id in ids:
        await store.create_key(make_key(key_id, label=label, daily=10 * USD))
    await store.set_label_budget(label, 3 * USD)
    results = [await store.admit(paid(k, f"res_{n}", USD)) for n, k in enumerate(ids)]
    assert [r.status for r in results] == ["admitted"] * 3 + ["refused"]
    assert results[-1].code == "cap_exhausted"
    for key_id in ids:
        key = await store.get_key(key_id)
        assert key is not None and key.agent_run_label == label
    listed = {k.key_id for k in await store.list_keys()}
    assert set(ids) <= listed
