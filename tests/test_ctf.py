"""core.ctf: Warp's CTF conventions, pinned against ctf_reference.mrc (GPU.CreateCTF) and analytic truths."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch
import torch_ctf

from napari_warp.core.ctf import (
    CTFParams,
    ctf_1d,
    ctf_1d_tensor,
    ctf_2d,
    ctf_2d_tensor,
    ctf_zeros,
    electron_wavelength,
    torch_ctf_arguments,
)
from napari_warp.core.fourier import radial_average, rfft_frequencies

# gen_ctf.txt, in Warp's own units (µm, DefocusDelta = u - v, PhaseShift in π)
C1 = CTFParams.from_warp(1.1, 1.5, 0.3, 25, 0.4, voltage=300, cs=2.7, amplitude=0.1, scale=0.9, bfactor=-40)
C2 = CTFParams.from_warp(1.5, 2.5, 0.0, 0.0, 0.0, voltage=200, cs=2.7, amplitude=0.07, scale=1.0, bfactor=-40)


@pytest.fixture(scope="module")
def warp_ctf(data_dir):
    with mrcfile.open(data_dir / "warp-reference" / "ctf_reference.mrc", permissive=True) as m:
        return torch.tensor(np.array(m.data, dtype=np.float32))


def test_params_units():
    assert C1.defocus == pytest.approx(15000) and C1.astigmatism == pytest.approx(3000)
    assert C1.phase_shift == pytest.approx(72.0)  # 0.4 π
    assert (C1.defocus_u, C1.defocus_v) == pytest.approx((16500, 13500))
    p = CTFParams.from_uv(16500, 13500, 25, pixel_size=1.1)
    assert (p.defocus, p.astigmatism, p.astigmatism_angle) == pytest.approx((15000, 3000, 25))
    assert electron_wavelength(300) == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength(200) == pytest.approx(0.025079, abs=1e-6)


def test_reproduces_warp_createctf(warp_ctf):
    """Half-complex 256² layout with DC at [0, 0]; Scale, B (negative damps), PhaseShift·π, angle from x."""
    assert warp_ctf.shape == (2, 256, 129)
    ours = ctf_2d([C1, C2], (256, 256))
    assert ours.shape == (2, 256, 129)
    torch.testing.assert_close(ours, warp_ctf, atol=1e-4, rtol=0)
    # DC: +scale·sin(phase + asin(amplitude)): positive, "+sin χ" convention
    assert warp_ctf[1, 0, 0] == pytest.approx(0.07, abs=1e-6)
    assert warp_ctf[0, 0, 0] == pytest.approx(0.9 * math.sin(math.radians(72) + math.asin(0.1)), abs=1e-5)


def test_nyquist_row_is_positive_frequency(warp_ctf):
    """Row 128 of a 256 box is +0.5 cycles/px in Warp; with fftfreq's -0.5 the astigmatic C1 misses there."""
    freqs = rfft_frequencies((256, 256), C1.pixel_size)
    flipped = freqs.clone()
    flipped[128, :, 0] *= -1
    args = (C1.defocus, C1.astigmatism, C1.astigmatism_angle, C1.voltage, C1.cs, C1.amplitude, C1.phase_shift,
            C1.bfactor, C1.scale)
    assert (ctf_2d_tensor(freqs, *args)[128] - warp_ctf[0, 128]).abs().max() < 1e-4
    assert (ctf_2d_tensor(flipped, *args)[128] - warp_ctf[0, 128]).abs().max() > 0.1


def test_astigmatism_angle_from_x_axis():
    """defocus_u lies along astigmatism_angle measured from +x toward +y."""
    n = 128
    for angle in (0.0, 90.0, 30.0):
        p = CTFParams(pixel_size=1.0, defocus=20000, astigmatism=4000, astigmatism_angle=angle)
        theta = math.radians(angle)
        f = torch.linspace(0, 0.45, 50, dtype=torch.float64)
        freqs = torch.stack([f * math.sin(theta), f * math.cos(theta)], -1)[None]  # (1, 50, 2) as (fy, fx)
        along = ctf_2d_tensor(freqs, p.defocus, p.astigmatism, angle, amplitude=p.amplitude)[0]
        torch.testing.assert_close(along, ctf_1d_tensor(f, p.defocus_u, amplitude=p.amplitude))
    # on the image grid: angle 0 puts u (stronger defocus, denser rings) along the x axis, i.e. row 0
    img = ctf_2d(CTFParams(pixel_size=1.0, defocus=20000, astigmatism=4000), (2 * n, 2 * n), dtype=torch.float64)
    torch.testing.assert_close(img[0, :n], ctf_1d(CTFParams(pixel_size=1.0, defocus=22000), n, dtype=torch.float64))
    torch.testing.assert_close(img[:n, 0], ctf_1d(CTFParams(pixel_size=1.0, defocus=18000), n, dtype=torch.float64))


def test_ctf_1d_matches_2d_and_radial_average():
    p = CTFParams(pixel_size=1.3, defocus=12000, bfactor=-20, phase_shift=15)
    img = ctf_2d(p, (256, 256), dtype=torch.float64)
    one = ctf_1d(p, 128, dtype=torch.float64)
    torch.testing.assert_close(img[0, :128], one)  # Warp's 1D sampling: i / (2 n pixel_size)
    # the rotational average follows the 1D curve at low frequency (before rings get narrower than a shell)
    assert (radial_average(img)[:40] - one[:40]).abs().max() < 0.05
    assert ctf_1d([p, p.with_(defocus=20000)], 64).shape == (2, 64)


def test_bfactor_and_scale():
    base = CTFParams(pixel_size=1.0, defocus=10000)
    f = rfft_frequencies((64, 64), 1.0, dtype=torch.float64).norm(dim=-1)
    damped = ctf_2d(base.with_(bfactor=-100, scale=0.5), (64, 64), dtype=torch.float64)
    torch.testing.assert_close(damped, 0.5 * ctf_2d(base, (64, 64), dtype=torch.float64) * torch.exp(-25 * f**2))


def test_anisotropic_magnification():
    """pixel_size_delta stretches the pixel along pixel_size_angle (Warp's GetCTFCoords)."""
    p = CTFParams(pixel_size=1.0, defocus=15000, pixel_size_delta=0.02, pixel_size_angle=0.0)
    img = ctf_2d(p, (128, 128), dtype=torch.float64)
    along_x = ctf_2d(p.with_(pixel_size=1.02, pixel_size_delta=0.0), (128, 128), dtype=torch.float64)[0]
    along_y = ctf_2d(p.with_(pixel_size=0.98, pixel_size_delta=0.0), (128, 128), dtype=torch.float64)[:65, 0]
    torch.testing.assert_close(img[0], along_x)
    torch.testing.assert_close(img[:65, 0], along_y)


def test_zeros():
    p = CTFParams(pixel_size=1.0, defocus=15000, astigmatism=2000, astigmatism_angle=40, phase_shift=20)
    z = ctf_zeros(p, 6)
    assert torch.all(z[1:] > z[:-1])
    vals = ctf_1d_tensor(z, p.defocus, p.voltage, p.cs, p.amplitude, p.phase_shift)
    assert vals.abs().max() < 1e-9
    zu = ctf_zeros(p, 3, angle_deg=40)
    dirs = torch.stack([zu * math.sin(math.radians(40)), zu * math.cos(math.radians(40))], -1)
    vals = ctf_2d_tensor(dirs, p.defocus, p.astigmatism, 40, amplitude=p.amplitude, phase_shift_deg=p.phase_shift)
    assert vals.abs().max() < 1e-9


def test_batched_gradients():
    """Per-patch defocus tensors broadcast; gradients are exact, also at zero astigmatism."""
    freqs = rfft_frequencies((32, 32), 1.5, dtype=torch.float64)
    defocus = torch.tensor([9000.0, 12000.0, 15000.0], dtype=torch.float64, requires_grad=True)
    astig = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = ctf_2d_tensor(freqs, defocus, astig, 30.0)
    assert out.shape == (3, 32, 17)
    target = torch.randn(3, 32, 17, dtype=torch.float64)
    loss = ((out - target) ** 2).sum()
    gd, ga = torch.autograd.grad(loss, (defocus, astig))
    assert torch.isfinite(ga).all() and torch.isfinite(gd).all()
    eps = 1e-3
    for i in range(3):
        d = torch.zeros(3, dtype=torch.float64)
        d[i] = eps
        for g, plus, minus in [
            (gd, (defocus + d, astig), (defocus - d, astig)),
            (ga, (defocus, astig + d), (defocus, astig - d)),
        ]:
            fd = (((ctf_2d_tensor(freqs, *plus, 30.0) - target) ** 2).sum()
                  - ((ctf_2d_tensor(freqs, *minus, 30.0) - target) ** 2).sum()) / (2 * eps)
            assert g[i].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_agrees_with_torch_ctf_off_nyquist():
    """torch-ctf (µm, half-astigmatism) agrees once units are converted; it differs only on the even Nyquist row."""
    keep = torch.ones(256, dtype=torch.bool)
    keep[128] = False
    for p in [CTFParams(1.1, 15000, 3000, 25, phase_shift=30), CTFParams(1.1, 15000, -3000, 25)]:
        theirs = torch_ctf.calculate_ctf_2d(**torch_ctf_arguments(p), image_shape=(256, 256), rfft=True,
                                            fftshift=False)
        ours = ctf_2d(p, (256, 256))
        assert (theirs - ours)[keep].abs().max() < 5e-3  # float32 + CODATA wavelength in torch-ctf


def test_full_layout_extends_rfft_layout():
    full = ctf_2d(C1, (64, 48), rfft=False, dtype=torch.float64)
    half = ctf_2d(C1, (64, 48), dtype=torch.float64)
    assert full.shape == (64, 48) and half.shape == (64, 25)
    torch.testing.assert_close(full[:, :25], half)
    # Hermitian symmetry of a real image's transfer: C(-f) = C(f) away from the Nyquist lines
    torch.testing.assert_close(full[1:32, 1:24], full.flip(0, 1)[:31, :23])
