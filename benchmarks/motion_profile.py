"""Timing of core.motion on synthetic movies: read -> fit -> dose-weighted average (+ halves) -> MRC written.

Usage: python benchmarks/motion_profile.py [--size 4096] [--frames 40] [--local] [--separate] [--repeat 2]

The movie is a smooth "blobby" image (mean 1 e/px/frame) moved by a known global drift (Fourier shift) and, with
``--local``, a smooth deformation of up to ~2.5 px (bicubic resampling), Poisson-sampled, stored once as uint8
counts under $TMPDIR (generation is not timed; the read is a real read of a memory-mapped file). By default the
movie goes through ``correct_movie`` (one read, one FFT per frame); ``--separate`` times ``fit_motion`` +
``aligned_average`` (two reads). Reports the phases (the "average" column also holds what the fit's timers do not
see, e.g. the second patch cut) and the RMS error of the fitted shifts (global + local) on a 7×7 lattice.
For RELION 3.1's own motion correction on the same file (2 threads, 5×5 patches, dose weighting), convert the .npy
to MRC and run ``relion_run_motioncorr --use_own --j 2 --patch_x 5 --patch_y 5 --dose_weighting ...``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_warp.core.fourier import fourier_shift
from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.motion import MotionSettings, aligned_average, correct_movie, fit_motion, motion_metrics


def _truth(size: int, frames: int, local: bool):
    """True shifts as a function ``(t (F,), yx (P, 2)) -> (F, P, 2)`` px: a decaying drift, plus (``local``) a smooth
    deformation of up to ~2.5 px that grows over the exposure."""
    def shifts(t, yx):
        u = (1 - np.exp(-t / 0.3)) / (1 - np.exp(-1 / 0.3))
        glob = np.stack([12 * u, -9 * u + 1.5 * np.sin(3 * t)], -1)[:, None, :]
        if not local:
            return np.broadcast_to(glob, (len(t), len(yx), 2)).copy()
        q = yx / size
        field = np.stack([np.sin(2 * np.pi * q[:, 1]) * np.cos(np.pi * q[:, 0]),
                          np.cos(2 * np.pi * q[:, 0]) * np.sin(np.pi * q[:, 1])], -1) * 2.5
        return glob + t[:, None, None] * field[None]
    return shifts


def make_movie(size: int, frames: int, seed: int = 0, local: bool = False) -> Path:
    """uint8 counts ``(F, size, size)`` (mean 1 e/px/frame) in a .npy file; frame f shows the reference moved by
    ``_truth`` at ``t = f / (F - 1)`` (global part by Fourier shift, local part by bicubic resampling)."""
    path = Path(tempfile.gettempdir()) / f"napari_warp_motion_{size}_{frames}_{seed}{'_local' if local else ''}.npy"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(size, size, generator=g)
    f = torch.fft.rfftfreq(size)[None, :] ** 2 + torch.fft.fftfreq(size)[:, None] ** 2
    blobs = torch.fft.irfft2(torch.fft.rfft2(white) * (torch.exp(-f * 2e3) + 0.3 * torch.exp(-f * 2e2)), s=(size, size))
    image = 1 + 0.35 * blobs / blobs.std()
    truth = _truth(size, frames, local)
    t = np.arange(frames) / max(1, frames - 1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(frames, size, size))
    coarse = np.stack(np.meshgrid(np.linspace(0, size - 1, 65), np.linspace(0, size - 1, 65), indexing="ij"), -1)
    for i in range(frames):
        glob = truth(t[i : i + 1], np.zeros((1, 2)))[0, 0]
        moved = fourier_shift(image, torch.tensor(glob, dtype=torch.float32))
        if local:  # frame(p + l(p)) = reference(p): sample the reference at p - l(p) (l is small and smooth)
            loc = truth(t[i : i + 1], coarse.reshape(-1, 2))[0] - glob
            loc = torch.as_tensor(loc.reshape(65, 65, 2), dtype=torch.float32).permute(2, 0, 1)[None]
            loc = torch.nn.functional.interpolate(loc, size=(size, size), mode="bilinear", align_corners=True)[0]
            gy, gx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                    indexing="ij")
            grid = torch.stack([(gx - loc[1]) * 2 / (size - 1) - 1, (gy - loc[0]) * 2 / (size - 1) - 1], -1)[None]
            moved = torch.nn.functional.grid_sample(moved[None, None], grid, mode="bicubic", padding_mode="border",
                                                    align_corners=True)[0, 0]
        out[i] = np.minimum(rng.poisson(moved.clamp_min(0).numpy()), 255)
    out.flush()
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--separate", action="store_true", help="fit_motion + aligned_average (reads twice)")
    ap.add_argument("--local", action="store_true", help="add a smooth local deformation of ~2.5 px")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    path = make_movie(args.size, args.frames, local=args.local)
    truth = _truth(args.size, args.frames, args.local)
    print(f"movie {args.frames}x{args.size}² ready in {time.perf_counter() - t0:.1f} s ({path})")
    settings = MotionSettings(pixel_size=args.pixel_size, exposure_per_frame=1.0 / args.pixel_size**2,
                              local_grid=(5, 5) if args.local else None)
    for _ in range(args.repeat):
        frames = np.load(path, mmap_mode="r")
        if args.separate:  # two reads: fit_motion, then aligned_average
            t0 = time.perf_counter()
            model = fit_motion(frames, settings)
            t1 = time.perf_counter()
            avg = aligned_average(frames, model, settings)
            t2 = time.perf_counter()
        else:  # one read: correct_movie keeps the frame spectra for the average
            t0 = time.perf_counter()
            model, avg = correct_movie(frames, settings)
            t2 = time.perf_counter()
            t1 = t0 + sum(model.info[k] for k in ("seconds_prepare", "seconds_prealign")) + sum(
                st["seconds"] for st in model.info["steps"])
        out = Path(tempfile.gettempdir()) / "napari_warp_motion_avg.mrc"
        write_mrc(out, avg.average, pixel_size=args.pixel_size)
        t3 = time.perf_counter()
        t = np.arange(args.frames) / max(1, args.frames - 1)
        yx = np.stack(np.meshgrid(*[np.linspace(0.1, 0.9, 7) * args.size] * 2, indexing="ij"), -1).reshape(-1, 2)
        est, ref = model.shifts(yx), truth(t, yx)
        est, ref = est - est.mean(0), ref - ref.mean(0)
        rms = float(np.sqrt(((est - ref) ** 2).sum(-1).mean()))
        info = {k: v for k, v in model.info.items() if k != "steps"}
        print(f"fit {t1 - t0:.2f} s | average+halves {t2 - t1:.2f} s | write {t3 - t2:.2f} s | total {t3 - t0:.2f} s"
              f" | RMS error of the shifts {rms:.3f} px | {info}")
        for step in model.info.get("steps", []):
            print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in step.items() if k != "trace"})
        print("   ", motion_metrics(model))


if __name__ == "__main__":
    main()
