"""Duplicate faces: exact counts on crafted data, near duplicates at a threshold, groups kept
on one side of the validation split, drop_from_train, the seen-in-Training flags, and the
prepare and split stages end to end on synthetic data with planted copies."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from ferpipe import constants, files
from ferpipe.data import duplicates, split
from ferpipe.errors import FerPipeError
from ferpipe.tools import synthetic

TRAINING, PUBLIC, PRIVATE = (constants.USAGES.index(u) for u in ("Training", "PublicTest", "PrivateTest"))
BASE = synthetic.make_faces(2, seed=0)[0]  # 14 distinct faces, pHashes at least 10 bits apart

# (base face, usage, label) per row; letters name the groups the tests expect.
ROWS = [
    (0, TRAINING, 3), (0, TRAINING, 3),                       # A: twice within Training
    (1, TRAINING, 4), (1, PUBLIC, 4),                         # B: Training-PublicTest
    (2, TRAINING, 0), (2, PRIVATE, 5),                        # C: Training-PrivateTest, labels differ
    (3, TRAINING, 6), (3, PUBLIC, 6), (3, PRIVATE, 6),        # D: all three splits
    (4, PUBLIC, 1), (4, PUBLIC, 2),                           # E: within PublicTest, labels differ
    (5, PUBLIC, 3), (5, PRIVATE, 3),                          # G: PublicTest-PrivateTest
] + [(k, TRAINING, k % 7) for k in range(6, 14)]              # 8 faces with no copy


def crafted(rows=ROWS, base=BASE):
    idx, usage, labels = (np.array(c) for c in zip(*rows))
    return {"images": base[idx], "labels": labels.astype(np.int8), "usage": usage.astype(np.uint8),
            "ids": np.array([f"face{i}" for i in range(len(rows))])}


def test_exact_counts_on_crafted_data():
    arrays = crafted()
    group, exact, info = duplicates.find_groups(arrays["images"])
    np.testing.assert_array_equal(group, exact)
    # Ids in order of first appearance; a face with no copy has its own.
    np.testing.assert_array_equal(group, [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, *range(6, 14)])
    d = duplicates.describe(group, arrays)
    assert (d["faces"], d["distinct"], d["groups"], d["faces_in_groups"]) == (21, 14, 6, 13)
    assert d["within"] == {"Training": {"groups": 1, "faces": 2},
                           "PublicTest": {"groups": 1, "faces": 2},
                           "PrivateTest": {"groups": 0, "faces": 0}}
    assert d["across"] == {"Training-PublicTest": 1, "Training-PrivateTest": 1,
                           "PublicTest-PrivateTest": 1, "Training-PublicTest-PrivateTest": 1}
    assert d["across_total"] == 4
    assert d["test_faces_in_training"] == {"PublicTest": 2, "PrivateTest": 2}
    conflicts = d["conflicting_labels"]
    assert (conflicts["groups"], conflicts["faces"]) == (2, 4)
    c, e = conflicts["listed"]
    assert c["group"] == 2 and c["labels"] == {"angry": 1, "surprise": 1}
    assert c["members"] == [
        {"index": 4, "id": "face4", "split": "Training", "label": "angry"},
        {"index": 5, "id": "face5", "split": "PrivateTest", "label": "surprise"}]
    assert e["group"] == 4 and [m["index"] for m in e["members"]] == [9, 10]
    rep = duplicates.report(group, exact, arrays, info)
    assert rep["exact"] == d and "near" not in rep and rep["near_duplicates"] == -1
    json.dumps(rep)  # plain JSON types only


def test_unlabelled_faces_do_not_conflict_and_listing_is_capped(monkeypatch):
    arrays = crafted([(0, TRAINING, 3), (0, constants.USAGES.index("Unlabelled"), -1)]
                     + [(k, TRAINING, 0) for k in range(1, 14)])
    group, _, _ = duplicates.find_groups(arrays["images"])
    d = duplicates.describe(group, arrays)
    assert d["groups"] == 1 and d["conflicting_labels"]["groups"] == 0
    assert d["across"] == {"Training-Unlabelled": 1}
    # Many conflicting groups: the count is complete, the listing capped.
    monkeypatch.setattr(duplicates, "CONFLICTS_LISTED", 2)
    monkeypatch.setattr(duplicates, "MEMBERS_LISTED", 3)
    arrays = crafted([(k, TRAINING, lab) for k in range(5) for lab in range(4)])
    d = duplicates.describe(duplicates.find_groups(arrays["images"])[0], arrays)
    assert d["conflicting_labels"]["groups"] == 5 and d["conflicting_labels"]["faces"] == 20
    listed = d["conflicting_labels"]["listed"]
    assert len(listed) == 2 and all(len(g["members"]) == 3 and g["faces"] == 4 for g in listed)
    assert listed[0]["labels"] == {"angry": 1, "disgust": 1, "fear": 1, "happy": 1}


def perturbed(face):
    """The face with a small bright patch in a corner (2 bits of base face 7's pHash change)."""
    out = face.copy()
    out[:3, :3] = 255
    return out


def test_near_duplicate_found_at_threshold_not_at_zero_or_off():
    base = np.concatenate([BASE, perturbed(BASE[7])[None]])  # base face 14: 7 altered
    arrays = crafted(ROWS + [(14, PUBLIC, 3)], base)
    h = duplicates.perceptual_hashes(base)
    assert int(np.bitwise_count(h[7] ^ h[14])) == 2
    last = len(ROWS)  # the perturbed copy's row; base face 7 is on row 14
    for bits in (duplicates.OFF, 0):
        group, exact, _ = duplicates.find_groups(arrays["images"], bits)
        assert group[last] != group[14]
    group, exact, info = duplicates.find_groups(arrays["images"], 2)
    assert group[last] == group[14] and exact[last] != exact[14]
    assert info["near_pairs"] == 1 and info["near_duplicates"] == 2
    rep = duplicates.report(group, exact, arrays, info)
    assert rep["exact"]["groups"] == 6 and rep["near"]["groups"] == 7
    assert rep["near"]["across"]["Training-PublicTest"] == 2
    assert rep["near"]["test_faces_in_training"]["PublicTest"] == 3
    assert rep["near"]["conflicting_labels"]["groups"] == 3  # row 14 is 'angry', its copy 'happy'
    # The figure lists the near group as such.
    titles = [t for t, _, _ in duplicates.example_groups(group, exact, arrays)]
    assert any("near copies" in t for t in titles) and len(titles) == 7


def test_near_pairs_match_brute_force_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64)
    hashes[50] = hashes[10] ^ np.uint64(0b1011)   # 3 bits from 10
    hashes[299] = hashes[0] ^ np.uint64(1 << 40)  # 1 bit from 0, in another chunk
    i, j = duplicates.near_pairs(hashes, 20, chunk=16)
    want = {(a, b) for a in range(300) for b in range(a + 1, 300)
            if bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= 20}
    assert set(zip(i.tolist(), j.tolist())) == want and len(i) == len(want)
    i, j = duplicates.near_pairs(hashes, 3, chunk=16)
    assert set(zip(i.tolist(), j.tolist())) == {(10, 50), (0, 299)}
    monkeypatch.setattr(duplicates, "MAX_NEAR_PAIRS", 5)
    with pytest.raises(FerPipeError, match="prepare.near_duplicates: 20 bits links more than 5"):
        duplicates.near_pairs(hashes, 20, chunk=16)


def test_union_find_joins_chains():
    roots = duplicates.union_find(6, np.array([4, 1, 2]), np.array([5, 2, 4]))
    assert roots.tolist() == [0, 1, 1, 3, 1, 1]


def test_drop_from_train_removes_exactly_the_training_copies_of_test_faces():
    arrays = crafted()
    group = duplicates.find_groups(arrays["images"])[0]
    kept, kept_group, dropped = duplicates.drop_from_train(arrays, group)
    assert dropped == 3
    gone = {"face2", "face4", "face6"}  # the Training faces of B, C and D
    assert set(arrays["ids"]) - set(kept["ids"]) == gone
    assert all(len(v) == 18 for v in kept.values()) and len(kept_group) == 18
    # The copies within Training (A) stay; group ids are dense again.
    assert duplicates.describe(kept_group, kept)["within"]["Training"]["groups"] == 1
    assert sorted(set(kept_group.tolist())) == list(range(kept_group.max() + 1))
    assert duplicates.describe(kept_group, kept)["test_faces_in_training"] == {
        "PublicTest": 0, "PrivateTest": 0}


def test_split_marks_test_faces_seen_in_training():
    more = synthetic.make_faces(2, seed=5)[0]  # 14 more Training faces: enough to carve
    arrays = crafted(ROWS + [(14 + k, TRAINING, k % 7) for k in range(14)],
                     np.concatenate([BASE, more]))
    arrays["group"] = duplicates.find_groups(arrays["images"])[0]
    s = split.carve(arrays, 0.25, seed=0)
    # PublicTest rows in order: B, D, E, E, G; PrivateTest rows: C, D, G.
    assert s["test_seen"].tolist() == [True, True, False, False, False]
    assert s["private_seen"].tolist() == [True, True, False]
    assert s["test_seen"].dtype == bool
    assert duplicates.unseen(s, "test").tolist() == [False, False, True, True, True]
    assert duplicates.unseen(s, "private").tolist() == [False, False, True]
    # Without groups (a library caller's arrays) every face is distinct: nothing is seen.
    del arrays["group"]
    assert not split.carve(arrays, 0.25, seed=0)["test_seen"].any()


def test_unseen_refuses_splits_without_the_flags():
    with pytest.raises(FerPipeError, match="data/splits.npz: has no 'test_seen' array.*run split"):
        duplicates.unseen({"test_y": np.zeros(3)}, "test")
    with pytest.raises(FerPipeError, match="'private_seen' is int64"):
        duplicates.unseen({"private_y": np.zeros(3), "private_seen": np.zeros(3, int)}, "private")


def with_copies(per_class=20, copied=30, seed=0):
    """Training faces, per_class of each class, and up to two extra copies of `copied` of them."""
    images, labels = synthetic.make_faces(per_class, seed=seed)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(labels), copied, replace=False)
    extra = np.concatenate([picks, picks[: copied // 2]])
    images, labels = np.concatenate([images, images[extra]]), np.concatenate([labels, labels[extra]])
    n = len(labels)
    arrays = {"images": images, "labels": labels.astype(np.int8), "usage": np.zeros(n, np.uint8),
              "ids": np.arange(n).astype(str)}
    arrays["group"] = duplicates.find_groups(images)[0]
    return arrays


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_keeps_every_group_on_one_side_and_stays_stratified(seed):
    arrays = with_copies()
    s = split.carve(arrays, 0.2, seed=seed)
    group_of = dict(zip(arrays["ids"], arrays["group"]))
    train = {group_of[i] for i in s["train_ids"]}
    val = {group_of[i] for i in s["val_ids"]}
    assert not train & val
    assert len(s["train_ids"]) + len(s["val_ids"]) == len(arrays["ids"])
    assert set(s["train_ids"]).isdisjoint(s["val_ids"])
    # Stratified over distinct faces: 20% of each class's 20, whatever their copies.
    val_distinct = np.unique(s["val_x"].reshape(len(s["val_x"]), -1), axis=0, return_index=True)[1]
    assert (np.bincount(s["val_y"][val_distinct], minlength=7) == 4).all()
    assert s["train_x"].shape[1:] == (48, 48)


def test_split_without_duplicates_is_the_split_of_before():
    images, labels = synthetic.make_faces(20, seed=0)
    n = len(labels)
    arrays = {"images": images, "labels": labels.astype(np.int8), "usage": np.zeros(n, np.uint8),
              "ids": np.arange(n).astype(str), "group": np.arange(n)}
    s = split.carve(arrays, 0.1, seed=42)
    tr, va = train_test_split(np.arange(n), test_size=0.1, random_state=42, shuffle=True,
                              stratify=labels)
    np.testing.assert_array_equal(s["val_ids"], np.sort(va).astype(str))
    np.testing.assert_array_equal(s["train_ids"], np.sort(tr).astype(str))


def test_load_prepared_asks_for_prepare_when_group_is_missing(tmp_path):
    arrays = crafted()
    files.save_npz(tmp_path / "faces.npz", **arrays)
    with pytest.raises(FerPipeError, match=r"faces.npz: has no 'group' array.*run prepare again"):
        split.load_prepared(tmp_path / "faces.npz")
    files.save_npz(tmp_path / "faces.npz", **arrays, group=np.full(21, 99))
    with pytest.raises(FerPipeError, match=r"'group' is int64 of shape \(21,\), expected integers"):
        split.load_prepared(tmp_path / "faces.npz")
    files.save_npz(tmp_path / "faces.npz", **arrays, group=np.arange(21))
    assert split.load_prepared(tmp_path / "faces.npz")["group"].tolist() == list(range(21))


# ---------------------------------------------------------------- the stages

def plant_copies(raw):
    """Add copies to a synthetic fer2013.csv: Training row 0 into PublicTest, row 1 into
    Training again, row 2 into PublicTest under another label, PublicTest row 0 twice."""
    path = raw / "fer2013.csv"
    rows = list(csv.reader(io.StringIO(path.read_text())))
    header, body = rows[0], rows[1:]
    train = [r for r in body if r[2] == "Training"]
    test = [r for r in body if r[2] == "PublicTest"]
    other = str((int(train[2][0]) + 1) % 7)
    body += [[train[0][0], train[0][1], "PublicTest"], train[1],
             [other, train[2][1], "PublicTest"], test[0]]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + body)
    return len(train), len(test)


def test_prepare_and_split_stages_report_and_separate_duplicates(workspace):
    raw = workspace.path / "data/raw"
    synthetic.write_dataset(raw, "fer2013_csv", train_per_class=5, test_per_class=2, seed=0)
    n_train, n_test = plant_copies(raw)
    out = workspace.run("prepare").stdout
    assert "4 groups of identical faces" in out and "2 PublicTest faces have a copy in Training" in out
    rep = json.loads((workspace.path / "metrics/detail/data.json").read_text())
    d = rep["duplicates"]
    assert d["dedupe"] == "report" and "dropped_from_train" not in d
    e = d["exact"]
    assert (e["faces"], e["distinct"], e["groups"]) == (n_train + n_test + 4, n_train + n_test, 4)
    assert e["within"] == {"Training": {"groups": 1, "faces": 2},
                           "PublicTest": {"groups": 1, "faces": 2}}
    assert e["across"] == {"Training-PublicTest": 2} and e["test_faces_in_training"] == {"PublicTest": 2}
    assert e["conflicting_labels"]["groups"] == 1
    assert {m["split"] for m in e["conflicting_labels"]["listed"][0]["members"]} == {
        "Training", "PublicTest"}
    with Image.open(workspace.path / "plots/duplicates.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    prepared = split.load_prepared(workspace.path / "data/prepared/faces.npz")
    assert len(np.unique(prepared["group"])) == n_train + n_test

    out = workspace.run("split").stdout
    assert "test faces with a copy in Training: 2" in out
    with np.load(workspace.path / "data/splits.npz") as z:
        s = {k: z[k] for k in z.files}
    assert s["test_seen"].sum() == 2 and len(s["test_seen"]) == n_test + 3
    assert s["private_seen"].shape == (0,)
    group_of = dict(zip(prepared["ids"], prepared["group"]))
    assert not {group_of[i] for i in s["train_ids"]} & {group_of[i] for i in s["val_ids"]}
    counts = json.loads((workspace.path / "metrics/detail/split.json").read_text())
    assert counts["test"]["seen_in_training"] == 2
    assert counts["train"]["total"] + counts["val"]["total"] == n_train + 1

    workspace.set_params(prepare={"dedupe": "drop_from_train"})
    out = workspace.run("prepare").stdout
    assert "2 Training faces with a copy in a test split left out" in out
    rep = json.loads((workspace.path / "metrics/detail/data.json").read_text())
    assert rep["duplicates"]["dropped_from_train"] == 2
    assert rep["duplicates"]["exact"]["test_faces_in_training"] == {"PublicTest": 2}  # as read
    assert rep["counts"]["Training"]["total"] == n_train + 1 - 2 and rep["faces"] == n_train + n_test + 2
    workspace.run("split")
    with np.load(workspace.path / "data/splits.npz") as z:
        assert not z["test_seen"].any() and len(z["train_y"]) + len(z["val_y"]) == n_train - 1


def test_prepare_stage_without_duplicates_says_so_in_the_figure(workspace):
    synthetic.write_dataset(workspace.path / "data/raw", "fer2013_csv", 2, 1, seed=0)
    workspace.set_params(prepare={"near_duplicates": 0})
    workspace.run("prepare")
    d = json.loads((workspace.path / "metrics/detail/data.json").read_text())["duplicates"]
    assert d["exact"]["groups"] == 0 and d["near"]["groups"] == 0 and d["near_pairs"] == 0
    assert (workspace.path / "plots/duplicates.png").stat().st_size > 1000


def test_the_report_holds_no_timing(monkeypatch):
    """data.json is a DVC output: the same faces must give the same report however long the
    search took (here a clock that runs faster at each reading)."""
    import itertools
    import time

    ticks = itertools.accumulate(itertools.count(1))  # 1, 3, 6, 10, ...: each gap longer
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    reports = [duplicates.study(crafted(), 2, "report")[2] for _ in range(2)]
    assert reports[0] == reports[1]
    assert not [k for k in reports[0] if "second" in k or "time" in k], reports[0]


def test_prepare_and_split_twice_on_the_same_data_write_the_same_bytes(workspace):
    """Re-running prepare (a changed script, `dvc repro -f`) on unchanged data must leave
    every output of prepare and split as it was, or dvc.lock and git see a change."""
    import yaml

    synthetic.write_dataset(workspace.path / "data/raw", "fer2013_csv", 3, 1, seed=0)
    plant_copies(workspace.path / "data/raw")
    workspace.set_params(prepare={"near_duplicates": 4})
    stages = yaml.safe_load((workspace.path / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for name in ("prepare", "split") for o in stages[name]["outs"]]
    written = []
    for _ in range(2):
        workspace.run("prepare")
        workspace.run("split")
        written.append({o: (workspace.path / o).read_bytes() for o in outs})
    assert len(outs) == 6 and written[0] == written[1]


def test_evaluate_scores_the_faces_training_never_saw_apart():
    from ferpipe.evaluation import scores

    y = np.array([0, 1, 2, 3, 4, 5])
    probs = np.eye(7)[[0, 1, 2, 0, 0, 0]]          # right on the first three only
    single = np.eye(7)[[0, 0, 2, 3, 0, 0]]
    unseen = np.array([False, False, True, True, True, True])
    out = scores.leak_free(y, probs, single, unseen)
    assert out == {"unseen_faces": 4, "seen_faces": 2, "unseen_accuracy": 0.25,
                   "unseen_single_crop_accuracy": 0.5, "seen_accuracy": 1.0}
    none_seen = scores.leak_free(y, probs, single, np.ones(6, bool))
    assert none_seen["seen_faces"] == 0 and "seen_accuracy" not in none_seen
