"""Particle export, the proof (issue 7): local CTF + motion-corrected extraction reconstructs closer to the truth.

What is measured
----------------
Movies are simulated (``core.simulate``) whose particles are projections of a known 3D specimen (PDB 8OSK, a
~250 kDa nucleosome complex, 165 Å across, by default) at known random orientations (RELION ZYZ Euler angles) and
positions, with known global drift + local (spline) deformation, a tilted specimen plane (local defocus spanning
±``defocus_range`` Å from the centre to the corners), astigmatism, 300 Å of amorphous ice, the K3 detector MTF and
Poisson counts at 40 e/Å² (20 frames). Every reconstruction gets the **true** angles, so what differs between the
rows is only how the particles were extracted and which CTF they carry. Each map is reconstructed by RELION 3.1
(``relion_reconstruct --ctf``, C1) from our STAR + ``.mrcs`` and compared with the true map by FSC.

Rows (the same particles, coordinates and angles in every row)
  * ``oracle``: the true motion (``MovieTruth`` as the motion) and the true local CTF per particle: what the
    simulation allows at this particle count, dose, B-factors and MTF.
  * ``ours`` (pipeline A, as the session runs it): our motion fit (``motion.correct_movie``, session defaults,
    dose-weighted average), our local CTF fit on the aligned average (``ctf_fit.fit_ctf``, 5 × 5 grid: the session's
    ``ctf_from = "average"``), then ``particles.extract_particles`` with the fitted ``MotionModel`` and ``CTFFit``
    (each box moved rigidly by the model at its centre, dose-weighted, local defocus per particle).
  * ``global CTF + no motion`` (pipeline B, degraded): the frames summed as they are (motion None) and every
    particle given the fit's global CTF (its mean defocus). ``local CTF + no motion`` and ``global CTF + motion``
    separate the two effects.
  * ``RELION extract`` (peer): ``relion_preprocess --extract --norm --invert_contrast`` from our aligned,
    dose-weighted averages (continuous local deformation) with the same coordinates, the particles' CTF columns set to
    our per-particle local values, reconstructed the same way. RELION 3.1 centres each box on the coordinate
    truncated to whole pixels and records no origin for the remainder, so it is shown twice: as it comes, and with
    the remainder added as ``rlnOriginX/YAngst`` (what a fair comparison of the images needs).
  * ``noise-free`` (convention check): boxes of the simulator's projected specimen (no CTF, no noise, no motion),
    reconstructed without ``--ctf``: FSC ≈ 1 to high resolution only if the simulator's Euler angles mean what
    RELION means by them (a wrong convention gives FSC ≈ 0 beyond the lowest shells).

Coordinates: the true centres ``p`` are in the simulator's reference (frame 0); the aligned average sits at the mean
position over the exposure (``core.motion``'s convention), so a particle's position in the averages is
``q = p + mean_f shift_true(p, f)``: what a perfect picker finds. ``q`` is used by every row except the oracle
(``p`` with the true motion). Particles whose box leaves the image in any frame are dropped (RELION would drop them).

True map: the simulator's own specimen model (per-element Peng scattering factors × atomic B × Babinet solvent)
splatted in 3D exactly as the simulator splats its projections, at the particles' box and pixel size, its centre
of mass on voxel ``B // 2`` (``truth_volume``). FSC in 1-px shells, unmasked and inside a soft sphere (particle
radius + 6 Å, 6 px cosine edge) applied to both maps. FSC against the truth relates to the half-map FSC as
``FSC_true = sqrt(2 FSC_half / (1 + FSC_half))``, so the half-map 0.143 criterion is FSC_true = 0.5; both
thresholds (0.5 and 0.143) are reported.

Conventions, also checked directly: ``relion_project`` of the true map at the true angles against the simulator's
projected specimen around each particle (normalised cross-correlation inside the particle's radius), and at the
inverse rotation (what a transposed / passive-active mix-up would give); and ``relion_project --ctf`` with each
particle's true local CTF as our STAR files write it (U, V, angle) against the noise-free image of a simulation with
1000 Å astigmatism and a tilted plane (no ice, MTF or motion), beside the negated astigmatism angle and the centre's
defocus for all (what a CTF convention error would cost).

Speed: a 4096² × 40-frame movie (random counts, in memory) with a global + 5 × 5 local motion model, 300
particles (``--speed-particles``), box 256 at the native pixel size, box 128 at 2× binning (the same field of view)
and box 256 at 2× binning; particles/s of ``extract_particles`` (dose weighting, CTF columns, normalisation), warm,
on 2 CPU threads, and also on CUDA with ``--device cuda`` when a GPU is present.

Run (the full run takes ~20 min on 2 cores; ``--quick`` < 2 min: one 1024² movie, RELION's ``--skip_gridding``)::

    OMP_NUM_THREADS=2 /work/venv/bin/python benchmarks/export.py [--quick] [--movies N] [--device cpu|cuda]
        [--skip-speed] [--skip-accuracy] [--speed-particles N] [--keep DIR] [--out results.json]

It prints markdown tables for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_and_date  # noqa: E402

from napari_warp.core.ctf import CTFParams  # noqa: E402
from napari_warp.core.ctf_fit import CTFSettings, fit_ctf  # noqa: E402
from napari_warp.core.io.mrc_write import write_mrc  # noqa: E402
from napari_warp.core.io.star import read_star, write_star  # noqa: E402
from napari_warp.core.motion import MotionModel, MotionSettings, correct_movie  # noqa: E402
from napari_warp.core.particles import (  # noqa: E402
    ExportSettings,
    extract_particles,
    particle_ctf,
    write_particle_stack,
    write_particle_star,
)
from napari_warp.core.simulate import MovieSimulation, simulate_movie  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RELION_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
              "OMP_NUM_THREADS": "1"}
RELION_TOOLS = ("relion_reconstruct", "relion_preprocess", "relion_project")

ROWS = {  # key -> (label, motion, CTF)
    "oracle": ("oracle: true motion + true local CTF", "true", "true local"),
    "ours": ("**ours: fitted motion + fitted local CTF** (A)", "fitted", "fitted local"),
    "local_nomotion": ("fitted local CTF, no motion", "none", "fitted local"),
    "global_motion": ("fitted global CTF, fitted motion", "fitted", "fitted global"),
    "global_nomotion": ("fitted global CTF, no motion (B)", "none", "fitted global"),
    "relion": ("RELION extract from our aligned average (+ sub-pixel origin), our local CTF", "fitted (average)",
               "fitted local"),
    "relion_raw": ("RELION extract as it comes (whole-pixel centres), our local CTF", "fitted (average)",
                   "fitted local"),
    "noise_free": ("noise-free projections, no CTF (convention check)", "—", "—"),
}
REPORT_AT = (12.0, 8.0, 6.0, 5.0, 4.0)  # Å: FSC values reported at these resolutions


@dataclass(frozen=True)
class Setup:
    """The simulated data set. Lengths in Å, doses in e/Å²."""

    specimen: str = str(DATA / "models-pdb" / "8OSK.pdb")
    shape: tuple[int, int] = (2048, 2048)
    n_movies: int = 4
    n_frames: int = 20
    pixel_size: float = 2.0
    total_dose: float = 40.0
    particle_density: float = 0.4
    box: int = 144
    diameter: float = 200.0  # background circle for normalisation (RELION's --bg_radius = diameter / 2 / px)
    particle_diameter: float = 120.0  # of the built-in "blobs" molecule only (a PDB specimen has its own size)
    defocus: tuple[float, float] = (9000.0, 12000.0)  # range of the centre defocus over the movies
    defocus_range: float = 3000.0  # ± at the corners (tilted plane)
    astigmatism: float = 300.0
    drift: float = 15.0
    drift_jitter: float = 0.5
    local_amplitude: float = 3.0
    ice_thickness: float = 300.0
    mtf: str = "k3"
    seed: int = 7000

    @property
    def dose_per_frame(self) -> float:
        return self.total_dose / self.n_frames

    def movie(self, i: int) -> MovieSimulation:
        """Movie ``i``: its own seed, centre defocus, plane direction and astigmatism angle."""
        rng = np.random.default_rng(self.seed + i)
        theta = rng.uniform(0, 2 * np.pi)
        ny, nx = self.shape
        # |g| so that the plane reaches ±defocus_range at the far corners: (|gy| Y + |gx| X) px / 2 = range
        g = self.defocus_range / ((abs(math.cos(theta)) * ny + abs(math.sin(theta)) * nx) * self.pixel_size / 2)
        return MovieSimulation(
            shape=self.shape, n_frames=self.n_frames, pixel_size=self.pixel_size, dose_per_frame=self.dose_per_frame,
            defocus=float(rng.uniform(*self.defocus)), defocus_gradient=(g * math.cos(theta), g * math.sin(theta)),
            astigmatism=self.astigmatism, astigmatism_angle=float(rng.uniform(-90, 90)), specimen=self.specimen,
            particle_diameter=self.particle_diameter,
            particle_density=self.particle_density, ice_thickness=self.ice_thickness, drift=self.drift,
            drift_jitter=self.drift_jitter, local_amplitude=self.local_amplitude, mtf=self.mtf, seed=self.seed + i)


FULL = Setup()
QUICK = Setup(shape=(1024, 1024), n_movies=1, n_frames=12, box=128, particle_density=0.45, drift=12.0)


# ---------------------------------------------------------------------------------------------------------------
# truth map, FSC
# ---------------------------------------------------------------------------------------------------------------
def truth_volume(specimen: str | os.PathLike, box: int, pixel_size: float, voltage: float = 300.0,
                 seed: int = 0, particle_diameter: float = 120.0) -> tuple[np.ndarray, float]:
    """The simulator's specimen as a 3D map ``(box,)*3`` (z, y, x) at ``pixel_size``: the model ``core.simulate``
    projects (per-element scattering factor × atomic B × Babinet solvent for atoms; weighted voxels for a map), its
    centre of mass on voxel ``box // 2`` (where the simulator puts the particle centre and RELION the origin).

    Built as the simulator builds its projections, in 3D: points splatted trilinearly on a 2× oversampled grid,
    Fourier-cropped, divided by the trilinear kernel's transform and multiplied by each channel's transfer, so its
    projections along z are the simulator's particle images (before CTF) by the projection-slice theorem.
    seed, particle_diameter: the simulation's (only the built-in "blobs" molecule depends on them).
    Returns ``(map, the specimen's diameter in Å)``.
    """
    from napari_warp.core import simulate as sim

    model = sim._specimen_model(specimen, particle_diameter, voltage, sim._rngs(seed)["specimen"])
    n2 = 2 * box
    f = torch.fft.fftfreq(box, dtype=torch.float64)
    fr = torch.fft.rfftfreq(box, dtype=torch.float64)
    fz, fy, fx = torch.meshgrid(f, f, fr, indexing="ij")
    k2 = (fz**2 + fy**2 + fx**2) / pixel_size**2
    kernel = (torch.sinc(fz / 2) * torch.sinc(fy / 2) * torch.sinc(fx / 2)) ** 2
    keep = torch.cat([torch.arange(box // 2), torch.arange(n2 - box // 2, n2)])
    out = torch.zeros((box, box, box // 2 + 1), dtype=torch.complex128)
    for i, transfer in enumerate(model.transfers):
        sel = model.channel == i
        if not np.any(sel):
            continue
        zyx = torch.as_tensor(model.positions[sel][:, ::-1].copy() / pixel_size * 2 + box, dtype=torch.float64)
        grid = torch.zeros((n2, n2, n2), dtype=torch.float64)
        _splat3(zyx, torch.as_tensor(model.weight[sel], dtype=torch.float64), grid)
        spec = torch.fft.rfftn(grid)[keep][:, keep][:, :, : box // 2 + 1]
        out += spec * transfer(k2) / kernel
    return torch.fft.irfftn(out, s=(box, box, box)).numpy().astype(np.float32), float(model.diameter)


def _splat3(zyx: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """Add points ``zyx`` ``(P, 3)`` (voxels) trilinearly (periodic) into ``out`` ``(Z, Y, X)``."""
    n = out.shape
    flat = out.view(-1)
    base = torch.floor(zyx)
    frac = zyx - base
    base = base.long()
    for dz in (0, 1):
        wz = frac[:, 0] if dz else 1 - frac[:, 0]
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1 - frac[:, 1]
            for dx in (0, 1):
                wx = frac[:, 2] if dx else 1 - frac[:, 2]
                idx = (((base[:, 0] + dz) % n[0]) * n[1] + (base[:, 1] + dy) % n[1]) * n[2] + (base[:, 2] + dx) % n[2]
                flat.index_add_(0, idx, weight * wz * wy * wx)


def fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier shell correlation of two ``(B, B, B)`` maps in 1-px shells 0 .. B // 2."""
    box = a.shape[0]
    fa, fb = np.fft.rfftn(a.astype(np.float64)), np.fft.rfftn(b.astype(np.float64))
    f = np.fft.fftfreq(box) * box
    fr = np.fft.rfftfreq(box) * box
    shells = np.round(np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2)).astype(int)
    # the rfft half-spectrum holds one of each Hermitian pair (the x = 0 and Nyquist planes both): the sums over it
    # are half the full sums up to those planes, which a correlation ratio does not see
    n = box // 2 + 1
    s = shells.ravel()
    num = np.bincount(s, (fa * fb.conj()).real.ravel(), minlength=n)[:n]
    da = np.bincount(s, (np.abs(fa) ** 2).ravel(), minlength=n)[:n]
    db = np.bincount(s, (np.abs(fb) ** 2).ravel(), minlength=n)[:n]
    return num / np.sqrt(np.maximum(da * db, 1e-300))


def resolution_at(curve: np.ndarray, box: int, pixel_size: float, threshold: float) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold`` (linear between shells; from shell 1);
    Nyquist (2 × pixel size) when it never does."""
    for i in range(2, len(curve)):
        if curve[i] < threshold:
            x = i - 1 + (curve[i - 1] - threshold) / max(curve[i - 1] - curve[i], 1e-12)
            return box * pixel_size / x
    return 2.0 * pixel_size


def fsc_at(curve: np.ndarray, box: int, pixel_size: float, resolution: float) -> float | None:
    """The FSC interpolated at ``resolution`` Å (None beyond Nyquist)."""
    x = box * pixel_size / resolution
    if x > len(curve) - 1:
        return None
    return float(np.interp(x, np.arange(len(curve)), curve))


def soft_mask(box: int, radius: float, edge: float) -> np.ndarray:
    """Sphere about voxel ``box // 2``: 1 inside ``radius`` px, raised cosine to 0 over ``edge`` px."""
    r = np.arange(box) - box // 2
    d = np.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)
    m = np.clip((d - radius) / edge, 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * m)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# RELION
# ---------------------------------------------------------------------------------------------------------------
def relion(args: list[str], cwd: Path, timeout: float = 3600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=RELION_ENV, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}) in {cwd}:\n{out[-3000:]}")
    return out


def relion_version() -> str | None:
    if shutil.which("relion_reconstruct") is None:
        return None
    out = subprocess.run(["relion_reconstruct", "--version"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if "version" in line.lower()), "?")


def posed_star(star: Path, out: Path, angles: np.ndarray, ctf: pd.DataFrame | None = None,
               origin: np.ndarray | None = None) -> None:
    """Copy a particle STAR adding the true angles (``rlnAngleRot/Tilt/Psi``, row order) and, when given, the CTF
    columns of ``ctf`` (``rlnDefocusU/V/Angle``, row order) and ``origin`` ``(N, 2)`` Å (y, x) as
    ``rlnOriginY/XAngst``."""
    blocks = read_star(star)
    parts = blocks["particles"]
    if len(parts) != len(angles):
        raise RuntimeError(f"{star}: {len(parts)} particles, {len(angles)} angles")
    parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"] = np.asarray(angles, np.float64).T
    if ctf is not None:
        for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            parts[col] = ctf[col].to_numpy(np.float64)
    if origin is not None:
        parts["rlnOriginXAngst"], parts["rlnOriginYAngst"] = origin[:, 1], origin[:, 0]
    write_star(out, blocks)


def reconstruct(star: Path, out: Path, pixel_size: float, use_ctf: bool = True, gridding: bool = True) -> float:
    """``relion_reconstruct`` (C1) in the STAR file's folder; returns its wall time. ``gridding=False`` skips
    RELION's 10 iterations of gridding correction (``--skip_gridding``: ~15× faster, a little lower FSC)."""
    t = time.perf_counter()
    relion(["relion_reconstruct", "--i", star.name, "--o", str(out.resolve()), "--angpix", f"{pixel_size:g}"]
           + (["--ctf"] if use_ctf else []) + ([] if gridding else ["--skip_gridding"]), star.parent)
    return time.perf_counter() - t


def relion_extract(work: Path, averages: list[Path], coords: list[np.ndarray], setup: Setup,
                   pixel_size: float) -> Path:
    """``relion_preprocess --extract`` of ``coords`` ``(N, 2)`` px (y, x) from each average (RELION 3.1 STARs);
    returns the particles STAR (paths relative to ``work``)."""
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographOriginalPixelSize": [pixel_size], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.07],
                           "rlnMicrographPixelSize": [pixel_size]})
    names = [os.path.relpath(a, work) for a in averages]
    write_star(work / "micrographs.star", {"optics": optics, "micrographs": pd.DataFrame({
        "rlnMicrographName": names, "rlnOpticsGroup": np.ones(len(names), np.int64)})})
    for a, yx in zip(averages, coords):
        write_star(a.with_name(a.stem + "_pick.star"), {"": pd.DataFrame({"rlnCoordinateX": yx[:, 1],
                                                                            "rlnCoordinateY": yx[:, 0]})})
    radius = setup.diameter / 2 / pixel_size
    relion(["relion_preprocess", "--i", "micrographs.star", "--coord_dir", "./", "--coord_suffix", "_pick.star",
            "--part_dir", "RelionExtract/", "--part_star", "relion_particles.star", "--extract",
            "--extract_size", str(setup.box), "--norm", "--bg_radius", f"{radius:g}", "--invert_contrast"], work)
    return work / "relion_particles.star"


# ---------------------------------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------------------------------
def true_ctf_table(truth, yx: np.ndarray) -> pd.DataFrame:
    """Per-particle RELION CTF columns of the true local CTF at reference positions ``yx``."""
    table = particle_ctf(truth.ctf, yx, truth.shape)  # the centre's CTF, RELION's U/V/angle convention
    delta = truth.defocus_at(yx) - truth.ctf.defocus
    table["defocus_u"] += delta
    table["defocus_v"] += delta
    return table


def inside_all_frames(truth, yx: np.ndarray, half: float) -> np.ndarray:
    """``(N,)`` the box (half-width ``half`` px, plus 2 px) stays inside the image in every frame."""
    pos = yx[None] + truth.shifts(yx)
    lo = (pos >= half + 2).all(axis=(0, 2))
    hi = (pos <= np.asarray(truth.shape) - half - 3).all(axis=(0, 2))
    return lo & hi


def process_movie(setup: Setup, i: int, work: Path, device, log, rows=tuple(ROWS)) -> dict:
    """Simulate movie ``i``, fit motion and CTF as the session does, extract every row's stack and write it.
    Returns the particles' files per row, their angles and CTF tables, the fits' errors and timings."""
    px = setup.pixel_size
    timings = {}
    t = time.perf_counter()
    sim = simulate_movie(setup.movie(i), device=device)
    timings["simulate"] = time.perf_counter() - t
    truth, frames = sim.truth, sim.frames
    ms = MotionSettings(pixel_size=px, exposure_per_frame=setup.dose_per_frame)  # session defaults otherwise
    t = time.perf_counter()
    model, aligned = correct_movie(frames, ms, device=device, halves=False)
    timings["motion"] = time.perf_counter() - t
    t = time.perf_counter()
    fit = fit_ctf(aligned.average, CTFSettings(pixel_size=px), device=device)  # session: ctf_from = "average"
    timings["ctf"] = time.perf_counter() - t

    keep = inside_all_frames(truth, truth.particles, setup.box / 2)
    p = truth.particles[keep]
    angles = truth.particle_angles[keep]
    true_shifts = truth.shifts(p)
    q = p + true_shifts.mean(0)  # where the particles are in the aligned average
    name = f"movie{i:02d}"
    average = work / "averages" / f"{name}.mrc"
    write_mrc(average, aligned.average, pixel_size=px)

    errors = {
        "particles": int(len(p)),
        "motion_rms_px": float(np.sqrt(((model.shifts(q) - (true_shifts - true_shifts.mean(0))) ** 2)
                                       .sum(-1).mean())),
        "true_motion_rms_px": float(np.sqrt(((true_shifts - true_shifts.mean(0)) ** 2).sum(-1).mean())),
        "defocus_rms_A": float(np.sqrt(((fit.defocus_at(q) - truth.defocus_at(p)) ** 2).mean())),
        "defocus_spread_A": float(np.ptp(truth.defocus_at(p))),
        "global_defocus_rms_A": float(np.sqrt(((fit.defocus - truth.defocus_at(p)) ** 2).mean())),
        "astigmatism_fit_A": float(fit.astigmatism), "astigmatism_true_A": float(truth.ctf.astigmatism),
        "fit_resolution_A": float(fit.fit_resolution),
    }
    s = ExportSettings(box_size=setup.box, diameter=setup.diameter)
    raw = ExportSettings(box_size=setup.box, normalize=False, invert=False, dose_weighting=False)
    jobs = {
        "oracle": lambda: dataclasses.replace(extract_particles(frames, p, truth, truth.ctf, s, motion_settings=ms,
                                                                device=device), ctf=true_ctf_table(truth, p)),
        "ours": lambda: extract_particles(frames, q, model, fit, s, motion_settings=ms, device=device),
        "local_nomotion": lambda: extract_particles(frames, q, None, fit, s, motion_settings=ms, device=device),
        "global_motion": lambda: extract_particles(frames, q, model, fit.ctf, s, motion_settings=ms, device=device),
        "global_nomotion": lambda: extract_particles(frames, q, None, fit.ctf, s, motion_settings=ms, device=device),
        "noise_free": lambda: extract_particles(truth.specimen, p, None, None, raw, pixel_size=px, device=device),
    }
    files = {}
    for key, job in jobs.items():
        if key not in rows:
            continue
        t = time.perf_counter()
        stack = job()
        timings[f"extract_{key}"] = time.perf_counter() - t
        files[key] = write_particle_stack(work / key / "Particles" / f"{name}.mrcs", stack, average)
    extract_s = sum(v for k, v in timings.items() if k.startswith("extract_"))
    log(f"[{name}] {len(p)} particles; simulate {timings['simulate']:.0f} s, motion {timings['motion']:.0f} s "
        f"(error {errors['motion_rms_px']:.2f} px RMS of {errors['true_motion_rms_px']:.1f}), CTF "
        f"{timings['ctf']:.0f} s (local error {errors['defocus_rms_A']:.0f} Å RMS; global "
        f"{errors['global_defocus_rms_A']:.0f} Å), extraction {extract_s:.1f} s ({len(files)} rows)")
    return dict(name=name, files=files, angles=angles, q=q, average=average, ours_ctf=particle_ctf(fit, q, truth.shape),
                specimen=truth.specimen, p=p, errors=errors, timings=timings,
                settings=dataclasses.asdict(setup.movie(i)))


# ---------------------------------------------------------------------------------------------------------------
# convention check
# ---------------------------------------------------------------------------------------------------------------
def inverse_angles(angles: np.ndarray) -> np.ndarray:
    """The inverse rotation's (rot, tilt, psi): ``A⁻¹ = Aᵀ = Rz(−rot) Ry(−tilt) Rz(−psi)`` → (−psi, −tilt, −rot)."""
    return np.stack([-angles[:, 2], -angles[:, 1], -angles[:, 0]], 1)


def _project(work: Path, truth_map: Path, name: str, angles: np.ndarray, pixel_size: float, box: int,
             ctf: pd.DataFrame | None = None, amplitude: float = 0.07) -> np.ndarray:
    """``relion_project`` of ``truth_map`` at ``angles`` (with ``--ctf`` and the RELION CTF columns of ``ctf``)."""
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [pixel_size], "rlnImageSize": [box], "rlnImageDimensionality": [2],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [amplitude]})
    parts = pd.DataFrame({"rlnImageName": [f"{k + 1:06d}@none.mrcs" for k in range(len(angles))],
                          "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2]})
    if ctf is not None:
        parts["rlnDefocusU"], parts["rlnDefocusV"] = ctf["defocus_u"].to_numpy(), ctf["defocus_v"].to_numpy()
        parts["rlnDefocusAngle"] = ctf["defocus_angle"].to_numpy()
    parts["rlnOpticsGroup"] = np.ones(len(angles), np.int64)
    write_star(work / f"{name}.star", {"optics": optics, "particles": parts})
    relion(["relion_project", "--i", str(truth_map.resolve()), "--o", name, "--ang", f"{name}.star", "--angpix",
            f"{pixel_size:g}"] + (["--ctf"] if ctf is not None else []), work)
    return mrcfile.read(work / f"{name}.mrcs")


def _ncc_inside(a: np.ndarray, b: np.ndarray, radius: float) -> list[float]:
    """Normalised cross-correlation of each pair of boxes inside ``radius`` px of the centre pixel."""
    box = a.shape[-1]
    r = np.hypot(*np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij"))
    m = r < radius
    out = []
    for x, y in zip(a, b):
        x, y = x[m] - x[m].mean(), y[m] - y[m].mean()
        out.append(float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())))
    return out


def _stats(values: list[float]) -> dict:
    return dict(mean=float(np.mean(values)), min=float(np.min(values)), n=len(values))


def convention_checks(work: Path, truth_map: Path, movie: dict, setup: Setup, pixel_size: float, diameter: float,
                      n: int = 24) -> dict:
    """Euler angles and CTF: ``relion_project`` of the true map against the simulator's own images.

    euler: at the true angles and at the inverse rotation, against the simulator's projected specimen (no CTF)
    around each particle of the first movie. ctf: ``relion_project --ctf`` with each particle's true local CTF (as
    written to our STAR files: U, V, angle) against the noise-free image of a separate simulation with strong
    astigmatism (1000 Å at 35°), a tilted plane, no ice, no MTF, no motion, contrast inverted; also with the
    astigmatism angle negated and with the centre's defocus for every particle (what a convention error would cost).
    """
    box = setup.box
    radius = 0.5 * diameter / pixel_size
    raw = ExportSettings(box_size=box, normalize=False, invert=False, dose_weighting=False)
    p, angles = movie["p"][:n], movie["angles"][:n]
    boxes = extract_particles(movie["specimen"], p, None, None, raw, pixel_size=pixel_size).images
    euler = {label: _stats(_ncc_inside(boxes, _project(work, truth_map, f"proj_{label}", ang, pixel_size, box),
                                       radius))
             for label, ang in (("true", angles), ("inverse", inverse_angles(angles)))}

    s = MovieSimulation(shape=(1024, 1024), n_frames=2, pixel_size=pixel_size, dose_per_frame=1.0, defocus=10000.0,
                        defocus_gradient=(0.9, -0.9), astigmatism=1000.0, astigmatism_angle=35.0,
                        specimen=setup.specimen, particle_diameter=setup.particle_diameter, particle_density=0.3,
                        ice_thickness=0.0, mtf=None, drift=0.0,
                        local_amplitude=0.0, bfactor=0.0, seed=setup.seed)  # seed: the same "blobs" molecule
    truth = simulate_movie(s).truth
    keep = inside_all_frames(truth, truth.particles, box / 2)
    p, angles = truth.particles[keep][:n], truth.particle_angles[keep][:n]
    clean = extract_particles(1.0 - truth.clean, p, None, None, raw, pixel_size=pixel_size).images  # protein white
    table = true_ctf_table(truth, p)
    negated = table.assign(defocus_angle=-table["defocus_angle"])
    centre = particle_ctf(truth.ctf, p, truth.shape)
    ctf = {label: _stats(_ncc_inside(clean, _project(work, truth_map, f"ctf_{label}", angles, pixel_size, box, t),
                                     radius))
           for label, t in (("true", table), ("negated_angle", negated), ("centre_defocus", centre))}
    ctf["defocus_spread_A"] = float(np.ptp(truth.defocus_at(p)))
    return dict(euler=euler, ctf=ctf)


# ---------------------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------------------
def run_speed(size: int, n_frames: int, n_particles: int, device, log) -> dict:
    """particles/s of ``extract_particles`` on a ``size``² × ``n_frames`` movie held in memory."""
    px = 1.0
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    frames = rng.integers(0, 3, size=(n_frames, size, size), dtype=np.uint8).astype(np.float32)
    log(f"[speed] {size}² × {n_frames} frames made in {time.perf_counter() - t:.0f} s")
    tt = np.arange(n_frames) / (n_frames - 1)
    drift = 20.0 * (1 - np.exp(-tt / 0.3))[:, None] * np.array([0.6, 0.8])[None]
    local = rng.normal(scale=1.0, size=(2, 3, 5, 5)) * np.array([0.0, 0.5, 1.0])[None, :, None, None]
    model = MotionModel.from_nodes(drift, local, (size, size), px)
    fit_like = CTFParams(pixel_size=px, defocus=12000.0, astigmatism=300.0, astigmatism_angle=30.0)
    ms = MotionSettings(pixel_size=px, exposure_per_frame=40.0 / n_frames)
    margin = 300
    yx = rng.uniform(margin, size - margin, size=(n_particles, 2))
    cases = [("native", 256, None), ("2× binned", 128, 2 * px), ("2× binned", 256, 2 * px)]
    devices = ["cpu"] + (["cuda"] if str(device).startswith("cuda") and torch.cuda.is_available() else [])
    out = dict(size=size, frames=n_frames, particles=n_particles, pixel_size=px, runs=[])
    for dev in devices:
        for label, box, out_px in cases:
            s = ExportSettings(box_size=box, pixel_size=out_px, diameter=0.75 * box * (out_px or px))
            extract_particles(frames, yx[:4], model, fit_like, s, motion_settings=ms, device=dev)  # warm-up
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            stack = extract_particles(frames, yx, model, fit_like, s, motion_settings=ms, device=dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            run = dict(device=dev, label=label, box=box, pixel_size=stack.pixel_size, seconds=dt,
                       particles_per_s=n_particles / dt)
            out["runs"].append(run)
            log(f"[speed] {dev} {label} box {box}: {dt:.1f} s, {n_particles / dt:.1f} particles/s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def machine(relion: str | None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return dict(machine=f"{cpu_and_date()}, {ram:.0f} GiB RAM", torch=torch.__version__,
                threads=torch.get_num_threads(), numpy=np.__version__, napari_warp=commit,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, relion=relion,
                python=platform.python_version(),
                load=f"load average {os.getloadavg()[2]:.1f} (15 min) at the end")


def run_accuracy(setup: Setup, work: Path, device, log, gridding: bool = True, rows=tuple(ROWS),
                 checks: bool = True) -> dict:
    """Simulate, fit, extract, reconstruct and compare with the truth (the rows named in ``rows``); ``checks``:
    also the projection convention checks. Returns the results dictionary (see ``report``)."""
    px = setup.pixel_size
    movies = []
    for i in range(setup.n_movies):
        movies.append(process_movie(setup, i, work, device, log, rows))
    angles = np.concatenate([m["angles"] for m in movies])
    n = len(angles)

    t = time.perf_counter()
    if str(setup.specimen).lower() == "blobs" and setup.n_movies > 1:
        raise ValueError("the 'blobs' molecule changes with the seed: use one movie (or a PDB/map specimen)")
    vol, diameter = truth_volume(setup.specimen, setup.box, px, seed=setup.seed,
                                 particle_diameter=setup.particle_diameter)
    truth_map = work / "truth.mrc"
    write_mrc(truth_map, vol, pixel_size=px, volume=True)
    log(f"[truth] {setup.box}³ map at {px} Å/px ({diameter:.0f} Å specimen) in {time.perf_counter() - t:.0f} s")

    stars = {}
    for key in rows:
        if key in ("relion", "relion_raw"):
            continue
        folder = work / key
        write_particle_star(folder / "particles.star", [m["files"][key] for m in movies])
        posed_star(folder / "particles.star", folder / "posed.star", angles)
        stars[key] = folder / "posed.star"
    if "relion" in rows or "relion_raw" in rows:
        stars["relion"], stars["relion_raw"], t_relion_extract, relion_origin = relion_row(work, movies, angles,
                                                                                            setup, log)
    else:
        t_relion_extract, relion_origin = 0.0, None

    maps = {key: work / f"map_{key}.mrc" for key in rows}
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:  # relion_reconstruct is single-threaded: two at a time
        futures = {key: pool.submit(reconstruct, stars[key], maps[key], px, key != "noise_free", gridding)
                   for key in rows}
        rec_times = {key: f.result() for key, f in futures.items()}
    rec_wall = time.perf_counter() - t
    log(f"[reconstruct] {len(rows)} maps in {rec_wall:.0f} s")

    radius_px = (0.5 * diameter + 6.0) / px
    mask = soft_mask(setup.box, radius_px, 6)
    out_rows = {}
    for key in rows:
        rec = mrcfile.read(maps[key]).astype(np.float32)
        curves = {"unmasked": fsc(rec, vol), "masked": fsc(rec * mask, vol * mask)}
        row = dict(label=ROWS[key][0], motion=ROWS[key][1], ctf=ROWS[key][2], reconstruct_s=rec_times[key])
        for name, c in curves.items():
            row[name] = dict(res_05=resolution_at(c, setup.box, px, 0.5), res_0143=resolution_at(c, setup.box, px,
                             0.143), at={f"{r:g}": fsc_at(c, setup.box, px, r) for r in REPORT_AT},
                             curve=[float(v) for v in c])
        out_rows[key] = row
        log(f"[fsc] {key}: masked {row['masked']['res_05']:.2f} Å @0.5, {row['masked']['res_0143']:.2f} Å @0.143; "
            f"unmasked {row['unmasked']['res_05']:.2f} Å @0.5")
    check = None
    if checks:
        check = convention_checks(work, truth_map, movies[0], setup, px, diameter)
        log(f"[conventions] relion_project vs simulator NCC: true angles {check['euler']['true']['mean']:.3f} "
            f"(min {check['euler']['true']['min']:.3f}), inverse rotation {check['euler']['inverse']['mean']:.3f}; "
            f"with CTF: true {check['ctf']['true']['mean']:.3f}, negated astigmatism angle "
            f"{check['ctf']['negated_angle']['mean']:.3f}, centre defocus {check['ctf']['centre_defocus']['mean']:.3f}")

    errors = {k: [m["errors"][k] for m in movies] for k in movies[0]["errors"]}
    timings = {k: float(np.sum([m["timings"][k] for m in movies])) for k in movies[0]["timings"]}
    timings["relion_extract"] = t_relion_extract
    timings["reconstruct_wall"] = rec_wall
    return dict(setup=dataclasses.asdict(setup), gridding=gridding, specimen_diameter=diameter,
                movies=[m["settings"] for m in movies], particles=n,
                frequencies=[i / (setup.box * px) for i in range(setup.box // 2 + 1)], rows=out_rows,
                conventions=check, errors=errors, timings=timings, relion_origin_columns=relion_origin)


def relion_row(work: Path, movies: list[dict], angles: np.ndarray, setup: Setup, log):
    """The peer rows: RELION's extraction from our averages, our per-particle CTF, the true angles.

    ``relion_preprocess --extract`` (3.1) centres each box on the coordinate truncated to whole pixels and writes no
    origin for the remainder (checked: boxes equal ours at ``floor(coordinate)``), so the particles are off-centre
    by the fractional part, 0.8 px RMS for uniform fractions. The "+ sub-pixel origin" row adds the remainder as
    ``rlnOriginX/YAngst = −fraction × pixel size`` (RELION: true centre = box centre − origin).
    Returns ``(posed STAR with origins, posed STAR as extracted, seconds, RELION's own origin columns)``."""
    px = setup.pixel_size
    n = len(angles)
    t = time.perf_counter()
    relion_star = relion_extract(work, [m["average"] for m in movies], [m["q"] for m in movies], setup, px)
    relion_blocks = read_star(relion_star)
    rp = relion_blocks["particles"]
    ours_ctf = pd.concat([m["ours_ctf"] for m in movies], ignore_index=True)
    ours_ctf = pd.DataFrame({"rlnDefocusU": ours_ctf["defocus_u"], "rlnDefocusV": ours_ctf["defocus_v"],
                             "rlnDefocusAngle": ours_ctf["defocus_angle"]})
    if len(rp) != n:
        raise RuntimeError(f"RELION extracted {len(rp)} of {n} particles")
    # RELION keeps the coordinate order within a micrograph and the micrographs' order; check it
    want = np.concatenate([m["q"] for m in movies])
    got = np.stack([rp["rlnCoordinateY"].to_numpy(float), rp["rlnCoordinateX"].to_numpy(float)], 1)
    if np.abs(got - want).max() > 1e-3:
        raise RuntimeError("RELION's particle order differs from the coordinates'")
    relion_origin = [c for c in rp.columns if "Origin" in c]
    posed_star(relion_star, work / "relion_raw_posed.star", angles, ours_ctf)
    posed_star(relion_star, work / "relion_posed.star", angles, ours_ctf, origin=-(want - np.floor(want)) * px)
    dt = time.perf_counter() - t
    log(f"[relion] extracted {len(rp)} particles in {dt:.0f} s; its origin columns: {relion_origin or 'none'}")
    return work / "relion_posed.star", work / "relion_raw_posed.star", dt, relion_origin


def fmt(x, spec=".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(res: dict) -> None:
    v = res["versions"]
    print(f"\nMachine: {v['machine']}; torch {v['torch']} ({v['threads']} threads), numpy {v['numpy']}, "
          f"Python {v['python']}; napari-warp {v['napari_warp']}; RELION {v['relion'] or '—'}"
          + (f"; CUDA: {v['cuda']}" if v["cuda"] else "") + (f"; {v['load']}" if v.get("load") else "") + ".")
    acc = res.get("accuracy")
    if acc:
        s = acc["setup"]
        e = acc["errors"]
        px = s["pixel_size"]
        print(f"\nData: {s['n_movies']} simulated movies {s['shape'][1]}×{s['shape'][0]} × {s['n_frames']} frames, "
              f"{px} Å/px (Nyquist {2 * px:.1f} Å), {s['total_dose']:g} e/Å², specimen {Path(s['specimen']).name}, "
              f"{acc['particles']} particles (box {s['box']}, true angles), centre defocus "
              f"{s['defocus'][0] / 1e4:g}–{s['defocus'][1] / 1e4:g} µm with a tilted plane reaching "
              f"±{s['defocus_range']:g} Å at the corners (particles' spread {np.mean(e['defocus_spread_A']):.0f} Å "
              f"per movie), astigmatism {s['astigmatism']:g} Å, drift {s['drift']:g} Å + {s['drift_jitter']:g} Å "
              f"jitter + {s['local_amplitude']:g} Å RMS local, {s['ice_thickness']:g} Å ice, {s['mtf']} MTF.")
        print(f"Fits (mean over movies): motion error {np.mean(e['motion_rms_px']):.2f} px RMS at the particles "
              f"(true motion about the mean position: {np.mean(e['true_motion_rms_px']):.1f} px RMS); local "
              f"defocus error {np.mean(e['defocus_rms_A']):.0f} Å RMS (global value: "
              f"{np.mean(e['global_defocus_rms_A']):.0f} Å RMS); astigmatism {np.mean(e['astigmatism_fit_A']):.0f} "
              f"Å (true {s['astigmatism']:g}); fit resolution {np.mean(e['fit_resolution_A']):.1f} Å.\n")
        heads = " | ".join(f"FSC @ {r:g} Å" for r in REPORT_AT)
        print(f"FSC against the true map, masked (soft sphere, {acc['specimen_diameter']:.0f} Å specimen + 6 Å) unless "
              f"marked; FSC = 0.5 against the truth corresponds to the half-map 0.143 criterion"
              + ("" if acc.get("gridding", True) else "; RELION --skip_gridding (quick mode)") + ".\n")
        print(f"| particles extracted with | motion | CTF | res. @ FSC 0.5 | res. @ FSC 0.143 | "
              f"res. @ FSC 0.5 (unmasked) | {heads} |")
        print("|---|---|---|---:|---:|---:|" + "---:|" * len(REPORT_AT))
        for key, row in acc["rows"].items():
            m, u = row["masked"], row["unmasked"]
            vals = " | ".join(fmt(m["at"][f"{r:g}"], ".3f") for r in REPORT_AT)
            print(f"| {row['label']} | {row['motion']} | {row['ctf']} | {fmt(m['res_05'])} Å | "
                  f"{fmt(m['res_0143'])} Å | {fmt(u['res_05'])} Å | {vals} |")
        c, k = (acc["conventions"] or {}).get("euler"), (acc["conventions"] or {}).get("ctf")
        if c and k:
            print(f"\nConventions (relion_project of the true map vs the simulator's own images, NCC inside the "
                  f"particle, {c['true']['n']} particles): Euler angles: at the true angles {c['true']['mean']:.3f} "
                  f"(min {c['true']['min']:.3f}), at the inverse rotation {c['inverse']['mean']:.3f}. CTF (`--ctf` "
                  f"with our STAR's U/V/angle of the true local CTF, noise-free image with 1000 Å astigmatism and a "
                  f"{k['defocus_spread_A']:.0f} Å defocus spread): {k['true']['mean']:.3f} (min "
                  f"{k['true']['min']:.3f}); astigmatism angle negated {k['negated_angle']['mean']:.3f}; centre "
                  f"defocus for all {k['centre_defocus']['mean']:.3f}.")
        t = acc["timings"]
        extract = sum(v for k, v in t.items() if k.startswith("extract_") and k != "extract_noise_free")
        print(f"Times (all movies): simulate {t['simulate']:.0f} s, motion fit + average {t['motion']:.0f} s, CTF fit "
              f"{t['ctf']:.0f} s, our extraction {t['extract_ours']:.1f} s (all 5 rows {extract:.0f} s), RELION "
              f"extraction {t['relion_extract']:.1f} s, {len(acc['rows'])} reconstructions "
              f"{sum(r['reconstruct_s'] for r in acc['rows'].values()):.0f} s of RELION time ("
              + (f"{t['reconstruct_wall']:.0f} s wall, " if "reconstruct_wall" in t else "") + "2 at a time).")
    sp = res.get("speed")
    if sp:
        print(f"\nSpeed: {sp['particles']} particles from a {sp['size']}² × {sp['frames']}-frame movie in memory "
              f"({sp['pixel_size']} Å/px; global + 5 × 5 local motion model, dose weighting, local CTF columns, "
              f"normalisation), warm, torch {res['versions']['threads']} threads.\n")
        print("| device | output | box (px) | pixel size (Å) | time (s) | particles/s |")
        print("|---|---|---:|---:|---:|---:|")
        for r in sp["runs"]:
            print(f"| {r['device'].upper()} | {r['label']} | {r['box']} | {r['pixel_size']:g} | {r['seconds']:.1f} | "
                  f"**{r['particles_per_s']:.1f}** |")
    print(f"\nTotal wall time: {res['wall_s'] / 60:.1f} min.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (< 2 min): one 1024² movie, box 160, "
                                                         "1024² speed movie")
    ap.add_argument("--movies", type=int, default=None, help="number of simulated movies (default 4; --quick 1)")
    ap.add_argument("--device", default="cpu", help="torch device for our steps (cpu or cuda)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--speed-particles", type=int, default=None, help="default 300 (--quick 50)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="results JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg):
        print(f"{time.perf_counter() - t0:7.1f} s  {msg}", file=sys.stderr, flush=True)

    setup = QUICK if args.quick else FULL
    if args.movies:
        setup = dataclasses.replace(setup, n_movies=args.movies)
    rel = relion_version()
    result = dict(settings=dict(quick=args.quick, device=args.device, threads=args.threads))
    if not args.skip_accuracy:
        missing = [b for b in RELION_TOOLS if shutil.which(b) is None]
        if missing:
            print(f"RELION 3.1 tools {missing} not on PATH (apt-get install relion): the accuracy part is skipped",
                  file=sys.stderr)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                work = args.keep or Path(tmp)
                work.mkdir(parents=True, exist_ok=True)
                result["accuracy"] = run_accuracy(setup, work, args.device, log, gridding=not args.quick)
    if not args.skip_speed:
        result["speed"] = run_speed(1024 if args.quick else 4096, 10 if args.quick else 40,
                                    args.speed_particles or (50 if args.quick else 300), args.device, log)
    result["versions"] = machine(rel)
    result["wall_s"] = time.perf_counter() - t0
    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
