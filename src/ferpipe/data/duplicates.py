"""Duplicate faces: finding them, describing them, and keeping them out of the scores.

FER2013 holds many faces more than once, inside a split and across splits, so part of a
test score is faces the network trained on, and a validation set carved from Training
shares faces with what is left for training. Here:

  * exact duplicates have identical 48x48 pixels (found by a hash of the pixel bytes);
  * near duplicates, when `prepare.near_duplicates` is 0 or more, have 64-bit perceptual
    hashes (the signs of the lowest 8x8 DCT frequencies against their median) that differ
    in at most that many bits: the same photo re-cropped, re-encoded or re-lit.

Duplicates join transitively (union-find) into groups; every face gets a group id, numbered
in the order the groups first appear, so a face with no copy has a group of its own.
"""
import hashlib
from itertools import combinations

import numpy as np

from ferpipe import paths
from ferpipe.constants import EMOTIONS, IMAGE_SIZE, UNLABELLED, USAGES
from ferpipe.errors import FerPipeError

OFF = -1                  # prepare.near_duplicates: exact duplicates only
TEST_USAGES = ("PublicTest", "PrivateTest")
CONFLICTS_LISTED = 20     # groups with conflicting labels listed in metrics/detail/data.json
MEMBERS_LISTED = 10       # faces listed per such group
MAX_NEAR_PAIRS = 5_000_000  # beyond this the threshold links unrelated faces (and memory runs out)
SEEN = {"test": "test_seen", "private": "private_seen"}  # splits.npz arrays, per test split


# ---------------------------------------------------------------- hashes

def pixel_digests(images):
    """A 128-bit BLAKE2b digest of each face's pixels: equal digests mean identical faces (a
    chance collision is about as likely as 2**-64 among 10**10 faces)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return np.array([hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images],
                    dtype="S16").reshape(len(images))


def _dct_rows(n, k):
    """The first k rows of the n-point DCT-II (unnormalised: only the signs matter)."""
    return np.cos(np.pi * (np.arange(n)[None, :] + 0.5) * np.arange(k)[:, None] / n)


def perceptual_hashes(images, chunk=4096):
    """64-bit pHash of each face: bit i is set where DCT coefficient i of the lowest 8x8
    frequencies is above their median. Low frequencies survive small shifts, crops,
    compression and brightness changes, so copies of one photo land a few bits apart. With
    the median as cut exactly 32 bits are set (barring ties), so distances come out even."""
    d = _dct_rows(IMAGE_SIZE, 8)
    out = np.empty(len(images), dtype=np.uint64)
    for s in range(0, len(images), chunk):  # chunks bound the float64 copy (~18 KiB a face)
        coeffs = (d @ images[s:s + chunk].astype(np.float64) @ d.T).reshape(-1, 64)
        bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
        out[s:s + chunk] = np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel()
    return out


def near_pairs(hashes, max_bits, chunk=64):
    """(i, j) with i < j for every pair of hashes at most `max_bits` bits apart. All pairs
    are compared, a block of rows at a time against the rows after it (XOR, then a
    vectorised popcount): about 2 s for 30,000 faces, and exact, unlike hash-band buckets."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    found_i, found_j, total = [], [], 0
    for s in range(0, len(hashes), chunk):
        dist = np.bitwise_count(hashes[s:s + chunk, None] ^ hashes[None, s:])
        i, j = np.nonzero(dist <= max_bits)
        keep = j > i  # each pair once, and not a face with itself
        found_i.append(i[keep] + s)
        found_j.append(j[keep] + s)
        total += int(keep.sum())
        if total > MAX_NEAR_PAIRS:
            raise FerPipeError(f"params.yaml: prepare.near_duplicates: {max_bits} bits links more "
                               f"than {MAX_NEAR_PAIRS:,} pairs of faces, so it joins faces that "
                               "are not copies; choose a smaller threshold (4 suits FER2013)")
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64)


# ---------------------------------------------------------------- groups

def _by_first_appearance(keys):
    """Dense ids 0..K-1 for `keys`, numbered in the order each key first appears."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def union_find(n, pairs_i, pairs_j):
    """The root of each of n nodes after joining every pair (i, j): connected components."""
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving keeps the trees flat
            a = parent[a]
        return a

    for a, b in zip(pairs_i.tolist(), pairs_j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(a) for a in range(n)], dtype=np.int64)


def find_groups(images, near_bits=OFF):
    """Group the faces: returns (group id per face, exact-copy id per face, info). With
    near_bits >= 0, exact copies are joined first, then distinct faces whose perceptual
    hashes are at most near_bits apart."""
    # No timings in `info`: it goes into metrics/detail/data.json, a DVC output that must
    # come out byte for byte the same when the data has not changed (the stage prints them).
    exact = _by_first_appearance(pixel_digests(images))
    info = {"near_duplicates": near_bits}
    if near_bits == OFF:
        return exact, exact, info
    # One representative per exact group: its copies add nothing but work.
    _, first = np.unique(exact, return_index=True)
    i, j = near_pairs(perceptual_hashes(images[first]), near_bits)
    group = _by_first_appearance(union_find(len(first), i, j)[exact])
    info.update(near_pairs=int(len(i)))
    return group, exact, info


# ---------------------------------------------------------------- the report

def _usage_name(code):
    return USAGES[int(code)]


def _label_name(label):
    return "unlabelled" if label == UNLABELLED else EMOTIONS[int(label)]


def member(arrays, i):
    """One face as the report lists it: its index in the data as read, id, split and label."""
    return {"index": int(i), "id": str(arrays["ids"][i]), "split": _usage_name(arrays["usage"][i]),
            "label": _label_name(arrays["labels"][i])}


def _per_group(group, arrays):
    """Faces of each usage per group (G, len(USAGES)), and each group's lowest and highest
    label among its labelled faces (unlabelled faces cannot conflict)."""
    g = int(group.max()) + 1 if len(group) else 0
    counts = np.zeros((g, len(USAGES)), dtype=np.int64)
    np.add.at(counts, (group, arrays["usage"].astype(np.int64)), 1)
    labels = arrays["labels"].astype(np.int64)
    labelled = labels != UNLABELLED
    lo = np.full(g, len(EMOTIONS), dtype=np.int64)
    hi = np.full(g, -1, dtype=np.int64)
    np.minimum.at(lo, group[labelled], labels[labelled])
    np.maximum.at(hi, group[labelled], labels[labelled])
    return counts, lo, hi


def _label_counts(arrays, faces):
    labels = arrays["labels"][faces]
    return {_label_name(k): int((labels == k).sum()) for k in np.unique(labels)}


def describe(group, arrays):
    """Counts of the duplicate groups: within each split, across each set of splits, test
    faces with a copy in Training, and the groups whose copies carry different labels."""
    counts, lo, hi = _per_group(group, arrays)
    sizes = counts.sum(1)
    present = [k for k, u in enumerate(USAGES) if counts[:, k].any()]
    spans = (counts > 0).sum(1)
    out = {
        "faces": int(len(group)),
        "distinct": int(len(sizes)),  # groups of any size: faces once every copy is merged
        "groups": int((sizes > 1).sum()),
        "faces_in_groups": int(sizes[sizes > 1].sum()),
    }
    # Within a split: groups with two or more of their faces in it (they may span others too).
    out["within"] = {USAGES[k]: {"groups": int((counts[:, k] > 1).sum()),
                                 "faces": int(counts[counts[:, k] > 1, k].sum())}
                     for k in present}
    # Across splits: groups whose faces lie in exactly these splits, so the entries add up to
    # `across_total`, the groups that span two splits or more.
    out["across"] = {}
    for r in range(2, len(present) + 1):
        for combo in combinations(present, r):
            exactly = np.zeros(len(USAGES), bool)
            exactly[list(combo)] = True
            hit = ((counts > 0) == exactly).all(1)
            out["across"]["-".join(USAGES[k] for k in combo)] = int(hit.sum())
    out["across_total"] = int((spans > 1).sum())
    train = USAGES.index("Training")
    out["test_faces_in_training"] = {
        u: int(counts[counts[:, train] > 0, USAGES.index(u)].sum())
        for u in TEST_USAGES if counts[:, USAGES.index(u)].any()}
    conflicting = np.flatnonzero(hi > lo)
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], conflicting)
    listed = []
    for g, s in zip(conflicting[:CONFLICTS_LISTED], starts[:CONFLICTS_LISTED]):
        faces = order[s:s + sizes[g]]
        listed.append({"group": int(g), "faces": int(sizes[g]),
                       "labels": _label_counts(arrays, faces),
                       "members": [member(arrays, i) for i in faces[:MEMBERS_LISTED]]})
    out["conflicting_labels"] = {"groups": int(len(conflicting)),
                                 "faces": int(sizes[conflicting].sum()), "listed": listed}
    return out


def report(group, exact, arrays, info):
    """The `duplicates` entry of metrics/detail/data.json: `exact` always; `near` (exact copies and
    near duplicates together) when near duplicates are looked for."""
    out = {**info, "exact": describe(exact, arrays)}
    if info["near_duplicates"] != OFF:
        out["near"] = describe(group, arrays)
    return out


def summary(dup):
    """The prepare stage's lines about duplicates."""
    lines = []
    for key, what in (("exact", "identical faces"), ("near", "identical or near-duplicate faces")):
        if key not in dup:
            continue
        d = dup[key]
        seen = "".join(f"; {n} {u} faces have a copy in Training"
                       for u, n in d["test_faces_in_training"].items())
        lines.append(f"prepare: {d['groups']} groups of {what} ({d['faces_in_groups']} faces; "
                     f"{d['distinct']} distinct of {d['faces']}), {d['across_total']} across "
                     f"splits{seen}; {d['conflicting_labels']['groups']} groups with "
                     "conflicting labels")
    if "near_pairs" in dup:
        lines.append(f"prepare: {dup['near_pairs']} pairs of distinct faces within "
                     f"{dup['near_duplicates']} bits of perceptual hash")
    if "dropped_from_train" in dup:
        lines.append(f"prepare: dedupe drop_from_train: {dup['dropped_from_train']} Training faces "
                     "with a copy in a test split left out")
    return "\n".join(lines)


# ---------------------------------------------------------------- dedupe: drop_from_train

def in_training_with_test_copy(group, usage):
    """Mask of the Training faces whose group also holds a PublicTest or PrivateTest face."""
    test = np.isin(usage, [USAGES.index(u) for u in TEST_USAGES])
    return (usage == USAGES.index("Training")) & np.isin(group, group[test])


def drop_from_train(arrays, group):
    """Leave out every Training face with a copy in a test split; returns (arrays, group,
    how many were dropped). Group ids are renumbered densely over the faces kept."""
    drop = in_training_with_test_copy(group, arrays["usage"])
    keep = ~drop
    kept = {k: v[keep] for k, v in arrays.items()}
    return kept, _by_first_appearance(group[keep]), int(drop.sum())


# ---------------------------------------------------------------- split

def group_representatives(group, idx):
    """The first face (in `idx`'s order) of each group found among the faces `idx`."""
    _, first = np.unique(group[idx], return_index=True)
    return idx[np.sort(first)]


def members_of(group, idx, chosen):
    """The faces of `idx` whose group is that of one of the faces `chosen`, sorted."""
    return np.sort(idx[np.isin(group[idx], group[chosen])])


def seen_in(group, idx, reference):
    """For each face of `idx`: does its group hold a face of `reference` (e.g. Training)?"""
    return np.isin(group[idx], group[reference])


def unseen(splits, name="test", source=paths.SPLITS):
    """Boolean mask over split `name` (test | private): the faces with no copy in Training,
    neither in its train nor its validation part. Scoring only these gives the accuracy
    without the leak: evaluate reports y[mask] beside the whole split."""
    key = SEEN[name]
    if key not in splits:
        raise FerPipeError(f"{source}: has no '{key}' array: it was written before the split "
                           "stage marked duplicate faces; run split again (dvc repro split)")
    seen = np.asarray(splits[key])
    if seen.dtype != bool or seen.shape != splits[f"{name}_y"].shape:
        raise FerPipeError(f"{source}: '{key}' is {seen.dtype} of shape {seen.shape}, expected "
                           f"bool like '{name}_y' {splits[f'{name}_y'].shape}; run split again")
    return ~seen



def study(arrays, near_bits, dedupe):
    """What prepare does about duplicates: group the faces, report them, pick the example
    groups for the figure (from the data as read), and with dedupe `drop_from_train` leave
    out the Training copies of test faces. Returns (arrays, group, report entry, rows)."""
    group, exact, info = find_groups(arrays["images"], near_bits)
    dup = report(group, exact, arrays, info)
    rows = example_groups(group, exact, arrays)
    dup["dedupe"] = dedupe
    if dedupe == "drop_from_train":
        arrays, group, dup["dropped_from_train"] = drop_from_train(arrays, group)
    return arrays, group, dup, rows

# ---------------------------------------------------------------- the figure

def _caption_id(arrays, i):
    """The face's id, led by its split unless the id names it already (Training_123)."""
    ident, usage = str(arrays["ids"][i]), _usage_name(arrays["usage"][i])
    return ident if ident.startswith(usage) else f"{usage} {ident}"


def example_groups(group, exact, arrays, rows=8, per_row=8):
    """Up to `rows` groups for the figure, taken in turn from each kind (the largest first
    within a kind): across splits with conflicting labels, across splits, near (not
    identical) copies, conflicting labels within a split, the rest. Returns
    [(row title, images, captions)]."""
    counts, lo, hi = _per_group(group, arrays)
    sizes = counts.sum(1)
    multi = np.flatnonzero(sizes > 1)
    if not len(multi):
        return []
    # Exact-copy ids per group: more than one means its faces are not all identical.
    variants = np.zeros(len(sizes), dtype=np.int64)
    np.add.at(variants, np.unique(np.stack([group, exact], 1), axis=0)[:, 0], 1)
    across = (counts[multi] > 0).sum(1) > 1
    conflict = hi[multi] > lo[multi]
    near = variants[multi] > 1
    kinds = [across & conflict, across & ~conflict, near & ~across, conflict & ~across & ~near]
    kinds.append(~np.any(kinds, axis=0))
    queues = [list(multi[k][np.argsort(-sizes[multi[k]], kind="stable")]) for k in kinds]
    chosen = []
    while len(chosen) < rows and any(queues):
        for q in queues:
            if q and len(chosen) < rows:
                chosen.append(q.pop(0))
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], chosen)
    out = []
    for g, s in zip(chosen, starts):
        members = order[s:s + sizes[g]]
        # Each split-and-label pair shown first, so a row shows its conflicts when it has any.
        _, first = np.unique(arrays["usage"][members].astype(np.int64) * 16
                             + arrays["labels"][members] + 1,
                             return_index=True)
        first = np.sort(first)
        faces = np.concatenate([members[first], np.delete(members, first)])[:per_row]
        splits = " + ".join(USAGES[k] for k in np.flatnonzero(counts[g]))
        title = (f"group {g}: {sizes[g]} faces, {'near copies' if variants[g] > 1 else 'identical'}"
                 f", {splits}{', labels differ' if hi[g] > lo[g] else ''}")
        captions = [f"{_caption_id(arrays, i)}\n{_label_name(arrays['labels'][i])}" for i in faces]
        out.append((title, arrays["images"][faces], captions))
    return out
