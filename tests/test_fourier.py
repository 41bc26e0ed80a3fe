"""core.fourier: Warp's shift convention, frequency grids, crop/pad/rescale, radial averages."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from napari_warp.core.fourier import (
    fft_frequencies,
    fftfreq_warp,
    fourier_crop,
    fourier_pad,
    fourier_rescale,
    fourier_shift,
    fourier_shift_rfft,
    frequency_magnitude,
    radial_average,
    rfft_frequencies,
    tile_power_spectrum,
)


def _mrc(path) -> torch.Tensor:
    with mrcfile.open(path, permissive=True) as m:
        return torch.tensor(np.array(m.data, dtype=np.float32))


def test_shift_matches_warp_shiftslices(data_dir):
    """Warp: ShiftSlices(new float3(2.5, 3.3, 0)) on an 8x8 delta at [0,0] == our (dy, dx) = (3.3, 2.5)."""
    ref = data_dir / "warp-reference"
    original, shifted = _mrc(ref / "shift_reference.mrc"), _mrc(ref / "shift_shifted_2.5_3.3.mrc")
    assert original[0, 0] == 1 and original.sum() == 1
    ours = fourier_shift(original, torch.tensor([3.3, 2.5]))
    torch.testing.assert_close(ours, shifted, atol=1e-5, rtol=0)
    # torch.fft.fftfreq's -0.5 Nyquist (torch-fourier-shift's convention) does not reproduce Warp here
    spectrum = torch.fft.rfft2(original.double())
    fy = torch.fft.fftfreq(8, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(8, dtype=torch.float64)[None]
    naive = torch.fft.irfft2(spectrum * torch.exp(-2j * math.pi * (fy * 3.3 + fx * 2.5)), s=(8, 8))
    assert (naive.float() - shifted).abs().max() > 0.1


def test_shift_delta_moves_to_higher_indices():
    img = torch.zeros(2, 16, 20)
    img[:, 0, 0] = 1
    out = fourier_shift(img, torch.tensor([[3.0, 5.0], [-2.0, 7.0]]))
    assert out.shape == (2, 16, 20)
    assert out[0, 3, 5] == pytest.approx(1, abs=1e-5) and out[1, 14, 7] == pytest.approx(1, abs=1e-5)
    assert out.abs().sum() == pytest.approx(2, abs=1e-4)


def test_shift_3d_and_round_trip_odd():
    vol = torch.zeros(6, 8, 10)
    vol[1, 2, 3] = 1
    out = fourier_shift(vol, torch.tensor([1.0, 2.0, 3.0]))
    assert out[2, 4, 6] == pytest.approx(1, abs=1e-5)
    # odd sizes have no Nyquist sample, so a fractional shift is exactly invertible
    img = torch.randn(15, 17, dtype=torch.float64)
    back = fourier_shift(fourier_shift(img, [1.3, -0.7]), [-1.3, 0.7])
    torch.testing.assert_close(back, img)


def test_shift_rfft_consistent_and_differentiable():
    img = torch.randn(3, 12, 16, dtype=torch.float64)
    shifts = torch.tensor([[0.3, -1.2], [2.2, 0.5], [-0.4, 0.1]], dtype=torch.float64, requires_grad=True)
    spec = fourier_shift_rfft(torch.fft.rfft2(img), shifts, (12, 16))
    torch.testing.assert_close(torch.fft.irfft2(spec, s=(12, 16)), fourier_shift(img, shifts))
    # gradient w.r.t. the shift vs. central finite difference
    target = torch.randn(12, 16, dtype=torch.float64)

    def loss(s):
        return (fourier_shift(img[0], s) * target).sum()

    s0 = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(s0), s0)
    eps = 1e-6
    steps = torch.eye(2, dtype=torch.float64) * eps
    fd = [(loss(s0.detach() + e) - loss(s0.detach() - e)) / (2 * eps) for e in steps]
    torch.testing.assert_close(g, torch.stack(fd), rtol=1e-5, atol=1e-7)


def test_frequency_grids_warp_nyquist():
    f = fftfreq_warp(8)
    assert f[4] == 0.5  # Warp: k < n/2 + 1 ? k : k - n
    torch.testing.assert_close(f[[0, 1, 3, 5, 7]], torch.fft.fftfreq(8)[[0, 1, 3, 5, 7]])
    torch.testing.assert_close(fftfreq_warp(7), torch.fft.fftfreq(7))
    g = rfft_frequencies((8, 10), pixel_size=2.0)
    assert g.shape == (8, 6, 2)
    assert g[4, 0, 0] == 0.25 and g[7, 0, 0] == pytest.approx(-1 / 16) and g[0, 5, 1] == 0.25
    assert fft_frequencies((8, 10)).shape == (8, 10, 2)
    assert frequency_magnitude((8, 10))[3, 4] == pytest.approx(math.hypot(3 / 8, 4 / 10))


def test_crop_pad_round_trip_exact():
    x = torch.randn(2, 32, 48, dtype=torch.float64)
    for shape in [(64, 80), (65, 81), (33, 48)]:
        torch.testing.assert_close(fourier_crop(fourier_pad(x, shape), (32, 48)), x)
    v = torch.randn(8, 10, 12, dtype=torch.float64)
    torch.testing.assert_close(fourier_crop(fourier_pad(v, (16, 14, 20)), (8, 10, 12)), v)


def test_pad_interpolates_band_limited_including_nyquist():
    n, m = 16, 40
    t = torch.arange(n, dtype=torch.float64)
    u = torch.arange(m, dtype=torch.float64) * n / m

    def f(c):
        return torch.cos(2 * math.pi * 3 * c / n)[:, None] * torch.cos(2 * math.pi * 8 * c / n)[None, :]  # x at Nyquist

    torch.testing.assert_close(fourier_pad(f(t), (m, m)), f(u))
    # cropping a band-limited image samples it on the coarser grid; the mean is preserved
    def g(c):
        return 1.5 + torch.sin(2 * math.pi * 2 * c / n)[:, None] * torch.cos(2 * math.pi * 3 * c / n)[None, :]

    torch.testing.assert_close(fourier_crop(g(u), (n, n)), g(t))
    with pytest.raises(ValueError):
        fourier_crop(f(t), (20, 20))


def test_fourier_rescale_pixel_size():
    img = torch.randn(64, 96)
    out, px = fourier_rescale(img, 1.0, 1.5)
    assert out.shape == (42, 64) and px == pytest.approx(1.5)
    out, px = fourier_rescale(img, 1.0, 0.5)
    assert out.shape == (128, 192) and px == pytest.approx(0.5)
    out, px = fourier_rescale(img, 0.834, 3.0)
    assert out.shape[-1] % 2 == 0 and px == pytest.approx(0.834 * 96 / out.shape[-1])


def test_radial_average_shells():
    shape = (64, 64)
    r = frequency_magnitude(shape, dtype=torch.float64)
    shell = torch.round(r * 64)
    img = torch.stack([shell**2, torch.cos(shell)])  # constant on each shell -> exact
    avg = radial_average(img)
    assert avg.shape == (2, 32)
    i = torch.arange(32, dtype=torch.float64)
    torch.testing.assert_close(avg, torch.stack([i**2, torch.cos(i)]))
    # a smooth radial function is reproduced to within the shell width
    smooth = radial_average(torch.exp(-((r / 0.2) ** 2)))
    torch.testing.assert_close(smooth, torch.exp(-((i / 64 / 0.2) ** 2)), atol=0.01, rtol=0)
    # centred full layout gives the same answer as rfft layout
    full = torch.fft.fftshift(torch.round(frequency_magnitude(shape, rfft=False, dtype=torch.float64) * 64) ** 2)
    torch.testing.assert_close(radial_average(full, rfft=False, centered=True), i**2)


def test_tile_power_spectrum_white_noise_and_tone():
    torch.manual_seed(4)
    noise = torch.randn(2, 256, 256, dtype=torch.float64)
    ps = tile_power_spectrum(noise, 64)
    assert ps.shape == (2, 64, 33)
    assert ps[0, 0, 0] == pytest.approx(0, abs=1e-12)  # per-tile mean removed
    assert ps[..., 1:, 1:].mean().item() == pytest.approx(1.0, rel=0.05)  # white, unit variance
    t = torch.arange(128, dtype=torch.float64)
    tone = torch.cos(2 * math.pi * 8 * t / 64)[None, :].expand(128, 128)  # 8 cycles per 64-px tile along x
    full = tile_power_spectrum(tone, 64, rfft=False)
    assert full.shape == (64, 64)
    assert full.argmax().item() in (8, 56) and full[0, 8] == pytest.approx(full[0, 56])
