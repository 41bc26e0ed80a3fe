"""Particle export: dose-weighted particle images extracted from the movie, with the local CTF, for RELION 3.1+.

Extraction (paper, "Export of corrected data"): a particle is taken to be more rigid than the ice around it, so
its whole box moves *uniformly* with the motion model evaluated at its centre. For every used frame ``f`` the
particle at ``p`` (pixels of the aligned average) lies at ``p + shift(p, f)`` (``core.motion``'s convention); a
padded box around the nearest pixel is cut out, moved by the sub-pixel remainder with a Fourier phase ramp so the
particle sits at the box centre, multiplied by the frame's dose filter (``motion.dose_filters``, the same weights
as the aligned average), Fourier-cropped/padded to the output pixel size and summed over frames (odd/even frames
into two halves as the average's halves: the first used frame is even). After the sum: optional phase flipping
with the particle's local CTF, inverse FFT, crop to the box, and RELION's normalisation.

Box geometry: the box ``B`` is in output pixels and even (RELION's convention: the particle centre is pixel
``B // 2``, 0-based). Extraction uses a padded box of ``Bp`` output pixels (``2 B`` with phase flipping, as Warp:
CTF delocalisation; else ``B + 2 max(8, B // 8)``) and ``Bi`` input pixels with ``Bi / Bp`` as close as possible to
the requested pixel-size ratio; the pixel size reached, ``pixel_size_in · Bi / Bp``, is the one reported and written
(exact for integer or half-integer ratios; otherwise off by < 0.1 % for boxes of 96 px or more, < 0.5 % down to
32 px: both padded sizes are even, so the ratio moves in steps of ~1/Bp). Pixels of the box outside the frame take the
frame's mean. The outer few pixels of the padding (at most 8, half the margin) are tapered to the box mean with a
raised cosine before the FFT: a cut-out box is not periodic, and the sub-pixel phase ramp and the Fourier crop
would spread its edge discontinuity into the particle as ringing (1.7 % of the image's std at 8 px from an untapered
edge, 0.06 % with the taper, in the tests' smooth-image case).

Normalisation (RELION's ``relion_preprocess --norm``; Warp does the same with a plane over the whole box): a plane
fitted to the background (pixels farther than ``diameter / 2`` from the centre) is subtracted, then the background
is brought to mean 0 and (population) standard deviation 1; contrast is inverted (protein white) unless switched off.
Halves get their own background mean and plane but the full stack's scale, so ``odd + even == images`` exactly
(the average's halves add up the same way; Warp normalises each denoising half on its own, which breaks this).

CTF (RELION conventions, ``relion/src/ctf.h``): RELION's ``ΔF(θ) = U cos²(θ − angle) + V sin²(θ − angle)`` with θ
from +x toward +y in image (row, column) order is Warp's ``defocus + astigmatism/2 · cos 2(θ − angle)`` with
``U = defocus + astigmatism / 2``, ``V = defocus − astigmatism / 2`` and the same angle; both are positive at DC
(RELION ``−sin(−K3)``, Warp ``+sin(asin(amplitude))``), so phase flipping multiplies by the same sign either way.
Rows are written with ``U ≥ V`` (CTFFIND's habit; a negative astigmatism swaps U and V and turns the angle by 90°),
angles in (−90°, 90°], defocus in Å, phase shift in degrees.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .ctf import CTFParams, ctf_2d
from .device import get_device
from .fourier import fftfreq_warp, fourier_resize_rfft
from .io.mrc_write import write_mrc
from .io.star import write_star
from .motion import (
    MotionSettings,
    _chunk_size,
    _dose_factors,
    _frame_chunks,
    _frames_shape,
    _relative,
    frame_doses,
)

__all__ = [
    "ExportSettings",
    "ParticleStack",
    "ParticleFile",
    "extract_particles",
    "particle_ctf",
    "write_particle_stack",
    "write_particle_star",
    "normalise_particles",
]

Progress = Callable[[int, int], None]
_BOX_ELEMENTS = 1 << 24  # input-box pixels per particle batch (one reused 64 MB float32 buffer)
_ACCUMULATOR_BYTES = 1 << 30  # frame sums kept on the device per pass; more particles -> more passes over frames
# Temporaries per call: FFT outputs (and the final inverse FFTs) stay below glibc's largest mmap threshold (32 MB), so
# their memory is reused rather than mapped afresh each call: the page faults of a fresh 64 MB output cost as much as
# the FFT itself.
_FFT_BYTES = 30 << 20
_FINISH_BYTES = 24 << 20
_FACTOR_BYTES = 64 << 20  # per-frame shift and dose factors computed at once


# ---------------------------------------------------------------------------------------------------------------
# settings and results
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSettings:
    """Particle export settings.

    box_size: px of the output box (even, RELION's convention). pixel_size: Å/px of the output (None: the
    micrograph's; rescaled in Fourier space). diameter: Å, particle diameter; the background for normalisation
    lies outside this circle (None: 75 % of the box, RELION's default background radius). invert: protein white
    (RELION's ``--invert_contrast``). normalize: background mean 0, std 1 (RELION's ``--norm``); subtract_ramp:
    subtract a plane fitted to the background first (RELION's default, ``--no_ramp`` to switch off); only with
    normalize. halves: also odd/even-frame stacks. phase_flip: multiply by the sign of the particle's local CTF.
    dose_weighting: Warp's per-frame B-factors (the motion settings' ``dose_bfactor``), as the aligned average.
    """

    box_size: int = 128
    pixel_size: float | None = None
    diameter: float | None = None
    invert: bool = True
    normalize: bool = True
    subtract_ramp: bool = True
    halves: bool = False
    phase_flip: bool = False
    dose_weighting: bool = True

    def __post_init__(self):
        if int(self.box_size) < 4 or int(self.box_size) % 2:
            raise ValueError(f"box_size must be an even number of pixels >= 4, got {self.box_size}")
        if self.pixel_size is not None and self.pixel_size <= 0:
            raise ValueError(f"pixel_size must be positive (Å) or None, got {self.pixel_size}")
        if self.diameter is not None and self.diameter <= 0:
            raise ValueError(f"diameter must be positive (Å) or None, got {self.diameter}")
        object.__setattr__(self, "box_size", int(self.box_size))


@dataclass(frozen=True, eq=False)
class ParticleStack:
    """The particles of one micrograph.

    images: ``(N, B, B)`` float32. odd/even: ``(N, B, B)`` half stacks (``odd + even == images``) or None.
    yx: ``(N, 2)`` px ``(y, x)`` centres in the micrograph (the aligned average), exactly at box pixel ``B // 2``.
    pixel_size: Å/px of the images (the value reached, see the module notes); micrograph_pixel_size: Å/px of ``yx``.
    ctf: per-particle table (``defocus_u``, ``defocus_v`` Å, ``defocus_angle``, ``phase_shift`` degrees,
    ``max_resolution`` Å or NaN) or None. scores: ``(N,)`` figures of merit or None. inside: ``(N,)`` whether the
    box lies inside the micrograph in every frame (outside pixels were filled with the frame mean).
    voltage kV, cs mm, amplitude: optics of the CTF. phase_flipped: the images are phase-flipped.
    """

    images: np.ndarray
    yx: np.ndarray
    pixel_size: float
    micrograph_pixel_size: float
    ctf: pd.DataFrame | None = None
    scores: np.ndarray | None = None
    odd: np.ndarray | None = None
    even: np.ndarray | None = None
    inside: np.ndarray | None = None
    voltage: float = 300.0
    cs: float = 2.7
    amplitude: float = 0.07
    phase_flipped: bool = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def box_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass(frozen=True, eq=False)
class ParticleFile:
    """A particle stack as written: ``path`` of its ``.mrcs``, the ``micrograph`` its coordinates refer to, and
    the paths of its half stacks (None when not written)."""

    stack: ParticleStack
    path: Path
    micrograph: str | os.PathLike
    odd: Path | None = None
    even: Path | None = None


@dataclass(frozen=True)
class _Geometry:
    box: int  # output box, px
    box_in: int  # padded extraction box, input px
    box_pad: int  # padded box, output px
    pixel_size: float  # Å/px of the output (reached)
    taper: int  # input px of the raised-cosine edge taper


# ---------------------------------------------------------------------------------------------------------------
# geometry and CTF
# ---------------------------------------------------------------------------------------------------------------
def _geometry(s: ExportSettings, pixel_size_in: float) -> _Geometry:
    """The padded boxes whose size ratio is closest to the pixel-size ratio (the first best of the even sizes
    up to 50 % above the minimum)."""
    ratio = (s.pixel_size or pixel_size_in) / pixel_size_in
    base = 2 * s.box_size if s.phase_flip else s.box_size + 2 * max(8, s.box_size // 8)
    best = None
    for pad in range(base, base + max(34, base // 2), 2):
        box_in = max(2, 2 * round(pad * ratio / 2))
        err = abs(box_in / pad - ratio)
        if best is None or err < best[0] - 1e-12:
            best = (err, pad, box_in)
    _, pad, box_in = best
    margin_in = (box_in - s.box_size * ratio) / 2  # input px of padding on each side
    taper = int(max(1, min(8, margin_in // 2)))
    return _Geometry(s.box_size, box_in, pad, pixel_size_in * box_in / pad, taper)


def _relion_uv(defocus: np.ndarray, astigmatism: float, angle: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Warp's (mean defocus, DefocusDelta, angle) -> RELION's (U ≥ V, V, angle in (−90, 90])."""
    if astigmatism < 0:
        astigmatism, angle = -astigmatism, angle + 90.0
    angle = angle - 180.0 * math.ceil((angle - 90.0) / 180.0)  # wrap into (−90, 90]
    return defocus + astigmatism / 2, defocus - astigmatism / 2, float(angle)


def particle_ctf(ctf, yx, shape: Sequence[int]) -> pd.DataFrame | None:
    """The CTF of each particle: the local model at its centre.

    ctf: a ``ctf_fit.CTFFit`` (local defocus grid, global astigmatism and phase shift; its positions are pixels of
    the fitted image ``ctf.shape``, so ``yx`` is rescaled from ``shape`` to it), a ``CTFParams`` (the same CTF for
    every particle) or None. yx: ``(N, 2)`` px of an image of ``shape`` ``(Y, X)``.
    Returns columns ``defocus_u``, ``defocus_v`` (Å, U ≥ V), ``defocus_angle``, ``phase_shift`` (degrees),
    ``max_resolution`` (Å, the fit's resolution estimate, NaN when unknown), or None without a CTF.
    """
    if ctf is None:
        return None
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    if isinstance(ctf, CTFParams):
        defocus = np.full(len(yx), float(ctf.defocus))
        astig, angle, phase, res = ctf.astigmatism, ctf.astigmatism_angle, ctf.phase_shift, math.nan
    else:
        scale = np.asarray(ctf.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
        defocus = np.asarray(ctf.defocus_at(yx * scale), dtype=np.float64)
        astig, angle, phase = ctf.astigmatism, ctf.astigmatism_angle, ctf.phase_shift
        res = float(ctf.fit_resolution)
    u, v, angle = _relion_uv(defocus, float(astig), float(angle))
    n = len(yx)
    return pd.DataFrame({"defocus_u": u, "defocus_v": v, "defocus_angle": np.full(n, angle),
                         "phase_shift": np.full(n, float(phase)), "max_resolution": np.full(n, res)})


def _optics(ctf) -> dict[str, float]:
    """Voltage, Cs and amplitude contrast of a ``CTFFit`` / ``CTFParams`` (defaults without one)."""
    src = ctf if isinstance(ctf, CTFParams) else getattr(ctf, "settings", None)
    if src is None:
        return {"voltage": 300.0, "cs": 2.7, "amplitude": 0.07}
    return {"voltage": float(src.voltage), "cs": float(src.cs), "amplitude": float(src.amplitude)}


def _flip_signs(ctf, table: pd.DataFrame, geo: _Geometry, device) -> torch.Tensor:
    """``sign(CTF)`` ``(N, Bp, Bp//2+1)`` of each particle at the output sampling (rfft layout)."""
    base = ctf if isinstance(ctf, CTFParams) else ctf.ctf
    k = geo.pixel_size / base.pixel_size
    params = [base.with_(pixel_size=geo.pixel_size, pixel_size_delta=base.pixel_size_delta * k,
                         defocus=0.5 * (u + v), astigmatism=u - v, astigmatism_angle=a, bfactor=0.0, scale=1.0)
              for u, v, a in table[["defocus_u", "defocus_v", "defocus_angle"]].itertuples(index=False)]
    if not params:
        return torch.zeros(0, geo.box_pad, geo.box_pad // 2 + 1, device=device)
    return torch.sign(ctf_2d(params, (geo.box_pad, geo.box_pad), rfft=True, device=device))


# ---------------------------------------------------------------------------------------------------------------
# motion and dose
# ---------------------------------------------------------------------------------------------------------------
def _used_frames(motion, shape3: Sequence[int]) -> np.ndarray:
    """The frames summed: the model's ``used_frames`` (its skip_first/skip_last), else all. The model must describe
    these frames (its ``n_frames`` and ``shape``, where it has them)."""
    n_frames = int(shape3[0])
    model = (getattr(motion, "n_frames", n_frames), tuple(getattr(motion, "shape", shape3[1:])))
    if model != (n_frames, tuple(shape3[1:])):
        raise ValueError(f"frames {tuple(shape3)} do not match the motion model {(model[0], *model[1])}")
    used = getattr(motion, "used_frames", None)
    return np.arange(n_frames) if used is None else np.asarray(used, dtype=np.int64)


def _particle_positions(motion, yx: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Where each particle is in each used frame, ``(F, N, 2)`` px: ``p + shift(p, f)`` (rigid particle)."""
    if motion is None or len(yx) == 0:
        return np.broadcast_to(yx, (len(used), *yx.shape)).copy()
    shifts = np.asarray(motion.shifts(yx, used), dtype=np.float64).reshape(len(used), len(yx), 2)
    return yx[None] + shifts


def _dose_weights(used: np.ndarray, n_frames: int, box_in: int, pixel_size: float, ms: MotionSettings | None,
                  on: bool, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The used frames' dose filters in separable form, ``(ay (F, Bi), ax (F, Bi//2+1))`` float64: frame f's filter
    is ``ay[f] ⊗ ax[f]`` normalised over the frames (``motion.dose_filters``). Doses count from the least-exposed
    frame, as there and in the average: the normalised weights are the same, and their sum cannot underflow."""
    if not on:
        return None
    if ms is None:
        raise ValueError("dose weighting needs motion_settings (exposure_per_frame, pre_exposure, dose_bfactor)")
    doses = torch.as_tensor(frame_doses(n_frames, ms.exposure_per_frame, ms.pre_exposure)[used], device=device)
    return _dose_factors(_relative(doses), (box_in, box_in), pixel_size, ms.dose_bfactor)


def _input_pixel_size(motion, ms: MotionSettings | None, pixel_size: float | None) -> float:
    for value in (pixel_size, getattr(ms, "pixel_size", None), getattr(motion, "pixel_size", None)):
        if value:
            return float(value)
    raise ValueError("the frames' pixel size is unknown: pass pixel_size or motion_settings")


# ---------------------------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Band:
    """The samples of the input box's rfft that reach the output box (``fourier_resize_rfft``'s crop before its
    Nyquist sums): full-axis ``rows`` ``(R,)`` and the first ``cols`` columns, at frequencies ``fy``, ``fx`` (cycles/px,
    Warp's +0.5 Nyquist). A crop to ``m = 2h`` keeps the rows of frequencies ``0..h`` and ``-h..-1`` (two slices; the
    output's rows plus its −h row: the Nyquist sums and any padding are linear, so they are done once on the sums)."""

    rows: torch.Tensor
    cols: int
    fy: torch.Tensor
    fx: torch.Tensor
    half: int | None  # h of a crop; None: all rows and columns


def _band_shape(geo: _Geometry) -> tuple[int, int]:
    """``(R, C)`` of the band: the sums' shape per particle."""
    bi, bp = geo.box_in, geo.box_pad
    return (bp + 1, bp // 2 + 1) if bp < bi else (bi, bi // 2 + 1)


def _band(geo: _Geometry, device) -> _Band:
    bi, bp = geo.box_in, geo.box_pad
    h = bp // 2 if bp < bi else None
    rows = torch.arange(bi) if h is None else torch.cat([torch.arange(h + 1), torch.arange(bi - h, bi)])
    cols = _band_shape(geo)[1]
    fy = fftfreq_warp(bi, dtype=torch.float64)[rows]
    fx = torch.arange(cols, dtype=torch.float64) / bi
    return _Band(rows.to(device), cols, fy.to(device), fx.to(device), h)


def _band_blocks(band: _Band, size: int) -> list[tuple[slice, slice]]:
    """``(band rows, spectrum rows)`` of the contiguous row blocks of the band in an rfft of ``size`` rows (used in
    place: copying them out costs more than the arithmetic)."""
    if band.half is None:
        return [(slice(None), slice(None))]
    h = band.half
    return [(slice(0, h + 1), slice(0, h + 1)), (slice(h + 1, 2 * h + 1), slice(size - h, size))]


def _to_output(acc: torch.Tensor, band: _Band, geo: _Geometry) -> torch.Tensor:
    """Sums on the band ``(H, N, R, C)`` -> the output box's rfft ``(H, N, Bp, Bp//2+1)``: a crop's Nyquist sums
    (as ``fourier_resize_rfft``: the −h column the rfft drops is the conjugate of the +h column at the negated
    rows; then the ±h rows add up), or the padding of an input box smaller than the output's."""
    bi, m = geo.box_in, geo.box_pad
    h = band.half
    if h is None:
        return fourier_resize_rfft(acc, (bi, bi), (m, m))
    negated = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(2 * h, 0, -1)]).to(acc.device)  # row of −k
    col = acc[..., h]
    acc[..., h] = col + col[..., negated].conj()
    acc[..., h, :] += acc[..., h + 1, :]
    return torch.cat([acc[..., : h + 1, :], acc[..., h + 2 :, :]], -2)


def _gather_clamped(frame: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Boxes ``(n, size, size)`` of ``frame`` ``(Y, X)`` with top-left ``corners`` ``(n, 2)`` (long); pixels
    outside the frame take its mean."""
    ar = torch.arange(size, device=frame.device)
    iy, ix = corners[:, 0, None] + ar, corners[:, 1, None] + ar  # (n, size)
    ny, nx = frame.shape
    boxes = frame[iy.clamp(0, ny - 1)[:, :, None], ix.clamp(0, nx - 1)[:, None, :]]
    valid = ((iy >= 0) & (iy < ny))[:, :, None] & ((ix >= 0) & (ix < nx))[:, None, :]
    return torch.where(valid, boxes, frame.mean())


def _gather_boxes(frame: torch.Tensor, corners: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The boxes of ``frame`` ``(Y, X)`` with top-left ``corners`` ``(n, 2)`` (long) into ``out`` ``(n, S, S)``: two
    indices into the view of all boxes (``unfold``), so no box-sized index tensors and no fresh memory (``index``
    with ``out``; ``index_select`` on such a view takes a slow strided copy); boxes reaching outside the frame are
    redone with the frame's mean there."""
    ny, nx = frame.shape
    size = out.shape[-1]
    if ny < size or nx < size:
        return out.copy_(_gather_clamped(frame, corners, size))
    cy, cx = corners[:, 0].clamp(0, ny - size), corners[:, 1].clamp(0, nx - size)
    torch.ops.aten.index.Tensor_out(frame.unfold(0, size, 1).unfold(1, size, 1), [cy, cx], out=out)
    outside = (cy != corners[:, 0]) | (cx != corners[:, 1])
    if bool(outside.any()):
        out[outside] = _gather_clamped(frame, corners[outside], size)
    return out


def _edge_taper(size: int, width: int, device) -> torch.Tensor:
    """``(size, size)`` ``1 - w``, ``w`` the taper: 1 inside, a raised cosine to 0 over the outer ``width`` pixels of
    each side."""
    i = torch.arange(size, device=device, dtype=torch.float64)
    d = (torch.minimum(i, size - 1 - i) + 0.5) / width  # distance from the edge, in taper widths
    w = 0.5 - 0.5 * torch.cos(math.pi * d.clamp(max=1.0))
    return (1 - w[:, None] * w[None, :]).to(torch.float32)


def _taper_(boxes: torch.Tensor, taper: torch.Tensor) -> torch.Tensor:
    """Blend the edges of ``boxes`` ``(n, S, S)`` into each box's mean, in place (no discontinuity for the FFT to
    ring on): ``w · box + (1 - w) · mean``, one pass (``lerp_`` toward the mean by ``taper = 1 - w``)."""
    return boxes.lerp_(boxes.mean(dim=(-2, -1), keepdim=True), taper)


def _frame_factors(band: _Band, residual: torch.Tensor, dose) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis factors ``(G, N, R)``, ``(G, N, C)`` complex64 of ``G`` frames whose outer products are each particle's
    phase ramp (moving it by ``residual`` ``(G, N, 2)`` px, float32, ``fourier_shift``'s sign) times the frame's
    separable dose filter ``dose = (ay (G, R), ax (G, C))`` (None: no weighting). For a group of frames at once:
    small operations cost their threads' start-up (much more so on a busy machine) more than their work."""
    out = []
    for a, f in enumerate((band.fy, band.fx)):
        phase = residual[..., a, None] * (-2 * math.pi * f).to(torch.float32)
        amplitude = torch.ones(1, 1, 1, device=f.device) if dose is None else dose[a][:, None, :].to(torch.float32)
        out.append(torch.polar(amplitude.expand_as(phase), phase))
    return out[0], out[1]


def _add_spectra(acc: torch.Tensor, boxes: torch.Tensor, band: _Band, fy: torch.Tensor, fx: torch.Tensor) -> None:
    """``acc += band(rfft2(boxes)) · (fy ⊗ fx)`` for ``boxes`` ``(n, S, S)``, factors ``(n, R)``, ``(n, C)``."""
    spec = torch.fft.rfft2(boxes)
    for rows, at in _band_blocks(band, spec.shape[1]):
        acc[:, rows].addcmul_(spec[:, at, : band.cols].mul_(fx[:, None, :]), fy[:, rows, None])


def _batches(n: int, box_in: int) -> tuple[int, int]:
    """Particles per gather batch and per FFT call (a batch is whole FFT calls)."""
    batch = max(1, _BOX_ELEMENTS // (box_in * box_in))
    per_fft = min(batch, max(1, _FFT_BYTES // (box_in * (box_in // 2 + 1) * 8)))
    return max(1, min(n, batch - batch % per_fft)), per_fft


def _add_frame(acc: torch.Tensor, frame: torch.Tensor, corners: torch.Tensor, factors, band: _Band,
               taper: torch.Tensor, buffer: torch.Tensor, per_fft: int) -> None:
    """Add one frame's boxes of all particles (top-left ``corners`` ``(N, 2)``) to ``acc`` ``(N, R, C)``, with the
    frame's per-axis factors ``(fy (N, R), fx (N, C))``; ``buffer`` ``(batch, S, S)`` holds the boxes."""
    n, batch = len(corners), len(buffer)
    for b in range(0, n, batch):
        stop = min(n, b + batch)
        boxes = _taper_(_gather_boxes(frame, corners[b:stop], buffer[: stop - b]), taper)
        for c in range(b, stop, per_fft):
            part = slice(c, min(stop, c + per_fft))
            _add_spectra(acc[part], boxes[c - b : part.stop - b], band, factors[0][part], factors[1][part])


def _accumulate(frames, positions: np.ndarray, used: np.ndarray, geo: _Geometry, dose, n_halves: int, device,
                tick: Callable[[], None]) -> torch.Tensor:
    """Dose-weighted sums over the used frames of every particle's re-centred box, at the output sampling:
    complex ``(H, N, Bp, Bp//2+1)`` (H = 2: even, odd frames; else 1).

    Only the band of the input box's spectrum that reaches the output is kept after the FFT: the shift and the dose
    filter are diagonal in Fourier space, so they commute with the crop, and both are separable (per-axis factors),
    except for the dose normalisation, which is the same for every frame and applied once to the sums."""
    n = positions.shape[1]
    bi = geo.box_in
    band = _band(geo, device)
    acc = torch.zeros(n_halves, n, len(band.rows), band.cols, dtype=torch.complex64, device=device)
    pos = torch.as_tensor(positions, dtype=torch.float64, device=device)
    nearest = torch.round(pos)
    corners = (nearest - bi // 2).long()  # the nearest pixel lands on box pixel Bi // 2
    residual = (nearest - pos).to(torch.float32)  # moves the particle from there onto the exact centre
    parity = (used - used[0]) % 2  # as the average's halves: the first used frame is even
    row = {int(f): i for i, f in enumerate(used)}
    batch, per_fft = _batches(n, bi)
    taper = _edge_taper(bi, geo.taper, device)
    buffer = torch.empty(batch, bi, bi, device=device)  # reused: fresh memory costs page faults
    if dose is not None:
        dose = (dose[0][:, band.rows], dose[1][:, : band.cols])
    group = max(1, _FACTOR_BYTES // (n * (len(band.rows) + band.cols) * 8 + 1))  # frames per _frame_factors call
    for idx, chunk in _frame_chunks(frames, list(used), _chunk_size(_frames_shape(frames)[1:]), device):
        for j, f in enumerate(idx):
            i = row[int(f)]
            if i % group == 0:  # frames come in order
                g = slice(i, i + group)
                factors = _frame_factors(band, residual[g], None if dose is None else (dose[0][g], dose[1][g]))
            half = int(parity[i]) if n_halves == 2 else 0
            _add_frame(acc[half], chunk[j], corners[i], (factors[0][i % group], factors[1][i % group]), band, taper,
                       buffer, per_fft)
            tick()
    if dose is not None:
        acc *= (len(used) / (dose[0].T @ dose[1])).to(torch.float32)  # the weights at each frequency sum to F
    return _to_output(acc, band, geo)


@dataclass(frozen=True)
class _Background:
    """RELION's background of a ``B`` px box (pixels farther than the radius from pixel ``B // 2``) and the
    least-squares plane ``a + b y + c x`` over it: ``mask`` ``(B, B)``, ``basis`` ``(n_bg, 3)``, ``pinv`` ``(3, n_bg)``
    float64 (``y``, ``x`` px from pixel ``B // 2``)."""

    mask: torch.Tensor
    basis: torch.Tensor
    pinv: torch.Tensor


@functools.lru_cache(maxsize=8)
def _background(box: int, radius: float, device: torch.device) -> _Background:
    r = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    mask = (r[:, None] ** 2 + r[None, :] ** 2) > radius**2
    if int(mask.sum()) < 8:
        raise ValueError(f"no background outside a {2 * radius:.1f} px circle in a {box} px box: "
                         "make the box larger or the diameter smaller")
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    basis = torch.stack([torch.ones_like(yy), yy, xx], -1)[mask]  # (n_bg, 3)
    return _Background(mask, basis, torch.linalg.pinv(basis))


def _background_fit(images: torch.Tensor, bg: _Background, ramp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of ``images`` ``(..., B, B)``: the background's plane (``ramp``) plus mean, ``(..., 3)`` float64
    coefficients of ``1, y, x``, and the population std of the background about it (linear in the images: the
    halves' fits add up to the full one's)."""
    values = images[..., bg.mask].to(torch.float64).reshape(-1, len(bg.basis))  # (M, n_bg)
    coef = values @ bg.pinv.T if ramp else values.new_zeros(len(values), 3)
    residual = torch.addmm(values, coef, bg.basis.T, alpha=-1) if ramp else values
    std, mean = torch.std_mean(residual, -1, correction=0)
    coef[:, 0] += mean
    return coef.reshape(*images.shape[:-2], 3), std.reshape(images.shape[:-2])


def _minus_plane(images: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(images - (a + b y + c x)) · scale``, ``images`` ``(..., B, B)``, ``coef`` ``(..., 3)``, ``scale`` ``(...)``:
    the plane is the rank-2 product ``[a + b y, 1] @ [1, c x]``, so one ``baddbmm`` and one in-place multiply."""
    box = images.shape[-1]
    r = torch.arange(box, device=images.device, dtype=torch.float64) - box // 2
    c = coef.reshape(-1, 3)
    rows = torch.stack([c[:, :1] + c[:, 1:2] * r, torch.ones_like(c[:, :1] * r)], -1)  # (M, B, 2)
    cols = torch.stack([torch.ones_like(c[:, 2:] * r), c[:, 2:] * r], -2)  # (M, 2, B)
    out = torch.baddbmm(images.reshape(-1, box, box), rows.to(images.dtype), cols.to(images.dtype), alpha=-1)
    return out.mul_(scale.reshape(-1, 1, 1).to(images.dtype)).reshape(images.shape)


def normalise_particles(images: torch.Tensor, radius: float, *, invert: bool = True, ramp: bool = True,
                        halves: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RELION's particle normalisation of ``images`` ``(N, B, B)``: subtract a background plane (``ramp``), bring
    the background (farther than ``radius`` px from pixel ``B // 2``) to mean 0 and population std 1, invert.

    halves: ``(2, N, B, B)`` summing to ``images``; they get their own background plane and mean but the full
    images' scale, so the results still sum to the normalised images. Returns ``(images, halves or None)``.
    """
    bg = _background(images.shape[-1], float(radius), images.device)
    coef, std = _background_fit(images, bg, ramp)
    scale = (-1.0 if invert else 1.0) / std.clamp_min(1e-12)
    if halves is not None:
        halves = _minus_plane(halves, _background_fit(halves, bg, ramp)[0], scale.expand(halves.shape[:-2]))
    return _minus_plane(images, coef, scale), halves


def _finish(acc: torch.Tensor, geo: _Geometry, signs: torch.Tensor | None, s: ExportSettings, radius: float):
    """Frame sums (rfft, padded) ``(H, n, Bp, Bp//2+1)`` -> ``(start, images (k, B, B), halves (2, k, B, B) or
    None)`` in real space for consecutive chunks of particles (each independent of the others; kept below
    ``_FFT_BYTES`` for the same reason)."""
    bp = geo.box_pad
    step = max(1, _FINISH_BYTES // (acc.shape[0] * bp * bp * 4))
    for start in range(0, acc.shape[1], step):
        part = slice(start, start + step)
        yield start, *_finish_part(acc[:, part], geo, None if signs is None else signs[part], s, radius)


def _finish_part(acc: torch.Tensor, geo: _Geometry, signs: torch.Tensor | None, s: ExportSettings, radius: float):
    if signs is not None:
        acc = acc * signs
    bp, bi = geo.box_pad, geo.box_in
    start = bp // 2 - geo.box // 2  # the centre pixel Bp // 2 becomes B // 2
    boxes = torch.fft.irfft2(acc, s=(bp, bp))[..., start : start + geo.box, start : start + geo.box]
    images, halves = (boxes.sum(0), boxes) if boxes.shape[0] == 2 else (boxes[0], None)
    if s.normalize:  # the scale below cancels
        return normalise_particles(images, radius, invert=s.invert, ramp=s.subtract_ramp, halves=halves)
    k = (-1.0 if s.invert else 1.0) * bp * bp / (bi * bi)  # mean-preserving, as fourier_crop
    return images * k, None if halves is None else halves * k


def _inside(positions: np.ndarray, shape: Sequence[int], half: float) -> np.ndarray:
    """``(N,)``: the box (half-width ``half`` input px) lies inside the frame in every frame."""
    lo = (positions >= half - 0.5).all(axis=(0, 2))
    hi = (positions <= np.asarray(shape, dtype=np.float64) - 0.5 - half).all(axis=(0, 2))
    return lo & hi


def _passes(n: int, geo: _Geometry, n_halves: int) -> list[slice]:
    """Particle ranges whose frame sums fit in ``_ACCUMULATOR_BYTES`` (each range reads the frames once)."""
    rows, cols = _band_shape(geo)
    per = n_halves * max(rows * cols, geo.box_pad * (geo.box_pad // 2 + 1)) * 8
    step = max(1, _ACCUMULATOR_BYTES // per)
    return [slice(b, min(n, b + step)) for b in range(0, n, step)]


def extract_particles(
    frames,
    yx,
    motion,
    ctf,
    settings: ExportSettings,
    *,
    motion_settings: MotionSettings | None = None,
    pixel_size: float | None = None,
    scores=None,
    device=None,
    progress: Progress | None = None,
) -> ParticleStack:
    """Extract, dose-weight and sum the particles of one movie (see the module notes).

    frames: the movie ``(F, Y, X)`` the motion was fitted to (numpy, torch or ``io.movie.Movie``, read in chunks),
        or one image ``(Y, X)``. yx: ``(N, 2)`` px ``(y, x)`` particle centres in the aligned average (picks).
    motion: ``motion.MotionModel`` (its ``used_frames`` are summed), anything with ``shifts(yx, frames) -> (F', P,
        2)`` px (e.g. ``simulate.MovieTruth``), or None for no motion.
    ctf: ``ctf_fit.CTFFit`` (local defocus at each particle), ``CTFParams`` (one CTF) or None (no CTF columns; no
        phase flipping).
    motion_settings: dose (``exposure_per_frame``, ``pre_exposure``, ``dose_bfactor``) and the frames' pixel size,
        i.e. the settings the average was made with; needed for dose weighting.
    pixel_size: Å/px of the frames (default: ``motion_settings.pixel_size``, else ``motion.pixel_size``).
    scores: ``(N,)`` figures of merit (picking scores) carried to the STAR file.
    progress: ``progress(done, total)`` per frame read; raising ``errors.Cancelled`` from it stops the work.
    Returns a ``ParticleStack`` with ``images`` ``(N, B, B)`` float32 (and ``odd``/``even`` with ``halves``).
    """
    dev = get_device(device)
    n_frames, ny, nx = _frames_shape(frames)
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    s = settings
    ps_in = _input_pixel_size(motion, motion_settings, pixel_size)
    geo = _geometry(s, ps_in)
    used = _used_frames(motion, (n_frames, ny, nx))
    positions = _particle_positions(motion, yx, used)
    table = particle_ctf(ctf, yx, (ny, nx))
    if s.phase_flip and table is None:
        raise ValueError("phase flipping needs a CTF: pass the item's CTF fit")
    dose = _dose_weights(used, n_frames, geo.box_in, ps_in, motion_settings, s.dose_weighting, dev)
    radius = (s.diameter / geo.pixel_size / 2) if s.diameter else 0.375 * s.box_size
    n_halves = 2 if s.halves else 1
    passes = _passes(len(yx), geo, n_halves)
    total, done = max(1, len(passes) * len(used)), 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    images = np.empty((len(yx), s.box_size, s.box_size), np.float32)
    pair = np.empty((2, *images.shape), np.float32) if s.halves else None
    for sl in passes:
        acc = _accumulate(frames, positions[:, sl], used, geo, dose, n_halves, dev, tick)
        signs = _flip_signs(ctf, table.iloc[sl], geo, dev) if s.phase_flip else None
        for start, img, hv in _finish(acc, geo, signs, s, radius):
            at = slice(sl.start + start, sl.start + start + len(img))
            images[at] = img.cpu().numpy()
            if hv is not None:
                pair[:, at] = hv.cpu().numpy()
    half_in = s.box_size * geo.pixel_size / ps_in / 2
    return ParticleStack(
        images=images, yx=yx, pixel_size=geo.pixel_size, micrograph_pixel_size=ps_in, ctf=table,
        scores=None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1),
        even=None if pair is None else pair[0], odd=None if pair is None else pair[1],
        inside=_inside(positions, (ny, nx), half_in), phase_flipped=bool(s.phase_flip), **_optics(ctf),
    )


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def _half_path(path: Path, half: str) -> Path:
    """Where a half stack goes: ``<folder>/odd/<name>`` (Warp's ``particles/odd``, the average's ``odd/``)."""
    return path.parent / half / path.name


def write_particle_stack(path: str | os.PathLike, stack: ParticleStack, micrograph: str | os.PathLike) -> ParticleFile:
    """Write ``stack`` as an MRC image stack (``.mrcs``, float32, the pixel size in the header), atomically, and its
    halves to ``odd/`` and ``even/`` beside it. micrograph: the image the coordinates refer to (the average).
    Returns the ``ParticleFile`` that ``write_particle_star`` lists."""
    path = Path(path)
    if len(stack) == 0:
        raise ValueError(f"{path}: no particles to write (RELION cannot read an empty stack)")
    voltage = stack.voltage
    write_mrc(path, stack.images, pixel_size=stack.pixel_size, voltage=voltage)
    odd = even = None
    if stack.odd is not None and stack.even is not None:
        odd, even = _half_path(path, "odd"), _half_path(path, "even")
        write_mrc(odd, stack.odd, pixel_size=stack.pixel_size, voltage=voltage)
        write_mrc(even, stack.even, pixel_size=stack.pixel_size, voltage=voltage)
    return ParticleFile(stack=stack, path=path, micrograph=micrograph, odd=odd, even=even)


def _star_path(p: str | os.PathLike, root: Path | None) -> str:
    """A path as written into the STAR file: relative to ``root`` (the STAR file's folder), or absolute."""
    p = Path(os.path.abspath(os.fspath(p)))
    return p.as_posix() if root is None else Path(os.path.relpath(p, root)).as_posix()


def _optics_key(st: ParticleStack, name: str | None) -> tuple:
    return (name, round(st.pixel_size, 6), st.box_size, round(st.micrograph_pixel_size, 6), st.voltage, st.cs,
            st.amplitude, st.phase_flipped)


def _optics_table(groups: dict[tuple, int]) -> pd.DataFrame:
    keys = list(groups)
    return pd.DataFrame({
        "rlnOpticsGroup": np.array(list(groups.values()), dtype=np.int64),
        "rlnOpticsGroupName": [k[0] or f"opticsGroup{n}" for k, n in groups.items()],
        "rlnImagePixelSize": [float(k[1]) for k in keys],
        "rlnImageSize": np.array([k[2] for k in keys], dtype=np.int64),
        "rlnImageDimensionality": np.full(len(keys), 2, dtype=np.int64),
        "rlnMicrographPixelSize": [float(k[3]) for k in keys],
        "rlnVoltage": [float(k[4]) for k in keys],
        "rlnSphericalAberration": [float(k[5]) for k in keys],
        "rlnAmplitudeContrast": [float(k[6]) for k in keys],
        "rlnCtfDataArePhaseFlipped": np.array([int(k[7]) for k in keys], dtype=np.int64),
    })


def _particle_rows(f: ParticleFile, group: int, root: Path | None) -> pd.DataFrame:
    st = f.stack
    n = len(st)
    stack_name = _star_path(f.path, root)
    rows = {
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnMicrographName": [_star_path(f.micrograph, root)] * n,
        "rlnCoordinateX": st.yx[:, 1].astype(np.float64),
        "rlnCoordinateY": st.yx[:, 0].astype(np.float64),
    }
    if st.ctf is not None:
        rows.update({"rlnDefocusU": st.ctf["defocus_u"].to_numpy(np.float64),
                     "rlnDefocusV": st.ctf["defocus_v"].to_numpy(np.float64),
                     "rlnDefocusAngle": st.ctf["defocus_angle"].to_numpy(np.float64),
                     "rlnPhaseShift": st.ctf["phase_shift"].to_numpy(np.float64),
                     "rlnCtfMaxResolution": st.ctf["max_resolution"].to_numpy(np.float64)})
    if st.scores is not None:
        rows["rlnAutopickFigureOfMerit"] = st.scores.astype(np.float64)
    rows["rlnOpticsGroup"] = np.full(n, group, dtype=np.int64)
    return pd.DataFrame(rows)


def write_particle_star(
    path: str | os.PathLike,
    files: Sequence[ParticleFile],
    *,
    relative: bool = True,
    optics_group_name: str | None = None,
) -> pd.DataFrame:
    """Write a RELION 3.1+ particle STAR file (``data_optics`` + ``data_particles``) for written stacks, atomically.

    files: ``write_particle_stack`` results, in order. Optics groups are numbered 1.. by first appearance of
    distinct (name, image pixel size, box, micrograph pixel size, voltage, Cs, amplitude contrast, phase flipped).
    relative: paths (``rlnImageName`` ``000001@Particles/name.mrcs``, ``rlnMicrographName``) relative to the STAR
    file's folder (run RELION there, as Warp's ``--relative_output_paths``), else absolute.
    CTF columns (Å, degrees) are written when every stack has a CTF; ``rlnCtfMaxResolution`` only where known;
    ``rlnAutopickFigureOfMerit`` when every stack has scores. Returns the particles table written.
    """
    path = Path(path)
    root = Path(os.path.abspath(path.parent)) if relative else None
    groups: dict[tuple, int] = {}
    for f in files:
        groups.setdefault(_optics_key(f.stack, optics_group_name), len(groups) + 1)
    if not groups:
        raise ValueError("no particle stacks to write")
    tables = [_particle_rows(f, groups[_optics_key(f.stack, optics_group_name)], root) for f in files]
    particles = pd.concat(tables, ignore_index=True, join="inner")  # a column only some stacks have is dropped
    res = particles.get("rlnCtfMaxResolution")
    if res is not None and not np.isfinite(res.to_numpy(np.float64)).all():
        particles = particles.drop(columns="rlnCtfMaxResolution")
    write_star(path, {"optics": _optics_table(groups), "particles": particles})
    return particles
