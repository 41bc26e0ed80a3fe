"""The built-in sample: demo simulation settings and an inspection pass over a movie (average + power spectrum).

Used by ``napari-warp demo`` and the napari sample data, so both show the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .ctf import CTFParams, ctf_2d
from .device import get_device, to_numpy
from .fourier import fourier_rescale, tile_power_spectrum
from .io.movie import Movie, write_mrc
from .simulate import MovieSimulation

Progress = Callable[[int, int], None]


def demo_simulation(size: int = 1024, frames: int = 16, seed: int = 0) -> MovieSimulation:
    """A small, realistic movie: 1 Å/px, 300 kV, 2 e/Å²/frame, 1.5 µm under-focus with a tilted plane and
    astigmatism, 15 Å fast-then-slow drift plus local deformation, K3 MTF, a gain reference and hot pixels."""
    return MovieSimulation(
        shape=(size, size),
        n_frames=frames,
        pixel_size=1.0,
        dose_per_frame=2.0,
        defocus=15000.0,
        defocus_gradient=(0.05, 0.1),
        astigmatism=400.0,
        astigmatism_angle=30.0,
        drift=15.0,
        local_amplitude=2.0,
        mtf="k3",
        gain=True,
        n_hot_pixels=8,
        seed=seed,
    )


def binned_for_display(image: np.ndarray, pixel_size: float, target: float = 4.0) -> tuple[np.ndarray, float]:
    """Fourier-bin a micrograph to about ``target`` Å/px for display, as Warp shows micrographs (at ~1 Å/px
    a micrograph is shot noise to the eye). Returns ``(image, pixel_size)``; unchanged if already coarser."""
    if pixel_size >= target:
        return image, pixel_size
    binned, ps = fourier_rescale(torch.as_tensor(image, dtype=torch.float32), pixel_size, target)
    return to_numpy(binned), ps


def movie_average_and_spectrum(
    movie: Movie, box: int = 256, chunk: int = 8, device=None, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Plain (not motion-corrected) average of all frames, and the mean of the per-frame tile power spectra.

    Per-frame spectra are summed, as Warp does for CTF estimation from movies, so the Thon rings survive drift
    that blurs the average. Frames are read ``chunk`` at a time (gain/defects applied).
    Returns average ``(Y, X)`` and power ``(box, box)`` (full layout, non-centred) as numpy float32.
    """
    device = get_device(device)
    n = movie.shape[0]
    box = min(box, *movie.shape[1:]) // 2 * 2
    total = torch.zeros(movie.shape[1:], dtype=torch.float64, device=device)
    power = torch.zeros((box, box), dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        frames = torch.as_tensor(movie.frames(slice(start, min(start + chunk, n))), device=device)
        total += frames.sum(0, dtype=torch.float64)
        power += tile_power_spectrum(frames, box, rfft=False).sum(0, dtype=torch.float64)
        if progress:
            progress(min(start + chunk, n), n)
    return to_numpy(total / n).astype(np.float32), to_numpy(power / n).astype(np.float32)


def spectrum_display(power: np.ndarray, ctf: CTFParams | None, device=None) -> np.ndarray:
    """Warp-style display of a power spectrum ``(box, box)`` (non-centred): centred, left half the data (log,
    smooth background removed, scaled to [0, 1]), right half the CTF² of ``ctf`` without its envelope, so the
    ring positions compare at every frequency (the data half when None)."""
    device = get_device(device)
    box = power.shape[-1]
    data = torch.log(torch.fft.fftshift(torch.as_tensor(power, device=device)).clamp_min(1e-12))
    # A 3×3 blur tames the periodogram speckle of a short exposure without touching the ring spacing.
    data = torch.nn.functional.avg_pool2d(data[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    # Remove the smooth background: a wide box blur of the log spectrum.
    k = max(3, box // 16) | 1
    bg = torch.nn.functional.avg_pool2d(data[None, None], k, stride=1, padding=k // 2, count_include_pad=False)[0, 0]
    data = data - bg
    sample = data.flatten()[:: max(1, data.numel() // 100_000)]
    lo, hi = torch.quantile(sample, torch.tensor([0.02, 0.995], device=device))
    out = ((data - lo) / (hi - lo)).clamp(0, 1)
    if ctf is not None:
        # Supersample 5× in frequency and average down (odd, so each block stays centred on its coarse sample):
        # rings finer than a pixel fade to grey instead of showing moiré.
        k = 5
        fine = torch.fft.fftshift(ctf_2d(ctf.with_(bfactor=0.0), (k * box, k * box), rfft=False, device=device) ** 2)
        model = torch.nn.functional.avg_pool2d(fine.roll((k // 2, k // 2), (0, 1))[None, None], k)[0, 0]
        out[:, box // 2 :] = model[:, box // 2 :]
    return to_numpy(out)


def inspect_movie(movie: Movie, ctf: CTFParams | None, out: Path, progress: Progress | None = None) -> dict:
    """Average a movie and write ``average.mrc`` and ``spectrum.mrc`` (see :func:`spectrum_display`) into ``out``."""
    average, power = movie_average_and_spectrum(movie, progress=progress)
    write_mrc(out / "average.mrc", average, pixel_size=movie.pixel_size, voltage=movie.voltage)
    spectrum = spectrum_display(power, ctf)
    write_mrc(out / "spectrum.mrc", spectrum.astype(np.float32), pixel_size=None)
    return {"average": average, "spectrum": spectrum}
