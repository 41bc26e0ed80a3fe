"""Scoring particle picks against ground truth: one-to-one matching, precision/recall/F1, average precision.

All coordinates are ``(y, x)`` pixels (row, column of the image array), as everywhere in napari-warp.

- :func:`match_picks`: optimal one-to-one matching within a radius — the most matches, then the least total distance
  (Hungarian assignment per connected cluster of candidate pairs, so it scales to thousands of picks).
- :func:`score_picks`: TP / FP / FN, precision, recall, F1 of a pick set (optionally ignoring a border band).
- :func:`precision_recall` / :func:`average_precision`: the detection-style PR curve of scored picks (greedy matching
  in descending score order to the nearest unmatched truth, as in PASCAL VOC / COCO) and its area by step
  integration (``AP = Σ precision(k) · Δrecall(k)``, the non-interpolated form of scikit-learn's
  ``average_precision_score``).
- :func:`centres_from_disk_mask`: particle centres from a label image of filled disks (e.g. CryoPPP masks), which
  separates touching disks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = [
    "PickScore",
    "match_picks",
    "score_picks",
    "precision_recall",
    "average_precision",
    "centres_from_disk_mask",
    "inside_border",
]


def _points(yx) -> np.ndarray:
    return np.asarray(yx, dtype=np.float64).reshape(-1, 2)


def match_picks(picks_yx, truth_yx, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of picks to truth centres within ``radius`` px (inclusive).

    Maximises the number of matched pairs, then minimises their total distance (linear_sum_assignment on each
    connected cluster of pick–truth pairs closer than ``radius``; non-pairs cost more than any set of real pairs).

    Returns ``pairs`` ``(K, 2)`` int (pick index, truth index), sorted by pick index, and their ``distances`` ``(K,)``.
    """
    p, t = _points(picks_yx), _points(truth_yx)
    empty = np.zeros((0, 2), dtype=np.intp), np.zeros(0)
    if len(p) == 0 or len(t) == 0 or radius < 0:
        return empty
    d = cKDTree(p).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")  # keeps zero distances
    if len(d) == 0:
        return empty
    i, j, v = d["i"].astype(np.intp), d["j"].astype(np.intp), d["v"]
    n = len(p)
    graph = coo_matrix((np.ones(len(i)), (i, n + j)), shape=(n + len(t),) * 2)
    _, label = connected_components(graph, directed=False)
    comp = label[i]  # cluster of each candidate pair
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    pairs, dists = [], []
    for sel in np.split(order, bounds):
        ci, cj, cv = i[sel], j[sel], v[sel]
        if len(sel) == 1:
            pairs.append(np.array([[ci[0], cj[0]]])), dists.append(cv)
            continue
        ui, ri = np.unique(ci, return_inverse=True)
        uj, rj = np.unique(cj, return_inverse=True)
        big = radius * (min(len(ui), len(uj)) + 1) + 1.0  # one more match always beats any distance saving
        cost = np.full((len(ui), len(uj)), big)
        cost[ri, rj] = cv
        r, c = linear_sum_assignment(cost)
        keep = cost[r, c] < big
        pairs.append(np.stack([ui[r[keep]], uj[c[keep]]], axis=1)), dists.append(cost[r[keep], c[keep]])
    pairs_a, dist_a = np.concatenate(pairs).astype(np.intp), np.concatenate(dists)
    o = np.argsort(pairs_a[:, 0], kind="stable")
    return pairs_a[o], dist_a[o]


def inside_border(yx, shape, exclude_border: float = 0.0) -> np.ndarray:
    """Boolean ``(N,)``: points at least ``exclude_border`` px from every edge of an image of ``shape`` ``(Y, X)``.

    Pixel centres are at integer coordinates, so the image spans ``[-0.5, Y - 0.5]``; a point is kept when
    ``exclude_border - 0.5 <= y <= Y - 0.5 - exclude_border`` (and likewise for x).
    """
    yx = _points(yx)
    lo = exclude_border - 0.5
    hi = np.asarray(shape[:2], dtype=np.float64) - 0.5 - exclude_border
    return np.all((yx >= lo) & (yx <= hi), axis=1)


def _valid(yx, shape, exclude_border, valid) -> np.ndarray:
    yx = _points(yx)
    keep = np.ones(len(yx), dtype=bool)
    if exclude_border > 0:
        if shape is None:
            raise ValueError("exclude_border needs the image shape")
        keep &= inside_border(yx, shape, exclude_border)
    if valid is not None:
        if callable(valid):
            keep &= np.asarray(valid(yx), dtype=bool).reshape(len(yx))
        else:
            mask = np.asarray(valid, dtype=bool)
            ij = np.rint(yx).astype(np.intp)
            ok = np.all((ij >= 0) & (ij < mask.shape[:2]), axis=1)
            keep &= ok
            keep[ok] &= mask[ij[ok, 0], ij[ok, 1]]
    return keep


@dataclass(frozen=True)
class PickScore:
    """Counts and rates of a pick set. ``precision`` is 1 with no picks, ``recall`` is 1 with no truth, ``f1`` is 0
    when both rates are 0. ``mean_distance``: mean pick–truth distance of the true positives (px; NaN if none)."""

    true_positives: int
    false_positives: int
    false_negatives: int
    precision: float
    recall: float
    f1: float
    mean_distance: float = float("nan")


def score_picks(picks_yx, truth_yx, radius: float, *, exclude_border: float = 0.0, shape=None,
                valid=None) -> PickScore:
    """Score picks against truth centres with one-to-one matching within ``radius`` px (:func:`match_picks`).

    ``exclude_border`` (px, needs ``shape`` ``(Y, X)``): drop picks and truth closer than that to an image edge
    first. ``valid``: also keep only points where a boolean mask image is True (at the nearest pixel), or where a
    callable ``valid(yx) -> (N,) bool`` says so.
    """
    p, t = _points(picks_yx), _points(truth_yx)
    p, t = p[_valid(p, shape, exclude_border, valid)], t[_valid(t, shape, exclude_border, valid)]
    pairs, dist = match_picks(p, t, radius)
    tp = len(pairs)
    fp, fn = len(p) - tp, len(t) - tp
    precision = tp / len(p) if len(p) else 1.0
    recall = tp / len(t) if len(t) else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PickScore(tp, fp, fn, float(precision), float(recall), float(f1),
                     float(dist.mean()) if tp else float("nan"))


def precision_recall(picks_yx, scores, truth_yx, radius: float, *, exclude_border: float = 0.0, shape=None,
                     valid=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall after each pick in descending score order, and the score thresholds (all ``(N,)``).

    Detection-style matching: each pick, best score first (ties keep input order), takes the nearest still
    unmatched truth centre within ``radius`` px; otherwise it is a false positive.
    """
    p, s, t = _points(picks_yx), np.asarray(scores, dtype=np.float64).reshape(-1), _points(truth_yx)
    if len(s) != len(p):
        raise ValueError(f"{len(p)} picks but {len(s)} scores")
    keep = _valid(p, shape, exclude_border, valid)
    p, s, t = p[keep], s[keep], t[_valid(t, shape, exclude_border, valid)]
    order = np.argsort(-s, kind="stable")
    p, s = p[order], s[order]
    hit = np.zeros(len(p), dtype=bool)
    if len(p) and len(t):
        tree = cKDTree(t)
        taken = np.zeros(len(t), dtype=bool)
        for k, near in enumerate(tree.query_ball_point(p, radius)):
            if near:
                near = np.asarray(near)
                near = near[~taken[near]]
                if len(near):
                    best = near[np.argmin(np.sum((t[near] - p[k]) ** 2, axis=1))]
                    taken[best] = hit[k] = True
    tp = np.cumsum(hit)
    precision = tp / np.arange(1, len(p) + 1)
    recall = tp / len(t) if len(t) else np.ones(len(p))
    return precision, recall, s


def average_precision(picks_yx, scores, truth_yx, radius: float, *, exclude_border: float = 0.0, shape=None,
                      valid=None) -> float:
    """Area under the precision–recall curve of scored picks: ``Σ_k precision(k) · (recall(k) − recall(k−1))``.

    Uses :func:`precision_recall` (greedy matching in score order); equals 1 for a ranked list whose picks all hit
    before any miss and that finds every truth centre. NaN when there is no truth.
    """
    precision, recall, _ = precision_recall(picks_yx, scores, truth_yx, radius, exclude_border=exclude_border,
                                            shape=shape, valid=valid)
    n_truth = len(_points(truth_yx)[_valid(truth_yx, shape, exclude_border, valid)])
    if n_truth == 0:
        return float("nan")
    return float(np.sum(precision * np.diff(recall, prepend=0.0)))


def centres_from_disk_mask(mask: np.ndarray, diameter_px: float, *, refine: int = 3) -> np.ndarray:
    """Particle centres ``(N, 2)`` (y, x) px from a label image of filled disks (0/1, 0..255 grey, soft edges).

    Threshold at half the maximum, Euclidean distance transform (EDT), local maxima of the EDT in a window of
    ~0.5 · diameter that reach ≥ 0.3 · radius (flat maxima: one centre at their centroid), then maxima closer than
    0.5 · diameter are merged (larger EDT kept) — this separates touching disks. Each centre is then refined
    ``refine`` times by mean shift: the (mask-weighted) centroid of foreground pixels within one radius that are
    nearer to it than to any other centre (sub-pixel for whole disks; disks cut by the image edge are pulled
    inwards). An RGB(A) image is averaged over its colour channels.
    """
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim == 3:
        m = m[..., :3].mean(axis=-1)
    radius = diameter_px / 2
    if m.size == 0 or m.max() <= 0:
        return np.zeros((0, 2))
    fg = m >= 0.5 * m.max()
    edt = ndimage.distance_transform_edt(fg)
    size = max(3, int(round(0.5 * diameter_px)) | 1)
    peaks = (edt == ndimage.maximum_filter(edt, size=size)) & (edt >= 0.3 * radius) & fg
    lab, n = ndimage.label(peaks, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2))
    idx = np.arange(1, n + 1)
    cand = np.asarray(ndimage.center_of_mass(peaks, lab, idx)).reshape(-1, 2)
    height = ndimage.maximum(edt, lab, idx)
    # merge: strongest first, drop candidates within 0.5 diameter of a kept one
    order = np.argsort(-np.asarray(height), kind="stable")
    tree, kept, dead = cKDTree(cand), [], np.zeros(n, dtype=bool)
    for k in order:
        if not dead[k]:
            kept.append(k)
            dead[tree.query_ball_point(cand[k], 0.5 * diameter_px)] = True
    centres = cand[np.sort(kept)]
    ys, xs = np.nonzero(fg)
    pix = np.stack([ys, xs], axis=1).astype(np.float64)
    w = np.clip(m[ys, xs] / m.max(), 0, 1)
    for _ in range(refine):
        d, owner = cKDTree(centres).query(pix)
        sel = d <= radius
        tot = np.bincount(owner[sel], w[sel], minlength=len(centres))
        ok = tot > 0
        for ax in range(2):
            mean = np.bincount(owner[sel], w[sel] * pix[sel, ax], minlength=len(centres))
            centres[ok, ax] = mean[ok] / tot[ok]
    return centres
