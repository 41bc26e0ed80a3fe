"""core.particles: particle extraction from movies against truth; RELION normalisation, CTF and STAR conventions."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from napari_warp.core import particles as particles_mod
from napari_warp.core.ctf import CTFParams, ctf_2d
from napari_warp.core.ctf_fit import CTFFit, CTFSettings
from napari_warp.core.fourier import fourier_crop, fourier_shift
from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.io.star import read_star, write_star
from napari_warp.core.motion import MotionModel, MotionSettings, aligned_average, dose_filters, frame_doses
from napari_warp.core.particles import (
    ExportSettings,
    extract_particles,
    particle_ctf,
    write_particle_stack,
    write_particle_star,
)
from napari_warp.core.simulate import MovieSimulation, simulate_movie

RELION_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
              "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _smooth_image(shape, seed: int = 0, length: float = 3.0) -> np.ndarray:
    """Random smooth image (correlation length ~``length`` px), mean 10, std 1, float64."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(shape, generator=g, dtype=torch.float64)
    f2 = torch.fft.fftfreq(shape[0], dtype=torch.float64)[:, None] ** 2 + torch.fft.rfftfreq(
        shape[1], dtype=torch.float64)[None, :] ** 2
    img = torch.fft.irfft2(torch.fft.rfft2(white) * torch.exp(-f2 * (math.pi * length) ** 2), s=shape)
    return (10 + img / img.std()).numpy()


def _moved_frames(image: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Frames ``(F, Y, X)``: ``image`` moved by ``shifts`` ``(F, 2)`` px (content toward higher index)."""
    img = torch.as_tensor(image)[None].expand(len(shifts), -1, -1)
    return fourier_shift(img, torch.as_tensor(shifts, dtype=torch.float64)).numpy().astype(np.float32)


def _centred_crop(image: np.ndarray, yx, box: int) -> np.ndarray:
    """``box``² crop of ``image`` with the (sub-pixel) point ``yx`` moved onto pixel ``box // 2`` (circular)."""
    c = np.array(image.shape) // 2
    moved = fourier_shift(torch.as_tensor(image, dtype=torch.float64), torch.as_tensor(c - np.asarray(yx))).numpy()
    return moved[c[0] - box // 2 : c[0] + box // 2, c[1] - box // 2 : c[1] + box // 2]


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def _peak_offset(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Sub-pixel ``(dy, dx)`` by which ``image`` is displaced from ``reference`` (cross-correlation peak)."""
    a, b = image - image.mean(), reference - reference.mean()
    cc = np.fft.fftshift(np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape))
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)
    out = []
    for d, i in ((0, iy), (1, ix)):
        lo, hi = [cc[(i + s) % cc.shape[0], ix] if d == 0 else cc[iy, (i + s) % cc.shape[1]] for s in (-1, 1)]
        mid = cc[iy, ix]
        out.append(i - cc.shape[d] // 2 + 0.5 * (lo - hi) / (lo - 2 * mid + hi))
    return np.array(out)


def _ctf_fit(nodes, shape, pixel_size: float, astigmatism=0.0, angle=0.0, phase=0.0, resolution=4.5) -> CTFFit:
    """A ``CTFFit`` holding a given local-defocus grid (no spectra): what ``fit_ctf`` returns, minus the data."""
    z = np.zeros(0)
    return CTFFit(settings=CTFSettings(pixel_size=pixel_size, amplitude=0.1), shape=tuple(shape), window=256,
                  defocus_nodes=np.asarray(nodes, np.float64), astigmatism=astigmatism, astigmatism_angle=angle,
                  phase_nodes=np.array([phase]), fit_resolution=resolution, frequencies=z, spectrum=z,
                  background=z, envelope=z, rescaled=z, simulated=z)


RAW = dict(normalize=False, invert=False, dose_weighting=False)  # plain frame sums, to compare with truth


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rigid_movie():
    """A smooth image moved by a known global trajectory (8 frames, up to ~6 px), its model and settings."""
    image = _smooth_image((192, 192), seed=1)
    t = np.linspace(0, 1, 8)
    shifts = np.stack([5.3 * t**0.5 - 2.0, -3.1 * t + 1.2 * np.sin(7 * t)], -1)
    frames = _moved_frames(image, shifts)
    model = MotionModel.from_nodes(shifts, None, image.shape, pixel_size=2.0)
    return image, frames, model, MotionSettings(pixel_size=2.0, exposure_per_frame=5.0)


@pytest.fixture(scope="module")
def sim_movie():
    """A simulated 256² × 8 movie with drift (15 px) and local motion (1 px RMS: a particle stays nearly rigid), a
    steeply tilted specimen (defocus plane spanning ~1 µm), no detector MTF."""
    settings = MovieSimulation(shape=(256, 256), n_frames=8, pixel_size=2.0, dose_per_frame=20.0, drift=30.0,
                               local_amplitude=2.0, particle_diameter=100.0, n_particles=14, seed=3,
                               defocus_gradient=(1.0, -1.5), astigmatism=400.0, astigmatism_angle=25.0, mtf=None)
    return simulate_movie(settings, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# extraction against truth
# ---------------------------------------------------------------------------------------------------------------
def test_rigid_extraction_equals_the_shifted_image(rigid_movie):
    """With the true global trajectory, each box is the frame count times the image around the (sub-pixel) particle
    centre, which sits on pixel B // 2 (RELION's box centre)."""
    image, frames, model, ms = rigid_movie
    yx = np.array([[60.3, 97.7], [100.0, 50.0], [131.6, 140.2]])
    stack = extract_particles(frames, yx, model, None, ExportSettings(box_size=48, **RAW), motion_settings=ms)
    assert stack.images.shape == (3, 48, 48) and stack.images.dtype == np.float32
    assert stack.pixel_size == 2.0 and stack.micrograph_pixel_size == 2.0 and stack.inside.all()
    for k, p in enumerate(yx):
        expected = len(frames) * _centred_crop(image, p, 48)
        np.testing.assert_allclose(stack.images[k], expected, atol=0.01 * len(frames))  # image std: 1
        assert np.abs(_peak_offset(stack.images[k], expected)).max() < 0.02


def test_dose_weighted_extraction_matches_the_aligned_average(rigid_movie):
    """The dose weighting is the aligned average's own: for a rigid model the particle box is the average's crop.
    (Frames get independent noise, band-limited like the image: the weights, normalised per frequency, change nothing
    on identical frames; and a sub-pixel shift of content at Nyquist is ill-defined, in the reference crop too.)"""
    image, frames, model, _ = rigid_movie
    noisy = frames + np.stack([_smooth_image(image.shape, seed=10 + f) - 10 for f in range(len(frames))])
    noisy = noisy.astype(np.float32)
    ms = MotionSettings(pixel_size=2.0, exposure_per_frame=40.0)  # B-factors to −1200 Å²
    average = aligned_average(noisy, model, ms, halves=False).average
    yx = np.array([[70.0, 80.0], [120.4, 110.7]])
    stack = extract_particles(noisy, yx, model, None, ExportSettings(box_size=48, normalize=False, invert=False),
                              motion_settings=ms)
    plain = extract_particles(noisy, yx, model, None, ExportSettings(box_size=48, **RAW), motion_settings=ms)
    for k, p in enumerate(yx):
        expected = _centred_crop(average, p, 48)
        error = np.abs(stack.images[k] - expected)
        assert error.max() < 0.02 * expected.std() and error[8:-8, 8:-8].max() < 0.005 * expected.std()
        assert np.abs(plain.images[k] - expected).max() > 0.1 * expected.std()  # the weighting does something


def test_dose_weights_are_the_average_s_at_any_exposure(rigid_movie):
    """The separable dose factors of the extraction give ``motion.dose_filters``' normalised weights, and stay finite
    at high exposure (0.5 Å/px, 400 e/Å² before the first frame: the absolute filters underflow even in float64),
    where the particles are those without pre-exposure (normalised weights depend on dose differences only)."""
    for pre in (0.0, 60.0, 400.0):
        ms = MotionSettings(pixel_size=0.5, exposure_per_frame=2.0, pre_exposure=pre)
        ay, ax = particles_mod._dose_weights(np.arange(1, 8), 8, 48, 0.5, ms, True, "cpu")
        w = ay[:, :, None] * ax[:, None, :]
        w = (w * (7 / w.sum(0))).float().numpy()
        np.testing.assert_allclose(w, dose_filters(frame_doses(8, 2.0, pre)[1:], (48, 48), 0.5), rtol=1e-5, atol=1e-6)
    image, frames, model, _ = rigid_movie
    yx = np.array([[70.0, 80.0], [120.4, 110.7]])
    settings = [MotionSettings(pixel_size=0.5, exposure_per_frame=2.0, pre_exposure=pre) for pre in (0.0, 400.0)]
    stacks = [extract_particles(frames, yx, model, None, ExportSettings(box_size=48, halves=True), motion_settings=ms)
              for ms in settings]
    assert np.isfinite(stacks[1].images).all() and np.isfinite(stacks[1].odd).all()
    np.testing.assert_allclose(stacks[1].images, stacks[0].images, atol=1e-4)
    np.testing.assert_allclose(stacks[1].odd, stacks[0].odd, atol=1e-4)


def test_rescaled_extraction_matches_the_fourier_cropped_image(rigid_movie):
    """Output at twice the pixel size: the box is the Fourier-cropped image around the particle (at p / 2)."""
    image, frames, model, ms = rigid_movie
    small = fourier_crop(torch.as_tensor(image), (96, 96)).numpy()
    yx = np.array([[80.0, 100.0], [110.4, 70.6]])
    stack = extract_particles(frames, yx, model, None, ExportSettings(box_size=32, pixel_size=4.0, **RAW),
                              motion_settings=ms)
    assert stack.pixel_size == 4.0 and stack.images.shape == (2, 32, 32)
    for k, p in enumerate(yx):
        expected = len(frames) * _centred_crop(small, p / 2, 32)
        assert np.abs(stack.images[k] - expected).max() < 0.03 * len(frames) * small.std()


def test_true_motion_centres_the_particles(sim_movie):
    """On a simulated movie, boxes extracted with the true (global + local) motion match the clean particles better
    than with the global part alone or no motion, and are centred to < 0.5 px; without motion they are not."""
    truth = sim_movie.truth
    ms = MotionSettings(pixel_size=truth.pixel_size, exposure_per_frame=truth.dose_per_frame)
    global_only = MotionModel.from_nodes(truth.global_shifts, None, truth.shape, truth.pixel_size)
    s = ExportSettings(box_size=64, **RAW)
    refs = [_centred_crop(truth.clean, p, 64) for p in truth.particles]
    ncc, offset = {}, {}
    for name, motion in (("true", truth), ("global", global_only), ("none", None)):
        stack = extract_particles(sim_movie.frames, truth.particles, motion, None, s, motion_settings=ms)
        ncc[name] = np.array([_ncc(a, r) for a, r in zip(stack.images, refs)])
        offset[name] = np.array([np.hypot(*_peak_offset(a, r)) for a, r in zip(stack.images, refs)])
    assert ncc["true"].mean() > ncc["global"].mean() + 0.03 and ncc["global"].mean() > ncc["none"].mean() + 0.2, ncc
    assert (ncc["true"] > ncc["none"] + 0.2).all(), ncc
    assert offset["true"].max() < 0.5 and np.median(offset["global"]) > np.median(offset["true"]), offset
    assert np.median(offset["none"]) > 5.0, offset  # blurred along the 15 px trajectory


def test_normalisation_inversion_and_halves(sim_movie):
    """RELION normalisation: background (outside the diameter circle) mean 0, std 1; inverted contrast; halves from
    odd/even frames add up to the full stack exactly."""
    truth = sim_movie.truth
    ms = MotionSettings(pixel_size=truth.pixel_size, exposure_per_frame=truth.dose_per_frame)
    yx = truth.particles[:6]
    diameter = 80.0
    stack = extract_particles(sim_movie.frames, yx, truth, None,
                              ExportSettings(box_size=64, diameter=diameter, halves=True), motion_settings=ms)
    r = np.hypot(*np.meshgrid(np.arange(64) - 32, np.arange(64) - 32, indexing="ij"))
    bg = stack.images[:, r > diameter / truth.pixel_size / 2]
    np.testing.assert_allclose(bg.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(1), 1, atol=1e-5)
    np.testing.assert_allclose(stack.odd + stack.even, stack.images, atol=1e-4)
    assert 0.3 < stack.odd[:, r > 20].std() < 0.9  # each half carries about half the signal and noise
    raw = extract_particles(sim_movie.frames, yx, truth, None, ExportSettings(box_size=64, halves=True, **RAW),
                            motion_settings=ms)
    flat = extract_particles(sim_movie.frames, yx, truth, None, ExportSettings(box_size=64, diameter=diameter,
                             subtract_ramp=False, dose_weighting=False), motion_settings=ms)
    assert all(_ncc(a, b) == pytest.approx(-1, abs=1e-5) for a, b in zip(flat.images, raw.images))  # inverted
    # even = frames 0, 2, 4, 6 (the first used frame is even, as in the average's halves)
    even_only = extract_particles(sim_movie.frames[::2], yx, _EveryOther(truth), None,
                                  ExportSettings(box_size=64, **RAW), motion_settings=ms)
    np.testing.assert_allclose(raw.even, even_only.images, atol=1e-3 * np.abs(raw.even).max())
    np.testing.assert_allclose(raw.odd + raw.even, raw.images, rtol=1e-5, atol=1e-3)


class _EveryOther:
    """The motion of frames 0, 2, 4, ... of ``truth`` (for a movie of those frames only)."""

    def __init__(self, truth):
        self.truth = truth

    def shifts(self, yx, frames):
        return self.truth.shifts(yx, 2 * np.asarray(frames))


def test_normalisation_without_ramp_and_without_normalising(rigid_movie):
    image, frames, model, ms = rigid_movie
    yx = np.array([[90.0, 90.0]])
    flat = extract_particles(frames, yx, model, None, ExportSettings(box_size=48, diameter=60.0,
                                                                     subtract_ramp=False), motion_settings=ms)
    r = np.hypot(*np.meshgrid(np.arange(48) - 24, np.arange(48) - 24, indexing="ij"))
    bg = flat.images[0][r > 15]
    assert abs(bg.mean()) < 1e-5 and abs(bg.std() - 1) < 1e-5
    inverted = extract_particles(frames, yx, model, None, ExportSettings(box_size=48, normalize=False),
                                 motion_settings=ms)
    plain = extract_particles(frames, yx, model, None, ExportSettings(box_size=48, normalize=False, invert=False),
                              motion_settings=ms)
    np.testing.assert_array_equal(inverted.images, -plain.images)
    with pytest.raises(ValueError, match="background"):
        extract_particles(frames, yx, model, None, ExportSettings(box_size=48, diameter=200.0), motion_settings=ms)
    with pytest.raises(ValueError, match="even"):
        ExportSettings(box_size=63)
    with pytest.raises(ValueError, match="motion_settings"):
        extract_particles(frames, yx, model, None, ExportSettings(box_size=48))


def test_batches_and_passes_do_not_change_the_result(rigid_movie, monkeypatch):
    """Particles are processed in batches (and FFT calls, factor groups and final chunks within them) and, when their
    sums would not fit, in passes over the frames."""
    image, frames, model, ms = rigid_movie
    yx = np.random.default_rng(0).uniform(20, 170, (9, 2))
    s = ExportSettings(box_size=32, halves=True)
    whole = extract_particles(frames, yx, model, None, s, motion_settings=ms)
    monkeypatch.setattr(particles_mod, "_BOX_ELEMENTS", 3 * 48 * 48)
    monkeypatch.setattr(particles_mod, "_FFT_BYTES", 48 * 25 * 8)  # one box per FFT call, 3 per batch
    monkeypatch.setattr(particles_mod, "_FINISH_BYTES", 3 * 2 * 48 * 48 * 4)  # 3 particles' halves
    monkeypatch.setattr(particles_mod, "_FACTOR_BYTES", 3 * 4 * (48 + 25) * 8)  # 3 frames of 4 particles
    monkeypatch.setattr(particles_mod, "_ACCUMULATOR_BYTES", 4 * 2 * 48 * 25 * 8)  # 4 particles of 48² (padded)
    calls = []
    split = extract_particles(frames, yx, model, None, s, motion_settings=ms,
                              progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_allclose(split.images, whole.images, atol=1e-5)
    np.testing.assert_allclose(split.odd, whole.odd, atol=1e-5)
    assert calls[-1] == (3 * len(frames), 3 * len(frames))  # three passes of 4, 4, 1 particles


def test_edge_particles_empty_picks_and_mismatched_frames(rigid_movie):
    image, frames, model, ms = rigid_movie
    stack = extract_particles(frames, [[5.0, 96.0], [96.0, 96.0], [-40.0, -40.0]], model, None,
                              ExportSettings(box_size=32, diameter=40.0), motion_settings=ms)
    assert stack.inside.tolist() == [False, True, False]
    assert np.isfinite(stack.images).all()
    none = extract_particles(frames, np.zeros((0, 2)), model, None, ExportSettings(box_size=32, halves=True),
                             motion_settings=ms)
    assert none.images.shape == (0, 32, 32) and none.odd.shape == (0, 32, 32)
    with pytest.raises(ValueError, match="do not match the motion model"):
        extract_particles(frames[1:], [[96.0, 96.0]], model, None, ExportSettings(box_size=32), motion_settings=ms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(rigid_movie):
    image, frames, model, ms = rigid_movie
    yx = np.array([[60.3, 97.7], [131.6, 140.2]])
    s = ExportSettings(box_size=48, pixel_size=3.0, halves=True)
    cpu = extract_particles(frames, yx, model, None, s, motion_settings=ms, device="cpu")
    gpu = extract_particles(frames, yx, model, None, s, motion_settings=ms, device="cuda")
    np.testing.assert_allclose(gpu.images, cpu.images, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# CTF
# ---------------------------------------------------------------------------------------------------------------
def test_ctf_per_particle_is_the_local_model(sim_movie):
    """Each particle's defocus is the fitted local model at its centre (a tilted plane here, fitted at half the
    sampling); U/V/angle follow RELION (U − V = DefocusDelta ≥ 0, Warp's angle), phase shift in degrees."""
    truth = sim_movie.truth
    y, x = truth.shape
    corners = np.array([[0, 0], [0, x], [y, 0], [y, x]], np.float64)
    nodes = truth.defocus_at(corners).reshape(2, 2)  # a 2 × 2 grid of the fit is exactly a plane
    fit = _ctf_fit(nodes, (y // 2, x // 2), 2 * truth.pixel_size, astigmatism=400.0, angle=25.0, phase=30.0)
    ms = MotionSettings(pixel_size=truth.pixel_size, exposure_per_frame=truth.dose_per_frame)
    stack = extract_particles(sim_movie.frames, truth.particles, truth, fit, ExportSettings(box_size=32),
                              motion_settings=ms)
    expected = truth.defocus_at(truth.particles)
    assert np.ptp(expected) > 500  # the plane matters
    np.testing.assert_allclose(stack.ctf["defocus_u"], expected + 200, atol=0.01)
    np.testing.assert_allclose(stack.ctf["defocus_v"], expected - 200, atol=0.01)
    assert (stack.ctf["defocus_angle"] == 25.0).all() and (stack.ctf["phase_shift"] == 30.0).all()
    assert (stack.ctf["max_resolution"] == 4.5).all()
    assert (stack.voltage, stack.cs, stack.amplitude) == (300.0, 2.7, 0.1)


def test_relion_defocus_convention():
    """Negative astigmatism swaps U and V and turns the angle by 90° (wrapped into (−90, 90]); the 2D CTFs agree."""
    p = CTFParams(pixel_size=1.5, defocus=15000.0, astigmatism=-600.0, astigmatism_angle=40.0, amplitude=0.1)
    row = particle_ctf(p, [[10.0, 20.0]], (100, 100)).iloc[0]
    assert (row.defocus_u, row.defocus_v, row.defocus_angle) == (15300.0, 14700.0, -50.0)
    relion_form = CTFParams.from_uv(row.defocus_u, row.defocus_v, row.defocus_angle, pixel_size=1.5, amplitude=0.1)
    np.testing.assert_allclose(ctf_2d(relion_form, (64, 64)).numpy(), ctf_2d(p, (64, 64)).numpy(), atol=1e-5)
    assert particle_ctf(None, [[0.0, 0.0]], (10, 10)) is None


def test_phase_flipping_uses_the_local_ctf():
    """Two point particles imaged with very different local defocus: flipping each box with its own CTF turns its
    CTF-spread signal into a sharp positive peak (Σ|CTF|); one global CTF does much worse at both."""
    shape, ps = (256, 256), 2.0
    fit = _ctf_fit([[8000.0, 8000.0], [30000.0, 30000.0]], shape, ps)  # defocus grows along y
    yx = np.array([[60.0, 128.0], [196.0, 128.0]])
    image = torch.zeros(shape[0], shape[1] // 2 + 1, dtype=torch.complex128)
    for p, c in zip(yx, fit.ctf_at(yx)):
        point = torch.zeros(shape, dtype=torch.float64)
        point[int(p[0]), int(p[1])] = 1.0
        image += torch.fft.rfft2(point) * ctf_2d(c, shape, dtype=torch.float64)
    image = torch.fft.irfft2(image, s=shape).numpy()
    s = ExportSettings(box_size=64, phase_flip=True, **RAW)
    local = extract_particles(image, yx, None, fit, s, pixel_size=ps)
    global_ = extract_particles(image, yx, None, fit.ctf, s, pixel_size=ps)
    plain = extract_particles(image, yx, None, fit, ExportSettings(box_size=64, **RAW), pixel_size=ps)
    centre = local.images[:, 32, 32]
    assert (local.images.reshape(2, -1).argmax(1) == 32 * 64 + 32).all()
    assert (centre > 0.5).all()  # mean |CTF| ~ 0.64 over the band
    assert (centre > 2 * np.abs(global_.images[:, 32, 32])).all()
    assert (centre > 5 * np.abs(plain.images[:, 32, 32])).all()
    assert local.phase_flipped and not plain.phase_flipped
    with pytest.raises(ValueError, match="CTF"):
        extract_particles(image, yx, None, None, s, pixel_size=ps)


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def _written_project(tmp_path: Path, sim_movie, halves: bool = False):
    """Two micrographs' stacks (the second at another pixel size) in ``tmp_path/Particles`` and a STAR file."""
    truth = sim_movie.truth
    ms = MotionSettings(pixel_size=truth.pixel_size, exposure_per_frame=truth.dose_per_frame)
    y, x = truth.shape
    nodes = truth.defocus_at(np.array([[0, 0], [0, x], [y, 0], [y, x]], np.float64)).reshape(2, 2)
    fit = _ctf_fit(nodes, truth.shape, truth.pixel_size, astigmatism=400.0, angle=25.0)
    mics = tmp_path / "average"
    files = []
    for name, s in (("mic1", ExportSettings(box_size=48, diameter=90.0, halves=halves)),
                    ("mic2", ExportSettings(box_size=32, pixel_size=3.0, diameter=90.0))):
        write_mrc(mics / f"{name}.mrc", sim_movie.frames.sum(0), pixel_size=truth.pixel_size)
        stack = extract_particles(sim_movie.frames, truth.particles[:5], truth, fit, s, motion_settings=ms,
                                  scores=np.linspace(0.5, 0.9, 5))
        files.append(write_particle_stack(tmp_path / "Particles" / f"{name}.mrcs", stack, mics / f"{name}.mrc"))
    return files


def test_stack_files_are_mrc_image_stacks(tmp_path, sim_movie):
    files = _written_project(tmp_path, sim_movie, halves=True)
    with mrcfile.open(files[0].path, permissive=False) as mrc:
        assert mrc.is_image_stack() and mrc.data.shape == (5, 48, 48)
        assert float(mrc.voxel_size.x) == pytest.approx(2.0)
        np.testing.assert_array_equal(mrc.data, files[0].stack.images)
    with mrcfile.open(files[1].path) as mrc:
        assert mrc.data.shape == (5, 32, 32) and float(mrc.voxel_size.x) == pytest.approx(3.0)
    assert files[0].odd == tmp_path / "Particles" / "odd" / "mic1.mrcs"
    np.testing.assert_array_equal(mrcfile.read(files[0].even), files[0].stack.even)
    assert files[1].odd is None and not list(tmp_path.rglob("*.tmp"))


def test_particle_star_follows_relion_31(tmp_path, sim_movie):
    files = _written_project(tmp_path, sim_movie)
    star = tmp_path / "particles.star"
    written = write_particle_star(star, files)
    blocks = read_star(star)
    optics, parts = blocks["optics"], blocks["particles"]
    assert list(blocks) == ["optics", "particles"]
    assert optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    assert optics["rlnImagePixelSize"].tolist() == [2.0, 3.0]
    assert optics["rlnImageSize"].tolist() == [48, 32] and (optics["rlnImageDimensionality"] == 2).all()
    assert optics["rlnMicrographPixelSize"].tolist() == [2.0, 2.0]
    assert optics["rlnVoltage"].tolist() == [300.0, 300.0] and optics["rlnSphericalAberration"].tolist() == [2.7, 2.7]
    assert optics["rlnAmplitudeContrast"].tolist() == [0.1, 0.1]
    assert len(parts) == 10 and parts["rlnOpticsGroup"].tolist() == [1] * 5 + [2] * 5
    assert parts["rlnImageName"].iloc[0] == "000001@Particles/mic1.mrcs"
    assert parts["rlnImageName"].iloc[9] == "000005@Particles/mic2.mrcs"
    assert parts["rlnMicrographName"].iloc[0] == "average/mic1.mrc"
    for name in parts["rlnImageName"]:  # every path resolves from the STAR file's folder
        index, path = name.split("@")
        assert int(index) <= mrcfile.open(tmp_path / path, header_only=True).header.nz
    p = files[0].stack.yx
    np.testing.assert_allclose(parts["rlnCoordinateX"].iloc[:5], p[:, 1])
    np.testing.assert_allclose(parts["rlnCoordinateY"].iloc[:5], p[:, 0])
    assert (parts["rlnDefocusU"] - parts["rlnDefocusV"]).round(6).eq(400.0).all()
    np.testing.assert_allclose((parts["rlnDefocusU"] + parts["rlnDefocusV"]).iloc[:5] / 2,
                               sim_movie.truth.defocus_at(p), atol=0.01)
    assert (parts["rlnDefocusAngle"] == 25.0).all() and (parts["rlnPhaseShift"] == 0.0).all()
    assert (parts["rlnCtfMaxResolution"] == 4.5).all()
    np.testing.assert_allclose(parts["rlnAutopickFigureOfMerit"].iloc[:5], np.linspace(0.5, 0.9, 5))
    pd.testing.assert_frame_equal(parts, written, check_dtype=False)
    absolute = write_particle_star(tmp_path / "abs.star", files, relative=False, optics_group_name="g")
    assert absolute["rlnImageName"].iloc[0] == f"000001@{(tmp_path / 'Particles/mic1.mrcs').as_posix()}"
    assert read_star(tmp_path / "abs.star")["optics"]["rlnOpticsGroupName"].tolist() == ["g", "g"]


# ---------------------------------------------------------------------------------------------------------------
# RELION interop
# ---------------------------------------------------------------------------------------------------------------
def _relion(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=RELION_ENV, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


_NO_RELION = "RELION 3.1 binaries (relion_preprocess, relion_stack_create, relion_reconstruct) not on PATH; " \
             "install with `apt-get install -y relion`"
_HAVE_RELION = all(shutil.which(b) for b in ("relion_preprocess", "relion_stack_create", "relion_reconstruct"))


@pytest.mark.interop
@pytest.mark.skipif(not _HAVE_RELION, reason=_NO_RELION)
def test_relion_reads_our_star_and_stacks(tmp_path, sim_movie):
    """relion_stack_create finds every image our STAR names (same pixels), relion_reconstruct --ctf reads the
    optics and CTF columns and reconstructs at our box and pixel size."""
    files = _written_project(tmp_path, sim_movie)
    write_particle_star(tmp_path / "particles.star", files[:1])
    _relion(["relion_stack_create", "--i", "particles.star", "--o", "restacked"], tmp_path)
    np.testing.assert_array_equal(mrcfile.read(tmp_path / "restacked.mrcs"), files[0].stack.images)
    blocks = read_star(tmp_path / "particles.star")
    parts = blocks["particles"]
    parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"] = sim_movie.truth.particle_angles[:5].T
    write_star(tmp_path / "posed.star", {"optics": blocks["optics"], "particles": parts})
    _relion(["relion_reconstruct", "--i", "posed.star", "--o", "map.mrc", "--ctf"], tmp_path)
    with mrcfile.open(tmp_path / "map.mrc") as mrc:
        assert mrc.data.shape == (48, 48, 48) and float(mrc.voxel_size.x) == pytest.approx(2.0)
        assert np.isfinite(mrc.data).all() and mrc.data.std() > 0


@pytest.mark.interop
@pytest.mark.skipif(not _HAVE_RELION, reason=_NO_RELION)
def test_relion_preprocess_extracts_the_same_normalised_boxes(tmp_path):
    """relion_preprocess --extract --norm --invert_contrast on a micrograph gives our boxes to float precision: the
    same box centre (pixel B // 2 at rlnCoordinateX/Y), background circle, ramp, population std and inversion."""
    image = (_smooth_image((200, 240), seed=4, length=2.0) + np.linspace(0, 3, 240)[None]).astype(np.float32)
    write_mrc(tmp_path / "mic.mrc", image, pixel_size=2.0)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographOriginalPixelSize": [2.0], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnMicrographPixelSize": [2.0]})
    write_star(tmp_path / "mics.star", {"optics": optics, "micrographs": pd.DataFrame({
        "rlnMicrographName": ["mic.mrc"], "rlnOpticsGroup": [1]})})
    yx = np.array([[80.0, 100.0], [128.0, 150.0], [150.0, 200.0]])
    write_star(tmp_path / "mic_pick.star", {"": pd.DataFrame({"rlnCoordinateX": yx[:, 1],
                                                                "rlnCoordinateY": yx[:, 0]})})
    for ramp in (True, False):
        _relion(["relion_preprocess", "--i", "mics.star", "--coord_dir", "./", "--coord_suffix", "_pick.star",
                 "--part_dir", "Extract/", "--part_star", "parts.star", "--extract", "--extract_size", "64",
                 "--norm", "--bg_radius", "20", "--invert_contrast"] + ([] if ramp else ["--no_ramp"]), tmp_path)
        theirs = mrcfile.read(tmp_path / "Extract" / "mic.mrcs")
        ours = extract_particles(image, yx, None, None, ExportSettings(box_size=64, diameter=80.0,
                                 dose_weighting=False, subtract_ramp=ramp), pixel_size=2.0)
        np.testing.assert_allclose(ours.images, theirs, atol=1e-4)
