"""core.ctf_fit: local-defocus CTF estimation, checked against simulated micrographs with known CTF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_warp.core.ctf import CTFParams, ctf_2d
from napari_warp.core.ctf_fit import (
    CTFFit,
    CTFSettings,
    ctf_display_image,
    ctf_from_xml,
    ctf_to_xml,
    fit_ctf,
    fit_resolution,
)
from napari_warp.core.errors import NapariWarpError
from napari_warp.core.io.warp_xml import WarpMetadata
from napari_warp.core.simulate import MovieSimulation, simulate_movie


def _micrograph(defocus, astigmatism=0.0, angle=0.0, phase=0.0, tilt=0.0, axis=0.0, pixel_size=1.0, seed=0,
                shape=(1024, 1024)):
    """Simulated summed micrograph with a known CTF; a tilt (degrees) about ``axis`` (degrees from +x) makes the
    specimen a defocus plane."""
    g = math.tan(math.radians(tilt))
    normal = math.radians(axis + 90.0)  # the gradient is perpendicular to the tilt axis
    s = MovieSimulation(shape=shape, n_frames=2, pixel_size=pixel_size, defocus=defocus, astigmatism=astigmatism,
                        astigmatism_angle=angle, phase_shift=phase, drift=0.0, local_amplitude=0.0,
                        dose_per_frame=20.0, defocus_gradient=(g * math.sin(normal), g * math.cos(normal)), seed=seed)
    m = simulate_movie(s)
    return m.frames.sum(0), m.truth


def _field(shape, n=8):
    yy, xx = np.meshgrid(np.linspace(0, shape[0] - 1, n), np.linspace(0, shape[1] - 1, n), indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], 1)


def _rms_percent(fit: CTFFit, truth) -> float:
    yx = _field(truth.shape)
    true = truth.defocus_at(yx)
    return float(100 * np.sqrt(np.mean((fit.defocus_at(yx) - true) ** 2)) / np.mean(true))


def _angle_diff(a, b):
    """Difference of two astigmatism angles (period 180°), in degrees."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


@pytest.mark.parametrize(
    "defocus, astigmatism, angle",
    [(5000.0, 0.0, 0.0), (25000.0, 1000.0, 75.0), (50000.0, 300.0, -60.0)],
)
def test_flat_specimen_defocus_and_astigmatism(defocus, astigmatism, angle):
    image, truth = _micrograph(defocus, astigmatism, angle, seed=int(defocus) % 7)
    fit = fit_ctf(image, CTFSettings(pixel_size=1.0))
    assert _rms_percent(fit, truth) <= 0.5  # the target for flat specimens
    assert fit.defocus == pytest.approx(defocus, rel=0.005)
    assert fit.astigmatism == pytest.approx(astigmatism, abs=max(60.0, 0.1 * astigmatism))
    if astigmatism >= 300:
        assert _angle_diff(fit.angle, angle) <= 2.0
    assert fit.defocus_u - fit.defocus_v == pytest.approx(fit.astigmatism)
    assert fit.defocus_map().shape == image.shape
    assert 1.9 < fit.fit_resolution < 10.0  # Å: Nyquist is 2 Å; rings are strong far into the fit range


def test_phase_plate():
    image, truth = _micrograph(10000.0, 200.0, 10.0, phase=90.0, seed=5)
    fit = fit_ctf(image, CTFSettings(pixel_size=1.0, fit_phase=True))
    assert fit.phase_shift == pytest.approx(90.0, abs=5.0)
    assert _rms_percent(fit, truth) <= 0.5
    # without fitting the phase, a 90° phase plate cannot be matched as well
    plain = fit_ctf(image, CTFSettings(pixel_size=1.0, fit_phase=False))
    assert plain.score < fit.score - 0.05


@pytest.mark.parametrize("tilt, axis, defocus", [(20.0, 30.0, 8000.0), (60.0, 100.0, 30000.0)])
def test_tilted_specimen_plane(tilt, axis, defocus):
    image, truth = _micrograph(defocus, 300.0, 10.0, tilt=tilt, axis=axis, pixel_size=1.5, seed=3)
    fit = fit_ctf(image, CTFSettings(pixel_size=1.5, grid=(2, 2)))
    assert _rms_percent(fit, truth) <= 2.0  # the target over the field for tilted specimens
    gy, gx = fit.plane
    assert math.degrees(math.atan(math.hypot(gy, gx))) == pytest.approx(tilt, abs=2.0)
    fitted_axis = math.degrees(math.atan2(gy, gx)) - 90.0
    assert _angle_diff(fitted_axis, axis) <= 5.0
    # a global (1×1) model cannot describe the field
    flat = fit_ctf(image, CTFSettings(pixel_size=1.5, grid=(1, 1)))
    assert _rms_percent(flat, truth) > 3 * _rms_percent(fit, truth)
    if tilt < 45:
        return
    # the rescaled spectrum (all patches at one defocus) keeps the rings the plain rotational average smears out
    from napari_warp.core.ctf import ctf_zeros

    abs_ctf = fit.simulated / fit.envelope
    zeros = ctf_zeros(fit.ctf, 400).numpy()
    start = fit.fit_range[0]
    plain = fit_resolution(fit.frequencies, fit.spectrum - fit.background, abs_ctf, start, zeros)
    assert fit.fit_resolution == pytest.approx(
        fit_resolution(fit.frequencies, fit.rescaled, abs_ctf, start, zeros))
    assert plain > 1.2 * fit.fit_resolution  # measured: 6.3 Å plain vs 4.7 Å rescaled


def test_anisotropic_magnification_is_modelled():
    """1 % anisotropic magnification looks like 4·ε·defocus of astigmatism unless the model knows it."""
    rng = np.random.default_rng(0)
    shape = (1024, 1024)
    truth = CTFParams(pixel_size=1.0, defocus=20000.0, pixel_size_delta=0.01, pixel_size_angle=20.0)
    ctf = ctf_2d(truth, shape, dtype=torch.float64).numpy()
    signal = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * ctf, s=shape)
    image = signal + 0.5 * rng.standard_normal(shape)
    known = fit_ctf(image, CTFSettings(pixel_size=1.0, pixel_size_delta=0.01, pixel_size_angle=20.0, grid=(1, 1)))
    assert known.astigmatism < 60.0
    assert known.defocus == pytest.approx(20000.0, rel=0.002)
    unknown = fit_ctf(image, CTFSettings(pixel_size=1.0, grid=(1, 1)))
    assert unknown.astigmatism == pytest.approx(4 * 0.01 * 20000.0, rel=0.15)
    assert _angle_diff(unknown.angle, 20.0 + 90.0) <= 3.0  # larger pixels along 20° = less defocus there


def test_phase_shift_with_temporal_resolution():
    """Frames whose phase-plate shift grows from 40° to 100° over the exposure: two temporal nodes follow it."""
    rng = np.random.default_rng(3)
    shape, n = (768, 768), 8
    phases = np.linspace(40.0, 100.0, n)
    frames = []
    for ph in phases:
        ctf = ctf_2d(CTFParams(pixel_size=1.0, defocus=8000.0, phase_shift=float(ph)), shape,
                     dtype=torch.float64).numpy()
        frames.append(np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * ctf, s=shape)
                      + 0.7 * rng.standard_normal(shape))
    fit = fit_ctf(np.stack(frames).astype(np.float32),
                  CTFSettings(pixel_size=1.0, fit_phase=True, phase_nodes=2, grid=(1, 1)))
    assert fit.phase_nodes.shape == (2,)
    # nodes at the start and end of the exposure: 4 frame groups, centred at t = 1/8 … 7/8 of the linear ramp
    assert fit.phase_nodes[0] == pytest.approx(40.0, abs=6.0)
    assert fit.phase_nodes[1] == pytest.approx(100.0, abs=6.0)
    assert fit.defocus == pytest.approx(8000.0, rel=0.005)


def test_fit_resolution_finds_where_the_rings_end():
    """A spectrum that follows |CTF| up to a cut-off frequency and is noise beyond it."""
    px, n = 1.0, 256
    f = np.arange(n) / (2 * n * px)
    params = CTFParams(pixel_size=px, defocus=12000.0)
    from napari_warp.core.ctf import ctf_zeros

    simulated = np.abs(np.sin(_chi(f, params)))
    rng = np.random.default_rng(1)
    cut = 1 / 4.0  # 1/Å
    spectrum = np.where(f < cut, simulated + 0.05 * rng.standard_normal(n), rng.standard_normal(n))
    zeros = ctf_zeros(params, 200).numpy()
    res = fit_resolution(f, spectrum, simulated, 0.05, zeros)
    assert res == pytest.approx(4.0, rel=0.1)
    # all signal -> Nyquist
    assert fit_resolution(f, simulated, simulated, 0.05, zeros) == pytest.approx(2 * px, rel=0.02)


def _chi(f, p: CTFParams):
    from napari_warp.core.ctf import electron_wavelength

    lam = electron_wavelength(p.voltage)
    return (math.pi * lam * p.defocus * f**2 - 0.5 * math.pi * p.cs * 1e7 * lam**3 * f**4
            + math.asin(p.amplitude))


def test_frames_and_sum_agree():
    """Sum of per-frame spectra (movie input) and the spectrum of the sum find the same CTF."""
    s = MovieSimulation(shape=(768, 768), n_frames=4, pixel_size=1.0, defocus=15000.0, astigmatism=500.0,
                        astigmatism_angle=-30.0, drift=0.0, local_amplitude=0.0, dose_per_frame=10.0, seed=2)
    m = simulate_movie(s)
    settings = CTFSettings(pixel_size=1.0, grid=(1, 1))
    a = fit_ctf(m.frames, settings)
    b = fit_ctf(m.frames.sum(0), settings)
    assert a.defocus == pytest.approx(15000.0, rel=0.005) and b.defocus == pytest.approx(15000.0, rel=0.005)
    assert _angle_diff(a.angle, -30.0) < 2.0 and _angle_diff(b.angle, -30.0) < 2.0


@pytest.fixture(scope="module")
def small_fit():
    image, truth = _micrograph(15000.0, 600.0, 30.0, shape=(768, 768), seed=4)
    return fit_ctf(image, CTFSettings(pixel_size=1.0, grid=(3, 3))), truth


def test_xml_round_trip(small_fit, tmp_path):
    fit, _ = small_fit
    meta = WarpMetadata.new("Movie")
    ctf_to_xml(meta, fit)
    meta.write(tmp_path / "m.xml")
    from napari_warp.core.io.warp_xml import read_warp_xml

    back = read_warp_xml(tmp_path / "m.xml")
    p = back.get_params("CTF")
    assert float(p["Defocus"]) == pytest.approx(fit.defocus / 1e4)  # Warp stores µm
    assert float(p["DefocusDelta"]) == pytest.approx(fit.astigmatism / 1e4)
    assert back.get_grid("GridCTF").values.shape == (1, *fit.defocus_nodes.shape)
    assert float(back.get_attr("CTFResolutionEstimate")) == pytest.approx(fit.fit_resolution, abs=1e-3)
    ps1d = back.get_points("PS1D")
    assert ps1d[1, 0] == pytest.approx(1 / fit.window)  # x in cycles per pixel, Warp's sampling
    again = ctf_from_xml(back, fit.settings)
    yx = _field(fit.shape)
    np.testing.assert_allclose(again.defocus_at(yx), fit.defocus_at(yx), rtol=1e-6)
    assert again.angle == pytest.approx(fit.angle)
    assert again.score == pytest.approx(fit.score, abs=1e-5)
    np.testing.assert_allclose(again.rescaled, fit.rescaled, rtol=1e-5, atol=1e-6 * np.abs(fit.rescaled).max())


def test_display_image(small_fit):
    fit, _ = small_fit
    w = fit.window
    cropped = ctf_display_image(fit)
    assert cropped.shape == (2 * round(0.69 * w / 2),) * 2  # 15 % beyond the 0.6-Nyquist fit range
    img = ctf_display_image(fit, extent=1.0)
    assert img.shape == (w, w) and 0.0 <= img.min() and img.max() <= 1.0
    # the right half is the simulated |CTF|: its ring radii match the fitted defocus
    sim = np.fft.fftshift(np.abs(ctf_2d(fit.ctf, (w, w), rfft=False, dtype=torch.float64).numpy()))
    yy, xx = np.mgrid[:w, :w] - w // 2
    outside_dc = np.hypot(yy, xx)[:, w // 2 + 1:] > w // 4
    np.testing.assert_allclose(img[:, w // 2 + 1:][outside_dc], sim[:, w // 2 + 1:][outside_dc], atol=1e-6)
    # the left half shows the data: its rings line up with the model's (correlation over the fit range)
    r = np.hypot(yy, xx)
    lo, hi = (f * fit.settings.pixel_size * w for f in fit.fit_range)
    band = (r > lo) & (r < hi) & (xx < 0)
    assert np.corrcoef(img[band], sim[band])[0, 1] > 0.2


def test_settings_are_validated():
    with pytest.raises(ValueError, match="fit range"):
        CTFSettings(pixel_size=1.0, range_min=0.5, range_max=0.4)
    with pytest.raises(ValueError, match="defocus range"):
        CTFSettings(pixel_size=1.0, defocus_min=5000.0, defocus_max=1000.0)
    assert CTFSettings(pixel_size=1.0).range_angstrom() == pytest.approx((20.0, 2 / 0.6))
    with pytest.raises(ValueError, match="too small"):
        fit_ctf(np.zeros((40, 40), np.float32), CTFSettings(pixel_size=1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu(small_fit):
    image, _ = _micrograph(15000.0, 600.0, 30.0, shape=(768, 768), seed=4)
    settings = CTFSettings(pixel_size=1.0, grid=(3, 3))
    cpu = fit_ctf(image, settings, device="cpu")
    gpu = fit_ctf(image, settings, device="cuda")
    assert gpu.defocus == pytest.approx(cpu.defocus, rel=5e-4)
    assert gpu.astigmatism == pytest.approx(cpu.astigmatism, abs=10.0)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_micrograph_quadrants_agree_with_the_local_model(data_dir):
    """epu2.9_example.mrc: each quadrant fitted alone agrees within 2 % with the full-field local model there."""
    from napari_warp.core.io.movie import open_movie

    movie = open_movie(data_dir / "micrographs" / "epu2.9_example.mrc")
    image = np.asarray(movie.frames(), np.float32).sum(0)
    ps = movie.pixel_size
    full = fit_ctf(image, CTFSettings(pixel_size=ps, voltage=movie.voltage or 300.0))
    assert 3000 < full.defocus < 50000 and full.fit_resolution < 8.0
    h, w = (s // 2 for s in image.shape)
    for qy in (0, 1):
        for qx in (0, 1):
            quad = image[qy * h:(qy + 1) * h, qx * w:(qx + 1) * w]
            alone = fit_ctf(quad, CTFSettings(pixel_size=ps, voltage=movie.voltage or 300.0, grid=(1, 1)))
            centre = full.defocus_at([[qy * h + h / 2, qx * w + w / 2]])[0]
            assert alone.defocus == pytest.approx(centre, rel=0.02), (qy, qx)


def test_non_finite_pixels_are_refused_early():
    """NaN/inf pixels used to surface as ``RuntimeError: cannot reshape tensor of 0 elements`` deep in the fit; now
    a ``NapariWarpError`` names them, before any spectrum is computed."""
    image = np.random.default_rng(0).normal(10.0, 1.0, (128, 128)).astype(np.float32)
    image[3, 4] = image[50, 60] = np.nan
    image[100, 7] = np.inf
    settings = CTFSettings(pixel_size=1.0)
    calls = []
    with pytest.raises(NapariWarpError, match=r"the image has 3 non-finite values \(NaN or inf\) of 16384 pixels"):
        fit_ctf(image, settings, progress=lambda done, total: calls.append(done))
    assert not calls
    movie = np.stack([np.nan_to_num(image, nan=10.0, posinf=10.0), image])
    with pytest.raises(NapariWarpError, match="frames 0–1 have 3 non-finite"):
        fit_ctf(movie, settings)
