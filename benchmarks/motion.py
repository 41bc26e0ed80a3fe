"""Motion correction, side by side: napari-warp (``core.motion``) vs RELION 3.1's own ``relion_run_motioncorr``.

Same run, same movie files (MRC, int8 counts), settings fair to both: a 5 × 5 patch grid, dose weighting on, the
same pixel size / dose / voltage. For each movie:

* ours: ``open_movie`` → ``correct_movie`` (fit, then dose-weighted average from the same frame spectra) → ``write_mrc``, timed end to end;
* RELION: ``relion_run_motioncorr --use_own --j 2 --patch_x 5 --patch_y 5 --dose_weighting ...`` on a
  ``movies.star`` (timed as a subprocess: read, align, dose-weight, write), its motion STAR parsed with
  ``core.export.read_relion_motion`` — global shifts plus its third-order polynomial local model when it kept one
  (RELION drops the polynomial when its fit RMSD reaches 10 px; the table says which);

and the shift error against the truth at a 5 × 5 lattice of positions: RMS over frames and positions of the error
vector after removing each position's mean over frames (so the choice of reference frame does not matter).

Movies: a simulated movie with global drift only, the same with local deformation, a semi-synthetic movie from the
real micrograph in ``../shared/data/micrographs`` (fresh Poisson noise, known motion), and a 4096² × 40 movie made
cheaply (Poisson noise on a smooth blobby image moved by a known drift with ``core.fourier.fourier_shift``; periodic
at the edges) mainly for wall time.

    /work/venv/bin/python benchmarks/motion.py            # full set (~15 min on 2 cores)
    /work/venv/bin/python benchmarks/motion.py --quick    # small movies, ~2 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _machine import cpu_and_date

from napari_warp.core.export import read_relion_motion
from napari_warp.core.fourier import fourier_shift
from napari_warp.core.io.movie import open_movie
from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.io.star import write_star
from napari_warp.core.simulate import MovieSimulation, SemiSyntheticSimulation, simulate_movie

REPO = Path(__file__).resolve().parents[1]
MICROGRAPH = REPO.parent / "shared" / "data" / "micrographs" / "epu2.9_example.mrc"
PATCHES = 5
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@dataclass
class Case:
    name: str
    frames: np.ndarray  # (F, Y, X) counts
    truth: object  # .shifts(yx) -> (F, P, 2) px (dy, dx), our convention
    pixel_size: float
    dose_per_frame: float
    voltage: float = 300.0


class _GlobalTruth:
    def __init__(self, shifts: np.ndarray):
        self.global_shifts = shifts

    def shifts(self, yx, frames=None):
        out = np.repeat(self.global_shifts[:, None, :], len(np.asarray(yx).reshape(-1, 2)), axis=1)
        return out if frames is None else out[np.asarray(frames)]


# ---------------------------------------------------------------------------------------------------------------
# movies
# ---------------------------------------------------------------------------------------------------------------
def simulated(name: str, size: int, n_frames: int, local: float, seed: int) -> Case:
    s = MovieSimulation(shape=(size, size), n_frames=n_frames, pixel_size=1.0, dose_per_frame=1.5, drift=15.0,
                        local_amplitude=local, local_grid=(3, 5, 5), seed=seed)
    m = simulate_movie(s)
    return Case(name, m.frames, m.truth, s.pixel_size, s.dose_per_frame)


def semi_synthetic(size: int, n_frames: int, seed: int) -> Case | None:
    if not MICROGRAPH.is_file():
        print(f"skipping the semi-synthetic movie: {MICROGRAPH} not found", file=sys.stderr)
        return None
    s = SemiSyntheticSimulation(micrograph=MICROGRAPH, max_size=size, n_frames=n_frames, dose_per_frame=1.5,
                                drift=15.0, local_amplitude=2.0, seed=seed)
    m = simulate_movie(s)
    return Case(f"semi-synthetic {m.frames.shape[2]}×{m.frames.shape[1]}×{n_frames} (real micrograph, local)",
                m.frames, m.truth, m.pixel_size, s.dose_per_frame)


def blobby(size: int, n_frames: int, seed: int, pixel_size: float = 1.0, dose: float = 1.5) -> Case:
    """Poisson counts of a smooth band-limited 'blobby' image moved by a known global drift (Fourier shift)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(size, size, generator=gen)
    ky = torch.fft.fftfreq(size)[:, None]
    kx = torch.fft.rfftfreq(size)[None, :]
    k2 = ky**2 + kx**2
    band = torch.exp(-k2 / (2 * 0.06**2)) * (1 - torch.exp(-k2 / (2 * 0.004**2)))  # ~5–250 px features
    image = torch.fft.irfft2(torch.fft.rfft2(noise) * band, s=(size, size))
    image = 1 + 0.35 * image / image.std()
    t = np.arange(n_frames) / max(1, n_frames - 1)
    u = (1 - np.exp(-t / 0.3)) / (1 - np.exp(-1 / 0.3))
    direction = rng.uniform(0, 2 * np.pi)
    shifts = (15.0 / pixel_size) * u[:, None] * np.array([np.sin(direction), np.cos(direction)])[None]
    frames = np.empty((n_frames, size, size), np.float32)
    mean = dose * pixel_size**2
    for f in range(n_frames):
        moved = fourier_shift(image, torch.as_tensor(shifts[f], dtype=torch.float32)).clamp_min(0).numpy()
        frames[f] = rng.poisson(mean * moved)
    return Case(f"blobby {size}²×{n_frames} (global drift)", frames, _GlobalTruth(shifts), pixel_size, dose)


# ---------------------------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------------------------
def write_movie(case: Case, path: Path) -> None:
    counts = np.asarray(case.frames)
    if counts.max() > 127:
        raise ValueError(f"{case.name}: counts up to {counts.max()} do not fit int8")
    write_mrc(path, counts, case.pixel_size, dtype=np.int8, voltage=case.voltage)


def our_settings(case: Case, local_grid: tuple[int, int] | None = (PATCHES, PATCHES)):
    """Ours with a 5 × 5 local grid (the spatial resolution of RELION's 5 × 5 patches), or with ``None``: our
    default, WarpTools' rule that sizes the local grid by field of view and dose (none for small movies)."""
    from napari_warp.core.motion import MotionSettings

    return MotionSettings(pixel_size=case.pixel_size, exposure_per_frame=case.dose_per_frame,
                          local_grid=local_grid, dose_weighting=True)


def relion_bfactor(case: Case) -> float:
    """RELION's --bfactor (px²) that weights the cross-correlation like our ``bfactor`` (Å²) weights the cost.

    RELION multiplies each CC term by exp(−2 B k²) (k in 1/px: both images weighted by exp(−B k²)); our cost is
    quadratic in spectra weighted by exp(b/4 k²) (k in 1/Å), i.e. exp(b/2 · k²/ps²) → B = −b / (4 ps²).
    """
    return -our_settings(case).bfactor / (4 * case.pixel_size**2)


def run_ours(case: Case, movie: Path, out: Path, local_grid=(PATCHES, PATCHES)):
    from napari_warp.core.motion import correct_movie

    settings = our_settings(case, local_grid)
    t = time.perf_counter()
    mov = open_movie(movie, pixel_size=case.pixel_size)
    model, avg = correct_movie(mov, settings, halves=False)
    write_mrc(out, np.asarray(avg.average, np.float32), case.pixel_size, voltage=case.voltage)
    return model, time.perf_counter() - t


def run_relion(case: Case, movie: Path, workdir: Path, threads: int):
    write_star(workdir / "movies.star", {
        "optics": pd.DataFrame({
            "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [case.pixel_size], "rlnVoltage": [case.voltage],
            "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
        }),
        "movies": pd.DataFrame({"rlnMicrographMovieName": [movie.name], "rlnOpticsGroup": [1]}),
    })
    shutil.rmtree(workdir / "MC", ignore_errors=True)
    args = ["relion_run_motioncorr", "--i", "movies.star", "--o", "MC/", "--use_own", "--j", str(threads),
            "--bin_factor", "1", "--bfactor", f"{relion_bfactor(case):.4g}", "--patch_x", str(PATCHES),
            "--patch_y", str(PATCHES), "--dose_weighting", "--angpix", f"{case.pixel_size:g}",
            "--voltage", f"{case.voltage:g}", "--dose_per_frame", f"{case.dose_per_frame:g}"]
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=workdir, env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"relion_run_motioncorr failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    star = workdir / "MC" / (movie.stem + ".star")
    log = (workdir / "MC" / (movie.stem + ".log")).read_text()
    return read_relion_motion(star), elapsed, log


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def eval_positions(shape) -> np.ndarray:
    c = (np.arange(PATCHES) + 0.5) / PATCHES
    gy, gx = np.meshgrid(c * (shape[0] - 1), c * (shape[1] - 1), indexing="ij")
    return np.stack([gy.ravel(), gx.ravel()], axis=1)


def centred_rms(estimate: np.ndarray, truth: np.ndarray) -> float:
    err = np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)
    err -= err.mean(axis=0, keepdims=True)
    return float(np.sqrt(np.mean(np.sum(err**2, axis=-1))))


def machine() -> str:
    try:
        relion = subprocess.run(["relion_run_motioncorr", "--version"], capture_output=True, text=True,
                                env=ENV).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        relion = "RELION not found"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{cpu_and_date()}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; napari-warp {commit}; "
            f"{relion}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small movies (a couple of minutes)")
    p.add_argument("--threads", type=int, default=2, help="RELION --j (and torch threads)")
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--keep", type=Path, default=None, help="keep the movies and outputs in this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    have_relion = shutil.which("relion_run_motioncorr") is not None and not args.skip_relion
    if not have_relion and not args.skip_relion:
        print("relion_run_motioncorr not on PATH: RELION columns will be empty (apt-get install relion)",
              file=sys.stderr)

    if args.quick:
        makers = [lambda: simulated("simulated 512²×12, global only", 512, 12, 0.0, 1),
                  lambda: simulated("simulated 512²×12, local 2 Å", 512, 12, 2.0, 2),
                  lambda: semi_synthetic(512, 12, 3),
                  lambda: blobby(1024, 16, 4)]
    else:
        makers = [lambda: simulated("simulated 1024²×20, global only", 1024, 20, 0.0, 1),
                  lambda: simulated("simulated 1024²×20, local 2 Å", 1024, 20, 2.0, 2),
                  lambda: semi_synthetic(1024, 20, 3),
                  lambda: blobby(4096, 40, 4)]

    rows = []
    tmp_ctx = tempfile.TemporaryDirectory(prefix="nw-motion-bench-") if args.keep is None else None
    base = Path(tmp_ctx.name) if tmp_ctx else args.keep
    base.mkdir(parents=True, exist_ok=True)
    try:
        for k, make in enumerate(makers):
            t = time.perf_counter()
            case = make()
            if case is None:
                continue
            print(f"[{case.name}] made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            work = base / f"movie{k}"
            work.mkdir(exist_ok=True)
            movie = work / f"movie{k}.mrcs"
            write_movie(case, movie)
            shape = case.frames.shape[1:]
            yx = eval_positions(shape)
            truth = np.asarray(case.truth.shifts(yx))
            row = {"movie": case.name, "truth motion RMS (px)": centred_rms(np.zeros_like(truth), truth)}
            del case.frames
            if not args.skip_ours:
                model, t_ours = run_ours(case, movie, work / "ours.mrc")
                row["ours RMS (px)"] = centred_rms(np.asarray(model.shifts(yx)), truth)
                auto, _ = run_ours(case, movie, work / "ours_auto.mrc", local_grid=None)
                gy, gx = auto.local_grids[0].dims[-2:]
                row["ours default grid RMS (px)"] = centred_rms(np.asarray(auto.shifts(yx)), truth)
                row["ours default local grid"] = "none" if gy * gx == 1 else f"{gx}×{gy}"
                row["ours time (s)"] = t_ours
                print(f"  ours: {row['ours RMS (px)']:.3f} px ({row['ours default grid RMS (px)']:.3f} px with the "
                      f"default grid), {t_ours:.1f} s", file=sys.stderr)
            if have_relion:
                motion, t_rel, log = run_relion(case, movie, work, args.threads)
                row["RELION RMS (px)"] = centred_rms(motion.shifts(yx), truth)
                row["RELION global-only RMS (px)"] = centred_rms(
                    np.repeat(motion.global_shifts[:, None], len(yx), 1), truth)
                row["RELION local model"] = "polynomial" if motion.coeffs is not None else (
                    "rejected (fit RMSD ≥ 10 px)" if "did not explain" in log else "none (patches failed)")
                row["RELION time (s)"] = t_rel
                print(f"  RELION: {row['RELION RMS (px)']:.3f} px, {t_rel:.1f} s, {row['RELION local model']}",
                      file=sys.stderr)
            rows.append(row)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()

    print("\nMotion correction: napari-warp vs RELION 3.1 own (`--use_own`), same movies, same run.\n")
    print(f"Machine: {machine()}\n")
    print(f"Settings: RELION --use_own --patch_x {PATCHES} --patch_y {PATCHES} --dose_weighting --j {args.threads}, "
          f"--bfactor −b/(4·ps²) px² (= ours b, in its units); ours MotionSettings defaults (b = −500 Å², band "
          f"0.05–0.25 Nyquist, Warp's patch layout) with local_grid=({PATCHES}, {PATCHES}) and, in its own column, "
          f"with the default local grid (WarpTools' field-of-view/dose rule); dose weighting on, "
          f"torch {args.threads} threads. RMS: shift error vs truth at {PATCHES}×{PATCHES} positions, each "
          f"position's mean over frames removed. Times: read → align → dose-weighted average → MRC written.\n")
    cols = ["movie", "truth motion RMS (px)", "ours RMS (px)", "ours default grid RMS (px)",
            "ours default local grid", "RELION RMS (px)", "RELION global-only RMS (px)",
            "RELION local model", "ours time (s)", "RELION time (s)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "–")
            cells.append(f"{v:.3f}" if isinstance(v, float) and "RMS" in c else f"{v:.1f}" if isinstance(v, float)
                         else str(v))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
