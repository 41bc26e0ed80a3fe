"""core.simulate: every number the simulator claims is checked against an independent measurement of its output."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, maximum_filter

from napari_warp.core import simulate as sim
from napari_warp.core.ctf import ctf_1d_tensor, ctf_2d, ctf_zeros
from napari_warp.core.fourier import fourier_shift, radial_average
from napari_warp.core.simulate import (
    MovieSimulation,
    SemiSyntheticSimulation,
    detector_mtf,
    euler_to_matrix,
    simulate_from_micrograph,
    simulate_movie,
)

# Small, fast settings; each test changes what it examines.
BASE = dict(shape=(256, 256), n_frames=4, pixel_size=1.0, mtf=None, seed=3)


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers (independent of the simulator's code paths)
# ---------------------------------------------------------------------------------------------------------------
def _measure_shift(a: np.ndarray, b: np.ndarray, max_freq: float = 0.3, step: float = 0.01) -> np.ndarray:
    """(dy, dx) such that ``b ≈ a`` moved by it (content toward higher index), from band-limited phase correlation
    evaluated on a fine grid around the integer peak. Edges are tapered: the periodic-boundary cross does not move
    with the content and would pull the peak toward zero."""
    taper = np.outer(_taper(a.shape[0]), _taper(a.shape[1]))
    fa, fb = np.fft.fft2((a - a.mean()) * taper), np.fft.fft2((b - b.mean()) * taper)
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-9
    ky, kx = np.fft.fftfreq(a.shape[0]), np.fft.fftfreq(a.shape[1])
    cross *= (np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) < max_freq)
    cc = np.real(np.fft.ifft2(cross))
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)
    iy = iy - a.shape[0] if iy > a.shape[0] // 2 else iy
    ix = ix - a.shape[1] if ix > a.shape[1] // 2 else ix
    ty = iy + np.arange(-1, 1 + step / 2, step)
    tx = ix + np.arange(-1, 1 + step / 2, step)
    ey = np.exp(2j * np.pi * ty[:, None] * ky[None, :])
    ex = np.exp(2j * np.pi * kx[:, None] * tx[None, :])
    fine = np.real(ey @ cross @ ex)
    jy, jx = np.unravel_index(np.argmax(fine), fine.shape)
    return np.array([ty[jy], tx[jx]])


def _taper(n: int) -> np.ndarray:
    """1 in the middle, a sine ramp over the outer eighth on each side."""
    return np.minimum(1.0, np.sin(np.pi * (np.arange(n) + 0.5) / n) * 4)


def _tile_spectrum(image: np.ndarray, tile: int) -> np.ndarray:
    """Mean periodogram ``(tile, tile//2+1)`` over non-overlapping tiles, edges tapered (no leakage)."""
    y, x = image.shape
    tiles = image[: y // tile * tile, : x // tile * tile].reshape(y // tile, tile, x // tile, tile)
    tiles = tiles.transpose(0, 2, 1, 3).reshape(-1, tile, tile)
    tiles = (tiles - tiles.mean(axis=(1, 2), keepdims=True)) * np.outer(_taper(tile), _taper(tile))
    return (np.abs(np.fft.rfft2(tiles)) ** 2).mean(0)


def _detrended_corr(a: np.ndarray, b: np.ndarray, k: np.ndarray) -> float:
    """Pearson correlation of a and b after removing a quadratic trend in k from each."""
    ra = a - np.polyval(np.polyfit(k, a, 2), k)
    rb = b - np.polyval(np.polyfit(k, b, 2), k)
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _fit_defocus(image: np.ndarray, ctf, tile: int, guess: float, band=(0.03, 0.16), span=2000.0) -> float:
    """1D defocus search: radial spectrum vs CTF² (other parameters from ``ctf``), best correlation."""
    ps = radial_average(torch.as_tensor(_tile_spectrum(image, tile)), image_shape=(tile, tile)).numpy()
    k = np.arange(len(ps)) / (tile * ctf.pixel_size)
    sel = (k > band[0]) & (k < band[1])
    candidates = np.arange(guess - span, guess + span, 10.0)
    model = ctf_1d_tensor(torch.as_tensor(k[sel])[None], torch.as_tensor(candidates), ctf.voltage, ctf.cs,
                          ctf.amplitude, ctf.phase_shift).numpy() ** 2
    scores = [_detrended_corr(np.log(ps[sel]), m, k[sel]) for m in model]
    return float(candidates[int(np.argmax(scores))])


@pytest.fixture(scope="module")
def rigid_movie():
    """High-dose rigid movie: drift + jitter, no local deformation, no gain."""
    s = MovieSimulation(**{**BASE, "n_frames": 6, "dose_per_frame": 40.0}, drift=6.0, drift_jitter=0.6,
                        local_amplitude=0.0)
    return simulate_movie(s)


# ---------------------------------------------------------------------------------------------------------------
# exposure, noise, detector
# ---------------------------------------------------------------------------------------------------------------
def test_counts_are_poisson_with_the_stated_exposure():
    s = MovieSimulation(**{**BASE, "pixel_size": 1.3}, dose_per_frame=30.0, drift=0.0, local_amplitude=0.0)
    m = simulate_movie(s)
    expected = s.dose_per_frame * s.pixel_size**2  # 50.7 counts per pixel per frame
    assert m.frames.dtype == np.float32 and m.frames.shape == (4, 256, 256)
    assert np.array_equal(m.frames, np.round(m.frames)) and m.frames.min() >= 0
    assert m.frames.mean() == pytest.approx(expected, rel=2e-3)
    # frame 0 is the reference: residual to the expected image is pure Poisson noise (var = mean), which also
    # fails if the frames were displaced from ``truth.clean`` by even a fraction of a pixel
    resid = m.frames - expected * m.truth.clean
    assert resid.var() / expected == pytest.approx(1.0, abs=0.03)
    assert m.truth.clean.mean() == pytest.approx(1.0, abs=1e-4)


def test_gain_reference_is_multiplicative_and_hot_pixels_are_hot():
    s = MovieSimulation(**BASE, dose_per_frame=20.0, drift=0.0, local_amplitude=0.0, gain=True, n_hot_pixels=7)
    m = simulate_movie(s)
    g = m.gain
    assert g.shape == (256, 256) and 0.8 <= g.min() and g.max() <= 1.2 and 0.01 < g.std() < 0.08
    assert np.array_equal(m.frames, np.round(m.frames))  # raw counts stay integers
    cold = np.ones(g.shape, bool)
    cold[m.hot_pixels[:, 0], m.hot_pixels[:, 1]] = False
    expected = s.dose_per_frame * s.pixel_size**2 * m.truth.clean
    raw_mean = m.frames.mean(0)
    # corrected = raw × gain recovers the exposure; raw alone is biased by 1/gain pixel by pixel
    assert np.mean((raw_mean * g)[cold]) == pytest.approx(np.mean(expected[cold]), rel=3e-3)
    slope = np.polyfit((1 / g)[cold], (raw_mean / expected)[cold], 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)
    assert m.hot_pixels.shape == (7, 2) and len({tuple(p) for p in m.hot_pixels}) == 7
    hot = m.frames[:, m.hot_pixels[:, 0], m.hot_pixels[:, 1]]
    assert hot.min() > 5 * s.dose_per_frame * s.pixel_size**2
    own = simulate_movie(MovieSimulation(**BASE, drift=0.0, local_amplitude=0.0, gain=g))
    assert np.array_equal(own.gain, g)


def test_detector_mtf_attenuates_power_as_its_curve_says():
    samples = np.array([[0.0, 1.0], [0.25, 0.8], [0.5, 0.45], [0.75, 0.3]])
    common = dict(BASE, drift=0.0, local_amplitude=0.0, n_frames=1)
    ideal = simulate_movie(MovieSimulation(**common)).truth.clean
    blurred = simulate_movie(MovieSimulation(**{**common, "mtf": samples})).truth.clean
    p0 = radial_average(torch.as_tensor(_tile_spectrum(ideal, 256)), image_shape=(256, 256)).numpy()
    p1 = radial_average(torch.as_tensor(_tile_spectrum(blurred, 256)), image_shape=(256, 256)).numpy()
    for fi in (0.1, 0.25, 0.4, 0.48):  # cycles/pixel; shell i of 128 is at i/256
        i = int(round(fi * 256))
        assert p1[i] / p0[i] == pytest.approx(np.interp(fi, samples[:, 0], samples[:, 1]) ** 2, rel=0.03), fi
    assert np.all(p1[5:] <= p0[5:] * 1.001)


def test_detector_mtf_names_resolve_with_or_without_the_shared_data(monkeypatch):
    monkeypatch.setattr(sim, "_data_dirs", lambda: [])
    fit, source = detector_mtf("k3", 300)
    assert source.startswith("built-in fit")
    assert np.interp(0.5, fit[:, 0], fit[:, 1]) == pytest.approx(0.645, abs=0.02)  # K3 at Nyquist, 300 kV
    assert detector_mtf(None) == (None, "none")
    with pytest.raises(ValueError, match="unknown detector"):
        detector_mtf("k9000")


def test_detector_mtf_fits_match_relion_curves(data_dir, monkeypatch):
    monkeypatch.setenv("NAPARI_WARP_TEST_DATA", str(data_dir))
    for name in ("k2", "k3", "k3_cds", "falcon4", "de20"):
        for kv in (200, 300):
            measured, source = detector_mtf(name, kv)
            assert source.endswith(".star")
            monkeypatch.setattr(sim, "_data_dirs", lambda: [])
            fit, _ = detector_mtf(name, kv)
            monkeypatch.undo()
            monkeypatch.setenv("NAPARI_WARP_TEST_DATA", str(data_dir))
            sel = measured[:, 0] <= 0.5
            err = np.abs(np.interp(measured[sel, 0], fit[:, 0], fit[:, 1]) - measured[sel, 1]).max()
            assert err < 0.05, (name, kv, err)


# ---------------------------------------------------------------------------------------------------------------
# motion truth
# ---------------------------------------------------------------------------------------------------------------
def test_rigid_shifts_match_cross_correlation_with_the_documented_sign(rigid_movie):
    m = rigid_movie
    truth = m.truth.shifts([[128.0, 128.0]])[:, 0]  # (F, 2)
    assert np.abs(truth[0]).max() == 0.0
    assert np.linalg.norm(truth[-1]) > 4.0  # about 6 Å of drift, not nothing
    for f in range(1, m.frames.shape[0]):
        measured = _measure_shift(m.frames[0], m.frames[f])
        assert np.abs(measured - (truth[f] - truth[0])).max() < 0.1, (f, measured, truth[f])
    # and in core.fourier's convention: frame f ≈ fourier_shift(frame 0, +shift)
    clean = torch.as_tensor(m.truth.clean)[None]
    moved = fourier_shift(clean, torch.as_tensor(truth[-1:], dtype=torch.float32))[0].numpy()
    expected = m.truth.dose_per_frame * m.truth.pixel_size**2 * moved
    inner = (slice(16, -16), slice(16, -16))
    resid = (m.frames[-1] - expected)[inner]
    assert resid.var() / expected[inner].mean() == pytest.approx(1.0, abs=0.05)


def test_global_trajectory_has_the_requested_drift_and_decelerates(rigid_movie):
    g = rigid_movie.truth.global_shifts
    s = MovieSimulation(**{**BASE, "n_frames": 20}, drift=12.0, local_amplitude=0.0)
    t = simulate_movie(s).truth
    path = t.global_shifts
    assert np.linalg.norm(path[-1] - path[0]) * s.pixel_size == pytest.approx(12.0, rel=1e-6)
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
    assert steps[:3].mean() > 3 * steps[-3:].mean()  # fast first, then slowing
    assert g.shape == (6, 2) and np.all(t.frame_times == np.arange(20) / 19)


def test_local_deformation_truth_matches_patch_cross_correlation():
    s = MovieSimulation(shape=(512, 512), n_frames=3, pixel_size=1.0, dose_per_frame=60.0, drift=3.0,
                        local_amplitude=2.0, local_grid=(3, 3, 3), mtf=None, seed=11)
    m = simulate_movie(s)
    t = m.truth
    nodes = t.local_nodes
    assert nodes.shape == (2, 3, 3, 3)
    assert np.abs(nodes[:, 0]).max() == 0.0 and np.abs(nodes.mean(axis=(-2, -1))).max() < 1e-12
    centres = [(y, x) for y in (80, 256, 432) for x in (80, 256, 432)]
    means = []
    for cy, cx in centres:
        win = (slice(cy - 40, cy + 40), slice(cx - 40, cx + 40))
        measured = _measure_shift(m.frames[0][win], m.frames[-1][win])
        yy, xx = np.mgrid[cy - 40:cy + 40:8, cx - 40:cx + 40:8]
        patch_truth = t.shifts(np.stack([yy.ravel(), xx.ravel()], 1), frames=[-1])[0]
        assert np.ptp(patch_truth, axis=0).max() < 2.0  # a patch moves nearly rigidly
        assert np.abs(measured - patch_truth.mean(0)).max() < 0.15, ((cy, cx), measured, patch_truth.mean(0))
        means.append(patch_truth.mean(0))
    assert np.ptp(np.asarray(means), axis=0).max() > 2.0  # the local field really differs between patches
    np.testing.assert_array_equal(t.shifts(np.asarray(centres, float), frames=[0]), 0.0)
    rel = t.shifts(np.asarray(centres, float), relative_to_mean=True)
    np.testing.assert_allclose(rel.mean(0), 0.0, atol=1e-12)
    gy, gx = t.local_grid
    assert gy.dims == (3, 3, 3) and gx.dims == (3, 3, 3)


def _spot_centroid(image: np.ndarray, p: np.ndarray, h: int = 7) -> np.ndarray:
    """Centroid (y, x) of a spot near ``p`` in a (2h+1)² window, background from the window's border."""
    q = np.round(p).astype(int)
    win = image[q[0] - h:q[0] + h + 1, q[1] - h:q[1] + h + 1].astype(np.float64)
    ring = np.ones(win.shape, bool)
    ring[1:-1, 1:-1] = False
    win = win - win[ring].mean()
    ax = np.arange(-h, h + 1)
    return q + np.array([(win.sum(1) * ax).sum(), (win.sum(0) * ax).sum()]) / win.sum()


def test_features_move_to_p_plus_shift_under_local_deformation():
    """Gaussian spots at known reference positions p must be found at p + shifts(p) in every frame."""
    yy, xx = np.mgrid[24:256:32, 24:256:32]
    spots = np.stack([yy.ravel(), xx.ravel()], 1) + np.random.default_rng(1).uniform(-3, 3, (64, 2))
    gy, gx = np.mgrid[:256, :256]
    image = np.full((256, 256), 0.2)
    for p in spots:
        image += np.exp(-((gy - p[0]) ** 2 + (gx - p[1]) ** 2) / (2 * 1.5**2))
    m = simulate_from_micrograph(image, 1.0, n_frames=4, dose_per_frame=20000.0, drift=5.0, local_amplitude=4.0,
                                 local_grid=(3, 3, 3), seed=6)
    truth = m.truth.shifts(spots)  # (F, P, 2)
    assert np.abs(truth[-1] - truth[-1].mean(0)).max() > 1.0  # spots move differently
    errors = []
    for f in range(m.frames.shape[0]):
        for p, s in zip(spots, truth[f]):
            if min(p.min(), (p + s).min()) < 12 or max(p.max(), (p + s).max()) > 243:
                continue  # the reflect-padded canvas mirrors spots near the edge into the window
            errors.append(_spot_centroid(m.frames[f], p + s) - (p + s))
    errors = np.asarray(errors)
    assert len(errors) > 120
    assert np.abs(errors).max() < 0.04 and np.sqrt((errors**2).mean()) < 0.015


# ---------------------------------------------------------------------------------------------------------------
# CTF truth
# ---------------------------------------------------------------------------------------------------------------
def test_thon_rings_sit_at_the_true_ctf_zeros():
    s = MovieSimulation(shape=(512, 512), n_frames=2, pixel_size=1.0, dose_per_frame=100.0, drift=0.0,
                        local_amplitude=0.0, defocus=15000.0, mtf=None, seed=5)
    m = simulate_movie(s)
    zeros = ctf_zeros(m.truth.ctf, 3).numpy()
    tile = 256
    for image in (m.truth.clean, m.frames.sum(0)):
        ps = radial_average(torch.as_tensor(_tile_spectrum(image, tile)), image_shape=(tile, tile)).numpy()
        k = np.arange(len(ps)) / (tile * s.pixel_size)
        for i, z in enumerate(zeros):
            spacing = (zeros[i + 1] if i + 1 < len(zeros) else 2 * z - zeros[i - 1]) - z
            window = np.abs(k - z) < 0.35 * spacing
            found = k[window][np.argmin(ps[window])]
            assert abs(found - z) <= 1.0 / (tile * s.pixel_size), (i, found, z)
            assert ps[window].min() < 0.5 * ps[window].max()  # a real dip, not a slope
    assert _fit_defocus(m.truth.clean, m.truth.ctf, tile, 15000.0) == pytest.approx(15000.0, abs=60)


def test_astigmatism_orientation_in_image_axes():
    s = MovieSimulation(shape=(512, 512), n_frames=1, pixel_size=1.0, drift=0.0, local_amplitude=0.0,
                        defocus=15000.0, astigmatism=3000.0, astigmatism_angle=30.0, mtf=None, seed=2)
    m = simulate_movie(s)
    ps = np.log(_tile_spectrum(m.truth.clean, 256))
    truth = m.truth.ctf

    def score(ctf):
        model = ctf_2d(ctf, (256, 256)).numpy() ** 2
        f = np.hypot(np.fft.fftfreq(256)[:, None], np.fft.rfftfreq(256)[None, :])
        band = (f > 0.03) & (f < 0.15)
        a, b = ps[band] - ps[band].mean(), model[band] - model[band].mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    best = score(truth)
    for wrong in (truth.with_(astigmatism_angle=-30.0), truth.with_(astigmatism_angle=120.0),
                  truth.with_(astigmatism=0.0)):
        assert best > score(wrong) + 0.05, wrong


def test_defocus_plane_is_in_the_image_and_in_defocus_at():
    s = MovieSimulation(shape=(1024, 1024), n_frames=1, pixel_size=2.0, drift=0.0, local_amplitude=0.0,
                        defocus=15000.0, defocus_gradient=(0.1, 0.3), mtf=None, seed=4)
    m = simulate_movie(s)
    t = m.truth
    corners = np.array([[0, 0], [0, 1023], [1023, 0], [1023, 1023], [511.5, 511.5]])
    expected = 15000.0 + (0.1 * (corners[:, 0] - 511.5) + 0.3 * (corners[:, 1] - 511.5)) * 2.0
    np.testing.assert_allclose(t.defocus_at(corners), expected)
    fitted = {}
    for name, (cy, cx) in {"left": (512, 128), "right": (512, 896)}.items():
        patch = t.clean[cy - 128:cy + 128, cx - 128:cx + 128]
        fitted[name] = _fit_defocus(patch, t.ctf, 128, 15000.0)
        assert fitted[name] == pytest.approx(t.defocus_at([[cy - 0.5, cx - 0.5]])[0], abs=80), name
    assert fitted["right"] - fitted["left"] == pytest.approx(0.3 * 768 * 2.0, abs=100)


# ---------------------------------------------------------------------------------------------------------------
# specimen truth
# ---------------------------------------------------------------------------------------------------------------
def test_particles_sit_on_density_maxima():
    s = MovieSimulation(shape=(512, 512), n_frames=1, drift=0.0, local_amplitude=0.0, particle_diameter=100.0,
                        mtf=None, seed=8)
    t = simulate_movie(s).truth
    assert len(t.particles) >= 5 and t.particle_angles.shape == (len(t.particles), 3)
    assert t.particle_diameter == pytest.approx(100.0, rel=0.03)
    assert np.all((t.particles >= 0) & (t.particles < 512))
    d = np.sqrt(((t.particles[:, None] - t.particles[None]) ** 2).sum(-1)) + np.eye(len(t.particles)) * 1e9
    assert d.min() >= 100.0 / s.pixel_size * 0.999  # no overlaps
    smooth = gaussian_filter(t.specimen.astype(np.float64), 100.0 / 5)
    peaks = smooth == maximum_filter(smooth, size=15)
    yy, xx = np.nonzero(peaks & (smooth > 0.3 * smooth.max()))
    for p in t.particles:
        margin = min(p[0], p[1], 511 - p[0], 511 - p[1])
        if margin < 50:
            continue  # partly outside the field: its visible part peaks elsewhere
        dist = np.hypot(yy - p[0], xx - p[1]).min()
        assert dist < 6.0, (p, dist)
    assert t.specimen[t.particles[:, 0].astype(int), t.particles[:, 1].astype(int)].min() > 0


def test_blob_particles_look_dark_on_the_raw_frames():
    s = MovieSimulation(shape=(512, 512), n_frames=1, drift=0.0, local_amplitude=0.0, ice_thickness=0.0,
                        mtf=None, seed=9)
    t = simulate_movie(s).truth
    low = gaussian_filter(t.clean.astype(np.float64), 6.0)
    inside = low[t.particles[:, 0].astype(int), t.particles[:, 1].astype(int)]
    assert np.all(inside < 1.0)  # under-focus + amplitude contrast: particles darker than the ice


def _projected_covariance(points: np.ndarray, weights: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """2×2 (y, x) covariance of weighted 3D points (x, y, z) projected with RELION angles, built from elementary
    rotations (independent of ``euler_to_matrix``)."""
    def rz(a):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    a = rz(angles[2]) @ ry(angles[1]) @ rz(angles[0])
    xy = (points @ a.T)[:, :2]
    yx = xy[:, ::-1]
    c = (yx * weights[:, None]).sum(0) / weights.sum()
    d = yx - c
    return (d * weights[:, None]).T @ d / weights.sum()


def _image_moments(image: np.ndarray, centre: np.ndarray, radius: float, pixel_size: float):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float64)
    w = image * (np.hypot(yy - centre[0], xx - centre[1]) < radius)
    c = np.array([(w * yy).sum(), (w * xx).sum()]) / w.sum()
    dy, dx = (yy - c[0]) * pixel_size, (xx - c[1]) * pixel_size
    cov = np.array([[(w * dy * dy).sum(), (w * dy * dx).sum()], [(w * dy * dx).sum(), (w * dx * dx).sum()]])
    return c, cov / w.sum()


def _assert_same_shape(img_cov: np.ndarray, model_cov: np.ndarray, tol: float):
    """Equal up to an isotropic term (blur from B-factors/kernels adds σ²·I): compare the anisotropic parts."""
    scale = np.trace(model_cov)
    assert img_cov[0, 1] == pytest.approx(model_cov[0, 1], abs=tol * scale)
    assert img_cov[0, 0] - img_cov[1, 1] == pytest.approx(model_cov[0, 0] - model_cov[1, 1], abs=tol * scale)
    assert np.trace(img_cov) == pytest.approx(scale, rel=0.15)


def test_euler_matrix_is_relions():
    a = euler_to_matrix([[30.0, 50.0, -70.0]])[0]
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)
    # RELION: tilt about y after rot about z moves the z axis into (−sin(tilt)·cos(psi), sin(tilt)·sin(psi), cos)
    np.testing.assert_allclose(a[:, 2], [-math.sin(math.radians(50)) * math.cos(math.radians(-70)),
                                         math.sin(math.radians(50)) * math.sin(math.radians(-70)),
                                         math.cos(math.radians(50))], atol=1e-12)


def test_pdb_projection_has_the_size_and_orientation_of_the_atoms(data_dir):
    import gemmi

    path = data_dir / "models-pdb" / "8OSK.pdb"
    s = MovieSimulation(shape=(320, 320), n_frames=1, pixel_size=2.0, drift=0.0, local_amplitude=0.0,
                        specimen=path, n_particles=1, ice_thickness=0.0, mtf=None, seed=1)
    t = simulate_movie(s).truth
    assert len(t.particles) == 1
    st = gemmi.read_structure(str(path))
    st.remove_alternative_conformations()
    st.remove_waters()
    atoms = [(a.pos.tolist(), a.element) for ch in st[0] for r in ch for a in r]
    xyz = np.array([p for p, _ in atoms])
    w = np.array([sum(e.c4322.get_coefs()[:5]) for _, e in atoms])
    radius = np.sqrt(((xyz - (xyz * w[:, None]).sum(0) / w.sum()) ** 2).sum(1)).max()
    assert t.particle_diameter == pytest.approx(2 * radius + 4, rel=1e-3)
    centre = t.particles[0]
    assert min(centre.min(), 319 - centre.max()) > radius / 2.0 + 4  # wholly inside the field
    # band particles outside the field keep at least one diameter away: a disk of radius + 2 px sees only ours
    com, cov = _image_moments(t.specimen.astype(np.float64), centre, radius / 2.0 + 2, 2.0)
    assert np.abs(com - centre).max() < 0.3
    _assert_same_shape(cov, _projected_covariance(xyz, w, t.particle_angles[0]), 0.03)


def test_map_projection_follows_the_maps_axes_and_angles(tmp_path):
    # a uniform ellipsoid with semi-axes 36, 20, 12 Å along x, y, z: covariance diag(a²/5)
    voxel = 2.0
    z, y, x = np.mgrid[-24:24, -24:24, -24:24] * voxel
    vol = (((x / 36) ** 2 + (y / 20) ** 2 + (z / 12) ** 2) <= 1).astype(np.float32)
    vol += np.random.default_rng(0).normal(scale=0.01, size=vol.shape).astype(np.float32)
    path = tmp_path / "ellipsoid.mrc"
    with mrcfile.new(path) as m:
        m.set_data(vol)
        m.voxel_size = voxel
    s = MovieSimulation(shape=(160, 160), n_frames=1, pixel_size=1.5, drift=0.0, local_amplitude=0.0,
                        specimen=path, n_particles=1, ice_thickness=0.0, mtf=None, seed=1)
    t = simulate_movie(s).truth
    assert len(t.particles) == 1 and t.particle_diameter == pytest.approx(2 * 36 + voxel, abs=2 * voxel)
    assert min(t.particles.min(), 159 - t.particles.max()) > 40 / 1.5  # wholly inside the field
    com, cov = _image_moments(t.specimen.astype(np.float64), t.particles[0], 40 / 1.5, 1.5)
    assert np.abs(com - t.particles[0]).max() < 0.3
    m3 = np.diag(np.array([36.0, 20.0, 12.0]) ** 2 / 5)
    a = euler_to_matrix(t.particle_angles[0])
    model = (a @ m3 @ a.T)[:2, :2][::-1, ::-1]  # (x', y') -> (y, x)
    _assert_same_shape(cov, model, 0.04)


def test_map_specimen_from_emdb_renders(data_dir):
    s = MovieSimulation(shape=(192, 192), n_frames=2, pixel_size=4.0, n_particles=3, mtf=None, seed=0,
                        specimen=data_dir / "maps" / "emdb-small" / "EMD-3197.map")
    m = simulate_movie(s)
    assert m.truth.specimen.max() > 0 and np.isfinite(m.frames).all()


# ---------------------------------------------------------------------------------------------------------------
# reproducibility, semi-synthetic, API
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_same_movie_and_streams_are_independent():
    s = MovieSimulation(**{**BASE, "n_frames": 3}, gain=True, n_hot_pixels=3, drift_jitter=0.5)
    a, b = simulate_movie(s), simulate_movie(s)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.gain, b.gain)
    np.testing.assert_array_equal(a.truth.particles, b.truth.particles)
    c = simulate_movie(MovieSimulation(**{**BASE, "n_frames": 3, "seed": 4}, gain=True, n_hot_pixels=3))
    assert not np.array_equal(a.frames, c.frames)
    d = simulate_movie(MovieSimulation(**{**BASE, "n_frames": 5}, gain=True, n_hot_pixels=3, drift_jitter=0.5))
    np.testing.assert_array_equal(a.truth.particles, d.truth.particles)  # frames do not move particles
    np.testing.assert_array_equal(a.truth.clean, d.truth.clean)


def test_progress_reports_done_and_total():
    calls = []
    simulate_movie(MovieSimulation(**BASE), progress=lambda done, total: calls.append((done, total)))
    assert calls[0][0] >= 1 and calls[-1][0] == calls[-1][1] == 4 + 2
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="specimen"):
        simulate_movie(MovieSimulation(**BASE, specimen="nonsense.xyz"))
    with pytest.raises(ValueError, match="gain reference shape"):
        simulate_movie(MovieSimulation(**BASE, gain=np.ones((10, 10))))
    with pytest.raises(ValueError, match="2D image"):
        simulate_from_micrograph(np.ones((2, 8, 8)), 1.0)


def test_semi_synthetic_from_array_has_known_rigid_motion():
    rng = np.random.default_rng(0)
    image = 1000 * np.exp(0.3 * gaussian_filter(rng.normal(size=(256, 256)), 1.0) / 0.28)  # ±30 % texture
    m = simulate_from_micrograph(image, 1.5, n_frames=4, dose_per_frame=200.0, drift=9.0, local_amplitude=0.0,
                                 seed=2)
    assert m.truth.ctf is None and m.truth.particles.shape == (0, 2)
    assert m.frames.mean() == pytest.approx(200.0 * 1.5**2, rel=3e-3)
    truth = m.truth.shifts([[128, 128]])[:, 0]
    measured = _measure_shift(m.frames[0], m.frames[-1], max_freq=0.15)
    assert np.abs(measured - truth[-1]).max() < 0.1
    with pytest.raises(ValueError, match="no CTF truth"):
        m.truth.defocus_at([[0, 0]])


def test_semi_synthetic_from_the_real_micrograph(data_dir):
    s = SemiSyntheticSimulation(micrograph=data_dir / "micrographs" / "epu2.9_example.mrc", max_size=1024,
                                n_frames=5, dose_per_frame=8.0, drift=12.0, local_amplitude=3.0, seed=1)
    m = simulate_movie(s)
    assert m.frames.shape == (5, 1024, 1024)
    assert m.pixel_size == pytest.approx(0.66655135 * 4, rel=1e-5)
    assert m.frames.mean() == pytest.approx(8.0 * m.pixel_size**2, rel=3e-3)
    centre = (slice(256, 768), slice(256, 768))
    measured = _measure_shift(m.frames[0][centre], m.frames[-1][centre], max_freq=0.1)
    yy, xx = np.mgrid[256:768:16, 256:768:16]
    truth = m.truth.shifts(np.stack([yy.ravel(), xx.ravel()], 1), frames=[-1])[0].mean(0)
    assert np.linalg.norm(truth) > 3.0
    assert np.abs(measured - truth).max() < 0.15


def test_cancel_from_progress_stops_simulation():
    from napari_warp.core.errors import Cancelled

    calls = []

    def progress(done, total):
        calls.append(done)
        if done > 1:  # the first report after setup
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        sim.simulate_movie(sim.MovieSimulation(shape=(128, 128), n_frames=8), progress=progress)
    assert len(calls) == 2  # nothing ran on after the cancelling report
