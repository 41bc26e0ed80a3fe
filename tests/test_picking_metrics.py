"""Pick scoring: one-to-one matching, PR/F1, average precision, centres from disk label masks."""

import numpy as np
import pytest

from napari_warp.core.picking.metrics import (
    PickScore,
    average_precision,
    centres_from_disk_mask,
    inside_border,
    match_picks,
    precision_recall,
    score_picks,
)


def test_match_empty_inputs():
    for p, t in [([], []), ([[1, 2]], []), ([], [[1, 2]]), ([[0, 0]], [[50, 50]])]:
        pairs, d = match_picks(p, t, 5)
        assert pairs.shape == (0, 2) and d.shape == (0,)
    s = score_picks([], [[1, 1]], 5)
    assert (s.true_positives, s.false_positives, s.false_negatives, s.precision, s.recall, s.f1) == (0, 0, 1, 1, 0, 0)


def test_match_one_to_one_two_picks_one_truth():
    pairs, d = match_picks([[10, 10], [11, 10]], [[10.5, 10]], radius=3)
    assert len(pairs) == 1 and d[0] == pytest.approx(0.5)
    s = score_picks([[10, 10], [11, 10]], [[10.5, 10]], 3)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (1, 1, 0)
    assert s.precision == 0.5 and s.recall == 1 and s.f1 == pytest.approx(2 / 3)


def test_match_maximises_count_before_distance():
    # greedy-by-distance would pair pick 0 with truth 1 (distance 0.5) and leave truth 0 unmatched
    picks = [[0, 1.0], [0, 2.5]]
    truth = [[0, -1.0], [0, 1.5]]
    pairs, d = match_picks(picks, truth, radius=2.0)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]
    assert d.sum() == pytest.approx(3.0)
    # exact zero distances count, radius is inclusive
    pairs, d = match_picks([[5, 5], [9, 5]], [[5, 5], [5, 5], [12, 5]], radius=3)
    assert len(pairs) == 2 and sorted(d.tolist()) == [0.0, 3.0]


def test_match_many_clusters_against_bruteforce_count():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 500, (300, 2))
    picks = np.concatenate([truth[:200] + rng.normal(0, 2, (200, 2)), rng.uniform(0, 500, (150, 2))])
    pairs, d = match_picks(picks, truth, 6)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
    assert np.all(d <= 6) and np.allclose(d, np.linalg.norm(picks[pairs[:, 0]] - truth[pairs[:, 1]], axis=1))
    assert len(pairs) >= 200


def test_score_counts_and_border():
    truth = [[10, 10], [50, 50], [90, 90], [2, 50]]
    picks = [[11, 10], [50, 52], [30, 30], [98, 50], [2, 51]]
    s = score_picks(picks, truth, 4)
    assert isinstance(s, PickScore)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (3, 2, 1)
    assert s.mean_distance == pytest.approx((1 + 2 + 1) / 3)
    # 5 px border: drops truth (2, 50), picks (98, 50) and (2, 51)
    s = score_picks(picks, truth, 4, exclude_border=5, shape=(100, 100))
    assert (s.true_positives, s.false_positives, s.false_negatives) == (2, 1, 1)
    mask = np.ones((100, 100), bool)
    mask[:, 40:] = False
    s = score_picks(picks, truth, 4, valid=mask)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (1, 1, 0)
    s = score_picks(picks, truth, 4, valid=lambda yx: yx[:, 0] > 20)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (1, 2, 1)
    assert inside_border([[4.5, 50], [4.4, 50]], (100, 100), 5).tolist() == [True, False]
    with pytest.raises(ValueError):
        score_picks(picks, truth, 4, exclude_border=5)


def test_average_precision():
    truth = np.array([[10, 10], [30, 30], [50, 50]])
    assert average_precision(truth + 1, [3, 2, 1], truth, 3) == pytest.approx(1.0)
    # a perfect list followed by misses stays 1
    assert average_precision(np.vstack([truth, [[80, 80]]]), [4, 3, 2, 1], truth, 3) == pytest.approx(1.0)
    # ranked: hit, miss, hit, miss (the last truth is never found): AP = (1/1 + 2/3) / 3 = 5/9
    picks = [[10, 11], [70, 70], [30, 29], [90, 90]]
    scores = [0.9, 0.8, 0.7, 0.6]
    assert average_precision(picks, scores, truth, 3) == pytest.approx(5 / 9)
    prec, rec, thr = precision_recall(picks, scores, truth, 3)
    assert np.allclose(prec, [1, 1 / 2, 2 / 3, 2 / 4]) and np.allclose(rec, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert np.allclose(thr, scores)
    # order comes from the scores, not the input order; a duplicate pick of a found truth is a false positive
    perm = [3, 1, 0, 2]
    assert average_precision(np.asarray(picks)[perm], np.asarray(scores)[perm], truth, 3) == pytest.approx(5 / 9)
    dup = [[10, 10], [10, 11], [30, 30], [50, 50]]  # hit, duplicate (FP), hit, hit: (1 + 2/3 + 3/4) / 3
    assert average_precision(dup, [4, 3, 2, 1], truth, 3) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert np.isnan(average_precision(picks, scores, [], 3))
    assert average_precision([], [], truth, 3) == 0.0


def _disks(shape, centres, radius, soft=True):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for cy, cx in centres:
        r = np.hypot(yy - cy, xx - cx)
        disk = np.clip(radius + 0.5 - r, 0, 1) if soft else (r <= radius).astype(float)
        img = np.maximum(img, disk)
    return np.round(img * 255).astype(np.uint8)


def test_centres_from_disk_mask_touching():
    d = 30.0
    rng = np.random.default_rng(1)
    isolated = [[40.3, 50.7], [150.0, 60.2], [60.5, 200.5]]
    touching = [[160.2, 180.4], [160.2, 180.4 + d], [160.2 + d, 180.4 + 0.3 * d]]  # a touching trio
    cut_pair = [[100.0, 100.0], [100.0 + 0.95 * d, 100.0]]  # slightly overlapping pair
    truth = np.array(isolated + touching + cut_pair) + rng.uniform(-0.3, 0.3, (8, 2))
    for soft in (True, False):
        found = centres_from_disk_mask(_disks((256, 256), truth, d / 2, soft), d)
        assert found.shape == (8, 2)
        pairs, dist = match_picks(found, truth, 3)
        assert len(pairs) == 8 and dist.max() < 1.0, dist
    # RGB input, empty mask
    rgb = np.repeat(_disks((80, 80), [[40, 40]], 10)[..., None], 3, axis=2)
    assert np.allclose(centres_from_disk_mask(rgb, 20), [[40, 40]], atol=0.5)
    assert centres_from_disk_mask(np.zeros((32, 32)), 10).shape == (0, 2)
