"""BoxNet: architecture as the paper describes it, model files, tiled inference geometry and post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_warp.core.picking import (
    BoxNet,
    BoxNetSettings,
    PickingModel,
    apply_threshold,
    calibrate_threshold,
    load_model,
    save_model,
)
from napari_warp.core.picking.infer import (
    _postprocess,
    input_to_model,
    model_to_input,
    resolve_overlaps,
    segment,
    tile_origins,
    to_model_sampling,
)
from napari_warp.core.picking.model import ResBlock, model_file_id


def test_architecture_matches_the_paper():
    net = BoxNet(width=8)
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 35  # 5×5 contracting + 4×2 expanding + 2 final ("35 ResNet blocks")
    shapes = []
    hooks = [g.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for g in net.down]
    out = net(torch.zeros(1, 1, 256, 256))
    for h in hooks:
        h.remove()
    assert out.shape == (1, 3, 256, 256)
    assert shapes == [(1, 8 * 2**g, 256 >> g, 256 >> g) for g in range(5)]  # down to 16×16, channels doubling
    assert net.stem[0].kernel_size == (5, 5) and net.head.kernel_size == (1, 1)


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PickingModel(BoxNet(width=4), name="unit", version="3", trained_on={"what": "nothing"})
    path = save_model(model, tmp_path / "m.pt")
    back = load_model(path)
    assert (back.name, back.version, back.trained_on["what"]) == ("unit", "3", "nothing")
    x = torch.randn(1, 1, 64, 64)
    model.net.eval()
    with torch.inference_mode():
        a, b = torch.softmax(model.net(x), 1), torch.softmax(back.net(x), 1)
    assert torch.allclose(a, b, atol=2e-2)  # weights are stored as float16
    assert back.label.startswith("unit v3 (") and back.digest == load_model(path).digest
    id1 = model_file_id(path)
    save_model(PickingModel(BoxNet(width=4), name="unit", version="3"), path)  # other weights, same name
    assert model_file_id(path) != id1
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(tmp_path / "nowhere.pt")


def test_model_sampling_keeps_positions():
    """A feature at a known input position is found at the mapped position after rescaling to 8 Å/px."""
    yy, xx = np.mgrid[:600, :500].astype(np.float32)
    centre = np.array([[231.0, 377.0]])
    image = np.exp(-((yy - centre[0, 0]) ** 2 + (xx - centre[0, 1]) ** 2) / (2 * 12.0**2))
    scaled = to_model_sampling(image, 2.0, 8.0, device="cpu").numpy()
    assert scaled.shape == (150, 124)  # sizes rounded to even (125 -> 124)
    peak = np.unravel_index(np.argmax(scaled), scaled.shape)
    mapped = input_to_model(centre, image.shape, scaled.shape)[0]
    assert np.all(np.abs(np.asarray(peak) - mapped) <= 0.6)
    assert np.allclose(model_to_input(mapped[None], scaled.shape, image.shape), centre)


def test_tiles_cover_with_overlap():
    for size in (256, 300, 512, 1000):
        starts = tile_origins(size, 256, 64)
        assert starts[0] == 0 and starts[-1] + 256 == max(size, 256)
        assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))


def _disk(shape, yx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - yx[0]) ** 2 + (xx - yx[1]) ** 2 <= r * r


def test_postprocess_picks_merges_and_masks():
    shape = (120, 160)
    prob = np.zeros((3, *shape), np.float32)
    prob[0] = 1
    particles = {(30, 30): 4, (30, 40): 2.5, (80, 100): 3, (90, 30): 3, (60, 140): 3}  # centre: radius (px)
    for yx, r in particles.items():
        d = _disk(shape, yx, r)
        prob[1][d], prob[0][d] = 0.99, 0.01
    prob[1][_disk(shape, (80, 100), 1)] = 1.0  # a higher peak for the score check
    prob[2][_disk(shape, (90, 5), 6)] = 0.5  # an artifact close to (90, 30)
    prob[2][_disk(shape, (10, 150), 1)] = 0.5  # a speck below the minimum area
    s = BoxNetSettings(pixel_size=2.0, diameter=8.0 * 12, threshold=0.95, mask_distance=8.0 * 20,
                       min_distance=8.0 * 12)  # the paper's rule: overlaps resolved at one diameter
    input_shape = (480, 640)  # the model grid is 4× coarser
    picks = _postprocess(prob, input_shape, 8.0, s, "oracle")
    got = input_to_model(picks.yx, input_shape, shape)
    # (30, 40) is within one diameter (12 px) of the bigger (30, 30): dropped; (90, 30) is 19 px from the mask edge
    expect = np.array([[30, 30], [60, 140], [80, 100]], float)
    order = np.lexsort((got[:, 1], got[:, 0]))
    assert np.allclose(got[order], expect, atol=1e-6)
    assert picks.mask.shape == input_shape and picks.mask.any()
    assert not picks.mask[:120, 560:].any()  # the speck was removed
    assert picks.score[order][2] == pytest.approx(1.0)
    # a hand-edited mask replaces the network's: erased, the pick near the artifact returns; painted over the pick
    # at (80, 100) (model px; ×4 in the input), that one goes instead
    unmasked = apply_threshold(picks, artifact_mask=np.zeros(input_shape, bool))
    assert len(unmasked) == 4 and not unmasked.mask.any()
    painted = np.zeros(input_shape, bool)
    painted[310:330, 390:410] = True
    repainted = input_to_model(apply_threshold(picks, artifact_mask=painted).yx, input_shape, shape)
    assert sorted(map(tuple, np.round(repainted).astype(int))) == [(30, 30), (60, 140), (90, 30)]
    with pytest.raises(ValueError, match="does not match"):
        apply_threshold(picks, artifact_mask=np.zeros((10, 10), bool))
    fewer = apply_threshold(picks, 0.995)  # only the component peaking at 1.0 survives
    assert len(fewer) == 1 and np.allclose(input_to_model(fewer.yx, input_shape, shape), [[80, 100]], atol=0.6)


def test_touching_particles_are_split_at_their_maxima():
    """Two particles 10 px apart whose softmax blobs merge into one component above the threshold become two picks at
    their centres with the default minimum distance (0.4 diameter); with the paper's one diameter, one of them stays
    (not the component's centroid between them, where there is no particle)."""
    shape = (64, 64)
    y, x = np.mgrid[:64, :64]
    centres = np.array([[32.0, 27.0], [32.0, 37.0]])
    blob = sum(np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 3.0**2)) for cy, cx in centres)
    prob = np.stack([1 - 0.9 * blob / blob.max(), 0.9 * blob / blob.max(), np.zeros(shape)]).astype(np.float32)
    assert ndimage.label(prob[1] >= 0.2)[1] == 1  # one connected component
    s = BoxNetSettings(pixel_size=8.0, diameter=8.0 * 12, threshold=0.2)
    assert s.min_distance_angstrom == pytest.approx(0.4 * 8.0 * 12)
    split = _postprocess(prob, shape, 8.0, s, "oracle")
    assert len(split) == 2
    assert np.allclose(split.yx[np.argsort(split.yx[:, 1])], centres, atol=1.0)
    merged = apply_threshold(split, min_distance=8.0 * 12)
    assert len(merged) == 1 and np.abs(centres - merged.yx).max(axis=1).min() < 1.0


def test_calibrated_threshold_separates_the_users_particles_from_weaker_blobs():
    """Particles peak at 0.6–0.8 and false blobs at 0.3–0.45: the threshold that best matches the user's picks lies
    between the two groups (F1 1); picks the user left out (an incomplete set) pull it up to drop them."""
    rng = np.random.default_rng(3)
    shape = (128, 128)
    y, x = np.mgrid[: shape[0], : shape[1]]
    centres = np.array([[20.0 + 28 * i, 20.0 + 28 * j] for i in range(4) for j in range(4)])
    rng.shuffle(centres)
    true, false = centres[:10], centres[10:]
    peaks = np.r_[rng.uniform(0.6, 0.8, 10), rng.uniform(0.3, 0.45, 6)]
    blob = np.max([p * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 2.5**2)) for (cy, cx), p
                   in zip(np.r_[true, false], peaks)], axis=0)
    prob = np.stack([1 - blob, blob, np.zeros(shape)]).astype(np.float32)
    s = BoxNetSettings(pixel_size=4.0, diameter=8.0 * 10)  # input 2× finer than the model grid
    picks = [_postprocess(prob, (256, 256), 8.0, s, "oracle")]
    threshold, f1 = calibrate_threshold(picks, [2 * true + 0.5])
    assert 0.45 <= threshold <= 0.6 and f1 == pytest.approx(1.0)
    assert len(apply_threshold(picks[0], threshold)) == 10
    # the user also picked the weak blobs: the threshold drops below them
    low, f1_all = calibrate_threshold(picks, [2 * centres + 0.5])
    assert low < 0.3 and f1_all == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one set of centres"):
        calibrate_threshold(picks, [])


def test_resolve_overlaps_keeps_bigger_component():
    yx = np.array([[0, 0], [0, 5], [0, 11], [50, 50]], float)
    kept = resolve_overlaps(yx, np.array([10, 30, 20, 1]), distance=8)
    assert kept.tolist() == [1, 3]  # 1 beats 0 and 2 (both within 8 px), 3 is alone


def test_segment_blends_tiles_consistently():
    """Tiled segmentation equals whole-image segmentation where the network sees the same context (a 1×1 net)."""

    class Pointwise(torch.nn.Module):
        factor = 1

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[0.0], [1.0], [-1.0]]))

        def forward(self, x):
            return (self.w[None, :, :, None] * x) if x.ndim == 4 else x

    model = PickingModel(Pointwise())
    image = torch.randn(300, 420)
    prob = segment(image, model, tile=128, overlap=32, batch_size=3)
    assert prob.shape == (3, 300, 420)
    assert torch.allclose(prob.sum(0), torch.ones(300, 420), atol=1e-5)
    # tiles are normalised separately, so compare ranks: the particle class follows the pixel value everywhere
    corr = np.corrcoef(prob[1].ravel().numpy(), image.ravel().numpy())[0, 1]
    assert corr > 0.9


# ---------------------------------------------------------------------------------------------------------------
# training data
# ---------------------------------------------------------------------------------------------------------------
def test_make_example_labels_disks_masks_and_ignore():
    from napari_warp.core.picking.train import ARTIFACT, IGNORE, PARTICLE, make_example

    image = np.random.default_rng(0).normal(size=(800, 640)).astype(np.float32)
    picks = np.array([[200.0, 160.0], [600.0, 480.0]])
    artifact = np.zeros(image.shape, bool)
    artifact[:100, :] = True
    ignore = np.zeros(image.shape, bool)
    ignore[700:, :100] = True
    ex = make_example(image, 2.0, picks, diameter=160.0, artifact=artifact, ignore=ignore)
    assert ex.image.shape == ex.labels.shape == (200, 160)  # 2 -> 8 Å/px
    # disks of a quarter diameter (160 Å / 8 = 20 px -> radius 5 px) around the mapped centres
    for y, x in input_to_model(picks, image.shape, ex.image.shape):
        yy, xx = np.mgrid[:200, :160]
        inside = (yy - y) ** 2 + (xx - x) ** 2 <= 4.5**2
        outside_ring = ((yy - y) ** 2 + (xx - x) ** 2 > 5.5**2) & ((yy - y) ** 2 + (xx - x) ** 2 < 8**2)
        assert np.all(ex.labels[inside] == PARTICLE) and not np.any(ex.labels[outside_ring] == PARTICLE)
    assert np.all(ex.labels[:24] == ARTIFACT) and not np.any(ex.labels[26:] == ARTIFACT)
    assert np.all(ex.labels[176:, :24] == IGNORE)


def test_augmented_windows_keep_image_and_labels_aligned():
    """Rotation, shear and flip move labels with the image: a window of an image that *is* its label map stays so."""
    from napari_warp.core.picking.train import IGNORE, TrainingExample, sample_windows

    rng = np.random.default_rng(1)
    labels = np.zeros((200, 240), np.uint8)
    yy, xx = np.mgrid[:200, :240]
    for cy, cx in rng.uniform(20, 180, size=(15, 2)):
        labels[(yy - cy) ** 2 + (xx - cx * 1.2) ** 2 < 64] = 1
    labels[150:, 200:] = 2
    ex = TrainingExample(labels.astype(np.float32), labels)
    x, y = sample_windows([ex], 12, 64, rng, augment=True, noise=0.0)
    assert x.shape == (12, 1, 64, 64) and y.shape == (12, 64, 64)
    valid = y != IGNORE
    assert valid.float().mean() > 0.5
    checked = 0
    for xi, yi, vi in zip(x[:, 0], y, valid):  # within each window, intensities order as the classes do
        med = {c: float(xi[vi & (yi == c)].median()) for c in (0, 1, 2) if (vi & (yi == c)).sum() > 20}
        order = [med[c] for c in sorted(med)]
        assert order == sorted(order), med
        checked += len(med) > 1
    assert checked >= 3
    # and pixel-wise: bilinear image vs nearest labels differ only at edges
    for xi, yi, vi in zip(x[:, 0], y, valid):
        if (yi[vi] == 1).sum() < 30:
            continue
        lo, hi = float(xi[vi & (yi == 0)].median()), float(xi[vi & (yi == 1)].median())
        pred = (xi > (lo + hi) / 2) & (xi < hi + (hi - lo) / 2)
        truth = yi == 1
        assert (pred[vi] == truth[vi]).float().mean() > 0.95


def test_holdout_bands_are_kept_out_of_training_and_used_for_early_stopping():
    """holdout: a band across each micrograph loses its labels in the training copy and becomes its own example; the
    best epoch and the new-data metrics come from the bands."""
    from napari_warp.core.picking.train import IGNORE, TrainingExample, TrainingSettings, split_holdout, train

    rng = np.random.default_rng(0)
    image = rng.normal(size=(100, 160)).astype(np.float32)
    labels = rng.integers(0, 3, size=(100, 160)).astype(np.uint8)
    ex = TrainingExample(image, labels, "mic")
    (kept,), (band,) = split_holdout([ex], 0.2, 32, np.random.default_rng(1))
    ignored = np.flatnonzero((kept.labels == IGNORE).all(axis=0))  # columns: the band runs across the longer axis
    assert len(ignored) == 32 == band.image.shape[1] and band.image.shape[0] == 100
    assert np.array_equal(ignored, np.arange(ignored[0], ignored[0] + 32))
    assert np.array_equal(band.labels, labels[:, ignored]) and np.array_equal(band.image, image[:, ignored])
    assert np.array_equal(np.delete(kept.labels, ignored, axis=1), np.delete(labels, ignored, axis=1))
    assert kept.image is image and band.source == "mic (held out)"

    torch.manual_seed(0)
    model = PickingModel(BoxNet(width=4), name="tiny")
    settings = dict(epochs=2, patience=0, window=32, batch_size=2, eval_windows=2, dilute=False)
    _, plain = train(model, [ex], None, TrainingSettings(holdout=0.0, **settings), device="cpu")
    assert TrainingSettings().holdout == pytest.approx(0.2)  # on by default
    _, held = train(model, [ex], None, TrainingSettings(holdout=0.2, **settings), device="cpu")
    assert len(held.epoch) == 2 and held.best_epoch in (1, 2)
    assert held.old_on_new[0] != plain.old_on_new[0]  # the old network scored on other (held-out) windows
