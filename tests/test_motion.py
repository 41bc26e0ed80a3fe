"""core.motion: fitted shifts against simulated truth, sign/unit conventions, dose weighting, averages, Warp XML."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from napari_warp.core.errors import Cancelled
from napari_warp.core.fourier import fftfreq_warp, fourier_shift
from napari_warp.core.grid import CubicGrid
from napari_warp.core.io.warp_xml import WarpMetadata
from napari_warp.core.motion import (
    MotionModel,
    MotionSettings,
    aligned_average,
    alignment_cost,
    auto_local_grid,
    correct_movie,
    dose_filters,
    effective_patch_size,
    fit_motion,
    frame_doses,
    motion_from_xml,
    motion_metrics,
    motion_to_xml,
    patch_layout,
)
from napari_warp.core.simulate import MovieSimulation, SemiSyntheticSimulation, simulate_movie

# Small movies with enough signal per frame that per-frame shifts are measurable to < 0.1 px at 768² (a real 4K
# movie has 28× the area; at 768² and 2 e/Å²/frame the noise floor of any per-frame estimate is ~0.2 px).
SIM = dict(shape=(768, 768), n_frames=12, pixel_size=2.0, dose_per_frame=8.0, drift=20.0, seed=1)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _points(shape, n: int = 7, margin: float = 0.1) -> np.ndarray:
    """``(n², 2)`` (y, x) positions on a regular lattice inside the field of view."""
    ys = np.linspace(shape[0] * margin, shape[0] * (1 - margin), n)
    xs = np.linspace(shape[1] * margin, shape[1] * (1 - margin), n)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], -1)


def _rms_error(model: MotionModel, truth, frames=None) -> float:
    """RMS (px) of fitted minus true shifts, each position's mean over the frames removed from both."""
    yx = _points(model.shape)
    est = model.shifts(yx, frames)
    tru = truth.shifts(yx, frames)
    est = est - est.mean(0)
    tru = tru - tru.mean(0)
    return float(np.sqrt(((est - tru) ** 2).sum(-1).mean()))


def _blobs(shape, seed: int = 0) -> torch.Tensor:
    """Smooth random image, mean 1 (content for cheap synthetic movies)."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(shape, generator=g, dtype=torch.float64)
    f2 = torch.fft.fftfreq(shape[0], dtype=torch.float64)[:, None] ** 2 + torch.fft.rfftfreq(
        shape[1], dtype=torch.float64)[None, :] ** 2
    img = torch.fft.irfft2(torch.fft.rfft2(white) * torch.exp(-f2 * 400), s=shape)
    return 1 + 0.4 * img / img.std()


def _moved_stack(image: torch.Tensor, shifts: np.ndarray, counts: float | None = None, seed: int = 0) -> np.ndarray:
    """Frames ``(F, Y, X)``: ``image`` moved by ``shifts`` ``(F, 2)`` px (content toward higher index), optionally
    Poisson-sampled at ``counts`` per pixel."""
    frames = fourier_shift(image[None].expand(len(shifts), -1, -1), torch.as_tensor(shifts, dtype=image.dtype))
    frames = frames.numpy()
    if counts is not None:
        frames = np.random.default_rng(seed).poisson(np.clip(frames, 0, None) * counts).astype(np.float32)
    return frames.astype(np.float32)


def _correlation(a: np.ndarray, b: np.ndarray, lo: float = 0.1, hi: float = 0.4) -> float:
    """Normalised cross-correlation of two images within a band (fractions of Nyquist)."""
    fa, fb = np.fft.rfft2(a), np.fft.rfft2(b)
    r = 2 * np.sqrt(np.fft.fftfreq(a.shape[0])[:, None] ** 2 + np.fft.rfftfreq(a.shape[1])[None, :] ** 2)
    sel = (r >= lo) & (r < hi)
    num = np.real((fa * fb.conj())[sel]).sum()
    return float(num / np.sqrt((np.abs(fa[sel]) ** 2).sum() * (np.abs(fb[sel]) ** 2).sum()))


def _settings(movie, **kw) -> MotionSettings:
    return MotionSettings(pixel_size=movie.pixel_size, exposure_per_frame=movie.truth.dose_per_frame, **kw)


# ---------------------------------------------------------------------------------------------------------------
# fixtures: each movie is simulated and fitted once
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def global_movie():
    return simulate_movie(MovieSimulation(**SIM, local_amplitude=0.0))


@pytest.fixture(scope="module")
def global_fit(global_movie):
    settings = _settings(global_movie, local_grid=(1, 1))
    return settings, fit_motion(global_movie.frames, settings)


@pytest.fixture(scope="module")
def local_movie():
    return simulate_movie(MovieSimulation(**{**SIM, "seed": 2}, local_amplitude=4.0))


@pytest.fixture(scope="module")
def local_fit(local_movie):
    settings = _settings(local_movie, local_grid=(5, 5))
    return settings, fit_motion(local_movie.frames, settings)


# ---------------------------------------------------------------------------------------------------------------
# accuracy against truth
# ---------------------------------------------------------------------------------------------------------------
def test_global_motion_accuracy(global_movie, global_fit):
    settings, model = global_fit
    assert model.global_grids[0].dims == (12, 1, 1)  # one temporal node per frame by default
    assert not model.has_local
    err = _rms_error(model, global_movie.truth)
    assert err <= 0.1, err
    drift = np.linalg.norm(global_movie.truth.global_shifts[-1])
    assert drift > 8  # the movie really moves (px), so the error is not trivially small


def test_local_motion_accuracy(local_movie, local_fit):
    settings, model = local_fit
    assert model.local_grids[0].dims == (3, 5, 5)
    truth = local_movie.truth
    yx = _points(model.shape)
    tru = truth.shifts(yx)
    tru = tru - tru.mean(0)
    local_part = float(np.sqrt(((tru - tru.mean(1, keepdims=True)) ** 2).sum(-1).mean()))
    assert local_part > 0.35  # a deformation of a few px at the corners, not a rigid shift
    err = _rms_error(model, truth)
    assert err <= 0.25, err
    # without the local grid the same data fit worse than with it
    rigid = fit_motion(local_movie.frames, _settings(local_movie, local_grid=(1, 1), iterations=8))
    assert _rms_error(rigid, truth) > err + 0.1


@pytest.mark.realdata
def test_semisynthetic_accuracy(data_dir):
    path = data_dir / "micrographs" / "epu2.9_example.mrc"
    if not path.exists():
        pytest.skip("epu2.9_example.mrc missing")
    movie = simulate_movie(SemiSyntheticSimulation(micrograph=path, max_size=768, n_frames=12, dose_per_frame=2.0,
                                                   drift=40.0, local_amplitude=6.0, seed=4))
    model = fit_motion(movie.frames, _settings(movie, local_grid=(5, 5)))
    err = _rms_error(model, movie.truth)
    assert err <= 0.25, err


def test_single_frame_is_identity():
    frames = _moved_stack(_blobs((128, 128)), np.zeros((1, 2)))
    model = fit_motion(frames, MotionSettings(pixel_size=1.0))
    assert model.n_frames == 1
    np.testing.assert_array_equal(model.shifts([[10.0, 20.0], [64.0, 64.0]]), np.zeros((1, 2, 2)))
    avg = aligned_average(frames, model, MotionSettings(pixel_size=1.0))
    np.testing.assert_allclose(avg.average, frames[0], atol=1e-4)
    assert motion_metrics(model)["mean_frame_movement"] == 0.0


def test_shift_sign_convention():
    """Frames made by moving an image by +s_f (content toward higher index) are fitted as shifts +s_f, and the
    aligned average is the image at the mean position."""
    image = _blobs((256, 256), seed=3)
    truth = np.stack([np.linspace(-3.0, 4.0, 8), 2.5 * np.sin(np.linspace(0, 3, 8))], -1)
    frames = _moved_stack(image, truth)
    settings = MotionSettings(pixel_size=4.0, exposure_per_frame=1.0, local_grid=(1, 1), bfactor=0.0)
    model = fit_motion(frames, settings)
    est = model.shifts([[128.0, 128.0]])[:, 0]
    np.testing.assert_allclose(est, truth - truth.mean(0), atol=0.03)
    avg = aligned_average(frames, model, MotionSettings(pixel_size=4.0, dose_weighting=False), halves=False)
    expected = fourier_shift(image, torch.as_tensor(truth.mean(0))).numpy() * len(frames)
    inner = (slice(16, -16), slice(16, -16))  # the circular shift wraps the edges
    np.testing.assert_allclose(avg.average[inner], expected[inner], rtol=0, atol=0.02 * len(frames))


# ---------------------------------------------------------------------------------------------------------------
# cost and gradients
# ---------------------------------------------------------------------------------------------------------------
def test_cost_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    spectra = torch.randn(3, 5, 40, dtype=torch.complex64, generator=g)
    kvec = torch.rand(2, 40, generator=g) * 0.2 - 0.1
    shifts = torch.randn(3, 5, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    alignment_cost(shifts, spectra, kvec).backward()
    assert torch.isfinite(shifts.grad).all()
    h = 1e-3
    for idx in [(0, 0, 0), (1, 2, 1), (2, 4, 0), (2, 1, 1)]:
        plus, minus = shifts.detach().clone(), shifts.detach().clone()
        plus[idx] += h
        minus[idx] -= h
        numeric = (alignment_cost(plus, spectra, kvec) - alignment_cost(minus, spectra, kvec)) / (2 * h)
        assert float(shifts.grad[idx]) == pytest.approx(float(numeric), rel=2e-3, abs=1e-3)


def test_cost_is_minimal_at_the_true_shifts():
    """Patch spectra of one image moved by s_f: the cost is lowest when the shifts are s_f (up to a common
    translation), and moving one frame away raises it."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 1, 60, dtype=torch.complex64, generator=g)
    kvec = torch.rand(2, 60, generator=g) * 0.2 - 0.1
    s = torch.randn(1, 6, 2, generator=g).expand(4, -1, -1)
    spectra = base * torch.exp(-2j * math.pi * (s @ kvec))  # content moved by +s
    at_truth = alignment_cost(s.double(), spectra, kvec)
    at_common = alignment_cost(s.double() + 0.7, spectra, kvec)
    off = s.double().clone()
    off[:, 2, 0] += 0.3
    assert float(at_common) == pytest.approx(float(at_truth), rel=1e-5)
    assert float(alignment_cost(off, spectra, kvec)) > float(at_truth) + 1e-3 * abs(float(at_truth))


# ---------------------------------------------------------------------------------------------------------------
# dose weighting and averages
# ---------------------------------------------------------------------------------------------------------------
def test_dose_filters_follow_warp_bfactors():
    doses = frame_doses(6, 1.5, pre_exposure=2.0)
    np.testing.assert_allclose(doses, 2.0 + (np.arange(6) + 0.5) * 1.5)
    shape, ps = (64, 80), 1.3
    w = dose_filters(doses, shape, ps, normalise=False).double().numpy()
    fy = np.fft.fftfreq(shape[0], ps)[:, None]
    fx = np.fft.rfftfreq(shape[1], ps)[None, :]
    fy[shape[0] // 2] *= -1  # Warp's +Nyquist (same |k|)
    k2 = fy**2 + fx**2
    for f, d in enumerate(doses):  # amplitude filter exp(B/4 k²) with B = -4 Å² per e/Å²
        np.testing.assert_allclose(w[f], np.exp(-4 * d / 4 * k2), rtol=1e-5)
    wn = dose_filters(doses, shape, ps).double().numpy()
    np.testing.assert_allclose(wn.sum(0), 6.0, rtol=1e-5)  # normalised per frequency: weights sum to F
    np.testing.assert_allclose(wn[:, 0, 0], 1.0, rtol=1e-6)  # DC untouched
    ratio = wn[3] / wn[0]
    np.testing.assert_allclose(ratio, np.exp(-(doses[3] - doses[0]) * k2), rtol=1e-4)


def _weighted_reference(frames: np.ndarray, model: MotionModel, doses: np.ndarray, ps: float) -> np.ndarray:
    """The dose-weighted aligned average of a globally moving movie in float64: each frame moved back by its shift,
    weighted by ``F / Σ_g exp(-(d_g - d_f) k²)`` (Warp's -4 Å² per e/Å² normalised per frequency, written stably)."""
    shape = frames.shape[1:]
    fy = fftfreq_warp(shape[0], dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(shape[1], dtype=torch.float64)[None, :]
    k2 = (fy**2 + fx**2) / ps**2
    d = torch.as_tensor(doses, dtype=torch.float64)
    w = len(d) / torch.exp(-(d[None, :, None, None] - d[:, None, None, None]) * k2).sum(1)  # (F, Y, X//2+1)
    g = torch.as_tensor(model.global_shifts(), dtype=torch.float64)
    ramp = torch.exp(2j * math.pi * (g[:, 0, None, None] * fy + g[:, 1, None, None] * fx))
    spectra = torch.fft.rfft2(torch.as_tensor(frames, dtype=torch.float64))
    return torch.fft.irfft2((spectra * ramp * w).sum(0), s=shape).numpy()


def test_dose_weighted_average_at_high_exposure():
    """Regression: at 0.5 Å/px and 60 e/Å² pre-exposure the per-frame filters underflowed in float32 while their
    normaliser overflowed, and the average was all NaN. It is the float64 dose-weighted average, and, as the
    normalised weights only depend on dose differences, the same as without pre-exposure."""
    rng = np.random.default_rng(0)
    shape, ps = (48, 64), 0.5
    frames = rng.poisson(5.0, size=(6, *shape)).astype(np.float32)
    model = MotionModel.from_nodes(np.stack([np.linspace(0, 3.3, 6), np.linspace(0, -2.1, 6)], -1), None, shape,
                                   pixel_size=ps)
    averages = {}
    for pre in (0.0, 60.0, 400.0):
        settings = MotionSettings(pixel_size=ps, exposure_per_frame=1.0, pre_exposure=pre)
        averages[pre] = aligned_average(frames, model, settings, halves=False).average
        assert np.isfinite(averages[pre]).all(), pre
        weights = dose_filters(frame_doses(6, 1.0, pre), shape, ps).numpy()
        assert np.isfinite(weights).all() and np.allclose(weights.sum(0), 6.0, rtol=1e-5), pre
    expected = _weighted_reference(frames, model, frame_doses(6, 1.0, 60.0), ps)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(averages[60.0], expected, atol=1e-5 * scale)
    np.testing.assert_allclose(averages[400.0], averages[0.0], atol=1e-5 * scale)


def test_aligned_average_is_sharper_and_halves_add_up(global_movie, global_fit):
    settings, model = global_fit
    frames, truth = global_movie.frames, global_movie.truth
    avg = aligned_average(frames, model, settings)
    np.testing.assert_allclose(avg.odd + avg.even, avg.average, rtol=0, atol=1e-3 * np.abs(avg.average).max())
    plain = frames.sum(0)
    assert avg.average.mean() == pytest.approx(plain.mean(), rel=1e-4)  # dose weighting keeps the DC
    # the aligned average sits at the mean position of the exposure: compare with the clean image moved there
    ref = truth.shifts([[SIM["shape"][0] / 2, SIM["shape"][1] / 2]])[:, 0].mean(0)
    clean = fourier_shift(torch.as_tensor(truth.clean), torch.as_tensor(ref)).numpy()
    c_aligned, c_plain = _correlation(avg.average, clean), _correlation(plain, clean)
    assert c_aligned > 2 * c_plain, (c_aligned, c_plain)
    # halves: even = frames 0, 2, ...; each correlates with the truth too
    assert _correlation(avg.even, clean) > c_plain


def test_aligned_stack_and_no_dose_weighting(local_movie, local_fit):
    settings, model = local_fit
    s = MotionSettings(pixel_size=settings.pixel_size, exposure_per_frame=settings.exposure_per_frame,
                       dose_weighting=False, local_tolerance=1e-3)
    avg = aligned_average(local_movie.frames, model, s, stack=True, halves=False)
    assert avg.stack.shape == local_movie.frames.shape and avg.odd is None
    # per-frame resampling vs grouped resampling of the same (unweighted) frames agree closely
    diff = avg.stack.sum(0) - avg.average
    assert np.abs(diff[32:-32, 32:-32]).max() < 0.02 * np.abs(avg.average).max()


def test_local_correction_sharpens_the_average(local_movie, local_fit):
    """Resampling with the local field raises the agreement of the odd and even half-averages (an FRC in a band)
    over the same fit with its local part dropped."""
    settings, model = local_fit
    zero = CubicGrid(torch.zeros(1, 1, 1, dtype=torch.float64))
    rigid = dataclasses.replace(model, local_grids=(zero, zero))
    with_local = aligned_average(local_movie.frames, model, settings)
    global_only = aligned_average(local_movie.frames, rigid, settings)
    for lo, hi in ((0.2, 0.4), (0.4, 0.6)):
        gain = _correlation(with_local.odd, with_local.even, lo, hi) - _correlation(global_only.odd,
                                                                                    global_only.even, lo, hi)
        assert gain > 0.015, (lo, hi, gain)


def test_correct_movie_matches_the_two_steps(global_movie):
    frames = global_movie.frames[:6, :256, :256]
    settings = MotionSettings(pixel_size=2.0, exposure_per_frame=8.0, local_grid=(1, 1), skip_first=1)
    model, avg = correct_movie(frames, settings)
    model2 = fit_motion(frames, settings)
    np.testing.assert_allclose(model.global_shifts(), model2.global_shifts(), atol=1e-6)
    avg2 = aligned_average(frames, model2, settings)
    np.testing.assert_allclose(avg.average, avg2.average, atol=1e-3)
    np.testing.assert_allclose(avg.odd, avg2.odd, atol=1e-3)


def test_skip_frames(global_movie):
    settings = _settings(global_movie, local_grid=(1, 1), skip_first=2, skip_last=1)
    model = fit_motion(global_movie.frames, settings)
    assert model.n_frames == 12 and list(model.used_frames) == list(range(2, 11))
    assert _rms_error(model, global_movie.truth, frames=model.used_frames) <= 0.12
    avg = aligned_average(global_movie.frames, model, settings)
    used_sum = global_movie.frames[2:11].sum(0)
    assert avg.average.mean() == pytest.approx(used_sum.mean(), rel=1e-4)


def test_many_frames_are_grouped_for_the_fit():
    """Hundreds of fractions (EER): the fit groups them, the model still has one time axis over all frames."""
    n = 150
    t = np.arange(n) / (n - 1)
    truth = np.stack([6 * (1 - np.exp(-t / 0.3)), -4 * t], -1)
    frames = _moved_stack(_blobs((192, 192), seed=5), truth, counts=2.0, seed=5)
    settings = MotionSettings(pixel_size=4.0, exposure_per_frame=0.1, local_grid=(1, 1), max_fit_frames=30)
    model = fit_motion(frames, settings)
    assert model.n_frames == n and model.info["fit_frames"] == 30
    assert model.global_grids[0].dims[0] <= 30
    est = model.shifts([[96.0, 96.0]])[:, 0]
    err = np.sqrt(((est - (truth - truth.mean(0))) ** 2).sum(-1).mean())
    assert err < 0.3, err


def test_movie_input_is_read_in_chunks(tmp_path):
    from napari_warp.core.io.movie import open_movie, write_mrc

    truth = np.stack([np.linspace(0, 3, 6), np.linspace(0, -2, 6)], -1)
    frames = _moved_stack(_blobs((128, 160), seed=7), truth, counts=20.0, seed=7)
    write_mrc(tmp_path / "m.mrc", frames, pixel_size=2.0)
    settings = MotionSettings(pixel_size=2.0, exposure_per_frame=5.0, local_grid=(1, 1))
    with open_movie(tmp_path / "m.mrc") as movie:
        from_movie = fit_motion(movie, settings)
        avg_movie = aligned_average(movie, from_movie, settings)
    from_array = fit_motion(frames, settings)
    np.testing.assert_allclose(from_movie.global_shifts(), from_array.global_shifts(), atol=1e-4)
    np.testing.assert_allclose(avg_movie.average, aligned_average(frames, from_array, settings).average,
                               atol=1e-2)


def test_progress_and_cancellation():
    frames = _moved_stack(_blobs((128, 128)), np.stack([np.arange(5.0), np.zeros(5)], -1), counts=20.0)
    calls = []
    fit_motion(frames, MotionSettings(pixel_size=2.0, local_grid=(1, 1)), progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] and all(d <= t for d, t in calls)

    def cancel(done, total):
        if done >= 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        fit_motion(frames, MotionSettings(pixel_size=2.0, local_grid=(1, 1)), progress=cancel)


# ---------------------------------------------------------------------------------------------------------------
# metrics, XML, geometry
# ---------------------------------------------------------------------------------------------------------------
def _linear_model(n: int = 10, step=(0.3, 0.4), ps: float = 1.5) -> MotionModel:
    t = torch.arange(n, dtype=torch.float64)
    gy = CubicGrid((t * step[0])[:, None, None])
    gx = CubicGrid((t * step[1])[:, None, None])
    loc = torch.zeros(3, 4, 4, dtype=torch.float64)
    loc[2, 0, 0] = 2.0  # a corner moving late
    zero = CubicGrid(torch.zeros(3, 4, 4, dtype=torch.float64))
    return MotionModel((200, 300), ps, n, (gy, gx), (CubicGrid(loc), zero))


def test_metrics_on_a_known_trajectory():
    model = _linear_model()
    m = motion_metrics(model)
    per_frame = math.hypot(0.3, 0.4) * 1.5  # Å per frame at the centre (local is zero there... nearly)
    assert m["mean_frame_movement"] == pytest.approx(per_frame, rel=0.02)
    assert m["total_drift"] == pytest.approx(per_frame * 9, rel=0.02)
    assert m["net_drift"] == pytest.approx(per_frame * 9, rel=0.02)
    assert m["max_local_deviation"] == pytest.approx(2.0 * 1.5, rel=1e-6)  # the node value, at the corner


def test_xml_round_trip_and_warp_convention(tmp_path, local_fit):
    settings, model = local_fit
    meta = WarpMetadata.new("Movie")
    motion_to_xml(meta, model)
    path = meta.write(tmp_path / "movie.xml")
    back = WarpMetadata.from_bytes(path.read_bytes())
    ps = model.pixel_size
    loaded = motion_from_xml(back, model.shape, ps)
    assert loaded.n_frames == model.n_frames
    yx = _points(model.shape, 5)
    np.testing.assert_allclose(loaded.shifts(yx), model.shifts(yx), atol=1e-4)
    # units and signs: Warp's grids hold corrections in Å; X is the fast axis, Z is time
    gx = back.get_grid("GridMovementX")
    assert gx.shape == (model.n_frames, 1, 1)
    np.testing.assert_allclose(gx.values[:, 0, 0], -model.global_grids[1].values[:, 0, 0].numpy() * ps, atol=1e-4)
    lx = back.get_grid("GridLocalMovementX")
    assert lx.shape == model.local_grids[1].dims
    # Warp's position of a reference point p in frame f: p_Å − global − local at (x/W, y/H, f/(N−1))
    n = model.n_frames
    p = np.array([300.0, 500.0])  # (y, x) px
    t = torch.arange(n, dtype=torch.float64) / (n - 1)
    coords_g = torch.stack([t, torch.full_like(t, 0.5), torch.full_like(t, 0.5)], -1)
    u = torch.tensor([p[0] / model.shape[0], p[1] / model.shape[1]], dtype=torch.float64)  # Warp: y/H, x/W
    coords_l = torch.cat([t[:, None], u[None].expand(n, -1)], -1)
    grids = {name: CubicGrid(torch.tensor(back.get_grid(name).values)) for name in
             ("GridMovementX", "GridMovementY", "GridLocalMovementX", "GridLocalMovementY")}
    warp_x = p[1] * ps - grids["GridMovementX"](coords_g) - grids["GridLocalMovementX"](coords_l)
    warp_y = p[0] * ps - grids["GridMovementY"](coords_g) - grids["GridLocalMovementY"](coords_l)
    ours = (p + model.shifts([p])[:, 0]) * ps  # where the feature is, in Å
    np.testing.assert_allclose(warp_x.numpy(), ours[:, 1], atol=1e-3)
    np.testing.assert_allclose(warp_y.numpy(), ours[:, 0], atol=1e-3)
    assert float(back.get_float("MeanFrameMovement")) == pytest.approx(motion_metrics(model)["mean_frame_movement"],
                                                                       rel=1e-4)


def test_patch_layout_and_auto_grid():
    origins, grid = patch_layout((4096, 4096), 512, 0.5)
    assert grid == (15, 15) and origins.min() == 0 and origins.max() == 4096 - 512
    origins, grid = patch_layout((3710, 3838), 512)  # K3 frames: patches spread evenly and centred
    assert origins[:, 0].max() + 512 <= 3710 and origins[:, 1].max() + 512 <= 3838
    assert effective_patch_size((4096, 4096), 512) == 512
    assert effective_patch_size((1024, 1024), 512) == 256  # a quarter of the short side for small images
    assert auto_local_grid((4096, 4096), 1.0, 40.0) == (5, 5)  # WarpTools: 5 for ~4000 Å at >= 30 e/Å²
    assert auto_local_grid((4096, 5760), 0.8, 15.0) == (2, 3)  # half the dose, 3277 Å short side; long side 1.4×
    assert auto_local_grid((1024, 1024), 1.0, 40.0) == (1, 1)  # small field of view: no local model
    assert auto_local_grid((4096, 4096), 1.0, 40.0, patch_grid=(3, 3)) == (3, 3)
