"""core.deconvolve: Warp's Wiener-like filter against its formula, and global/local deconvolution of simulated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_warp.core import deconvolve as deconvolve_module
from napari_warp.core.ctf import CTFParams, ctf_2d
from napari_warp.core.deconvolve import (
    deconvolution_filter,
    deconvolve,
    defocus_levels,
    highpass_raised_cosine,
    wiener_filter,
)
from napari_warp.core.fourier import frequency_magnitude, radial_average

P15 = CTFParams(pixel_size=1.0, defocus=15000.0)


def _numpy_wiener(ctf, r, pixel_size, strength=1.0, falloff=1.0, highpass_nyquist=0.02):
    """The filter written out independently from Warp's kernel, in float64 numpy."""
    ctf, r = np.asarray(ctf, np.float64), np.asarray(r, np.float64)
    highpass = 1.0 - (np.cos(np.minimum(1.0, 2.0 * r / highpass_nyquist) * np.pi) * 0.5 + 0.5)
    ssnr = np.exp(-r * 2.0 * falloff * 100.0 / pixel_size) * 10.0 ** (3.0 * strength) * highpass
    return ctf / (ctf**2 + 1.0 / np.maximum(1e-15, ssnr))


def _smooth_image(shape, resolution, seed):
    """White noise with a Gaussian spectrum exp(-(r·resolution)²) (r in cycles/px): a smooth random image."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    r = frequency_magnitude(shape, 1.0, dtype=torch.float64)
    return torch.fft.irfft2(torch.fft.rfft2(noise) * torch.exp(-((r * resolution) ** 2)), s=shape)


def _convolve(x, params):
    """IFFT(FFT(x)·CTF): the noiseless image of x under ``params`` (float64)."""
    return torch.fft.irfft2(torch.fft.rfft2(x) * ctf_2d(params, x.shape, dtype=torch.float64), s=x.shape)


def _band(x, low_res, high_res):
    """Keep frequencies with 1/low_res <= |f| <= 1/high_res (Å, 1 Å/px); ``low_res=None`` keeps DC too."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    r = frequency_magnitude(x.shape, 1.0, dtype=torch.float64)
    keep = r <= 1.0 / high_res
    if low_res is not None:
        keep &= r >= 1.0 / low_res
    return torch.fft.irfft2(torch.fft.rfft2(x) * keep, s=x.shape).numpy()


def _pearson(a, b):
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


# ---------------------------------------------------------------------------------------------------------------
# 1. the filter formula


def test_wiener_filter_matches_formula_at_hand_picked_values():
    # r = 0 (DC: H = 0 -> filter ctf·1e-15 ≈ 0), r = 0.005 (H = 0.5), just below / at / above the high-pass end (0.01 cycles/px
    # for highpass_nyquist = 0.02), a mid frequency, Nyquist (SSNR underflows -> the 1e-15 floor).
    r = torch.tensor([0.0, 0.005, 0.0099, 0.01, 0.0101, 0.1, 0.5], dtype=torch.float64)
    ctf = torch.tensor([0.07, 0.5, -0.3, 0.8, 1.0, -0.6, 1.0], dtype=torch.float64)
    out = wiener_filter(ctf, r, pixel_size=1.0)
    np.testing.assert_allclose(out.numpy(), _numpy_wiener(ctf, r, 1.0), rtol=1e-12, atol=0)
    assert abs(out[0].item()) <= 1e-15  # 0.07 / (0.07² + 1e15)
    # by hand: r = 0.005 -> H = 1 - (cos(π/2)/2 + 1/2) = 0.5, SSNR = e^-1 · 1000 · 0.5 = 183.94
    ssnr = math.exp(-1.0) * 500.0
    assert out[1].item() == pytest.approx(0.5 / (0.25 + 1.0 / ssnr), rel=1e-12)  # = 1.95743
    assert out[1].item() == pytest.approx(1.95743, abs=1e-5)
    assert out[-1].item() == pytest.approx(1.0 / (1.0 + 1e15), rel=1e-9)
    h = highpass_raised_cosine(r).numpy()
    np.testing.assert_allclose(h[[0, 1, 3, 4, 5]], [0.0, 0.5, 1.0, 1.0, 1.0], atol=1e-12)
    assert 0.999 < h[2] < 1.0


def test_wiener_filter_parameters_and_pixel_size_match_formula():
    g = torch.Generator().manual_seed(3)
    r = torch.rand(50, generator=g, dtype=torch.float64) * 0.5
    ctf = torch.rand(50, generator=g, dtype=torch.float64) * 2 - 1
    for kwargs in ({"strength": 0.4, "falloff": 2.5, "highpass_nyquist": 0.1}, {"strength": 1.7, "falloff": 0.3}):
        out = wiener_filter(ctf, r, 2.3, **kwargs)
        np.testing.assert_allclose(out.numpy(), _numpy_wiener(ctf, r, 2.3, **kwargs), rtol=1e-12)


def test_wiener_filter_is_dimension_generic_3d():
    shape = (6, 8, 10)  # (Z, Y, X) -> rfft grid (6, 8, 6)
    r = frequency_magnitude(shape, 1.0, dtype=torch.float64)
    assert r.shape == (6, 8, 6)
    ctf = torch.sin(40.0 * r + 0.07)  # some CTF-like values on the grid
    out = wiener_filter(ctf, r, pixel_size=1.5, strength=1.2)
    assert out.shape == (6, 8, 6)
    np.testing.assert_allclose(out.numpy(), _numpy_wiener(ctf, r, 1.5, strength=1.2), rtol=1e-12)
    assert abs(out[0, 0, 0].item()) <= 1e-15


def test_deconvolution_filter_uses_warp_ctf_without_envelope():
    shape = (64, 80)
    params = CTFParams(pixel_size=1.3, defocus=12000, astigmatism=800, astigmatism_angle=30, bfactor=-80)
    filt = deconvolution_filter(params, shape, strength=0.8, dtype=torch.float64)
    ctf = ctf_2d(params.with_(bfactor=0.0), shape, dtype=torch.float64)
    r = frequency_magnitude(shape, 1.0, dtype=torch.float64)
    np.testing.assert_allclose(filt.numpy(), _numpy_wiener(ctf, r, 1.3, strength=0.8), rtol=1e-12)
    batch = deconvolution_filter([params, params.with_(defocus=20000)], shape, dtype=torch.float64)
    assert batch.shape == (2, 64, 41)
    np.testing.assert_allclose(batch[0].numpy(), deconvolution_filter(params, shape, dtype=torch.float64).numpy())


# ---------------------------------------------------------------------------------------------------------------
# 2. round trip on a simulated image


def test_deconvolution_restores_low_frequency_contrast():
    x = _smooth_image((256, 256), 10.0, seed=0)
    y = _convolve(x, P15)  # 15000 Å under-focus, 1 Å/px, noiseless
    d = deconvolve(y.numpy(), P15)
    # Measured (seeds 0..3): low-passed to 30 Å the CTF-convolved input correlates 0.904-0.922 with the truth, the
    # deconvolved image 0.991-0.994; to 50 Å 0.919-0.950 vs 0.996-0.999. Pearson cannot show a +0.3 gap here: up to
    # ~20 Å this CTF does not change sign, so the input is a positively weighted copy of the truth and already
    # correlates ~0.9; what deconvolution fixes is the weighting (CTF ~0.07 at DC). So we also assert the unexplained
    # variance 1 − ρ² shrinks many-fold (measured ~0.17 -> ~0.016 at 30 Å, ~10×; asserted 4×).
    rho = {}
    for res in (30.0, 50.0):
        truth = _band(x, None, res)
        rho[res] = (_pearson(_band(y, None, res), truth), _pearson(_band(d, None, res), truth))
    (in30, de30), (in50, de50) = rho[30.0], rho[50.0]
    assert de30 > 0.98 and in30 < 0.94 and de30 > in30 + 0.05
    assert de50 > 0.99 and in50 < 0.96
    assert (1 - de30**2) < (1 - in30**2) / 4
    # Beyond 20 Å the Wiener filter is a low-pass (SSNR e^-10·1000 = 0.045 at 20 Å): it must not restore that band,
    # so the deconvolved image is smoother than the truth.
    assert _band(d, 20.0, 5.0).std() < 0.1 * _band(y, 20.0, 5.0).std()


def test_deconvolve_is_mean_free_and_ignores_offset():
    x = _smooth_image((128, 96), 8.0, seed=1).numpy()
    d0 = deconvolve(x, P15)
    d1 = deconvolve(x + 1000.0, P15)
    assert abs(float(d0.mean())) < 1e-6 * float(d0.std())
    np.testing.assert_allclose(d1, d0, atol=1e-3 * float(d0.std()))


# ---------------------------------------------------------------------------------------------------------------
# 3. local CTF


@pytest.fixture(scope="module")
def split_defocus():
    """Left half under 10000 Å, right half under 30000 Å (each convolved globally, then spliced)."""
    x = _smooth_image((256, 256), 10.0, seed=2)
    y_left, y_right = _convolve(x, P15.with_(defocus=10000.0)), _convolve(x, P15.with_(defocus=30000.0))
    y = y_left.clone()
    y[:, 128:] = y_right[:, 128:]
    dmap = np.full((256, 256), 10000.0)
    dmap[:, 128:] = 30000.0
    return x.numpy(), y.numpy(), dmap


def test_local_deconvolution_beats_global_on_each_half(split_defocus):
    x, y, dmap = split_defocus
    params = P15.with_(defocus=20000.0)  # the mean defocus, for the global filter
    local = deconvolve(y, params, defocus_map=dmap)
    glob = deconvolve(y, params)
    left, right = slice(24, 104), slice(152, 232)  # 24 px away from the seams (the image wraps around)
    # Band 25-12 Å: where 10000/20000/30000 Å CTFs disagree in sign, so deconvolving at the wrong defocus inverts
    # contrast. Measured over seeds 0..3: left local 0.42-0.53 vs global 0.23-0.35 (gap >= 0.17); right local
    # 0.40-0.52 vs global -0.11..-0.23.
    tb, lb, gb = (_band(a, 25.0, 12.0) for a in (x, local, glob))
    assert _pearson(lb[:, left], tb[:, left]) > _pearson(gb[:, left], tb[:, left]) + 0.1
    assert _pearson(lb[:, right], tb[:, right]) > 0.3
    assert _pearson(gb[:, right], tb[:, right]) < 0.0
    # Full band too (dominated by low frequencies, so smaller gaps; measured 0.54 vs 0.53 left, 0.49 vs 0.47 right).
    assert _pearson(local[:, left], x[:, left]) > _pearson(glob[:, left], x[:, left])
    assert _pearson(local[:, right], x[:, right]) > _pearson(glob[:, right], x[:, right]) + 0.01


def test_local_deconvolution_is_exact_blend_of_levels(split_defocus, monkeypatch):
    _, y, _ = split_defocus
    # The two map values are the end levels: each half is *exactly* the global deconvolution at its own defocus.
    dmap = np.full(y.shape, 10000.0)
    dmap[:, 128:] = 30000.0
    local = deconvolve(y, P15, defocus_map=dmap)
    at10, at30 = deconvolve(y, P15.with_(defocus=10000.0)), deconvolve(y, P15.with_(defocus=30000.0))
    tol = 1e-5 * float(at10.std())
    np.testing.assert_allclose(local[:, :128], at10[:, :128], atol=tol)
    np.testing.assert_allclose(local[:, 128:], at30[:, 128:], atol=tol)
    # A ramp 10000 -> 12000 Å along x: 2000/100 would need 21 levels, capped at 16 -> spacing 133.33 Å; a pixel
    # between two levels is their linear interpolation.
    levels = defocus_levels(10000.0, 12000.0)
    assert len(levels) == 16 and levels[0] == 10000.0 and levels[-1] == 12000.0
    assert len(defocus_levels(10000.0, 10250.0)) == 4  # 3 steps of 83.3 Å
    ramp = np.broadcast_to(np.linspace(10000.0, 12000.0, y.shape[1]), y.shape)
    local = deconvolve(y, P15, defocus_map=ramp)
    for col in (0, 77, 200, 255):
        d = ramp[0, col]
        i = min(int(np.searchsorted(levels, d, side="right")) - 1, len(levels) - 2)
        w = (d - levels[i]) / (levels[i + 1] - levels[i])
        lo = deconvolve(y, P15.with_(defocus=float(levels[i])))
        hi = deconvolve(y, P15.with_(defocus=float(levels[i + 1])))
        np.testing.assert_allclose(local[:, col], (1 - w) * lo[:, col] + w * hi[:, col], atol=tol)
    # Batching the 16 levels 3 at a time (as for a large micrograph) gives the same result.
    monkeypatch.setattr(deconvolve_module, "_CHUNK_ELEMENTS", 3 * y.size)
    np.testing.assert_allclose(deconvolve(y, P15, defocus_map=ramp), local, atol=tol)


def test_constant_or_coarse_defocus_map_is_global(split_defocus):
    _, y, _ = split_defocus
    ref = deconvolve(y, P15.with_(defocus=18000.0))
    flat = np.full(y.shape, 18000.0)
    flat[0, 0] = 18002.0  # within the constant-map tolerance: mean 18000.00003 Å
    np.testing.assert_allclose(deconvolve(y, P15, defocus_map=flat), ref, atol=1e-4 * float(ref.std()))
    coarse = np.full((4, 5), 18000.0)  # a coarse grid is resampled to the image
    np.testing.assert_allclose(deconvolve(y, P15, defocus_map=coarse), ref, atol=1e-5 * float(ref.std()))
    with pytest.raises(ValueError, match="2D"):
        deconvolve(y, P15, defocus_map=np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# 4. parameters


def _radial_abs_filter(**kwargs):
    filt = deconvolution_filter(P15, (256, 256), dtype=torch.float64, **kwargs)
    return radial_average(filt.abs(), image_shape=(256, 256)).numpy()  # shells of 1/256 cycles/px


def test_strength_boosts_and_falloff_suppresses():
    low, high = 4, 26  # shells at r = 4/256 (64 Å) and 26/256 (~10 Å) cycles/px
    by_strength = [_radial_abs_filter(strength=s) for s in (0.5, 1.0, 1.5)]
    assert by_strength[0][low] < by_strength[1][low] < by_strength[2][low]
    assert by_strength[2][low] > 1.5 * by_strength[0][low]
    by_falloff = [_radial_abs_filter(falloff=f) for f in (0.5, 1.0, 2.0)]
    ratios = [f[high] / f[low] for f in by_falloff]
    assert ratios[0] > 10 * ratios[1] > 100 * ratios[2]
    # a larger high-pass cut-off removes more of the lowest frequencies
    assert _radial_abs_filter(highpass_nyquist=0.2)[2] < 0.5 * by_strength[1][2]


# ---------------------------------------------------------------------------------------------------------------
# 5. types and shapes


def test_types_and_odd_shapes():
    img = _smooth_image((255, 301), 6.0, seed=4).numpy()
    out = deconvolve(img, P15)  # float64 numpy in
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (255, 301)
    t = deconvolve(torch.from_numpy(img).float(), P15)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (255, 301)
    np.testing.assert_allclose(t.numpy(), out, atol=1e-5 * float(out.std()))
    t64 = deconvolve(torch.from_numpy(img), P15)
    assert t64.dtype == torch.float64
    dmap = np.broadcast_to(np.linspace(9000.0, 11000.0, 301), (255, 301))
    loc = deconvolve(img, P15, defocus_map=dmap)
    assert loc.dtype == np.float32 and loc.shape == (255, 301) and np.isfinite(loc).all()
    with pytest.raises(ValueError, match="2D"):
        deconvolve(np.zeros((2, 8, 8)), P15)


# ---------------------------------------------------------------------------------------------------------------
# 6. CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(split_defocus):
    _, y, dmap = split_defocus
    params = P15.with_(defocus=20000.0)
    for kwargs in ({}, {"defocus_map": dmap}):
        cpu = deconvolve(y, params, device="cpu", **kwargs)
        gpu = deconvolve(y, params, device="cuda", **kwargs)
        assert isinstance(gpu, np.ndarray)
        np.testing.assert_allclose(gpu, cpu, atol=1e-4 * float(cpu.std()))
        t = deconvolve(torch.from_numpy(y).cuda(), params, **kwargs)
        assert t.is_cuda
        np.testing.assert_allclose(t.cpu().numpy(), cpu, atol=1e-4 * float(cpu.std()))
