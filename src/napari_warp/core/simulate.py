"""Simulated dose-fractionated movies with ground truth, in physical units: the test bed of every later step.

Image formation (weak-phase object, Warp/torch-ctf CTF sign: ``CTF = +sin χ``, +amplitude at DC):

1. Specimen: a 3D model of weighted points (atoms of a PDB/mmCIF, voxels of an MRC map, or the built-in "blobs"
   molecule: random carbon atoms filling a seeded union of ellipsoids), rotated per particle by RELION ZYZ Euler
   angles, projected along z and splatted onto a 2× oversampled grid; each element's projected potential is its
   electron scattering factor (Peng 5-Gaussian, ``gemmi`` C4322) × an atomic B-factor × Babinet bulk-solvent
   contrast, as a phase in radians (``λ γ f(k)``).
2. Ice: amorphous water as a random phase field with power ``n t (λ γ f_water)² S(k)`` (S: a structure factor with
   its 3.7 Å ring) plus a slow thickness variation that modulates intensity through inelastic loss.
3. Intensity ``I = b(r) · (1 − 2 · CTF ⊛ φ)`` with the local defocus plane (per-pixel blend of CTFs at closely
   spaced defocus levels), then the detector MTF; normalised to mean 1 over the field of view. Particles are dark.
4. Motion: frame ``f`` shows the reference image deformed by global drift + a local spline field; ``MovieTruth.shifts``
   is the convention: *a feature at p in the aligned (reference) image is found at p + shift(p, f) in frame f*.
   Shifts are 0 at frame 0 (the reference). Global-only motion is applied exactly by a Fourier shift; with local
   deformation each frame is resampled once through the full per-pixel field (bilinear on a 4× sinc-oversampled
   canvas: position error ~0.005 px RMS on sharp spots, ≥ 92 % amplitude at Nyquist). The field of view is cut
   from a larger canvas (room for whole edge particles, the CTF's delocalisation and the motion), so drift brings
   genuinely new content in at the edges and nothing wraps around.
5. Counts: ``raw = Poisson(dose_per_frame · pixel_size² · I / gain)``, integer-valued float32. The gain reference is
   multiplicative as in Warp/RELION (``corrected = raw × gain``): a pixel with gain ``g`` is ``1/g`` as sensitive, so
   ``E[raw × gain] = dose · pixel_size² · I``. Hot pixels are added last (high counts in every frame).

Not modelled: intra-frame motion blur, radiation damage, coincidence loss, detector noise shaping (the MTF filters the
signal only; Poisson noise is white), particle z-heights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .ctf import CTFParams, ctf_2d_tensor, electron_wavelength
from .device import get_device, to_numpy
from .fourier import fftfreq_warp, fourier_pad, fourier_rescale, fourier_resize_rfft, rfft_frequencies
from .grid import CubicGrid, evaluate_cubic_grid

__all__ = [
    "MovieSimulation",
    "SemiSyntheticSimulation",
    "MovieTruth",
    "SimulatedMovie",
    "simulate_movie",
    "simulate_from_micrograph",
    "detector_mtf",
    "euler_to_matrix",
]

Progress = Callable[[int, int], None]

# Physical constants of the model (why each value: see the comment beside it).
_PROTEIN_ATOMS_PER_A3 = 0.058  # non-H atoms per Å³ in protein (1.35 g/cm³, ~14 Da per heavy atom incl. its H)
_WATER_PER_A3 = 0.0314  # molecules per Å³ in amorphous ice (0.94 g/cm³)
_SOLVENT_K, _SOLVENT_B = 0.6, 200.0  # Babinet: ice/protein potential ratio (H-less models), blur B (Å², s² form)
_ATOM_B = 30.0  # Å², atomic B-factor applied to all atoms (typical of cryo-EM models)
_INELASTIC_MFP_300KV = 3500.0  # Å, inelastic mean free path in ice at 300 kV (scales with β²)
_ICE_THICKNESS_VARIATION = 0.1  # relative RMS of the slow ice-thickness field
_ICE_CORRELATION = 1500.0  # Å, length scale of that field
_HOT_PIXEL_RATE = 30.0  # hot pixels count this many times the mean exposure per frame (at least 20)


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MovieSimulation:
    """Settings of a fully synthetic movie (all lengths in Å unless named ``_px``).

    shape: (Y, X) pixels. n_frames. pixel_size: Å/px. voltage: kV. cs: mm. amplitude: amplitude-contrast fraction.
    dose_per_frame: e/Å² per frame (mean counts per pixel per frame = dose_per_frame · pixel_size²).
    defocus: Å at the image centre, positive = under-focus. defocus_gradient: (d/dy, d/dx), Å of defocus per Å of
    distance (a tilted specimen plane; ``tan(tilt)``). astigmatism: Å, u − v (Warp's DefocusDelta);
    astigmatism_angle: degrees of defocus_u from +x. phase_shift: degrees. bfactor: Å², CTF envelope in Warp's sign
    (negative damps; the default −50 stands for coherence, intra-frame motion and charging, which are not simulated).
    specimen: "blobs" (built-in molecule), a PDB/mmCIF path (atoms) or an MRC map path (voxels; header voxel size).
    particle_diameter: Å of the "blobs" molecule (a structure's own size is used for PDB/map specimens).
    n_particles: particle centres inside the field of view (None: ``particle_density``, an area fraction); the band
    one radius wide around it is filled at the same density, so particles are cut by the edges as in real data.
    ice_thickness: Å (0 for no ice). drift: Å, global drift from the first to the last frame (fast first, then
    slowing, random direction); drift_jitter: Å RMS of extra uncorrelated per-frame stage jitter.
    local_amplitude: Å RMS of the local deformation at the end of the exposure, on a cubic grid of ``local_grid``
    nodes (time, y, x); 0 for rigid motion only.
    mtf: None (perfect detector), a detector name ("k2", "k3", "k3_cds", "falcon2", "falcon3", "falcon4", "de20";
    RELION's measured curve when the shared data folder is found, else a built-in fit to it), a RELION MTF STAR path,
    or ``(n, 2)`` samples of (frequency in cycles/pixel, MTF).
    gain: None, True (random gain reference ~1 ± 0.05) or a ``(Y, X)`` multiplicative gain reference.
    n_hot_pixels: pixels with high counts in every frame. seed: every random choice derives from it.
    """

    shape: tuple[int, int] = (512, 512)
    n_frames: int = 16
    pixel_size: float = 1.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude: float = 0.07
    dose_per_frame: float = 2.0
    defocus: float = 15000.0
    defocus_gradient: tuple[float, float] = (0.0, 0.0)
    astigmatism: float = 0.0
    astigmatism_angle: float = 0.0
    phase_shift: float = 0.0
    bfactor: float = -50.0
    specimen: str | os.PathLike = "blobs"
    particle_diameter: float = 120.0
    n_particles: int | None = None
    particle_density: float = 0.3
    ice_thickness: float = 300.0
    drift: float = 10.0
    drift_jitter: float = 0.0
    local_amplitude: float = 2.0
    local_grid: tuple[int, int, int] = (3, 5, 5)
    mtf: str | os.PathLike | np.ndarray | None = "k3"
    gain: bool | np.ndarray | None = None
    n_hot_pixels: int = 0
    seed: int = 0


@dataclass(frozen=True)
class SemiSyntheticSimulation:
    """Settings of a movie made from a real (summed) micrograph with known motion and fresh Poisson noise.

    micrograph: MRC path. pixel_size: Å/px of the file (None: from its header). max_size: Fourier-crop (bin) so the
    longer side is at most this many pixels (None: full size). voltage: kV (metadata only). The motion, gain, hot
    pixel and seed fields mean what they mean in ``MovieSimulation``.
    """

    micrograph: str | os.PathLike
    pixel_size: float | None = None
    max_size: int | None = 1024
    n_frames: int = 20
    dose_per_frame: float = 2.0
    voltage: float = 300.0
    drift: float = 10.0
    drift_jitter: float = 0.0
    local_amplitude: float = 2.0
    local_grid: tuple[int, int, int] = (3, 5, 5)
    gain: bool | np.ndarray | None = None
    n_hot_pixels: int = 0
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MovieTruth:
    """Everything the simulation knows. Pixels are those of the movie; positions are ``(y, x)``.

    frame_times: ``(F,)`` normalised exposure time of each frame (``f / (F − 1)``), the grids' time axis.
    global_shifts: ``(F, 2)`` px ``(dy, dx)`` of the whole field (0 at frame 0).
    local_nodes: ``(2, T, Gy, Gx)`` px ``(dy, dx)`` node values of the local cubic grid (``core.grid``, no margins),
        evaluated at ``(t, y / (Y − 1), x / (X − 1))``; zero at t = 0 and zero-mean over space.
    ctf: CTF at the image centre (None for semi-synthetic movies). defocus_gradient: (d/dy, d/dx) Å per Å.
    particles: ``(N, 2)`` px centres (projected centres of mass) in the reference frame, inside the image.
    particle_angles: ``(N, 3)`` degrees (rot, tilt, psi), RELION ZYZ (see ``euler_to_matrix``).
    particle_diameter: Å. specimen: ``(Y, X)`` projected phase of the particles (rad, before CTF, no ice).
    clean: ``(Y, X)`` noise-free expected intensity of the reference frame (CTF, ice, MTF), mean 1.
    mtf: ``(n, 2)`` (cycles/px, MTF) applied, or None; mtf_source: where it came from.
    """

    shape: tuple[int, int]
    pixel_size: float
    dose_per_frame: float
    frame_times: np.ndarray
    global_shifts: np.ndarray
    local_nodes: np.ndarray
    ctf: CTFParams | None
    defocus_gradient: tuple[float, float]
    particles: np.ndarray
    particle_angles: np.ndarray
    particle_diameter: float
    specimen: np.ndarray
    clean: np.ndarray
    mtf: np.ndarray | None = None
    mtf_source: str = "none"

    @property
    def n_frames(self) -> int:
        return len(self.frame_times)

    @property
    def local_grid(self) -> tuple[CubicGrid, CubicGrid]:
        """The local deformation as two ``CubicGrid`` (dy, dx) of dims ``(T, Gy, Gx)``, in px."""
        nodes = torch.as_tensor(self.local_nodes, dtype=torch.float64)
        return CubicGrid(nodes[0]), CubicGrid(nodes[1])

    def shifts(self, yx, frames: Sequence[int] | None = None, relative_to_mean: bool = False) -> np.ndarray:
        """True shifts ``(F', P, 2)`` px ``(dy, dx)`` of reference-frame positions ``yx`` ``(P, 2)`` px.

        A feature at ``p`` in the aligned (reference) image lies at ``p + shift`` in frame ``f``; frame 0 is the
        reference, so its shifts are 0. ``relative_to_mean`` subtracts the mean over all frames per position (the
        reference of fits that centre their trajectories).
        """
        yx = torch.as_tensor(np.asarray(yx, dtype=np.float64).reshape(-1, 2))
        times = torch.as_tensor(self.frame_times, dtype=torch.float64)
        s = _total_shifts(torch.as_tensor(self.global_shifts), torch.as_tensor(self.local_nodes), times, yx,
                          self.shape)
        if relative_to_mean:
            s = s - s.mean(dim=0, keepdim=True)
        out = s.numpy()
        return out if frames is None else out[np.asarray(frames, dtype=int)]

    def defocus_at(self, yx) -> np.ndarray:
        """Defocus ``(P,)`` in Å (positive under-focus) at reference-frame positions ``yx`` ``(P, 2)`` px."""
        if self.ctf is None:
            raise ValueError("this simulation has no CTF truth (semi-synthetic from a real micrograph)")
        yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
        return _defocus_plane(self.ctf.defocus, self.defocus_gradient, self.shape, self.pixel_size, yx)


@dataclass
class SimulatedMovie:
    """A simulated movie: ``frames`` ``(F, Y, X)`` float32 raw counts (integers), ``gain`` ``(Y, X)`` multiplicative
    gain reference or None, ``hot_pixels`` ``(N, 2)`` int ``(y, x)``, ``truth``, and the settings used."""

    frames: np.ndarray
    gain: np.ndarray | None
    hot_pixels: np.ndarray
    truth: MovieTruth
    settings: MovieSimulation | SemiSyntheticSimulation | None = None
    voltage: float = 300.0

    @property
    def pixel_size(self) -> float:
        return self.truth.pixel_size


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------
def simulate_movie(
    settings: MovieSimulation | SemiSyntheticSimulation, device=None, progress: Progress | None = None
) -> SimulatedMovie:
    """Simulate a movie with ground truth; ``SemiSyntheticSimulation`` delegates to ``simulate_from_micrograph``."""
    if isinstance(settings, SemiSyntheticSimulation):
        image, pixel_size = _load_micrograph(settings.micrograph, settings.pixel_size, settings.max_size)
        movie = simulate_from_micrograph(
            image, pixel_size, n_frames=settings.n_frames, dose_per_frame=settings.dose_per_frame,
            drift=settings.drift, drift_jitter=settings.drift_jitter, local_amplitude=settings.local_amplitude,
            local_grid=settings.local_grid, gain=settings.gain, n_hot_pixels=settings.n_hot_pixels,
            seed=settings.seed, voltage=settings.voltage, device=device, progress=progress,
        )
        movie.settings = settings
        return movie
    s = settings
    dev = get_device(device)
    rng = _rngs(s.seed)
    total = s.n_frames + 2
    shape = (int(s.shape[0]), int(s.shape[1]))
    motion = _motion(s.n_frames, s.drift, s.drift_jitter, s.local_amplitude, s.local_grid, s.pixel_size, rng)
    ctf = CTFParams(pixel_size=s.pixel_size, defocus=s.defocus, astigmatism=s.astigmatism,
                    astigmatism_angle=s.astigmatism_angle, voltage=s.voltage, cs=s.cs, amplitude=s.amplitude,
                    phase_shift=s.phase_shift, bfactor=s.bfactor)
    model = _specimen_model(s.specimen, s.particle_diameter, s.voltage, rng["specimen"])
    mtf, mtf_source = detector_mtf(s.mtf, s.voltage)
    centers = _place_particles(shape, model.diameter / s.pixel_size, s.n_particles, s.particle_density,
                               rng["placement"])
    angles = _random_angles(len(centers), rng["placement"])
    canvas, offset, specimen = _render_reference(s, model, centers, angles, ctf, mtf, motion, rng, dev)
    if progress:
        progress(1, total)
    inside = ((centers >= 0) & (centers < np.asarray(shape))).all(axis=1)
    truth = MovieTruth(
        shape=shape, pixel_size=float(s.pixel_size), dose_per_frame=float(s.dose_per_frame),
        frame_times=motion.times, global_shifts=motion.global_px, local_nodes=motion.local_px, ctf=ctf,
        defocus_gradient=(float(s.defocus_gradient[0]), float(s.defocus_gradient[1])),
        particles=centers[inside], particle_angles=angles[inside], particle_diameter=float(model.diameter),
        specimen=specimen, clean=to_numpy(_crop(canvas, offset, shape)).astype(np.float32),
        mtf=mtf, mtf_source=mtf_source,
    )
    frames, gain, hot = _expose(canvas, offset, truth, s.gain, s.n_hot_pixels, rng, progress, total, 1)
    return SimulatedMovie(frames=frames, gain=gain, hot_pixels=hot, truth=truth, settings=s, voltage=s.voltage)


def _render_reference(s: MovieSimulation, model, centers, angles, ctf: CTFParams, mtf, motion, rng, device):
    """The reference-frame intensity (mean 1 over the field of view) on a canvas with room for the motion.

    Rendering happens on a larger canvas that holds whole edge particles and the CTF's delocalisation, so nothing
    wraps into the field of view; the result is cut down to what the frames sample.
    Returns ``(canvas (Yc, Xc), offset of the field of view in it, specimen phase (Y, X) numpy)``.
    """
    shape = (int(s.shape[0]), int(s.shape[1]))
    margin = max(math.ceil(model.diameter / s.pixel_size) + 2, _delocalisation_px(ctf, s.defocus_gradient, shape),
                 _motion_margin(motion))
    big_shape = (_good_size(shape[0] + 2 * margin), _good_size(shape[1] + 2 * margin))
    big_offset = ((big_shape[0] - shape[0]) // 2, (big_shape[1] - shape[1]) // 2)
    phase_hat = _render_phase(model, centers + np.asarray(big_offset), angles, big_shape, s.pixel_size, device)
    ice_hat, background = _ice(big_shape, s.pixel_size, s.ice_thickness, s.voltage, rng["ice"], device)
    contrast = _ctf_contrast(phase_hat + ice_hat, ctf, s.defocus_gradient, shape, big_offset)
    image = _apply_mtf(background * (1.0 + contrast), mtf)
    image = (image / _crop(image, big_offset, shape).mean()).clamp_min(0.0)
    specimen = to_numpy(_crop(torch.fft.irfft2(phase_hat, s=big_shape), big_offset, shape)).astype(np.float32)
    m = _motion_margin(motion)
    canvas_shape = (_good_size(shape[0] + 2 * m), _good_size(shape[1] + 2 * m))
    offset = ((canvas_shape[0] - shape[0]) // 2, (canvas_shape[1] - shape[1]) // 2)
    start = (big_offset[0] - offset[0], big_offset[1] - offset[1])
    return _crop(image, start, canvas_shape), offset, specimen


def simulate_from_micrograph(
    image,
    pixel_size: float,
    n_frames: int = 20,
    dose_per_frame: float = 2.0,
    drift: float = 10.0,
    drift_jitter: float = 0.0,
    local_amplitude: float = 2.0,
    local_grid: tuple[int, int, int] = (3, 5, 5),
    gain=None,
    n_hot_pixels: int = 0,
    seed: int = 0,
    voltage: float = 300.0,
    device=None,
    progress: Progress | None = None,
) -> SimulatedMovie:
    """A semi-synthetic movie: a real micrograph ``(Y, X)`` (any scale; normalised to mean 1) as the reference image,
    moved by known drift + local deformation (Å, as in ``MovieSimulation``), Poisson-sampled per frame.

    Bin large micrographs first (``SemiSyntheticSimulation.max_size`` or ``fourier.fourier_rescale``). The field of
    view is the whole micrograph; content entering at the edges is its mirror image (reflect padding).
    Truth has no CTF and no particles; ``truth.clean`` and ``truth.specimen`` are the normalised micrograph.
    """
    dev = get_device(device)
    rng = _rngs(seed)
    total = n_frames + 2
    img = torch.as_tensor(np.asarray(image), dtype=torch.float32, device=dev)
    if img.ndim != 2:
        raise ValueError(f"simulate_from_micrograph needs a 2D image, got shape {tuple(img.shape)}")
    img = (img / img.mean()).clamp_min(0.0)
    y, x = img.shape
    motion = _motion(n_frames, drift, drift_jitter, local_amplitude, local_grid, pixel_size, rng)
    margin = min(_motion_margin(motion), y - 1, x - 1)
    canvas = F.pad(img[None, None], (margin, margin, margin, margin), mode="reflect")[0, 0]
    if progress:
        progress(1, total)
    clean = to_numpy(img).astype(np.float32)
    truth = MovieTruth(
        shape=(y, x), pixel_size=float(pixel_size), dose_per_frame=float(dose_per_frame), frame_times=motion.times,
        global_shifts=motion.global_px, local_nodes=motion.local_px, ctf=None, defocus_gradient=(0.0, 0.0),
        particles=np.zeros((0, 2)), particle_angles=np.zeros((0, 3)), particle_diameter=0.0,
        specimen=clean, clean=clean,
    )
    frames, gain_ref, hot = _expose(canvas, (margin, margin), truth, gain, n_hot_pixels, rng, progress, total, 1)
    return SimulatedMovie(frames=frames, gain=gain_ref, hot_pixels=hot, truth=truth, voltage=voltage)


def euler_to_matrix(angles_deg) -> np.ndarray:
    """RELION's ``Euler_angles2matrix``: ``(..., 3)`` (rot, tilt, psi) degrees -> ``(..., 3, 3)``.

    ``A = Rz(psi) Ry(tilt) Rz(rot)`` (RELION's passive form). A model point ``r = (x, y, z)`` appears in the
    projection image at ``(A r)[:2] = (x', y')``, as RELION projects (``P(x', y') = ∫ V(Aᵀ (x', y', z)) dz``).
    """
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    ca, sa = np.cos(a[..., 0]), np.sin(a[..., 0])
    cb, sb = np.cos(a[..., 1]), np.sin(a[..., 1])
    cg, sg = np.cos(a[..., 2]), np.sin(a[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


# ---------------------------------------------------------------------------------------------------------------
# randomness and sizes
# ---------------------------------------------------------------------------------------------------------------
def _rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators per concept, so changing e.g. n_frames leaves the particles where they were."""
    names = ("specimen", "placement", "ice", "drift", "jitter", "local", "gain", "noise", "hot")
    seqs = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.default_rng(q) for n, q in zip(names, seqs)}


def _good_size(n: int) -> int:
    """Smallest even size >= n whose prime factors are 2, 3, 5, 7 (fast FFTs)."""
    m = n + (n % 2)
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


def _crop(image: torch.Tensor, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``(..., Yc, Xc)`` -> ``(..., Y, X)`` window at ``offset``."""
    return image[..., offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]]


def _smooth_noise(shape: Sequence[int], length_px: float, rng: np.random.Generator, device) -> torch.Tensor:
    """Gaussian random field ``(Y, X)``, unit variance on an infinite plane, Gaussian correlation ``length_px``.

    Not re-normalised, so a field of view much smaller than the correlation length varies little, as it should.
    """
    white = torch.as_tensor(rng.standard_normal(tuple(shape)), dtype=torch.float32, device=device)
    f = rfft_frequencies(shape, 1.0, device=device)
    filt = torch.exp(-2 * math.pi**2 * length_px**2 * (f**2).sum(-1)) * math.sqrt(4 * math.pi) * length_px
    return torch.fft.irfft2(torch.fft.rfft2(white) * filt, s=tuple(shape))


# ---------------------------------------------------------------------------------------------------------------
# motion: global trajectory + local deformation grid
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Motion:
    times: np.ndarray  # (F,) normalised
    global_px: np.ndarray  # (F, 2) px (dy, dx)
    local_px: np.ndarray  # (2, T, Gy, Gx) px (dy, dx)


def _decay_profile(t: np.ndarray) -> np.ndarray:
    """Fast-then-slowing progress ``(...,)`` from 0 at t=0 to 1 at t=1 (beam-induced motion relaxes)."""
    tau = 0.3
    return (1 - np.exp(-t / tau)) / (1 - np.exp(-1 / tau))


def _motion(n_frames, drift, jitter, local_amplitude, local_grid, pixel_size, rng) -> _Motion:
    """Global drift trajectory (random direction, gently curving) and local node values, all in px."""
    times = np.arange(n_frames) / max(1, n_frames - 1)
    u = _decay_profile(times)
    theta = rng["drift"].uniform(0, 2 * np.pi) + rng["drift"].uniform(-0.5, 0.5) * u  # curving path
    g = (drift / pixel_size) * u[:, None] * np.stack([np.sin(theta), np.cos(theta)], axis=-1)
    g[1:] += rng["jitter"].normal(scale=jitter / pixel_size / np.sqrt(2), size=(n_frames - 1, 2))
    g -= g[0]
    nt, ny, nx = (int(n) for n in local_grid)
    v = rng["local"].normal(scale=local_amplitude / pixel_size / np.sqrt(2), size=(2, 1, ny, nx))
    v -= v.mean(axis=(-2, -1), keepdims=True)  # the uniform part of the motion is the global drift
    node_t = np.arange(nt) / max(1, nt - 1) if nt > 1 else np.zeros(1)
    local = v * _decay_profile(node_t)[None, :, None, None]
    return _Motion(times=times, global_px=g, local_px=local)


def _motion_margin(motion: _Motion) -> int:
    """Canvas margin (px) so every frame samples inside the canvas: max shift + spline overshoot + kernel room."""
    g = np.abs(motion.global_px).max(initial=0.0)
    loc = np.abs(motion.local_px).max(initial=0.0)
    return int(math.ceil(g + 1.5 * loc)) + 8


def _local_field(local_px: torch.Tensor, times: torch.Tensor, p: torch.Tensor, shape) -> torch.Tensor:
    """Local shifts ``(F, ..., 2)`` px at reference positions ``p`` ``(F, ..., 2)`` px; row f at time ``times[f]``.

    Grid coordinates are ``(t, y / (Y − 1), x / (X − 1))``; beyond the image the spline's end pieces continue
    (``core.grid``), which keeps the field smooth where frames sample just outside the field of view.
    """
    norm = torch.tensor([max(1, shape[0] - 1), max(1, shape[1] - 1)], dtype=p.dtype, device=p.device)
    values = local_px.to(p)
    # The tensor-product spline separates: Σ_k w_k(t) · S_k(y, x), with S_k the 2D spline of time node k. Evaluating
    # 2·T spatial splines (16 taps) and mixing per frame is much cheaper than 64-tap 3D evaluation at every point.
    n_t = values.shape[1]
    spatial = evaluate_cubic_grid(values.reshape(2 * n_t, *values.shape[-2:]), p / norm)  # (2T, F, ...)
    spatial = spatial.reshape(2, n_t, *p.shape[:-1])
    w = evaluate_cubic_grid(torch.eye(n_t, dtype=p.dtype, device=p.device), times.to(p)[:, None])  # (T, F)
    w = w.reshape(n_t, -1, *([1] * (p.ndim - 2)))
    return torch.movedim((spatial * w).sum(1), 0, -1)


def _total_shifts(global_px, local_px, times, yx, shape) -> torch.Tensor:
    """Global + local shifts ``(F, P, 2)`` px of reference positions ``yx`` ``(P, 2)``."""
    glob = global_px.to(yx)[:, None, :].expand(-1, yx.shape[0], -1)
    if not torch.any(local_px != 0):
        return glob.clone()
    return glob + _local_field(local_px, times, yx[None].expand(len(times), -1, -1), shape)


# ---------------------------------------------------------------------------------------------------------------
# specimen: 3D point models, orientations, placement, projection
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PointModel:
    """A 3D specimen as weighted points about its centre of mass.

    positions: ``(M, 3)`` Å as (x, y, z). channel: ``(M,)`` index into ``transfers``. weight: ``(M,)``.
    transfers: per channel, ``k² (1/Å²) -> projected-phase transfer (rad·Å²)`` of one unit point.
    diameter: Å (twice the largest distance from the centre).
    """

    positions: np.ndarray
    channel: np.ndarray
    weight: np.ndarray
    transfers: tuple
    diameter: float


def _interaction(voltage: float) -> float:
    """``λ γ`` (Å): phase (rad) per unit of electron scattering factor (Å) per Å² (σ·V in Born's form)."""
    return electron_wavelength(voltage) * (1.0 + voltage / 510.99895)


@lru_cache(maxsize=64)
def _peng(symbol: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Peng et al. (1996) 5-Gaussian electron scattering factor coefficients (a in Å, b in Å²) via gemmi."""
    import gemmi

    c = gemmi.Element(symbol).c4322
    coefs = list(c.get_coefs())
    if not any(coefs[:5]):
        raise ValueError(f"no electron scattering factor for element {symbol!r}")
    return tuple(coefs[:5]), tuple(coefs[5:])


def _scattering_factor(symbol: str, k2: torch.Tensor) -> torch.Tensor:
    """``f_e(k)`` in Å at squared frequency ``k2`` (1/Å²): Σ a_i exp(−b_i k²/4)."""
    a, b = _peng(symbol)
    return sum(ai * torch.exp(-bi * k2 / 4) for ai, bi in zip(a, b))


def _atom_transfer(symbol: str, voltage: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projected phase of one atom in ice: λγ f(k) · thermal B · Babinet (the ice it displaces lowers contrast)."""
    scale = _interaction(voltage)

    def transfer(k2):
        solvent = 1.0 - _SOLVENT_K * torch.exp(-_SOLVENT_B * k2 / 4)
        return scale * _scattering_factor(symbol, k2) * torch.exp(-_ATOM_B * k2 / 4) * solvent

    return transfer


def _voxel_transfer(voxel: float, voltage: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projected phase of one unit-weight voxel: protein-minus-ice contrast per Å³ × a Gaussian of σ = voxel/2."""
    per_a3 = _PROTEIN_ATOMS_PER_A3 * _interaction(voltage) * _peng_f0("C") * (1.0 - _SOLVENT_K)
    sigma = 0.5 * voxel

    def transfer(k2):
        return per_a3 * voxel**3 * torch.exp(-2 * math.pi**2 * sigma**2 * k2)

    return transfer


def _peng_f0(symbol: str) -> float:
    a, _ = _peng(symbol)
    return float(sum(a))


def _centred(positions: np.ndarray, weight: np.ndarray) -> np.ndarray:
    com = (positions * weight[:, None]).sum(0) / weight.sum()
    return positions - com


def _diameter(positions: np.ndarray, pad: float = 0.0) -> float:
    return float(2 * (np.sqrt((positions**2).sum(1)).max(initial=0.0) + pad))


def _radial_table(fn: Callable[[torch.Tensor], torch.Tensor], k2: torch.Tensor, n: int = 4096) -> torch.Tensor:
    """``fn(k²)`` for a smooth radial function, tabulated on ``n`` values of |k| and linearly interpolated onto the
    grid ``k2`` (a few ops per pixel instead of a dozen exponentials)."""
    k = k2.sqrt()
    k_max = float(k.max()) + 1e-12
    table = fn(torch.linspace(0, k_max, n, dtype=torch.float64, device=k2.device) ** 2).to(k2.dtype)
    pos = k * ((n - 1) / k_max)
    i0 = pos.floor().long().clamp(max=n - 2)
    frac = pos - i0
    return table[i0] * (1 - frac) + table[i0 + 1] * frac


def _blob_model(diameter: float, voltage: float, rng: np.random.Generator) -> _PointModel:
    """The built-in molecule: carbon atoms at protein density filling a random union of 6 ellipsoids, scaled so its
    measured diameter is ``diameter`` (to ~1 %)."""
    n_lobes = 6
    radii = rng.uniform(0.25, 0.45, size=(n_lobes, 3))  # in units of the bounding radius
    centres = rng.normal(size=(n_lobes, 3))
    centres *= ((1 - radii.max(1)) * rng.uniform(0.3, 1.0, n_lobes) / np.linalg.norm(centres, axis=1))[:, None]
    rot = euler_to_matrix(_random_angles(n_lobes, rng))  # (L, 3, 3)

    def inside(pts):  # (N, 3) -> (N,) in the union of lobes
        local = np.einsum("lij,nlj->nli", rot, pts[:, None, :] - centres[None])  # (N, L, 3)
        return ((local / radii[None]) ** 2).sum(-1).min(1) <= 1.0

    probe = rng.uniform(-1, 1, size=(20000, 3))
    probe = probe[inside(probe)]
    com = probe.mean(0)
    scale = (0.5 * diameter - 2.0) / np.sqrt(((probe - com) ** 2).sum(1)).max()  # _diameter pads 2 Å
    centres, radii = (centres - com) * scale, radii * scale
    r = 0.5 * diameter
    pts = rng.uniform(-r, r, size=(int(_PROTEIN_ATOMS_PER_A3 * (2 * r) ** 3), 3))
    pts = pts[inside(pts)]
    weight = np.ones(len(pts))
    pts = _centred(pts, weight)
    return _PointModel(pts, np.zeros(len(pts), dtype=np.int64), weight, (_atom_transfer("C", voltage),),
                       _diameter(pts, 2.0))


def _atomic_model(path: Path, voltage: float) -> _PointModel:
    """Atoms of the first model of a PDB/mmCIF file (waters removed; hydrogens kept if present)."""
    import gemmi

    st = gemmi.read_structure(str(path))
    st.remove_alternative_conformations()
    st.remove_waters()
    pos, elem = [], []
    for chain in st[0]:
        for res in chain:
            for atom in res:
                pos.append(atom.pos.tolist())
                elem.append(atom.element.name)
    if not pos:
        raise ValueError(f"{path}: no atoms in the first model")
    symbols = sorted(set(elem))
    lookup = {s: i for i, s in enumerate(symbols)}
    channel = np.array([lookup[e] for e in elem], dtype=np.int64)
    f0 = np.array([_peng_f0(s) for s in symbols])[channel]
    pts = _centred(np.asarray(pos, dtype=np.float64), f0)
    transfers = tuple(_atom_transfer(s, voltage) for s in symbols)
    return _PointModel(pts, channel, np.ones(len(pts)), transfers, _diameter(pts, 2.0))


def _map_model(path: Path, voltage: float) -> _PointModel:
    """Voxels of an MRC map above a robust solvent threshold, weighted by their density above it (mean 1)."""
    import mrcfile

    with mrcfile.open(str(path), permissive=True) as m:
        vol = np.asarray(m.data, dtype=np.float64)
        voxel = float(m.voxel_size.x)
    if vol.ndim != 3 or voxel <= 0:
        raise ValueError(f"{path}: need a 3D map with a voxel size in its header (got {vol.shape}, {voxel} Å)")
    thr = vol.mean() + vol.std()  # above the solvent of a box that is mostly solvent
    mask = _drop_specks(vol > thr)
    z, yy, xx = np.nonzero(mask)
    if len(z) == 0:
        raise ValueError(f"{path}: no density above the threshold mean + std = {thr:.3g}")
    w = vol[z, yy, xx] - thr
    w = w / w.mean()
    pts = _centred(np.stack([xx, yy, z], axis=1).astype(np.float64) * voxel, w)
    return _PointModel(pts, np.zeros(len(pts), dtype=np.int64), w, (_voxel_transfer(voxel, voltage),),
                       _diameter(pts, voxel))


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Keep connected components of at least 1 % of the largest one (noise specks would inflate the diameter)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= 0.01 * sizes.max()) + 1
    return np.isin(labels, keep)


def _specimen_model(specimen, diameter: float, voltage: float, rng: np.random.Generator) -> _PointModel:
    """Dispatch on the ``specimen`` setting: "blobs", an atomic model path, or a map path."""
    if isinstance(specimen, str) and specimen.lower() == "blobs":
        return _blob_model(diameter, voltage, rng)
    path = Path(specimen)
    name = path.name.lower()
    if name.endswith((".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz", ".mmcif.gz")):
        return _atomic_model(path, voltage)
    if name.endswith((".mrc", ".map", ".mrcs", ".rec", ".map.gz", ".mrc.gz")):
        return _map_model(path, voltage)
    raise ValueError(f"specimen must be 'blobs', a PDB/mmCIF file or an MRC map, got {specimen!r}")


def _random_angles(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3)`` uniformly distributed orientations as RELION (rot, tilt, psi) degrees (cos(tilt) uniform)."""
    rot = rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    psi = rng.uniform(-180, 180, n)
    return np.stack([rot, tilt, psi], axis=1)


def _place_particles(shape, diameter_px: float, n: int | None, density: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Non-overlapping particle centres ``(N, 2)`` px (y, x) in image coordinates.

    ``n`` centres (None: ``density`` × image area / particle disk area) inside the image by random sequential
    addition with a minimum distance of one diameter, then the band up to one radius outside the image is filled at
    the same density, so particles are cut by the edges as in real micrographs. Fewer when the image is full.
    """
    r = 0.5 * diameter_px
    area = float(shape[0] * shape[1])
    n_in = int(n) if n is not None else int(density * area / (math.pi * r * r))
    n_band = int(round(n_in * ((shape[0] + 2 * r) * (shape[1] + 2 * r) - area) / area))
    chosen = np.zeros((n_in + n_band, 2))
    count = 0
    for lo, hi, target, outside in (((0, 0), shape, n_in, False), ((-r, -r), np.add(shape, r), n_in + n_band, True)):
        tried = 0
        while count < target and tried < 100 * target + 2000:
            for c in rng.uniform(lo, hi, size=(256, 2)):
                if outside and (0 <= c[0] < shape[0]) and (0 <= c[1] < shape[1]):
                    continue
                if count == 0 or np.min(((chosen[:count] - c) ** 2).sum(1)) >= diameter_px**2:
                    chosen[count] = c
                    count += 1
                    if count == target:
                        break
            tried += 256
    return chosen[:count]


def _splat(yx: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """Add points ``yx`` ``(P, 2)`` px with ``weight`` ``(P,)`` bilinearly (periodic) into ``out`` ``(Y, X)``."""
    shape = out.shape
    flat = out.view(-1)
    y0, x0 = torch.floor(yx[:, 0]), torch.floor(yx[:, 1])
    fy, fx = yx[:, 0] - y0, yx[:, 1] - x0
    y0, x0 = y0.long(), x0.long()
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            idx = ((y0 + dy) % shape[0]) * shape[1] + (x0 + dx) % shape[1]
            flat.index_add_(0, idx, weight * wy * wx)


def _render_phase(model: _PointModel, centers: np.ndarray, angles: np.ndarray, canvas_shape, pixel_size: float,
                  device) -> torch.Tensor:
    """rfft ``(Yc, Xc//2+1)`` of the particles' projected phase (rad per pixel) on the canvas.

    Per channel (element), the rotated and projected points of all particles are splatted on a 2× oversampled grid
    (little aliasing), transformed, cropped to the canvas band, corrected for the bilinear kernel and multiplied by
    the channel's transfer. Particles go in chunks of ~4 M points to bound memory.
    """
    rshape = (canvas_shape[0], canvas_shape[1] // 2 + 1)
    out = torch.zeros(rshape, dtype=torch.complex64, device=device)
    if len(centers) == 0:
        return out
    os_shape = (2 * canvas_shape[0], 2 * canvas_shape[1])
    rot = torch.as_tensor(euler_to_matrix(angles)[:, :2, :], dtype=torch.float32, device=device)  # (N, 2, 3) x', y'
    c = torch.as_tensor(centers, dtype=torch.float32, device=device)
    f = rfft_frequencies(canvas_shape, 1.0, device=device)  # cycles per canvas pixel
    bilinear = (torch.sinc(f[..., 0] / 2) * torch.sinc(f[..., 1] / 2)) ** 2
    k2 = (f**2).sum(-1) / pixel_size**2
    for i, transfer in enumerate(model.transfers):
        sel = model.channel == i
        if not np.any(sel):
            continue
        pts = torch.as_tensor(model.positions[sel], dtype=torch.float32, device=device)
        w = torch.as_tensor(model.weight[sel], dtype=torch.float32, device=device)
        grid = torch.zeros(os_shape, dtype=torch.float32, device=device)
        chunk = max(1, int(4e6 // len(pts)))
        for start in range(0, len(centers), chunk):
            proj = torch.einsum("nij,mj->nmi", rot[start:start + chunk], pts) / pixel_size  # (n, M, 2) (x', y') px
            yx = (c[start:start + chunk, None, :] + proj.flip(-1)) * 2  # oversampled (y, x)
            _splat(yx.reshape(-1, 2), w.repeat(len(proj)), grid)
        spec = fourier_resize_rfft(torch.fft.rfft2(grid), os_shape, canvas_shape)
        out += spec * (_radial_table(transfer, k2) / (bilinear * pixel_size**2))
    return out


# ---------------------------------------------------------------------------------------------------------------
# ice, CTF, MTF
# ---------------------------------------------------------------------------------------------------------------
def _water_structure_factor(k: torch.Tensor) -> torch.Tensor:
    """S(k) of amorphous ice: ~0.06 at k→0 (low compressibility), a ring at 1/3.7 Å, → 1 at high k."""
    s0 = 0.06
    return s0 + (1 - s0) * (1 - torch.exp(-(k / 0.15) ** 2)) + 1.3 * torch.exp(-0.5 * ((k - 0.27) / 0.025) ** 2)


def _ice(canvas_shape, pixel_size: float, thickness: float, voltage: float, rng, device):
    """Amorphous-ice phase spectrum ``(Yc, Xc//2+1)`` and the intensity background ``(Yc, Xc)`` from slow thickness
    variation (inelastic loss ``exp(−Δt/Λ)``)."""
    rshape = (canvas_shape[0], canvas_shape[1] // 2 + 1)
    if thickness <= 0:
        return torch.zeros(rshape, dtype=torch.complex64, device=device), torch.ones(canvas_shape, device=device)
    f = rfft_frequencies(canvas_shape, pixel_size, device=device)
    k2 = (f**2).sum(-1)

    def power_spectrum(q2):  # rad²·Å²: n t (λγ f_water)² S(k)
        fw = _scattering_factor("O", q2) + 2 * _scattering_factor("H", q2)
        return _WATER_PER_A3 * thickness * (_interaction(voltage) * fw) ** 2 * _water_structure_factor(q2.sqrt())

    power = _radial_table(power_spectrum, k2)
    white = torch.as_tensor(rng.standard_normal(tuple(canvas_shape)), dtype=torch.float32, device=device)
    ice_hat = torch.fft.rfft2(white) * (power.sqrt() / pixel_size)  # E|X_k|² = N P(k) / pixel_size²
    ice_hat[0, 0] = 0
    beta2 = 1 - 1 / (1 + voltage / 510.99895) ** 2
    beta2_300 = 1 - 1 / (1 + 300 / 510.99895) ** 2
    mfp = _INELASTIC_MFP_300KV * beta2 / beta2_300
    dt = thickness * _ICE_THICKNESS_VARIATION * _smooth_noise(canvas_shape, _ICE_CORRELATION / pixel_size, rng,
                                                              device)
    return ice_hat, torch.exp(-dt / mfp)


def _defocus_plane(defocus, gradient, shape, pixel_size, yx: np.ndarray) -> np.ndarray:
    """Defocus (Å) at positions ``yx`` ``(..., 2)`` px of an image of ``shape``: plane through the centre."""
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return defocus + (gradient[0] * (yx[..., 0] - cy) + gradient[1] * (yx[..., 1] - cx)) * pixel_size


def _delocalisation_px(ctf: CTFParams, gradient, shape) -> int:
    """How far (px) the CTF spreads a point's signal, at the largest defocus in the field, up to the frequency where
    the envelope (or Nyquist) ends it; capped at 256 px."""
    k = 0.5 / ctf.pixel_size
    if ctf.bfactor < 0:
        k = min(k, math.sqrt(-4 * math.log(0.02) / -ctf.bfactor))
    extent = (abs(gradient[0]) * shape[0] + abs(gradient[1]) * shape[1]) * ctf.pixel_size / 2
    df = abs(ctf.defocus) + abs(ctf.astigmatism) / 2 + extent
    lam = electron_wavelength(ctf.voltage)
    reach = lam * df * k + ctf.cs * 1e7 * lam**3 * k**3  # Å: |∇χ| / 2π
    return int(min(256, math.ceil(reach / ctf.pixel_size))) + 8


def _ctf_contrast(phase_hat: torch.Tensor, ctf: CTFParams, gradient, shape, offset) -> torch.Tensor:
    """``−2 · CTF ⊛ φ`` ``(Yc, Xc)`` with the local defocus of the plane, by blending CTF images per pixel.

    Levels are spaced so the CTF phase at Nyquist moves by ≤ ~0.25 rad between them (at most 64 levels);
    each pixel mixes its two nearest levels linearly. Exact when there is no gradient.
    """
    yc, xc = phase_hat.shape[0], 2 * (phase_hat.shape[1] - 1)
    dev = phase_hat.device
    freqs = rfft_frequencies((yc, xc), ctf.pixel_size, device=dev)

    def filtered(defocus: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, Yc, Xc)
        c = ctf_2d_tensor(freqs, defocus, ctf.astigmatism, ctf.astigmatism_angle, ctf.voltage, ctf.cs,
                          ctf.amplitude, ctf.phase_shift, ctf.bfactor, 1.0)
        return -2.0 * torch.fft.irfft2(c * phase_hat, s=(yc, xc))

    if gradient[0] == 0 and gradient[1] == 0:
        return filtered(torch.tensor([ctf.defocus], device=dev))[0]
    ys = torch.arange(yc, dtype=torch.float64, device=dev) - offset[0]
    xs = torch.arange(xc, dtype=torch.float64, device=dev) - offset[1]
    yx = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    df = torch.as_tensor(_defocus_plane(ctf.defocus, gradient, shape, ctf.pixel_size, yx.cpu().numpy()),
                         device=dev)
    lo, hi = float(df.min()), float(df.max())
    step = ctf.pixel_size**2 / (math.pi * electron_wavelength(ctf.voltage))  # Δχ(Nyquist) = πλΔz/(4 px²) ≤ 1/4
    n_levels = int(min(64, max(2, math.ceil((hi - lo) / step) + 1)))
    levels = torch.linspace(lo, hi, n_levels, dtype=torch.float64, device=dev)
    spacing = max((hi - lo) / (n_levels - 1), 1e-9)
    out = torch.zeros((yc, xc), dtype=torch.float32, device=dev)
    for chunk in torch.split(levels, 8):
        images = filtered(chunk.float())
        w = (1 - (df[None] - chunk[:, None, None]).abs() / spacing).clamp_min(0).float()
        out += (images * w).sum(0)
    return out


# RELION MTF files (frequency in cycles/pixel) per detector name and voltage, and a built-in fit
# MTF(f) = exp(−(f/c)^p) to each (max error 0.002–0.05) for when the shared data folder is absent.
_DETECTORS = {
    "k2": {300: ("mtf_k2_300kV_FL2.star", 0.7564, 1.6922), 200: ("mtf_k2_200kV_FL2.star", 0.6779, 1.6710)},
    "k3": {300: ("mtf_k3_standard_300kV_FL2.star", 0.7637, 1.8907),
           200: ("mtf_k3_standard_200kV_FL2.star", 0.7589, 1.6373)},
    "k3_cds": {300: ("mtf_k3_CDS_300kV_FL1.star", 0.9233, 1.8400),
               200: ("mtf_k3_CDS_200kV_FL2.star", 0.8197, 1.6475)},
    "falcon2": {300: ("mtf_falcon2_300kV.star", 0.1762, 1.1429)},
    "falcon3": {300: ("mtf_falcon3EC_300kV.star", 0.3409, 1.8672), 200: ("mtf_falcon3EC_200kV.star", 0.3294, 1.7859)},
    "falcon4": {300: ("mtf_falcon4EC_300kV.star", 0.3177, 1.9019), 200: ("mtf_falcon4EC_200kV.star", 0.2903, 1.7535)},
    "de20": {300: ("mtf_de20_300kV.star", 0.3741, 1.3209)},
}


def _data_dirs() -> list[Path]:
    """Candidate shared-data folders: ``$NAPARI_WARP_TEST_DATA``, then ``../shared/data`` beside a source checkout."""
    out = []
    env = os.environ.get("NAPARI_WARP_TEST_DATA")
    if env:
        out.append(Path(env))
    out.append(Path(__file__).resolve().parents[4] / "shared" / "data")
    return out


def _read_mtf_star(path: Path) -> np.ndarray:
    import starfile

    table = starfile.read(path)
    if isinstance(table, dict):
        table = next(iter(table.values()))
    return np.stack([table["rlnResolutionInversePixel"].to_numpy(float), table["rlnMtfValue"].to_numpy(float)], 1)


def detector_mtf(name_or_samples, voltage: float = 300.0) -> tuple[np.ndarray | None, str]:
    """Resolve an MTF setting to ``(n, 2)`` samples (cycles/pixel, MTF) and a description of its source.

    None -> (None, "none"). A detector name -> RELION's measured curve from the shared data folder when present,
    else the built-in analytic fit. A STAR path -> its ``rlnResolutionInversePixel``/``rlnMtfValue`` columns.
    An array -> itself.
    """
    if name_or_samples is None:
        return None, "none"
    if isinstance(name_or_samples, (str, os.PathLike)) and str(name_or_samples).lower() in _DETECTORS:
        table = _DETECTORS[str(name_or_samples).lower()]
        kv = min(table, key=lambda v: abs(v - voltage))
        fname, c, p = table[kv]
        for d in _data_dirs():
            path = d / "detector-mtf" / fname
            if path.is_file():
                return _read_mtf_star(path), str(path)
        f = np.linspace(0, 0.75, 76)  # beyond Nyquist too: the 2D corners reach 0.71 cycles/px
        return np.stack([f, np.exp(-((f / c) ** p))], 1), f"built-in fit to {fname}"
    if isinstance(name_or_samples, (str, os.PathLike)):
        path = Path(name_or_samples)
        if not path.is_file():
            raise ValueError(f"unknown detector MTF {name_or_samples!r}: not a name in {sorted(_DETECTORS)} nor a file")
        return _read_mtf_star(path), str(path)
    arr = np.asarray(name_or_samples, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"MTF samples must be (n, 2) (cycles/pixel, value), got shape {arr.shape}")
    return arr, "samples"


def _apply_mtf(image: torch.Tensor, mtf: np.ndarray | None) -> torch.Tensor:
    """Filter ``(Y, X)`` by a radial MTF given as samples (cycles/pixel, value); held constant past the last."""
    if mtf is None:
        return image
    shape = tuple(image.shape)
    f = rfft_frequencies(shape, 1.0, device=image.device).norm(dim=-1)
    order = np.argsort(mtf[:, 0])
    curve = np.interp(to_numpy(f).ravel(), mtf[order, 0], mtf[order, 1]).reshape(f.shape)
    filt = torch.as_tensor(curve, dtype=image.dtype, device=image.device)
    return torch.fft.irfft2(torch.fft.rfft2(image) * filt, s=shape)


# ---------------------------------------------------------------------------------------------------------------
# frames: deformation, exposure, detector
# ---------------------------------------------------------------------------------------------------------------
def _frame_chunks(n_frames: int, shape) -> int:
    """Frames per batch: ~32 M grid values at most (the sampling grid is 2 floats per pixel per frame)."""
    return max(1, min(n_frames, int(8e6 // max(1, shape[0] * shape[1]))))


def _shifted_frames_fourier(canvas_hat, canvas_shape, offset, shape, global_px: torch.Tensor) -> torch.Tensor:
    """Rigid motion, exactly: frames ``(B, Y, X)`` = canvas moved by ``global_px`` ``(B, 2)`` (Fourier shift).

    The ramp ``exp(−2πi (fy dy + fx dx))`` is separable: two 1D ramps instead of a 2D sin/cos per frame.
    """
    dev = canvas_hat.device
    fy = fftfreq_warp(canvas_shape[0], device=dev, dtype=torch.float64)
    fx = torch.arange(canvas_shape[1] // 2 + 1, device=dev, dtype=torch.float64) / canvas_shape[1]
    ry = torch.polar(torch.ones_like(fy), -2 * math.pi * fy * global_px[:, :1]).to(torch.complex64)  # (B, Y)
    rx = torch.polar(torch.ones_like(fx), -2 * math.pi * fx * global_px[:, 1:]).to(torch.complex64)  # (B, X')
    frames = torch.fft.irfft2(canvas_hat[None] * ry[:, :, None] * rx[:, None, :], s=canvas_shape)
    return _crop(frames, offset, shape)


def _inverse_field(global_px, local_px, times, shape, tol: float = 1e-4, max_iterations: int = 12):
    """Displacement ``q − p`` (px) where ``p + s(p) = q``, on a coarse lattice of output positions q.

    Solved by fixed-point iteration until no point moves by more than ``tol`` px (the local field is smooth, so a
    few steps do). The lattice has ≥ 8 points per grid-node interval (step ≤ 32 px) and reaches one step beyond the
    image on every side, so ``_upsample``'s spline is accurate to ~1e-3 px inside the image.
    Returns ``(disp (B, 2, ny, nx), qy (ny,), qx (nx,))``.
    """
    dev = global_px.device
    axes = []
    for n, nodes in zip(shape, local_px.shape[-2:]):
        step = max(4.0, min(32.0, (n - 1) / max(1, nodes - 1) / 8))
        count = math.ceil((n - 1 + 2 * step) / step) + 1
        axes.append(torch.linspace(-step, -step + (count - 1) * step, count, dtype=torch.float64, device=dev))
    q = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (ny, nx, 2)
    g = global_px[:, None, None, :]
    p = (q - g).contiguous()  # (B, ny, nx, 2)
    for _ in range(max_iterations):
        new = q - g - _local_field(local_px, times, p, shape)
        done = (new - p).abs().max() < tol
        p = new
        if done:
            break
    return (q - p).permute(0, 3, 1, 2), axes[0], axes[1]


def _spline_matrix(nodes: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, n)`` matrix: natural cubic-spline interpolation (``core.grid``'s; far more accurate than torch's
    a = −0.75 bicubic) from values at evenly spaced ``nodes`` ``(n,)`` to the integer positions 0 .. size − 1."""
    u = (torch.arange(size, dtype=torch.float64, device=nodes.device) - nodes[0]) / (nodes[-1] - nodes[0])
    eye = torch.eye(len(nodes), dtype=torch.float64, device=nodes.device)
    return evaluate_cubic_grid(eye, u[:, None]).T


def _upsample(field: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor, shape) -> torch.Tensor:
    """``(..., ny, nx)`` values on the lattice ``qy × qx`` -> ``(..., Y, X)`` at every pixel (two matmuls)."""
    return _spline_matrix(qy, shape[0]) @ field @ _spline_matrix(qx, shape[1]).T


def _warped_frames(canvas: torch.Tensor, big: torch.Tensor, offset, shape, global_px, local_px, times) -> torch.Tensor:
    """Frames ``(B, Y, X)``: each output pixel q samples the canvas at ``q − disp(q)``.

    ``big`` is the canvas Fourier-oversampled ``os`` times (``_oversampled``); sampling it bilinearly is unbiased in
    position (torch's bicubic, a = −0.75, moves sharp features by up to 0.05 px) and, at os = 4, keeps ≥ 92 % of
    the amplitude at Nyquist. grid_sample's cost scales with the output, not the input.
    """
    b = global_px.shape[0]
    disp = _upsample(*_inverse_field(global_px, local_px, times, shape), shape).float()  # (B, 2, Y, X)
    yc, xc = canvas.shape
    os = big.shape[-1] // xc
    ys = torch.arange(shape[0], dtype=torch.float32, device=canvas.device) + offset[0]
    xs = torch.arange(shape[1], dtype=torch.float32, device=canvas.device) + offset[1]
    sy = (ys[None, :, None] - disp[:, 0]) * (2.0 * os / (os * yc - 1)) - 1  # canvas c -> oversampled os·c
    sx = (xs[None, None, :] - disp[:, 1]) * (2.0 * os / (os * xc - 1)) - 1
    grid = torch.stack([sx, sy], dim=-1)  # grid_sample wants (x, y)
    out = F.grid_sample(big[None, None].expand(b, 1, *big.shape), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[:, 0]


def _oversampled(canvas: torch.Tensor) -> torch.Tensor:
    """The canvas sinc-interpolated onto a grid ``os`` times finer (4, or 3/2 for large canvases to bound memory)."""
    n = canvas.numel()
    os = 4 if n <= 2.5e6 else 3 if n <= 6e6 else 2
    return fourier_pad(canvas, (os * canvas.shape[0], os * canvas.shape[1]))


def _gain_reference(gain, shape, rng: np.random.Generator, device) -> torch.Tensor | None:
    """None, a random reference (smooth ±3 % + per-pixel ±3 %, clipped to [0.8, 1.2]) for True, or the array."""
    if gain is None or gain is False:
        return None
    if gain is True:
        smooth = _smooth_noise(shape, max(shape) / 8, rng, device)
        pixel = torch.as_tensor(rng.standard_normal(tuple(shape)), dtype=torch.float32, device=device)
        return (1.0 + 0.03 * smooth + 0.03 * pixel).clamp(0.8, 1.2)
    g = torch.as_tensor(np.asarray(gain), dtype=torch.float32, device=device)
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"gain reference shape {tuple(g.shape)} does not match the frames {tuple(shape)}")
    return g


def _expose(canvas, offset, truth: MovieTruth, gain, n_hot, rng, progress, total, done):
    """Deform, expose and count every frame; returns (frames (F, Y, X) float32, gain (Y, X) or None, hot (N, 2))."""
    dev = canvas.device
    shape = truth.shape
    mean_counts = truth.dose_per_frame * truth.pixel_size**2
    gain_ref = _gain_reference(gain, shape, rng["gain"], dev)
    sensitivity = None if gain_ref is None else 1.0 / gain_ref
    gen = torch.Generator(device=dev).manual_seed(int(rng["noise"].integers(2**62)))
    global_px = torch.as_tensor(truth.global_shifts, dtype=torch.float64, device=dev)
    local_px = torch.as_tensor(truth.local_nodes, dtype=torch.float64, device=dev)
    times = torch.as_tensor(truth.frame_times, dtype=torch.float64, device=dev)
    rigid = not torch.any(local_px != 0)
    canvas_hat = torch.fft.rfft2(canvas) if rigid else None
    big = None if rigid else _oversampled(canvas)
    n_frames = len(times)
    frames = np.empty((n_frames, *shape), dtype=np.float32)
    batch = _frame_chunks(n_frames, canvas.shape)
    for start in range(0, n_frames, batch):
        sl = slice(start, min(n_frames, start + batch))
        if rigid:
            expected = _shifted_frames_fourier(canvas_hat, tuple(canvas.shape), offset, shape, global_px[sl])
        else:
            expected = _warped_frames(canvas, big, offset, shape, global_px[sl], local_px, times[sl])
        rate = expected.clamp_min(0) * mean_counts
        if sensitivity is not None:
            rate = rate * sensitivity
        frames[sl] = to_numpy(torch.poisson(rate, generator=gen))
        done += sl.stop - sl.start
        if progress:
            progress(done, total)
    hot = _hot_pixels(frames, n_hot, mean_counts, rng["hot"])
    if progress:
        progress(total, total)
    return frames, None if gain_ref is None else to_numpy(gain_ref).astype(np.float32), hot


def _hot_pixels(frames: np.ndarray, n: int, mean_counts: float, rng: np.random.Generator) -> np.ndarray:
    """Overwrite ``n`` distinct random pixels with high Poisson counts in every frame; returns ``(n, 2)`` (y, x)."""
    y, x = frames.shape[-2:]
    n = int(min(n, y * x))
    flat = rng.choice(y * x, size=n, replace=False) if n else np.zeros(0, dtype=np.int64)
    yx = np.stack([flat // x, flat % x], axis=1).astype(np.int64)
    if n:
        rate = max(20.0, _HOT_PIXEL_RATE * mean_counts)
        frames[:, yx[:, 0], yx[:, 1]] = rng.poisson(rate, size=(frames.shape[0], n)).astype(np.float32)
    return yx


# ---------------------------------------------------------------------------------------------------------------
# real micrographs
# ---------------------------------------------------------------------------------------------------------------
def _load_micrograph(path, pixel_size: float | None, max_size: int | None) -> tuple[np.ndarray, float]:
    """Read a 2D MRC (first section of a stack), Fourier-bin so the longer side is <= ``max_size``."""
    import mrcfile

    with mrcfile.open(str(path), permissive=True) as m:
        data = np.asarray(m.data, dtype=np.float32)
        header_px = float(m.voxel_size.x)
    if data.ndim == 3:
        data = data[0]
    ps = float(pixel_size) if pixel_size else header_px
    if ps <= 0:
        raise ValueError(f"{path}: no pixel size in the header; pass pixel_size")
    if max_size is not None and max(data.shape) > max_size:
        target = ps * max(data.shape) / max_size
        binned, ps = fourier_rescale(torch.as_tensor(data), ps, target)
        data = binned.numpy()
    return data, ps
