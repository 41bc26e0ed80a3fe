"""Warp's motion model: global + local cubic-spline grids, fitted to patch spectra; aligned, dose-weighted averages.

Model (paper, "Motion model"): the shift of a feature at reference position ``p`` in frame ``f`` is

    shift(p, f) = global(t_f) + local(t_f, p),      t_f = f / (N - 1),  p normalised as (y / Y, x / X)

``global`` is a pair of ``CubicGrid`` (dy, dx) with temporal nodes only (up to one per frame); ``local`` is a pair
with ``(T <= 3, Gy, Gx)`` nodes. Units are pixels of the input frames. **Convention**: a feature at ``p`` in the
aligned average is found at ``p + shift(p, f)`` in frame ``f`` (the same as ``simulate.MovieTruth.shifts``; Warp's
XML grids hold the negated shifts in Å, see :func:`motion_to_xml`).

Reference (the overall translation is arbitrary, the cost cannot see it): the fitted shifts have zero mean over the
fitted frames at every position, i.e. the aligned average sits at the mean position of the exposure. Identifiability
is enforced by construction, not by penalties: the global nodes are re-centred (zero mean over frames), the local
nodes have zero mean over the spatial nodes (the uniform part of the motion is global) and zero mean over frames
at every node (a per-patch constant offset is invisible to the cost).

Fit (paper, "Global and local motion correction"; Warp's ``Movie.ProcessShift``): every frame is Fourier-cropped
once to just above the band limit, cut into overlapping raised-cosine patches whose spectra are kept only inside the
fitting band (B-factor weighted), and the cost ``Σ_patches Σ_frames Σ_k |I_f(k) e^{2πi k·s} − mean_f(...)|²`` is
minimised by L-BFGS over all control points with exact gradients (analytic in the shifts, autograd through the
spline bases). Hierarchy as in Warp: 3 global temporal nodes first, ×3 per step up to the target, with the frequency
band widened at each step; a coarse cross-correlation pre-alignment puts large drifts inside the basin first.

Averages (paper, "Export of corrected data"): the global shift and the dose weighting are one Fourier filter per
frame (exact, no interpolation); the smooth local residual is applied by bicubic resampling, once per group of
consecutive frames whose local fields agree within ``local_tolerance`` px, so the continuous deformation field is
honoured without resampling every frame (Warp resamples each frame with a prefiltered cubic B-spline on the GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .device import get_device
from .fourier import fftfreq_warp, fourier_resize_rfft
from .grid import CubicGrid, evaluate_cubic_grid, evaluate_cubic_grid_lattice

__all__ = [
    "MotionSettings",
    "MotionModel",
    "AlignedAverage",
    "fit_motion",
    "aligned_average",
    "correct_movie",
    "alignment_cost",
    "motion_metrics",
    "motion_to_xml",
    "motion_from_xml",
    "frame_doses",
    "dose_filters",
    "patch_layout",
    "effective_patch_size",
    "auto_local_grid",
]

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# settings and results
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MotionSettings:
    """Motion-correction settings (Warp's ``OptionsMovement`` + export options), in physical units.

    pixel_size: Å per pixel of the frames given. exposure_per_frame: e/Å² per frame.
    patch_size: px of the fitting patches at full size (Warp's paper: 512); images shorter than 4 patches get
        proportionally smaller patches (a quarter of the short side, at least 32 px). patch_overlap: fraction.
    band: (low, high) fitting band as fractions of Nyquist (Warp: 0.05-0.25). bfactor: Å², weights the patch
        spectra by ``exp(bfactor/4 · k²)`` (Warp: -500).
    local_grid: (Gy, Gx) spatial nodes of the local model; None = auto (WarpTools: 5 on the short side for a 4000 Å
        field of view at >= 30 e/Å², scaled linearly, capped by the patch grid); (1, 1) = no local motion.
    local_temporal: temporal nodes of the local model (paper: at most 3).
    global_temporal: temporal nodes of the global model; None = one per fitted frame.
    skip_first, skip_last: frames left out of the averages (they are fitted, as in Warp and RELION, and still count
        for the dose).
    pre_exposure: e/Å² received before the first frame. dose_weighting: apply Warp's -4 Å² per e/Å² B-factor.
    dose_bfactor: Å² per e/Å² of accumulated dose (paper: -4).
    iterations: L-BFGS iterations per hierarchy step. max_fit_frames: frames are summed in consecutive groups for
        the fit when there are more (EER fractions); averages always use every frame.
    local_tolerance: px; consecutive frames whose local fields stay within this of their group's mean are resampled
        together in averages (a blur of at most this: 1.6 % signal loss at half Nyquist for 0.2 px).
    prealign: coarse whole-frame cross-correlation before the spline fit (robust to drifts of many pixels).
    """

    pixel_size: float = 1.0
    exposure_per_frame: float = 1.0
    patch_size: int = 512
    patch_overlap: float = 0.5
    band: tuple[float, float] = (0.05, 0.25)
    bfactor: float = -500.0
    local_grid: tuple[int, int] | None = None
    local_temporal: int = 3
    global_temporal: int | None = None
    skip_first: int = 0
    skip_last: int = 0
    pre_exposure: float = 0.0
    dose_weighting: bool = True
    dose_bfactor: float = -4.0
    iterations: int = 15
    max_fit_frames: int = 64
    local_tolerance: float = 0.2
    prealign: bool = True

    def __post_init__(self):
        lo, hi = self.band
        if not (0 <= lo < hi <= 1):
            raise ValueError(f"band must satisfy 0 <= low < high <= 1 (fractions of Nyquist), got {self.band}")
        if self.pixel_size <= 0:
            raise ValueError(f"pixel_size must be positive, got {self.pixel_size}")
        if self.skip_first < 0 or self.skip_last < 0:
            raise ValueError("skip_first and skip_last must be >= 0")
        if not 0 <= self.patch_overlap < 1:
            raise ValueError(f"patch_overlap must be in [0, 1), got {self.patch_overlap}")
        counts = {"patch_size": self.patch_size, "local_temporal": self.local_temporal, "iterations": self.iterations,
                  "max_fit_frames": self.max_fit_frames, "global_temporal": self.global_temporal or 1}
        for name, value in counts.items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.local_grid is not None and (len(self.local_grid) != 2 or min(self.local_grid) < 1):
            raise ValueError(f"local_grid must be (Gy, Gx) with both >= 1, or None for auto; got {self.local_grid}")
        if self.local_tolerance <= 0:
            raise ValueError(f"local_tolerance must be positive (px), got {self.local_tolerance}")


@dataclass(frozen=True, eq=False)
class MotionModel:
    """A fitted (or loaded) motion model. Grids hold shifts in pixels of the input, in our sign convention.

    shape: (Y, X) of the frames. pixel_size: Å/px. n_frames: frames of the movie (the grids' time axis runs over all
    of them, ``t = f / (N - 1)``). global_grids: (dy, dx) ``CubicGrid`` of dims ``(T, 1, 1)``. local_grids: (dy, dx)
    of dims ``(Tl, Gy, Gx)``. skip_first/skip_last: frames excluded from the averages.
    """

    shape: tuple[int, int]
    pixel_size: float
    n_frames: int
    global_grids: tuple[CubicGrid, CubicGrid]
    local_grids: tuple[CubicGrid, CubicGrid]
    skip_first: int = 0
    skip_last: int = 0
    info: dict = field(default_factory=dict)

    @property
    def used_frames(self) -> np.ndarray:
        """Indices ``(F_used,)`` of the frames averaged."""
        return np.arange(self.skip_first, max(self.skip_first, self.n_frames - self.skip_last))

    @property
    def has_local(self) -> bool:
        return any(bool(torch.any(g.values != 0)) for g in self.local_grids)

    def frame_times(self, frames: Sequence[int] | None = None) -> np.ndarray:
        """Normalised times ``(F',)`` of frames (all by default): ``f / (N - 1)``."""
        f = np.arange(self.n_frames) if frames is None else np.asarray(frames, dtype=np.float64)
        return f / max(1, self.n_frames - 1)

    def shifts(self, yx, frames: Sequence[int] | None = None) -> np.ndarray:
        """Shifts ``(F', P, 2)`` px ``(dy, dx)`` of reference positions ``yx`` ``(P, 2)`` px (y, x).

        A feature at ``p`` in the aligned average is found at ``p + shift`` in frame ``f``.
        """
        yx = torch.as_tensor(np.asarray(yx, dtype=np.float64).reshape(-1, 2))
        t = torch.as_tensor(self.frame_times(frames))
        return _model_shifts(self, t, yx).numpy()

    def global_shifts(self, frames: Sequence[int] | None = None) -> np.ndarray:
        """Global shifts ``(F', 2)`` px (dy, dx)."""
        t = torch.as_tensor(self.frame_times(frames))
        return _eval_global(self.global_grids, t).numpy()

    def local_shifts(self, yx, frames: Sequence[int] | None = None) -> np.ndarray:
        """Local shifts ``(F', P, 2)`` px (dy, dx) at positions ``yx`` ``(P, 2)`` px."""
        yx = torch.as_tensor(np.asarray(yx, dtype=np.float64).reshape(-1, 2))
        t = torch.as_tensor(self.frame_times(frames))
        return _eval_local(self.local_grids, t, _normalise_yx(yx, self.shape)).numpy()

    @classmethod
    def from_nodes(cls, global_px, local_nodes, shape, pixel_size: float) -> MotionModel:
        """A model from known grid values: ``global_px`` ``(F, 2)`` px (dy, dx), one temporal node per frame (so the
        per-frame values are exact), and ``local_nodes`` ``(2, T, Gy, Gx)`` px (dy, dx) or None for none."""
        g = torch.as_tensor(np.asarray(global_px, dtype=np.float64))
        glob = (CubicGrid(g[:, 0, None, None]), CubicGrid(g[:, 1, None, None]))
        if local_nodes is None:
            loc = (CubicGrid.zeros((1, 1, 1), dtype=torch.float64),) * 2
        else:
            nodes = torch.as_tensor(np.asarray(local_nodes, dtype=np.float64))
            loc = (CubicGrid(nodes[0]), CubicGrid(nodes[1]))
        return cls(tuple(int(v) for v in shape), float(pixel_size), len(g), glob, loc)

    @classmethod
    def identity(cls, shape, pixel_size: float, n_frames: int, skip_first: int = 0, skip_last: int = 0):
        """A no-motion model (single node grids)."""
        z = CubicGrid.zeros((1, 1, 1), dtype=torch.float64)
        return cls(tuple(int(s) for s in shape), float(pixel_size), int(n_frames), (z, z), (z, z),
                   skip_first, skip_last)


@dataclass(frozen=True, eq=False)
class AlignedAverage:
    """Aligned averages, numpy float32 ``(Y, X)``: ``average`` is the dose-weighted **sum** over the used frames
    (Warp writes sums: intensities stay in counts of the whole exposure); ``odd``/``even`` are the same sums over
    odd/even used frames (first used frame = even), so ``odd + even == average``; ``stack`` ``(F_used, Y, X)`` holds
    the aligned frames without dose weighting, or None."""

    average: np.ndarray
    odd: np.ndarray | None = None
    even: np.ndarray | None = None
    stack: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------------------
# model evaluation
# ---------------------------------------------------------------------------------------------------------------
def _normalise_yx(yx: torch.Tensor, shape) -> torch.Tensor:
    """px (y, x) -> Warp's normalised grid coordinates (y / Y, x / X)."""
    return yx / torch.tensor([float(shape[0]), float(shape[1])], dtype=yx.dtype)


def _eval_global(grids, t: torch.Tensor) -> torch.Tensor:
    """Global shifts ``(F, 2)`` at times ``t`` ``(F,)``."""
    coords = torch.stack([t, torch.full_like(t, 0.5), torch.full_like(t, 0.5)], -1)
    return torch.stack([g.to(dtype=t.dtype).evaluate(coords) for g in grids], -1)


def _eval_local(grids, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Local shifts ``(F, P, 2)`` at times ``t`` ``(F,)`` and normalised positions ``u`` ``(P, 2)``."""
    coords = torch.cat([t[:, None, None].expand(-1, u.shape[0], 1), u[None].expand(t.shape[0], -1, -1)], -1)
    return torch.stack([g.to(dtype=t.dtype).evaluate(coords) for g in grids], -1)


def _model_shifts(model: MotionModel, t: torch.Tensor, yx: torch.Tensor) -> torch.Tensor:
    """Total shifts ``(F, P, 2)`` px."""
    glob = _eval_global(model.global_grids, t)[:, None, :]
    return glob + _eval_local(model.local_grids, t, _normalise_yx(yx, model.shape))


def _basis(n: int, u: torch.Tensor) -> torch.Tensor:
    """Interpolating cubic-spline basis ``(M, n)`` of an ``n``-node axis at normalised positions ``u`` ``(M,)``."""
    eye = torch.eye(n, dtype=u.dtype, device=u.device)
    return evaluate_cubic_grid(eye, u[:, None]).T


# ---------------------------------------------------------------------------------------------------------------
# geometry: patches, local grid size
# ---------------------------------------------------------------------------------------------------------------
def effective_patch_size(shape: Sequence[int], patch_size: int) -> int:
    """Patch side (px, even): ``patch_size``, or a quarter of the short side for small images (>= 32)."""
    short = min(int(s) for s in shape)
    return int(max(32, min(patch_size, short // 4)) // 2 * 2) if short >= 64 else int(short // 2 * 2)


def patch_layout(shape: Sequence[int], patch: int, overlap: float = 0.5) -> tuple[np.ndarray, tuple[int, int]]:
    """Warp's ``GetEqualGridSpacing``: patch origins ``(P, 2)`` int (y, x), row-major, and the grid ``(Py, Px)``.

    Patches of ``patch`` px overlap by ``overlap`` and are spread evenly (equal integer steps, centred).
    """
    step = max(1, int(patch * (1 - overlap)))
    origins_axes, dims = [], []
    for n in shape:
        count = max(1, -(-(n - (patch - step)) // step))  # ceil, as Warp's NextMultipleOf
        shift = int((n - patch) / (count - 1)) if count > 1 else (n - patch) // 2
        offset = (n - shift * (count - 1) - patch) // 2 if count > 1 else shift
        origins_axes.append(offset + shift * np.arange(count))
        dims.append(count)
    oy, ox = np.meshgrid(*origins_axes, indexing="ij")
    return np.stack([oy.ravel(), ox.ravel()], -1).astype(np.int64), (dims[0], dims[1])


def auto_local_grid(shape: Sequence[int], pixel_size: float, total_dose: float,
                    patch_grid: Sequence[int] | None = None) -> tuple[int, int]:
    """WarpTools' automatic local grid ``(Gy, Gx)``: 5 nodes on the short side of a 4000 Å field of view at >= 30
    e/Å², linear in field of view and (below 30 e/Å²) in dose, long side proportional; capped by the patch grid."""
    y, x = (int(s) for s in shape)
    short_a = min(y, x) * pixel_size
    short = max(1, round(5 * min(1.0, total_dose / 30) * short_a / 4000))
    if x <= y:
        gy, gx = max(1, round(short * y / x)), short
    else:
        gy, gx = short, max(1, round(short * x / y))
    if patch_grid is not None:
        gy, gx = min(gy, patch_grid[0]), min(gx, patch_grid[1])
    return int(gy), int(gx)


def _raised_cosine(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """``(n,)`` window: flat middle half, raised-cosine tapers over the outer quarters (Tukey, α = 0.5)."""
    u = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    edge = torch.clamp(torch.minimum(u, 1 - u) / 0.25, max=1.0)
    return (0.5 - 0.5 * torch.cos(math.pi * edge)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# frame input
# ---------------------------------------------------------------------------------------------------------------
def _frames_shape(frames) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in frames.shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise ValueError(f"frames must be (F, Y, X), got shape {shape}")
    return shape


def _frame_chunks(frames, indices: Sequence[int], chunk: int, device) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, (c, Y, X) float32 tensor on device)`` for consecutive chunks of the requested frames.

    numpy/torch arrays are sliced (converted into one reused buffer: the batch is only valid until the next one);
    ``core.io.movie.Movie`` (anything with ``.frames(index)``) is decoded chunk by chunk, so a large movie is never
    held whole.
    """
    indices = list(indices)
    buffer = None
    for i in range(0, len(indices), chunk):
        idx = indices[i : i + chunk]
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        if hasattr(frames, "frames") and callable(frames.frames):
            data = torch.from_numpy(np.ascontiguousarray(frames.frames(idx), dtype=np.float32))
        elif isinstance(frames, torch.Tensor):
            data = frames if frames.ndim == 3 else frames[None]
            data = data[idx[0] : idx[-1] + 1] if contiguous else data[idx]
        else:
            arr = frames if getattr(frames, "ndim", 0) == 3 else np.asarray(frames)[None]
            part = arr[idx[0] : idx[-1] + 1] if contiguous else arr[idx]
            if buffer is None or buffer.shape[0] < len(idx):
                buffer = np.empty((len(idx), *part.shape[1:]), np.float32)
            out = buffer[: len(idx)]
            np.copyto(out, part, casting="unsafe")
            data = torch.from_numpy(out)
        yield idx, data.to(device=device, dtype=torch.float32)


def _chunk_size(shape: Sequence[int]) -> int:
    """Frames per chunk: ~64 MB of float32 per chunk, at least 1."""
    return int(max(1, min(16, (64 << 20) // (4 * shape[0] * shape[1]))))


def _spectra_chunks(frames, indices: Sequence[int], device) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, (c, Y, X//2+1) complex64 rfft)`` of consecutive chunks of frames (one FFT per frame)."""
    shape = _frames_shape(frames)[1:]
    for idx, batch in _frame_chunks(frames, indices, _chunk_size(shape), device):
        yield idx, torch.fft.rfft2(batch)


class _SpectraCache:
    """Frame spectra kept from the fit's read so the average needs no second read or FFT (``correct_movie``)."""

    def __init__(self, source: Iterator[tuple[list[int], torch.Tensor]], keep: bool):
        self.source, self.keep, self.chunks = source, keep, []

    def __iter__(self):
        for idx, spec in self.source:
            if self.keep:
                self.chunks.append((idx, spec))
            yield idx, spec


# ---------------------------------------------------------------------------------------------------------------
# fit data: cropped frames -> patch spectra in the band
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _FitData:
    """Everything the cost needs.

    spectra: ``(P, F, K)`` complex64 band-limited, B-factor-weighted patch spectra, K sorted by radius, of the
    frames moved back by ``offsets`` ``(F, 2)`` px (the patches are re-cut around the current global trajectory, so
    the fixed mask does not drag the shifts toward zero). kvec: ``(2, K)`` (ky, kx) in cycles per **input** pixel.
    radius: ``(K,)`` fraction of Nyquist. times: ``(F,)`` normalised times of the fitted (grouped) frames.
    centres: ``(P, 2)`` normalised (y, x). cropped: ``(F, Yc, Xc)`` band-limited frames. scale: (Yc / Y, Xc / X).
    """

    spectra: torch.Tensor | None
    kvec: torch.Tensor
    radius: torch.Tensor
    times: torch.Tensor
    centres: torch.Tensor
    patch_grid: tuple[int, int]
    cropped: torch.Tensor
    scale: tuple[float, float]
    origins: np.ndarray
    pc: int
    mask: torch.Tensor
    ring: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor | None = None

    def extract(self, offsets: torch.Tensor | None) -> None:
        """(Re)cut the patch spectra from the cropped frames moved back by ``offsets`` ``(F, 2)`` input px."""
        n_f = self.cropped.shape[0]
        out = torch.empty(len(self.origins), n_f, self.ring.numel(), dtype=torch.complex64,
                          device=self.cropped.device)
        cshape = tuple(self.cropped.shape[-2:])
        # a frame or two at a time keeps every temporary under ~32 MB (reused heap memory, no page faults)
        step = max(1, (4 << 20) // (len(self.origins) * self.pc * self.pc))
        scale = torch.tensor(self.scale, dtype=torch.float64, device=self.cropped.device)
        for f0 in range(0, n_f, step):
            frames = self.cropped[f0 : f0 + step]
            if offsets is not None:
                spec = torch.fft.rfft2(frames).mul_(_ramp(offsets[f0 : f0 + step].to(torch.float64) * scale, cshape))
                frames = torch.fft.irfft2(spec, s=cshape)
            out[:, f0 : f0 + step] = _patch_spectra(frames, self.origins, self.pc, self.mask, self.ring, self.weight)
        self.spectra = out
        self.offsets = offsets.to(torch.float32) if offsets is not None else None


def _even(n: float) -> int:
    return max(2, int(round(n / 2)) * 2)


def _crop_geometry(shape, patch: int, band_max: float) -> tuple[tuple[int, int], int]:
    """Cropped frame shape and cropped patch side: Nyquist ~12 % above the band limit (room for the mask's blur)."""
    ratio = min(1.0, band_max * 1.125)
    pc = min(patch, _even(patch * ratio))
    r = pc / patch
    return (min(shape[0], _even(shape[0] * r)), min(shape[1], _even(shape[1] * r))), pc


def _crop_spectra(spec: torch.Tensor, shape, cshape) -> torch.Tensor:
    """rfft ``(c, Y, X//2+1)`` of frames ``shape`` -> Fourier-cropped frames ``(c, Yc, Xc)`` (mean preserved)."""
    small = fourier_resize_rfft(spec, tuple(shape), tuple(cshape)) if tuple(cshape) != tuple(shape) else spec
    return torch.fft.irfft2(small, s=tuple(cshape)) * (cshape[0] * cshape[1] / (shape[0] * shape[1]))


def _band_indices(pc: int, scale, band, device):
    """Ring of an rfft ``(pc, pc//2+1)`` patch spectrum inside ``band``: flat indices, (ky, kx) cycles/input px and
    radius (fraction of Nyquist), sorted by radius; the redundant half of the kx = 0 column is dropped."""
    fy = fftfreq_warp(pc, device=device, dtype=torch.float64) * scale[0]
    fx = torch.arange(pc // 2 + 1, device=device, dtype=torch.float64) / pc * scale[1]
    ky, kx = torch.meshgrid(fy, fx, indexing="ij")
    r = 2 * torch.sqrt(ky**2 + kx**2)
    keep = (r >= band[0]) & (r < band[1]) & ~((kx == 0) & (ky < 0))
    if band[0] == 0:
        keep &= r > 0
    idx = torch.nonzero(keep.flatten()).squeeze(1)
    order = torch.argsort(r.flatten()[idx], stable=True)
    idx = idx[order]
    return idx, torch.stack([ky.flatten()[idx], kx.flatten()[idx]]), r.flatten()[idx]


def _patch_spectra(cropped: torch.Tensor, origins: np.ndarray, pc: int, mask: torch.Tensor, idx: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
    """``(c, Yc, Xc)`` -> ``(P, c, K)`` complex: masked patches, rfft, band ring, weighted."""
    ys, xs = np.unique(origins[:, 0]), np.unique(origins[:, 1])
    step_y = int(ys[1] - ys[0]) if len(ys) > 1 else 1
    step_x = int(xs[1] - xs[0]) if len(xs) > 1 else 1
    view = cropped[:, ys[0] :, xs[0] :].unfold(1, pc, step_y).unfold(2, pc, step_x)  # equal steps: a strided view
    patches = view[:, : len(ys), : len(xs)].reshape(cropped.shape[0], -1, pc, pc)  # (c, P, pc, pc), row-major
    if patches.untyped_storage().data_ptr() == cropped.untyped_storage().data_ptr():
        patches = patches.clone()  # one patch covering the whole frame: reshape returned a view
    patches = patches.sub_(patches.mean(dim=(-2, -1), keepdim=True)).mul_(mask)  # in place on reshape's copy
    spec = torch.fft.rfft2(patches).flatten(-2)[..., idx].mul_(weight)
    return spec.transpose(0, 1)


def _prepare_fit(chunks, used: Sequence[int], n_total: int, shape, s: MotionSettings, device,
                 counter: Callable[[int], None]) -> _FitData:
    """Consume frame spectra ``chunks`` once: crop to the band, group (EER), extract patch spectra."""
    patch = effective_patch_size(shape, s.patch_size)
    cshape, pc = _crop_geometry(shape, patch, s.band[1])
    scale = (cshape[0] / shape[0], cshape[1] / shape[1])
    origins, pgrid = patch_layout(cshape, pc, s.patch_overlap)
    centres = torch.as_tensor((origins + pc / 2) / np.asarray(cshape, dtype=np.float64), device=device)
    n_used = len(used)
    group = max(1, -(-n_used // max(1, s.max_fit_frames)))
    n_fit = -(-n_used // group)
    times_all = torch.as_tensor(np.asarray(used, dtype=np.float64) / max(1, n_total - 1))
    times = torch.stack([times_all[g * group : (g + 1) * group].mean() for g in range(n_fit)]).to(device)
    cropped = torch.zeros(n_fit, *cshape, device=device)
    for idx, spec in chunks:
        c = _crop_spectra(spec, shape, cshape)
        pos = (torch.as_tensor(idx, device=device) - used[0]) // group  # used frames are contiguous
        cropped.index_add_(0, pos, c)
        counter(len(idx))
    ridx, kvec, radius = _band_indices(pc, scale, s.band, device)
    k2 = (kvec**2).sum(0) / s.pixel_size**2  # (1/Å)²
    weight = torch.exp(s.bfactor / 4 * k2).to(torch.float32)
    mask = (_raised_cosine(pc, device)[:, None] * _raised_cosine(pc, device)[None, :])
    return _FitData(None, kvec.to(torch.float32), radius, times, centres, pgrid, cropped, scale, origins, pc, mask,
                    ridx, weight)


# ---------------------------------------------------------------------------------------------------------------
# the cost: Σ_p Σ_f Σ_k |J_f - mean_f J|², with exact gradient in the shifts
# ---------------------------------------------------------------------------------------------------------------
def _cost_and_grad(spectra: torch.Tensor, kvec: torch.Tensor, shifts: torch.Tensor,
                   chunk_elements: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment cost (up to a constant) and its exact gradient.

    spectra: ``(P, F, K)`` complex; kvec: ``(2, K)`` cycles/px; shifts: ``(P, F, 2)`` px (float32).
    With ``J_f = I_f e^{2πi k·s_f}`` (frame f moved back by its shift) and ``S = Σ_f J_f``,
    ``Σ_f |J_f − S/F|² = Σ_f |I_f|² − |S|²/F``: the cost is ``−Σ_k |S|²`` and
    ``∂/∂s_f = 4π Σ_k k Im(conj(S) J_f)``, evaluated as one batched matrix-vector product per chunk.
    Patches are processed in chunks of ~``chunk_elements`` values (few, large ops: cache-friendly and cheap in
    thread synchronisation). Returns (scalar float64, ``(P, F, 2)`` float32).
    """
    n_p, n_f, n_k = spectra.shape
    grad = torch.empty_like(shifts)
    total = torch.zeros((), dtype=torch.float64, device=shifts.device)
    ky, kx = kvec[0] * (2 * math.pi), kvec[1] * (2 * math.pi)
    kk = torch.stack([kvec[0], kvec[1]], -1).to(spectra.dtype) * (4 * math.pi)  # (K, 2)
    chunk = max(1, chunk_elements // max(1, n_f * n_k))
    for p0 in range(0, n_p, chunk):
        sh = shifts[p0 : p0 + chunk]
        phase = torch.addcmul(sh[..., 1:2] * kx, sh[..., 0:1], ky)  # (c, F, K)
        j = spectra[p0 : p0 + chunk] * torch.complex(torch.cos(phase), torch.sin(phase))
        s = j.sum(1)  # (c, K)
        total -= torch.view_as_real(s).square().sum(dtype=torch.float64)
        grad[p0 : p0 + chunk] = torch.bmm(j, s.conj()[:, :, None] * kk).imag
    return total, grad


class _AlignmentCost(torch.autograd.Function):
    """Autograd wrapper: forward computes value and gradient together (L-BFGS always wants both)."""

    @staticmethod
    def forward(ctx, shifts, spectra, kvec, norm):
        value, grad = _cost_and_grad(spectra, kvec, shifts.detach().to(torch.float32))
        ctx.save_for_backward(grad)
        ctx.norm = norm
        return value / norm

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad_out.to(grad.dtype) * grad / ctx.norm).to(torch.float64), None, None, None


def alignment_cost(shifts: torch.Tensor, spectra: torch.Tensor, kvec: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    """Differentiable alignment cost ``−Σ|Σ_f I_f e^{2πi k·s_f}|² / norm`` of patch ``spectra`` ``(P, F, K)``
    (complex) with frequencies ``kvec`` ``(2, K)`` (cycles/px) under ``shifts`` ``(P, F, 2)`` px. Returns a
    float64 scalar; the gradient is analytic (computed with the value)."""
    return _AlignmentCost.apply(shifts, spectra, kvec, norm)


def _cost_norm(spectra: torch.Tensor, kvec: torch.Tensor) -> tuple[float, float]:
    """Cost normalisation ``4π² Σ k² |I|²`` (a curvature of ~2 per px² for one frame's shift, so L-BFGS steps are
    in pixels from the first iteration) and the bound ``F Σ|I|² / norm`` of the normalised cost's magnitude."""
    k2 = (kvec**2).sum(0)
    weighted = total = 0.0
    chunk = max(1, (1 << 21) // max(1, spectra.shape[1] * spectra.shape[2]))
    for p0 in range(0, spectra.shape[0], chunk):  # chunks: no gigabyte temporaries
        power = torch.view_as_real(spectra[p0 : p0 + chunk]).square().sum(-1)  # (c, F, K)
        weighted += float((power * k2).sum(dtype=torch.float64))
        total += float(power.sum(dtype=torch.float64))
    norm = 4 * math.pi**2 * weighted + 1e-30
    return norm, spectra.shape[1] * total / norm


# ---------------------------------------------------------------------------------------------------------------
# coarse pre-alignment (cross-correlation to the leave-one-out sum)
# ---------------------------------------------------------------------------------------------------------------
def _prealign(cropped: torch.Tensor, scale, s: MotionSettings, iterations: int = 3,
              max_size: int = 384) -> torch.Tensor:
    """Whole-frame shifts ``(F, 2)`` px of the input (same convention as the model), zero mean.

    Cross-correlates each cropped frame with the sum of the others (band + B-factor filtered, edges tapered),
    integer peak + parabolic refinement, three rounds. Only a starting point for the spline fit.
    """
    n, yc, xc = cropped.shape
    dev = cropped.device
    taper = _raised_cosine(yc, dev)[:, None] * _raised_cosine(xc, dev)[None, :]
    spec = torch.fft.rfft2((cropped - cropped.mean(dim=(-2, -1), keepdim=True)) * taper)
    if max(yc, xc) > max_size:  # coarse alignment needs no more than ~max_size px: crop further
        r = max_size / max(yc, xc)
        small = (_even(yc * r), _even(xc * r))
        spec = fourier_resize_rfft(spec, (yc, xc), small)
        scale = (scale[0] * small[0] / yc, scale[1] * small[1] / xc)
        yc, xc = small
    fy = fftfreq_warp(yc, device=dev, dtype=torch.float32)[:, None] * scale[0]
    fx = (torch.arange(xc // 2 + 1, device=dev, dtype=torch.float32) / xc)[None, :] * scale[1]
    r = 2 * torch.sqrt(fy**2 + fx**2)
    k2 = (fy**2 + fx**2) / s.pixel_size**2
    filt = torch.exp(s.bfactor / 2 * k2) * (r >= s.band[0]) * (r < s.band[1])
    shifts = torch.zeros(n, 2, device=dev)  # in cropped px
    max_shift = min(yc, xc) // 4
    for _ in range(iterations):
        ramp = _ramp(shifts, (yc, xc))  # moves each frame back by its shift
        aligned = spec * ramp
        total = aligned.sum(0, keepdim=True)
        cc = torch.fft.irfft2((total - aligned) * aligned.conj() * filt, s=(yc, xc))  # peak at the frame's shift
        cc = torch.fft.fftshift(cc, dim=(-2, -1))
        cy, cx = yc // 2, xc // 2
        win = cc[:, cy - max_shift : cy + max_shift + 1, cx - max_shift : cx + max_shift + 1]
        flat = win.flatten(1).argmax(1)
        iy, ix = flat // win.shape[-1], flat % win.shape[-1]
        iy = iy.clamp(1, win.shape[-2] - 2)
        ix = ix.clamp(1, win.shape[-1] - 2)
        b = torch.arange(n, device=dev)
        c0 = win[b, iy, ix]
        dy = _parabola(win[b, iy - 1, ix], c0, win[b, iy + 1, ix])
        dx = _parabola(win[b, iy, ix - 1], c0, win[b, iy, ix + 1])
        delta = torch.stack([iy - max_shift + dy, ix - max_shift + dx], -1)
        shifts = shifts - delta  # residual peak: the frame still sits at +delta relative to the others
        shifts = shifts - shifts.mean(0)
    return shifts / torch.tensor(scale, device=dev)


def _parabola(a, b, c):
    denom = a - 2 * b + c
    return torch.where(denom.abs() > 1e-12, 0.5 * (a - c) / denom, torch.zeros_like(b)).clamp(-0.5, 0.5)


def _ramp(shifts: torch.Tensor, shape) -> torch.Tensor:
    """``exp(+2πi k·s)`` on the rfft grid ``(F, Y, X//2+1)``: moves content of frames **back** by ``s`` ``(F, 2)``."""
    fy = fftfreq_warp(shape[0], device=shifts.device, dtype=torch.float64)
    fx = torch.arange(shape[1] // 2 + 1, device=shifts.device, dtype=torch.float64) / shape[1]
    py = 2 * math.pi * shifts[:, 0, None].double() * fy
    px = 2 * math.pi * shifts[:, 1, None].double() * fx
    ry = torch.polar(torch.ones_like(py), py).to(torch.complex64)
    rx = torch.polar(torch.ones_like(px), px).to(torch.complex64)
    return ry[:, :, None] * rx[:, None, :]


# ---------------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------------
def _hierarchy(target: int) -> list[int]:
    """Warp's temporal steps: 3, 9, 27, ... capped at ``target`` (one step when ``target <= 3``)."""
    steps = max(1, math.ceil(math.log(max(target, 1.01) - 0.01, 3)))
    return [int(min(target, 3 ** (m + 1))) for m in range(steps)]


def _better_than_zero(data: _FitData, init: torch.Tensor) -> bool:
    """Whether the pre-aligned trajectory ``init`` ``(F, 2)`` fits the patches better than no motion at all
    (judged on the lowest quarter of the band, where a wrong start would show first)."""
    n_k = max(1, data.kvec.shape[1] // 4)
    spectra, kvec = data.spectra[..., :n_k].contiguous(), data.kvec[:, :n_k].contiguous()
    with torch.no_grad():
        zero = torch.zeros(spectra.shape[0], *init.shape, dtype=torch.float32, device=init.device)
        at_init = alignment_cost(zero, spectra, kvec)  # spectra were cut at the init offsets
        at_rest = alignment_cost(zero - init.to(torch.float32)[None], spectra, kvec)
    return bool(at_init <= at_rest)


def _mask_bias(data: _FitData, trajectory: torch.Tensor) -> float:
    """Rough bound (px) of the pull toward the extraction offsets that the fixed patch mask exerts when the
    trajectory ``(F, 2)`` has moved away from them: ~2 / (patch side in cropped px) of the largest residual,
    measured as 12 % for 18-px patches (``test_shift_sign_convention``), negligible for 4K movies' 144-px patches."""
    offsets = data.offsets if data.offsets is not None else torch.zeros_like(trajectory)
    residual = trajectory.to(offsets.dtype) - offsets  # input px
    return float(residual.abs().max()) * 2.2 / data.pc


def _local_dims(shape, s: MotionSettings, n_frames: int, patch_grid) -> tuple[int, int, int]:
    if s.local_grid is None:
        gy, gx = auto_local_grid(shape, s.pixel_size, s.exposure_per_frame * n_frames, patch_grid)
    else:
        gy, gx = (int(v) for v in s.local_grid)
        gy, gx = min(gy, patch_grid[0]), min(gx, patch_grid[1])
    if gy * gx <= 1:
        return 1, 1, 1
    return max(1, int(s.local_temporal)), gy, gx


class _Parametrisation:
    """Grid node parameters -> per-patch, per-frame shifts ``(P, F, 2)``, with identifiability built in."""

    def __init__(self, data: _FitData, n_global: int, local_dims: tuple[int, int, int], dtype=torch.float64):
        dev = data.times.device
        t = data.times.to(dtype)
        self.bg = _basis(n_global, t)  # (F, nG)
        nt, gy, gx = local_dims
        self.local_dims = local_dims
        self.has_local = gy * gx > 1
        if self.has_local:
            bt = _basis(nt, t)  # (F, nt)
            by = _basis(gy, data.centres[:, 0].to(dtype))  # (P, gy)
            bx = _basis(gx, data.centres[:, 1].to(dtype))  # (P, gx)
            self.bt = bt
            self.bs = (by[:, :, None] * bx[:, None, :]).reshape(by.shape[0], -1)  # (P, gy*gx)
            a = bt.mean(0)  # temporal mean weights of the nodes
            self.a = a / a.square().sum().clamp_min(1e-30).sqrt()
        self.n_patches = data.centres.shape[0]
        self.device, self.dtype = dev, dtype

    def project_global(self, g: torch.Tensor) -> torch.Tensor:
        """Nodes ``(nG, 2)`` re-centred so the trajectory has zero mean over the fitted frames."""
        return g - (self.bg @ g).mean(0, keepdim=True)

    def project_local(self, loc: torch.Tensor) -> torch.Tensor:
        """Nodes ``(nt, gy, gx, 2)`` with zero spatial node mean and zero mean over frames at every node."""
        loc = loc - loc.mean(dim=(1, 2), keepdim=True)
        if loc.shape[0] > 1:
            loc = loc - self.a[:, None, None, None] * torch.einsum("t,tyxc->yxc", self.a, loc)[None]
        else:
            loc = loc * 0  # one temporal node: constant in time, invisible to the cost
        return loc

    def shifts(self, g: torch.Tensor, loc: torch.Tensor | None) -> torch.Tensor:
        glob = (self.bg @ self.project_global(g))[None].expand(self.n_patches, -1, -1)  # (P, F, 2)
        if loc is None or not self.has_local:
            return glob
        nt, gy, gx = self.local_dims
        lp = self.project_local(loc).reshape(nt, gy * gx, 2)
        spatial = torch.einsum("ps,tsc->tpc", self.bs, lp)  # (nt, P, 2)
        return glob + torch.einsum("ft,tpc->pfc", self.bt, spatial)


def _lbfgs(params: list[torch.Tensor], closure, iterations: int, cost_bound: float, history: int = 20) -> None:
    """Minimise ``closure()`` (returns the cost, fills ``.grad`` of ``params``) over ``params`` in place by L-BFGS
    (two-loop recursion) with a strong-Wolfe line search; at most ``iterations`` iterations, ``2 × iterations``
    evaluations.

    Written out (~60 lines) rather than ``torch.optim.LBFGS``, whose first construction imports TorchDynamo
    (~1.7 s per process: more than a whole 1K-movie fit). The cost is scaled to a curvature of ~2 per px² (one
    frame's shift), so tolerances are in pixels; the change tolerance sits just above the float32 round-off of the
    cost (~1e-7 of its magnitude, bounded by ``cost_bound``), below which steps are noise.
    """
    tol_change, tol_grad = max(1e-9, 2e-7 * cost_bound), 1e-5
    x = torch.cat([p.detach().reshape(-1) for p in params])
    evals = [0]

    def fun(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        value = closure()
        evals[0] += 1
        return float(value.detach()), torch.cat([p.grad.reshape(-1) for p in params]).to(v.dtype)

    f, g = fun(x)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for it in range(iterations):
        if float(g.abs().max()) <= tol_grad or evals[0] >= 2 * iterations:
            break
        d = -g
        alphas = []
        for s_, y_, rho in reversed(pairs):  # two-loop recursion
            a = rho * float(s_ @ d)
            d = d - a * y_
            alphas.append(a)
        if pairs:
            s_, y_, _ = pairs[-1]
            d = d * (float(s_ @ y_) / float(y_ @ y_))
        else:
            d = d * min(1.0, 1.0 / float(g.abs().sum()))  # first step: at most 1 px in total
        for (s_, y_, rho), a in zip(pairs, reversed(alphas)):
            d = d + s_ * (a - rho * float(y_ @ d))
        gtd = float(g @ d)
        if gtd > -1e-12:  # not a descent direction: restart from steepest descent
            pairs.clear()
            d, gtd = -g, -float(g @ g)
        t, f_new, g_new = _wolfe(fun, x, d, f, g, gtd, tol_change, max_evals=max(1, 2 * iterations - evals[0]))
        step, dg = t * d, g_new - g
        if float(dg @ step) > 1e-12:
            pairs.append((step, dg, 1.0 / float(dg @ step)))
            pairs = pairs[-history:]
        x, done = x + step, abs(f_new - f) < tol_change
        f, g = f_new, g_new
        if done:
            break
    with torch.no_grad():  # leave params at the final point
        offset = 0
        for p in params:
            p.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def _wolfe(fun, x, d, f0, g0, gtd0, noise: float, c1: float = 1e-4, c2: float = 0.9, max_evals: int = 10):
    """Strong-Wolfe line search along ``d`` from ``x`` (bracketing + safeguarded cubic interpolation).
    Returns (step, f, grad) of the best point found; stops as soon as the cost changes by less than ``noise``."""
    t, lo, hi = 1.0, (0.0, f0, gtd0), None
    best = (0.0, f0, g0)
    for _ in range(max_evals):
        f, g = fun(x + t * d)
        gtd = float(g @ d)
        if f < best[1]:
            best = (t, f, g)
        if abs(f - f0) < noise:  # the cost cannot tell these points apart: converged
            return best
        if f > f0 + c1 * t * gtd0 or f >= lo[1]:
            hi = (t, f, gtd)
        elif abs(gtd) <= -c2 * gtd0:
            return t, f, g
        elif gtd * (t - lo[0]) >= 0:
            hi, lo = lo, (t, f, gtd)
        else:
            lo = (t, f, gtd)
        if hi is None:
            t = 2 * t  # still descending at full step: extrapolate
        else:
            t = _cubic_min(lo, hi)
        if hi is not None and abs(hi[0] - lo[0]) < 1e-9:
            break
    return best


def _cubic_min(a, b) -> float:
    """Minimiser of the cubic through two (t, f, f') points, kept inside the central 80 % of the bracket."""
    (t1, f1, g1), (t2, f2, g2) = a, b
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    sq = d1 * d1 - g1 * g2
    lo, hi = min(t1, t2), max(t1, t2)
    if sq >= 0:
        d2 = math.copysign(math.sqrt(sq), t2 - t1)
        t = t2 - (t2 - t1) * (g2 + d2 - d1) / (g2 - g1 + 2 * d2)
    else:
        t = (lo + hi) / 2
    margin = 0.1 * (hi - lo)
    return min(max(t, lo + margin), hi - margin)


def fit_motion(frames, settings: MotionSettings, device=None, progress: Progress | None = None) -> MotionModel:
    """Fit Warp's motion model to a movie.

    frames: ``(F, Y, X)`` numpy/torch array, or a ``core.io.movie.Movie`` (decoded in chunks, read once).
    Returns a :class:`MotionModel` (a 1-frame movie gives the identity model). Every frame is fitted;
    ``skip_first``/``skip_last`` are recorded for the averages.
    ``progress(done, total)`` is called as frames are read and as L-BFGS evaluates; ``Cancelled`` raised from it
    propagates.
    """
    dev = get_device(device)
    n = _frames_shape(frames)[0]
    return _fit(_spectra_chunks(frames, range(n), dev), _frames_shape(frames), settings, dev, progress)


def correct_movie(frames, settings: MotionSettings, device=None, progress: Progress | None = None,
                  halves: bool = True, stack: bool = False,
                  cache_bytes: int = 8 << 30) -> tuple[MotionModel, AlignedAverage]:
    """``fit_motion`` then ``aligned_average``, reading and Fourier-transforming each frame only once.

    The frame spectra from the fit's read are kept for the average when they fit in ``cache_bytes`` (one copy of
    the movie in complex64 rfft layout: 2.7 GB for 40 × 4096²); otherwise the movie is read again.
    Progress runs over both phases.
    """
    dev = get_device(device)
    n, y, x = _frames_shape(frames)
    keep = n * y * (x // 2 + 1) * 8 <= cache_bytes
    cache = _SpectraCache(_spectra_chunks(frames, range(n), dev), keep)
    model = _fit(cache, (n, y, x), settings, dev, _sub_progress(progress, 0, 2))
    chunks = _drain(cache.chunks) if keep else _spectra_chunks(frames, list(model.used_frames), dev)
    avg = _average(chunks, (n, y, x), model, settings, dev, _sub_progress(progress, 1, 2), halves, stack)
    return model, avg


def _drain(chunks: list) -> Iterator:
    """Yield and forget cached chunks, so the cache shrinks while the average grows."""
    while chunks:
        yield chunks.pop(0)


def _sub_progress(progress: Progress | None, part: int, parts: int) -> Progress | None:
    """Map a phase's ``(done, total)`` onto ``part`` of ``parts`` equal shares of 1000 ticks."""
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(int(1000 * (part + done / max(1, total)) / parts), 1000)

    return report


def _fit(chunks, shape3, s: MotionSettings, dev, progress: Progress | None) -> MotionModel:
    """The fit on an iterable of all frames' spectra, in order. As in Warp and RELION, every frame is fitted;
    ``skip_first``/``skip_last`` only leave frames out of the averages."""
    n_total, y, x = shape3
    if n_total <= 1:
        for _ in chunks:  # a cache still sees the frame
            pass
        if progress is not None:
            progress(1, 1)
        return MotionModel.identity((y, x), s.pixel_size, n_total, s.skip_first, s.skip_last)
    group = -(-n_total // max(1, s.max_fit_frames))  # EER fractions: sum consecutive frames for the fit
    n_fit = -(-n_total // group)
    steps = _hierarchy(min(n_fit, s.global_temporal or n_fit))
    counter = _Counter(progress, n_total + len(steps) * s.iterations * 2)
    clock = time.perf_counter()
    data = _prepare_fit(chunks, list(range(n_total)), n_total, (y, x), s, dev, counter)
    info = {"steps": [], "patch_grid": data.patch_grid, "n_patches": int(data.centres.shape[0]),
            "n_frequencies": int(data.radius.numel()), "fit_frames": n_fit,
            "seconds_prepare": time.perf_counter() - clock}
    init = _start(data, s)
    info["seconds_prealign"] = time.perf_counter() - clock - info["seconds_prepare"]
    local_dims = _local_dims((y, x), s, n_total, data.patch_grid)
    g, loc = None, torch.zeros(*local_dims, 2, dtype=torch.float64, device=dev)
    for m, n_nodes in enumerate(steps):
        par = _Parametrisation(data, n_nodes, local_dims)
        g = _initial_nodes(par, g, init, n_nodes)
        last = m == len(steps) - 1
        if m > 0 and last and _mask_bias(data, par.bg @ g) > 0.01:
            data.extract(par.bg @ g)  # re-cut the patches around the refined trajectory
        # Warp widens the band with each step: coarse trajectories see only low frequencies first
        r_max = s.band[0] + (s.band[1] - s.band[0]) * (m + 1) / len(steps)
        n_k = data.radius.numel() if last else max(1, int((data.radius < r_max).sum()))
        fit_local = par.has_local and (m > 0 or len(steps) == 1)  # local joins once the global path is coarse-fit
        g, new_loc, step = _fit_step(par, data, g, loc if fit_local else None, n_k, s.iterations, counter)
        loc = new_loc if fit_local else loc
        info["steps"].append({"global_nodes": n_nodes, **step})
    data.cropped = data.spectra = None
    counter.finish()
    grids = [CubicGrid(v.cpu()) for v in (g[:, 0, None, None], g[:, 1, None, None], loc[..., 0], loc[..., 1])]
    return MotionModel((y, x), float(s.pixel_size), n_total, (grids[0], grids[1]), (grids[2], grids[3]),
                       s.skip_first, s.skip_last, info)


class _Counter:
    """Progress over the fit: frames read, then cost evaluations (capped below the total until the end)."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total - 1), self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)


def _start(data: _FitData, s: MotionSettings) -> torch.Tensor | None:
    """Coarse pre-alignment ``(F, 2)`` px (or None) and the first cut of the patch spectra around it."""
    init = _prealign(data.cropped, data.scale, s).to(torch.float64) if s.prealign else None
    data.extract(init)
    if init is not None and not _better_than_zero(data, init):  # no signal to pre-align on: start from rest
        init = None
        data.extract(None)
    return init


def _initial_nodes(par: _Parametrisation, g: torch.Tensor | None, init: torch.Tensor | None,
                   n_nodes: int) -> torch.Tensor:
    """Global nodes ``(n_nodes, 2)`` to start a step from: the previous step's grid resized (Warp's ``Resize``),
    or for the first step the least-squares fit of the pre-alignment (zeros without one)."""
    if g is not None:
        return torch.stack([CubicGrid(g[:, c, None, None]).resized((n_nodes, 1, 1)).values[:, 0, 0]
                            for c in range(2)], -1)
    if init is not None:
        return torch.linalg.lstsq(par.bg, init - init.mean(0)).solution
    return torch.zeros(n_nodes, 2, dtype=torch.float64, device=par.device)


def _fit_step(par: _Parametrisation, data: _FitData, g: torch.Tensor, loc: torch.Tensor | None, n_k: int,
              iterations: int, counter: _Counter) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """One hierarchy step: L-BFGS over the global nodes ``(nG, 2)`` (and the local nodes ``(nt, gy, gx, 2)`` if
    given) on the lowest ``n_k`` band frequencies. Returns the projected nodes and a diagnostics dict."""
    spectra = data.spectra[..., :n_k].contiguous() if n_k < data.spectra.shape[-1] else data.spectra
    kvec = data.kvec[:, :n_k].contiguous()
    norm, bound = _cost_norm(spectra, kvec)
    offsets = data.offsets.to(torch.float64) if data.offsets is not None else torch.zeros(
        1, 2, dtype=torch.float64, device=par.device)  # the spectra were cut around these
    gp = g.contiguous().clone().requires_grad_(True)
    lp = loc.contiguous().clone().requires_grad_(True) if loc is not None else None
    params = [gp] + ([lp] if lp is not None else [])
    trace = []

    def closure():
        for p in params:
            p.grad = None
        value = alignment_cost(par.shifts(gp, lp) - offsets, spectra, kvec, norm)
        value.backward()
        trace.append(float(value.detach()))
        counter()
        return value

    clock = time.perf_counter()
    _lbfgs(params, closure, iterations, bound)
    with torch.no_grad():
        g = par.project_global(gp.detach())
        loc = par.project_local(lp.detach()) if lp is not None else None
        cost = float(alignment_cost(par.shifts(g, loc) - offsets, spectra, kvec, norm))
    return g, loc, {"frequencies": n_k, "evaluations": len(trace), "seconds": time.perf_counter() - clock,
                    "cost": cost, "trace": trace}


# ---------------------------------------------------------------------------------------------------------------
# dose weighting
# ---------------------------------------------------------------------------------------------------------------
def frame_doses(n_frames: int, exposure_per_frame: float, pre_exposure: float = 0.0) -> np.ndarray:
    """Accumulated dose ``(F,)`` e/Å² at the middle of each frame (Warp: ``(f + 0.5) · dose per frame``)."""
    return pre_exposure + (np.arange(n_frames) + 0.5) * exposure_per_frame


def _dose_factors(doses: torch.Tensor, shape, pixel_size: float, bfactor_per_e: float):
    """Separable per-frame amplitude filters ``exp(B_f/4 · k²)``, ``B_f = bfactor_per_e · dose_f``:
    returns (ay ``(F, Y)``, ax ``(F, X//2+1)``) whose outer product is the 2D filter."""
    fy = fftfreq_warp(shape[0], d=pixel_size, device=doses.device, dtype=torch.float64)
    fx = torch.arange(shape[1] // 2 + 1, device=doses.device, dtype=torch.float64) / (shape[1] * pixel_size)
    b = bfactor_per_e * doses.to(torch.float64)[:, None] / 4
    return torch.exp(b * fy**2), torch.exp(b * fx**2)


def _relative(doses: torch.Tensor) -> torch.Tensor:
    """Doses counted from the least-exposed frame: the normalised weights are unchanged, but that frame's filter is
    1, so the sum over frames stays >= 1. From absolute doses, at high exposure (> ~170·px² e/Å²) the filters
    underflowed in float32 while their normaliser overflowed, and 0 · inf made the average NaN."""
    return doses - doses.min() if len(doses) else doses


def dose_filters(doses, shape, pixel_size: float, bfactor_per_e: float = -4.0, normalise: bool = True,
                 device=None) -> torch.Tensor:
    """Dose-weighting filters ``(F, Y, X//2+1)`` (rfft layout) for frames with accumulated ``doses`` ``(F,)`` e/Å².

    Frame f gets the amplitude B-factor ``bfactor_per_e · dose_f`` (Warp: -4 Å² per e/Å²). With ``normalise``
    (as Warp/Unblur/RELION) the weights at each frequency sum to F, so the dose-weighted sum keeps the plain sum's
    scale (its DC is the plain sum's DC exactly).
    """
    d = torch.as_tensor(np.asarray(doses, dtype=np.float64), device=get_device(device))
    ay, ax = _dose_factors(_relative(d) if normalise else d, shape, pixel_size, bfactor_per_e)
    w = ay[:, :, None] * ax[:, None, :]
    if normalise:
        w = w * (w.shape[0] / w.sum(0, keepdim=True))
    return w.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# aligned averages
# ---------------------------------------------------------------------------------------------------------------
def _sampling_grid(model: MotionModel, t_weights: torch.Tensor, shape, device, step: int = 32) -> torch.Tensor:
    """``grid_sample`` grid ``(1, Y, X, 2)`` (normalised x, y) that samples each pixel ``p`` at ``p + local(p)``, for
    temporal node weights ``t_weights`` ``(nt,)`` (a frame, or the mean over a group of frames).

    The local spline is evaluated on a lattice every ``step`` px and upsampled bilinearly together with the pixel
    coordinates (bilinear interpolation reproduces the linear part exactly; the field is far smoother than 32 px).
    """
    y, x = shape
    ny, nx = max(2, -(-(y - 1) // step) + 1), max(2, -(-(x - 1) // step) + 1)
    py = torch.linspace(0, y - 1, ny, device=device, dtype=torch.float64)
    px = torch.linspace(0, x - 1, nx, device=device, dtype=torch.float64)
    zero = torch.zeros(1, device=device, dtype=torch.float64)
    coarse = []
    for grid, pos, n in ((model.local_grids[1], px[None, :], x), (model.local_grids[0], py[:, None], y)):
        nodes = torch.einsum("t,tyx->yx", t_weights.to(device=device, dtype=torch.float64),
                             grid.values.to(device=device, dtype=torch.float64))
        local = evaluate_cubic_grid_lattice(nodes[None], [zero, py / y, px / x])[0]  # (ny, nx) px
        coarse.append((pos + local) * (2 / max(1, n - 1)) - 1)  # normalised sampling coordinate
    coarse = torch.stack(coarse).to(torch.float32)[None]  # (1, 2, ny, nx): (x, y) as grid_sample wants
    fine = torch.nn.functional.interpolate(coarse, size=(y, x), mode="bilinear", align_corners=True)
    return fine.permute(0, 2, 3, 1).contiguous()


def _resample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bicubic (Keys) resampling of ``images`` ``(C, Y, X)`` on ``grid`` ``(1, Y, X, 2)``, border clamped; one
    vectorised call for all channels (the grid is smooth and near the identity: memory-speed gathers)."""
    return torch.nn.functional.grid_sample(images[None], grid, mode="bicubic", padding_mode="border",
                                           align_corners=True)[0]


def _local_groups(model: MotionModel, frames: np.ndarray, tol: float) -> list[np.ndarray]:
    """Split frames (time order) into contiguous groups whose local fields (sampled on a 9×9 lattice) stay within
    ``tol`` px of the group mean."""
    yy, xx = np.meshgrid(np.linspace(0, model.shape[0] - 1, 9), np.linspace(0, model.shape[1] - 1, 9), indexing="ij")
    field_ = model.local_shifts(np.stack([yy.ravel(), xx.ravel()], -1), frames)  # (F, 81, 2)
    groups, start = [], 0
    for end in range(1, len(frames) + 1):
        seg = field_[start:end]
        if end - start > 1 and np.abs(seg - seg.mean(0)).max() > tol:
            groups.append(frames[start : end - 1])
            start = end - 1
    groups.append(frames[start:])
    return groups


def _local_matters(model: MotionModel, frames: np.ndarray, tol: float) -> bool:
    """Whether the local field anywhere (9×9 lattice) in ``frames`` exceeds half the grouping tolerance."""
    if not model.has_local:
        return False
    yy, xx = np.meshgrid(np.linspace(0, model.shape[0] - 1, 9), np.linspace(0, model.shape[1] - 1, 9), indexing="ij")
    return bool(np.abs(model.local_shifts(np.stack([yy.ravel(), xx.ravel()], -1), frames)).max() > tol / 2)


def _temporal_weights(model: MotionModel, frames: np.ndarray) -> torch.Tensor:
    """Mean temporal node weights ``(nt,)`` of the local grid over ``frames``."""
    nt = model.local_grids[0].dims[0]
    t = torch.as_tensor(model.frame_times(frames))
    return _basis(nt, t).mean(0)


def aligned_average(frames, model: MotionModel, settings: MotionSettings, device=None,
                    progress: Progress | None = None, halves: bool = True, stack: bool = False) -> AlignedAverage:
    """Motion-corrected, dose-weighted sum of the used frames, with odd/even halves and optionally the aligned stack.

    frames: the movie the model was fitted to (array or ``Movie``, read in chunks). The frames averaged are
    ``model.used_frames`` (the model's skip_first/skip_last); ``settings`` supplies the dose (exposure_per_frame,
    pre_exposure, dose_weighting, dose_bfactor) and local_tolerance.

    Each frame's global shift and dose filter are one Fourier-space multiplication; the local residual (a smooth
    field) is applied by bicubic resampling of per-group sums (frames whose local fields agree within
    ``settings.local_tolerance`` px); groups are finished as they complete, so memory stays at a few frames. A local
    field that stays below half the tolerance everywhere is not resampled at all.
    Dose weighting uses ``frame_doses`` and ``settings.dose_bfactor`` (Warp: −4 Å² per e/Å²), normalised per
    frequency so the weights of the used frames sum to their number (the DC is the plain sum's).
    """
    dev = get_device(device)
    shape3 = _frames_shape(frames)
    if shape3[0] != model.n_frames or tuple(shape3[1:]) != tuple(model.shape):
        raise ValueError(f"frames {shape3} do not match the motion model {(model.n_frames, *model.shape)}")
    return _average(_spectra_chunks(frames, list(model.used_frames), dev), shape3, model, settings, dev, progress,
                    halves, stack)


def _average(chunks, shape3, model: MotionModel, s: MotionSettings, dev, progress, halves, stack) -> AlignedAverage:
    """The average on an iterable of the used frames' spectra."""
    n_total, y, x = shape3
    shape = (y, x)
    used = model.used_frames
    if len(used) == 0:
        raise ValueError("no frames left after skipping")
    glob = torch.as_tensor(model.global_shifts(used), dtype=torch.float64, device=dev)  # (F, 2)
    doses = torch.as_tensor(frame_doses(n_total, s.exposure_per_frame, s.pre_exposure)[used], device=dev)
    ay, ax = _dose_factors(_relative(doses), shape, s.pixel_size, s.dose_bfactor if s.dose_weighting else 0.0)
    fy = fftfreq_warp(y, device=dev, dtype=torch.float64)
    fx = torch.arange(x // 2 + 1, device=dev, dtype=torch.float64) / x
    ry = torch.polar(torch.ones_like(ay), 2 * math.pi * glob[:, :1] * fy)  # moves frames back by their shift
    rx = torch.polar(torch.ones_like(ax), 2 * math.pi * glob[:, 1:] * fx)
    fac_y, fac_x = (ay * ry).to(torch.complex64), (ax * rx).to(torch.complex64)  # (F, Y), (F, Xr)
    norm = (len(used) / (ay.T @ ax)).to(torch.float32) if s.dose_weighting else None  # Σ_f of separable filters

    local = _local_matters(model, used, s.local_tolerance)
    groups = _local_groups(model, used, s.local_tolerance) if local else [used]
    n_par = 2 if halves else 1
    parity = (used - used[0]) % 2  # Warp: the first used frame is even
    group_of = {int(f): gi for gi, grp in enumerate(groups) for f in grp}
    last_of_group = {int(grp[-1]): gi for gi, grp in enumerate(groups)}
    acc = torch.zeros(n_par, y, x // 2 + 1, dtype=torch.complex64, device=dev)  # the current group's sums
    total = torch.zeros(n_par, y, x, device=dev)
    stack_out = np.empty((len(used), y, x), np.float32) if stack else None
    total_work, done = len(used) + len(groups), 0
    used_set = set(int(f) for f in used)
    for idx, spec in chunks:
        keep = [j for j, f in enumerate(idx) if int(f) in used_set]  # a cache holds the skipped frames too
        if not keep:
            continue
        if len(keep) < len(idx):
            idx, spec = [idx[j] for j in keep], spec[keep]
        rows = torch.as_tensor([int(f) - int(used[0]) for f in idx], device=dev)
        if stack:
            for j, f in enumerate(idx):
                moved = spec[j] * (ry[rows[j]][:, None] * rx[rows[j]][None, :]).to(torch.complex64)
                stack_out[int(rows[j])] = _finish(moved[None], model, np.array([f]), shape, dev, local)[0].cpu().numpy()
        # in place: a fresh 67 MB temporary per 4K frame costs more in page faults than the multiplication
        spec.mul_(fac_y[rows][:, :, None])
        spec.mul_(fac_x[rows][:, None, :])
        for j, f in enumerate(idx):
            acc[int(parity[int(rows[j])]) if halves else 0].add_(spec[j])
            if int(f) in last_of_group:  # frames arrive in time order: finish each group as soon as it is complete
                if norm is not None:
                    acc *= norm
                total += _finish(acc, model, groups[group_of[int(f)]], shape, dev, local)
                acc.zero_()
                done += 1
        done += len(idx)
        if progress is not None:
            progress(done, total_work)
    if halves:
        even, odd = total[0], total[1]
        return AlignedAverage((even + odd).cpu().numpy(), odd.cpu().numpy(), even.cpu().numpy(), stack_out)
    return AlignedAverage(total[0].cpu().numpy(), None, None, stack_out)


def _finish(spec: torch.Tensor, model: MotionModel, frames: np.ndarray, shape, device, local: bool) -> torch.Tensor:
    """rfft ``(C, Y, X//2+1)`` of globally aligned images -> real ``(C, Y, X)``, resampled by the mean local field
    of ``frames``."""
    images = torch.fft.irfft2(spec, s=shape)
    if not local:
        return images
    return _resample(images, _sampling_grid(model, _temporal_weights(model, frames), shape, device))


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def motion_metrics(model: MotionModel) -> dict[str, float]:
    """Summary numbers, in Å.

    mean_frame_movement: Warp's ``MeanFrameMovement``: mean frame-to-frame displacement of the image centre's track
        (global + local) over the first third of the exposure (the first ``max(1, (N - 1) // 3)`` steps).
    max_local_deviation: largest ``|local|`` over the field (33×33 lattice) and all frames.
    total_drift: path length of the centre track over all frames; net_drift: its end-to-end distance.
    """
    if model.n_frames <= 1:
        return {"mean_frame_movement": 0.0, "max_local_deviation": 0.0, "total_drift": 0.0, "net_drift": 0.0}
    centre = np.array([[model.shape[0] / 2, model.shape[1] / 2]])
    track = model.shifts(centre)[:, 0] * model.pixel_size  # (F, 2) Å
    steps = np.linalg.norm(np.diff(track, axis=0), axis=1)
    first = steps[: max(1, len(steps) // 3)]
    yy, xx = np.meshgrid(np.linspace(0, model.shape[0], 33), np.linspace(0, model.shape[1], 33), indexing="ij")
    local = model.local_shifts(np.stack([yy.ravel(), xx.ravel()], -1)) * model.pixel_size
    return {
        "mean_frame_movement": float(first.mean()),
        "max_local_deviation": float(np.linalg.norm(local, axis=-1).max()),
        "total_drift": float(steps.sum()),
        "net_drift": float(np.linalg.norm(track[-1] - track[0])),
    }


# ---------------------------------------------------------------------------------------------------------------
# Warp XML
# ---------------------------------------------------------------------------------------------------------------
def motion_to_xml(meta, model: MotionModel) -> None:
    """Write the model into a Warp ``<Movie>`` XML: ``GridMovementX/Y`` and ``GridLocalMovementX/Y``.

    Warp's grids hold **corrections in Å** (a feature at ``p`` is at ``p − grid`` in frame f), so values are
    ``−shift · pixel_size``; dims are Warp's ``(X, Y, Z)`` = our ``(Z, Y, X)`` reversed, time on Z. Also sets the
    ``MeanFrameMovement`` attribute (Å).
    """
    from .io.warp_xml import GridData

    ps = model.pixel_size
    for name, grid in (("GridMovementX", model.global_grids[1]), ("GridMovementY", model.global_grids[0]),
                       ("GridLocalMovementX", model.local_grids[1]), ("GridLocalMovementY", model.local_grids[0])):
        meta.set_grid(name, GridData(-grid.values.detach().cpu().numpy().astype(np.float64) * ps, grid.margins))
    meta.set_attr("MeanFrameMovement", motion_metrics(model)["mean_frame_movement"])


def motion_from_xml(meta, shape: Sequence[int], pixel_size: float, n_frames: int | None = None,
                    skip_first: int = 0, skip_last: int = 0) -> MotionModel:
    """Read ``GridMovementX/Y`` and ``GridLocalMovementX/Y`` (Warp's signs and Å) into a :class:`MotionModel`.

    shape: (Y, X) px of the movie; pixel_size: Å/px the grids are converted with. ``n_frames``: the movie's frame
    count (the grids' time axis spans it); defaults to the global grid's temporal size, which is the frame count
    only when Warp fitted one node per frame (WarpTools' auto grid uses ceil(total dose) nodes, capped at the frame
    count). Missing local grids mean no local motion; Warp's 4-node local time axis is read as is.
    """

    def grid(name):
        if not meta.has(name):
            return CubicGrid.zeros((1, 1, 1), dtype=torch.float64)
        g = meta.get_grid(name)
        return CubicGrid(torch.as_tensor(-np.asarray(g.values) / pixel_size), g.margins)

    gx, gy = grid("GridMovementX"), grid("GridMovementY")
    lx, ly = grid("GridLocalMovementX"), grid("GridLocalMovementY")
    n = int(n_frames) if n_frames is not None else int(gx.dims[0])
    return MotionModel(tuple(int(v) for v in shape), float(pixel_size), n, (gy, gx), (ly, lx), skip_first, skip_last)
