from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from fedsd.data.manifest import ManifestRow
from fedsd.data.partition import ClientPartition, Partition, PartitionError, make_partition

CLASSES = ["angry", "happy", "neutral", "sad"]


def corpus(
    n_speakers: int = 12, per_class: int = 5, skew: bool = False, unlabelled: int = 0
) -> list[ManifestRow]:
    """Synthetic manifest rows; with ``skew`` each speaker mostly expresses one class."""
    rows = []
    for s in range(n_speakers):
        for ci, c in enumerate(CLASSES):
            n = per_class * (4 if skew and ci == s % len(CLASSES) else 1) + (s % 3)
            for u in range(n):
                rows.append(
                    ManifestRow(
                        f"s{s:02d}_{c}_{u:02d}", f"s{s}/{c}{u}.wav", c, c, f"x:s{s:02d}", "x", 1.0, 16000
                    )
                )
        for u in range(unlabelled):
            rows.append(
                ManifestRow(f"s{s:02d}_unl_{u}", f"s{s}/u{u}.wav", "", "", f"x:s{s:02d}", "x", 1.0, 16000)
            )
    return rows


def all_client_utts(p: Partition) -> list[str]:
    return [u for c in p.clients for u in c.utt_ids]


def test_speaker_mode_one_client_per_speaker_and_holdout():
    rows = corpus(unlabelled=2)
    p = make_partition(rows, num_clients=None, by="speaker", test_speakers=2, server_speakers=1, seed=3)
    assert p.num_clients == 9 and len(p.test_speakers) == 2 and len(p.server_speakers) == 1
    assert all(len(c.speakers) == 1 for c in p.clients)
    client_spk = {s for c in p.clients for s in c.speakers}
    assert not client_spk & set(p.test_speakers) and not client_spk & set(p.server_speakers)
    utts = all_client_utts(p)
    assert len(utts) == len(set(utts))
    labelled_ids = {r.utt_id for r in rows if r.label}
    assert set(utts) | set(p.test_utt_ids) | set(p.server_utt_ids) == labelled_ids  # only labelled rows
    assert len(utts) + len(p.test_utt_ids) + len(p.server_utt_ids) == len(labelled_ids)
    spk_of = {r.utt_id: r.speaker for r in rows}
    assert {spk_of[u] for u in p.test_utt_ids} == set(p.test_speakers)
    assert p.label_names == CLASSES
    c0 = p.clients[0]
    assert sum(c0.class_histogram.values()) == len(c0.utt_ids) and set(c0.class_histogram) == set(CLASSES)


def test_speakers_dealt_into_balanced_clients():
    rows = corpus(n_speakers=10)
    p = make_partition(rows, num_clients=3, by="speaker", seed=0)
    sizes = [len(c.utt_ids) for c in p.clients]
    assert p.num_clients == 3 and sum(sizes) == len(rows)
    assert max(sizes) - min(sizes) <= 22  # at most one speaker's worth of imbalance
    spk = [s for c in p.clients for s in c.speakers]
    assert len(spk) == len(set(spk)) == 10


def test_deterministic_per_seed():
    rows = corpus()
    kw = dict(num_clients=4, by="dirichlet", alpha=0.3, label_fraction=0.2, test_speakers=2)
    a = make_partition(rows, seed=5, **kw).model_dump()
    b = make_partition(rows, seed=5, **kw).model_dump()
    assert a == b
    c = make_partition(rows, seed=6, **kw).model_dump()
    assert a != c


def test_labelled_sets_are_nested_and_stratified():
    rows = corpus(per_class=10)
    fracs = [0.1, 0.2, 0.5, 1.0]
    parts = [make_partition(rows, num_clients=None, label_fraction=f, test_speakers=2, seed=1) for f in fracs]
    for k in range(parts[0].num_clients):
        sets = [set(p.clients[k].labelled_utt_ids()) for p in parts]
        assert all(p.clients[k].utt_ids == parts[0].clients[k].utt_ids for p in parts)
        assert sets[0] <= sets[1] <= sets[2] <= sets[3] == set(parts[0].clients[k].utt_ids)
    c = parts[1].clients[0]
    labs = {r.utt_id: r.label for r in rows}
    got = {cls: sum(1 for u in c.labelled_utt_ids() if labs[u] == cls) for cls in CLASSES}
    assert got == {cls: int(np.ceil(0.2 * n)) for cls, n in c.class_histogram.items()}


def test_at_least_one_labelled_per_class_and_zero_fraction():
    rows = corpus()
    p = make_partition(rows, num_clients=3, by="dirichlet", alpha=0.5, label_fraction=0.01, seed=2)
    labs = {r.utt_id: r.label for r in rows}
    for c in p.clients:
        present = {cls for cls, n in c.class_histogram.items() if n}
        assert {labs[u] for u in c.labelled_utt_ids()} == present
        assert c.num_labelled == len(present)
    none = make_partition(rows, num_clients=3, by="iid", label_fraction=0.0, seed=2)
    assert all(c.num_labelled == 0 and len(c.unlabelled_utt_ids()) == len(c.utt_ids) for c in none.clients)


def _dominance(p: Partition) -> float:
    shares = [max(c.class_histogram.values()) / sum(c.class_histogram.values()) for c in p.clients]
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_skewed_and_has_no_empty_client():
    rows = corpus(n_speakers=20, per_class=5)
    skewed = make_partition(rows, num_clients=5, by="dirichlet", alpha=0.05, seed=0)
    flat = make_partition(rows, num_clients=5, by="dirichlet", alpha=1000.0, seed=0)
    assert _dominance(skewed) > 0.6 and _dominance(flat) < 0.35
    for p in (skewed, flat):
        assert all(len(c.utt_ids) >= 1 for c in p.clients)
        utts = all_client_utts(p)
        assert len(utts) == len(set(utts)) == len(rows)


def test_dirichlet_min_per_client_is_repaired():
    rows = corpus(n_speakers=4, per_class=3)
    p = make_partition(rows, num_clients=8, by="dirichlet", alpha=0.01, min_per_client=4, seed=0)
    assert min(len(c.utt_ids) for c in p.clients) >= 4
    assert len(set(all_client_utts(p))) == len(rows)


def test_dirichlet_keep_speakers():
    rows = corpus(n_speakers=16, per_class=3, skew=True)
    p = make_partition(
        rows, num_clients=4, by="dirichlet", alpha=0.1, keep_speakers=True, test_speakers=2, seed=0
    )
    spk = [s for c in p.clients for s in c.speakers]
    assert len(spk) == len(set(spk)) == 14 and all(c.speakers for c in p.clients)
    spk_of = {r.utt_id: r.speaker for r in rows}
    for c in p.clients:
        assert {spk_of[u] for u in c.utt_ids} == set(c.speakers)
    flat = make_partition(rows, num_clients=4, by="dirichlet", alpha=1000.0, keep_speakers=True, seed=0)
    assert _dominance(p) > _dominance(flat)
    few = make_partition(corpus(n_speakers=5), num_clients=5, by="dirichlet", alpha=0.01, keep_speakers=True)
    assert all(len(c.speakers) == 1 for c in few.clients)


def test_iid_deals_evenly():
    rows = corpus()
    p = make_partition(rows, num_clients=7, by="iid", seed=0)
    sizes = [len(c.utt_ids) for c in p.clients]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(rows)


def test_argument_errors():
    rows = corpus(n_speakers=4)
    with pytest.raises(PartitionError, match="speaker"):
        make_partition(rows, num_clients=None, test_speakers=3, server_speakers=1)
    with pytest.raises(PartitionError, match="need at least 5 speakers"):
        make_partition(rows, num_clients=5, by="speaker")
    with pytest.raises(PartitionError, match="needs num_clients"):
        make_partition(rows, num_clients=None, by="dirichlet")
    with pytest.raises(PartitionError, match="label_fraction"):
        make_partition(rows, num_clients=2, label_fraction=1.5)
    with pytest.raises(PartitionError, match="unknown partition mode"):
        make_partition(rows, num_clients=2, by="random")  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="no labelled rows"):
        make_partition([ManifestRow("u", "u.wav", "", "", "x:a", "x", 1.0, 16000)], num_clients=None)


def test_save_load_and_client_lookup(tmp_path):
    p = make_partition(corpus(), num_clients=3, by="speaker", label_fraction=0.5, test_speakers=1, seed=4)
    path = p.save(tmp_path / "sub" / "partition.json")
    q = Partition.load(path)
    assert q == p
    assert (
        q.client(1) is q.clients[1]
        and q.client("client-002") is q.clients[2]
        and q.client("0") is q.clients[0]
    )
    with pytest.raises(PartitionError, match="no client 'nope'"):
        q.client("nope")
    with pytest.raises(PartitionError, match="out of range"):
        q.client(3)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PartitionError, match=r"missing\.json: partition file not found"):
        Partition.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PartitionError, match=r"bad\.json: not valid JSON"):
        Partition.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"seed": 1}))
    with pytest.raises(PartitionError, match=r"wrong\.json: invalid partition at config"):
        Partition.load(wrong)


def test_model_rejects_overlap_and_leaks():
    c = ClientPartition(
        client_id="a", utt_ids=["u1"], labelled=[True], speakers=["x:s"], class_histogram={"h": 1}
    )
    with pytest.raises(ValidationError, match="both test and a"):
        Partition(config={}, seed=0, label_names=["h"], test_utt_ids=["u1"], test_speakers=[], clients=[c])
    with pytest.raises(ValidationError, match="test speaker"):
        Partition(config={}, seed=0, label_names=["h"], test_utt_ids=[], test_speakers=["x:s"], clients=[c])
    with pytest.raises(ValidationError, match="labelled mask"):
        ClientPartition(client_id="a", utt_ids=["u1"], labelled=[], speakers=[], class_histogram={})


def test_virtual_devices_parse_the_partition_and_manifest_once_per_file_version(tmp_path, monkeypatch):
    """Simulation serves thousands of virtual devices per process: their shares come from one parse per
    file version (not one per message), and a rewritten file is parsed again, never served stale."""
    import os

    from fedsd.clients import device
    from fedsd.data.manifest import ManifestError, write_manifest

    rows = corpus(n_speakers=6)
    write_manifest(rows, tmp_path / "m.csv")
    part = make_partition(rows, num_clients=3, by="speaker", label_fraction=0.5, seed=0)
    part.save(tmp_path / "p.json")
    loads = []
    real = Partition.load
    monkeypatch.setattr(Partition, "load", classmethod(lambda cls, p: loads.append(p) or real.__func__(cls, p)))
    device._parsed_partition.cache_clear()
    device._manifest_index.cache_clear()
    for pid in (0, 1, 2, 0, 1, 2):
        c = device.simulated_client(tmp_path / "p.json", pid)
        assert c == part.client(pid)
        got = device.simulated_rows(tmp_path / "m.csv", list(c.utt_ids))
        assert [r.utt_id for r in got] == list(c.utt_ids) and got[0] == next(r for r in rows if r.utt_id == c.utt_ids[0])
    assert len(loads) == 1 and device._manifest_index.cache_info().misses == 1

    other = make_partition(rows, num_clients=2, by="speaker", label_fraction=0.5, seed=1)
    other.save(tmp_path / "p.json")
    st = (tmp_path / "p.json").stat()
    os.utime(tmp_path / "p.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert device.simulated_client(tmp_path / "p.json", 1) == other.client(1)  # re-read, not stale
    assert len(loads) == 2
    with pytest.raises(ManifestError, match="m.csv: 1 utterance id"):
        device.simulated_rows(tmp_path / "m.csv", ["nope"])
