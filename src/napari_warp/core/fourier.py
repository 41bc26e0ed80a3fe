"""Frequency grids, sub-pixel shifts, Fourier crop/pad/rescale and radial averages, in Warp's conventions.

Layouts and conventions (all pinned by tests against Warp's own outputs):

- Axes are ``(..., y, x)`` (or ``(..., z, y, x)``); transforms are over the trailing spatial axes.
- "rfft layout" is torch's: ``(..., Y, X//2 + 1)``, DC at ``[0, 0]``, not centred. This is also Warp's half-complex
  layout (e.g. ``CTF.GetCTFCoords``).
- Frequencies along full (non-rfft) axes follow **Warp**, not ``torch.fft.fftfreq``: for an even length ``n`` the
  Nyquist sample ``k = n/2`` is taken as **+0.5** cycles/pixel (Warp: ``k < n/2 + 1 ? k : k - n``), whereas
  ``fftfreq`` says −0.5. This matters wherever something odd in frequency is evaluated on the Nyquist row: sub-pixel
  shifts of even-sized images (``shift_shifted_2.5_3.3.mrc`` only matches with +0.5) and astigmatic CTFs
  (``ctf_reference.mrc`` row 128 only matches with +0.5).
- ``fourier_shift`` moves content toward higher indices: a delta at ``[0, 0]`` shifted by ``(dy, dx) = (3, 2)``
  lands at ``[3, 2]`` (phase ramp ``exp(-2πi (fy·dy + fx·dx))``). Warp's ``ShiftSlices(new float3(x, y, 0))`` equals
  ``fourier_shift(img, (y, x))``.
- Crop/pad/rescale work on the rfft directly and preserve the mean value; pixel 0 stays fixed (for even sizes
  pixel ``N//2`` maps to ``N'//2`` too, as in torch-fourier-rescale). An even-size Nyquist sample stands for both
  ±N/2: padding splits it in halves, cropping sums both sides, so ``crop(pad(x)) == x`` exactly and a Nyquist cosine
  is upsampled to the exact cosine. torch-fourier-rescale keeps only the −N/2 side, which breaks both (0.02 error on
  a random 32×48 round trip), so it is not used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "fftfreq_warp",
    "rfft_frequencies",
    "fft_frequencies",
    "frequency_magnitude",
    "fourier_shift",
    "fourier_shift_rfft",
    "fourier_crop",
    "fourier_pad",
    "fourier_rescale",
    "fourier_resize_rfft",
    "rescaled_shape",
    "radial_average",
    "tile_power_spectrum",
]


def fftfreq_warp(n: int, d: float = 1.0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample frequencies of a full FFT axis of length ``n`` in Warp's convention, ``(n,)`` in cycles per ``d``.

    Like ``torch.fft.fftfreq`` except that, for even ``n``, index ``n/2`` is +0.5/d (Warp) instead of −0.5/d.
    """
    k = torch.arange(n, device=device, dtype=torch.float64)
    k = torch.where(k <= n // 2, k, k - n)
    return (k / (n * d)).to(dtype)


def _axis_frequencies(shape: Sequence[int], rfft: bool, device, dtype) -> list[torch.Tensor]:
    """Per-axis frequency vectors (cycles/pixel) of a (r)fft grid over ``shape``; Warp's +0.5 Nyquist."""
    axes = [fftfreq_warp(n, 1.0, device, dtype) for n in shape[:-1]]
    last = shape[-1]
    if rfft:
        axes.append(torch.arange(last // 2 + 1, device=device, dtype=torch.float64).div(last).to(dtype))
    else:
        axes.append(fftfreq_warp(last, 1.0, device, dtype))
    return axes


def _freq_grid(shape: Sequence[int], rfft: bool, pixel_size: float, device, dtype) -> torch.Tensor:
    """``(*shape', ndim)`` grid of frequencies (1/Å) over ``shape``; last axis halved when ``rfft``."""
    axes = [f / pixel_size for f in _axis_frequencies(shape, rfft, device, dtype)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def rfft_frequencies(
    shape: Sequence[int], pixel_size: float = 1.0, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Frequencies of an rfft of an image of ``shape`` ``(Y, X)`` (or ``(Z, Y, X)``).

    Returns ``(Y, X//2+1, 2)`` of ``(fy, fx)`` in 1/Å (cycles/pixel when ``pixel_size`` is 1); Warp's +0.5 Nyquist.
    """
    return _freq_grid(tuple(shape), True, pixel_size, device, dtype)


def fft_frequencies(
    shape: Sequence[int], pixel_size: float = 1.0, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Frequencies of a full (non-centred) FFT of ``shape``: ``(Y, X, 2)`` of ``(fy, fx)`` in 1/Å."""
    return _freq_grid(tuple(shape), False, pixel_size, device, dtype)


def frequency_magnitude(
    shape: Sequence[int], pixel_size: float = 1.0, rfft: bool = True, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``|f|`` in 1/Å on the rfft ``(Y, X//2+1)`` or full ``(Y, X)`` grid of an image of ``shape``."""
    return torch.linalg.vector_norm(_freq_grid(tuple(shape), rfft, pixel_size, device, dtype), dim=-1)


def _phase_ramp(shifts: torch.Tensor, image_shape: Sequence[int]) -> torch.Tensor:
    """``exp(-2πi f·s)`` on the rfft grid: real shifts ``(..., ndim)`` -> complex ``(..., *rfft_shape)``.

    Built as an outer product of per-axis ramps, so sin/cos run on ``Y + X`` samples per shift, not ``Y·X``.
    """
    ndim = len(image_shape)
    ramp = None
    for a, f in enumerate(_axis_frequencies(tuple(image_shape), True, shifts.device, shifts.dtype)):
        phase = shifts[..., a, None] * f * (-2 * math.pi)  # (..., n_a)
        axis_ramp = torch.complex(torch.cos(phase), torch.sin(phase))  # differentiable in shifts
        axis_ramp = axis_ramp.reshape(*axis_ramp.shape[:-1], *([1] * a), -1, *([1] * (ndim - a - 1)))
        ramp = axis_ramp if ramp is None else ramp * axis_ramp
    return ramp


def fourier_shift_rfft(spectra: torch.Tensor, shifts, image_shape: Sequence[int]) -> torch.Tensor:
    """Shift in Fourier space: multiply rfft ``spectra`` by the phase ramp of real-space ``shifts``.

    spectra: complex ``(..., Y, X//2+1)`` (or ``(..., Z, Y, X//2+1)``), rfft of images of ``image_shape``.
    shifts: ``(..., ndim)`` pixels in ``(dy, dx)`` (``(dz, dy, dx)``) order, broadcast against the batch axes.
    Returns complex ``(..., Y, X//2+1)``: the spectra of the images with content moved toward higher indices.
    """
    shifts = torch.as_tensor(shifts, device=spectra.device)
    if shifts.shape[-1] != len(image_shape):
        raise ValueError(f"shifts have {shifts.shape[-1]} components for a {len(image_shape)}-D image shape")
    real = spectra.real.dtype
    if shifts.is_floating_point():
        real = torch.promote_types(real, shifts.dtype)
    ramp = _phase_ramp(shifts.to(real), image_shape)
    return spectra * ramp


def fourier_shift(images: torch.Tensor, shifts) -> torch.Tensor:
    """Sub-pixel circular shift of real images by a Fourier phase ramp (Warp's ``ShiftSlices``).

    images: ``(..., Y, X)`` (or ``(..., Z, Y, X)`` with 3-component shifts).
    shifts: ``(..., 2)`` pixels as ``(dy, dx)``; positive moves content toward higher indices, so a delta at
        ``[0, 0]`` ends at ``[dy, dx]``. Batch axes broadcast. Differentiable in images and shifts.
    Returns ``(..., Y, X)`` real, same dtype as images.
    """
    shifts = torch.as_tensor(shifts, device=images.device)
    ndim = shifts.shape[-1]
    shape = tuple(images.shape[-ndim:])
    dims = tuple(range(-ndim, 0))
    spectra = torch.fft.rfftn(images, dim=dims)
    shifted = fourier_shift_rfft(spectra, shifts.to(images.dtype), shape)
    return torch.fft.irfftn(shifted, s=shape, dim=dims).to(images.dtype)


def _flip_full_axes(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Index ``k -> -k mod n`` along each of ``dims`` (the Hermitian partner's position)."""
    return torch.roll(torch.flip(x, dims=tuple(dims)), shifts=(1,) * len(dims), dims=tuple(dims))


def _resize_full_axis(x: torch.Tensor, dim: int, n: int, m: int) -> torch.Tensor:
    """Crop/pad one full FFT axis from ``n`` to ``m`` samples, keeping Warp frequency indices.

    An even-length Nyquist sample stands for both ±n/2: padding splits it in halves between +n/2 and -n/2;
    cropping to even ``m`` sums the +m/2 and -m/2 samples into the new Nyquist. So pad -> crop is exact.
    """
    if m == n:
        return x
    k_out = fftfreq_warp(m, device=x.device, dtype=torch.float64).mul(m).round().long()
    if m < n:
        out = x.index_select(dim, k_out % n)
        if m % 2 == 0:
            nyq = [slice(None)] * x.ndim
            nyq[dim] = slice(m // 2, m // 2 + 1)
            out[tuple(nyq)] = out[tuple(nyq)] + x.narrow(dim, n - m // 2, 1)
        return out
    k_in = fftfreq_warp(n, device=x.device, dtype=torch.float64).mul(n).round().long()
    shape = list(x.shape)
    shape[dim] = m
    out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    if n % 2 == 0:
        half = x.narrow(dim, n // 2, 1) / 2
        x = torch.cat([x.narrow(dim, 0, n // 2), half, x.narrow(dim, n // 2 + 1, n - n // 2 - 1)], dim=dim)
        out = out.index_copy(dim, k_in % m, x)
        idx = torch.tensor([m - n // 2], device=x.device)
        return out.index_copy(dim, idx, half)
    return out.index_copy(dim, k_in % m, x)


def _resize_rfft_axis(x: torch.Tensor, n: int, m: int, full_dims: Sequence[int]) -> torch.Tensor:
    """Crop/pad the last (rfft) axis from image length ``n`` to ``m`` with the same Nyquist rule.

    ``full_dims``: the (negative) full-FFT axes of ``x``, over which the Hermitian partner is found.
    """
    if m == n:
        return x
    if m < n:
        out = x[..., : m // 2 + 1].clone()
        if m % 2 == 0:  # the implicit -m/2 column is the conjugate of the +m/2 column at negated full indices
            col = x[..., m // 2]
            out[..., m // 2] = col + _flip_full_axes(col, [d + 1 for d in full_dims]).conj()  # col lost the last axis
        return out
    out = torch.nn.functional.pad(x, (0, m // 2 + 1 - x.shape[-1]))
    if n % 2 == 0:  # the stored +n/2 column keeps half; its implicit conjugate partner carries the other half
        out[..., n // 2] = out[..., n // 2] / 2
    return out


def fourier_resize_rfft(spectra: torch.Tensor, image_shape: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Crop and/or pad rfft ``spectra`` ``(..., *rfft(image_shape))`` to ``(..., *rfft(shape))`` (no rescaling)."""
    ndim = len(image_shape)
    full_dims = list(range(-ndim, -1))
    out = _resize_rfft_axis(spectra, image_shape[-1], shape[-1], full_dims)
    for d, n, m in zip(full_dims, image_shape[:-1], shape[:-1]):
        out = _resize_full_axis(out, out.ndim + d, n, m)
    return out


def _rescale_to_shape(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Fourier crop or pad the trailing ``len(shape)`` axes of real ``images`` to ``shape``; mean preserved."""
    shape = tuple(int(s) for s in shape)
    old = tuple(images.shape[-len(shape):])
    if old == shape:
        return images
    dims = tuple(range(-len(shape), 0))
    spectra = fourier_resize_rfft(torch.fft.rfftn(images, dim=dims), old, shape)
    out = torch.fft.irfftn(spectra, s=shape, dim=dims) * (math.prod(shape) / math.prod(old))
    return out.to(images.dtype)


def fourier_crop(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Downsample by cropping the Fourier transform: ``(..., Y, X) -> (..., Y', X')`` with ``Y' <= Y, X' <= X``.

    Band-limits to the new Nyquist; keeps pixel ``N//2`` fixed and preserves the mean value.
    """
    if any(s > n for s, n in zip(shape, images.shape[-len(shape):])):
        raise ValueError(f"fourier_crop target {tuple(shape)} is larger than {tuple(images.shape[-len(shape):])}")
    return _rescale_to_shape(images, shape)


def fourier_pad(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Upsample (sinc-interpolate) by zero-padding the Fourier transform: ``(..., Y, X) -> (..., Y', X')``.

    ``fourier_crop(fourier_pad(x, s), x.shape[-2:])`` returns ``x`` exactly (to float precision).
    """
    if any(s < n for s, n in zip(shape, images.shape[-len(shape):])):
        raise ValueError(f"fourier_pad target {tuple(shape)} is smaller than {tuple(images.shape[-len(shape):])}")
    return _rescale_to_shape(images, shape)


def rescaled_shape(shape: Sequence[int], pixel_size_in: float, pixel_size_out: float) -> tuple[int, ...]:
    """Shape after rescaling ``pixel_size_in -> pixel_size_out`` (Å): each axis rounded to the nearest even size."""
    ratio = pixel_size_in / pixel_size_out
    return tuple(max(2, 2 * int(round(n * ratio / 2))) for n in shape)


def fourier_rescale(images: torch.Tensor, pixel_size_in: float, pixel_size_out: float, ndim: int = 2):
    """Resample ``(..., Y, X)`` images from ``pixel_size_in`` to ~``pixel_size_out`` (Å) by Fourier crop/pad.

    The output shape is ``rescaled_shape`` (even sizes), so the pixel size actually reached is
    ``pixel_size_in * X / X'``; that x-axis value is returned (the y axis differs by less than 1/Y' relative).
    Returns ``(images (..., Y', X'), actual_pixel_size_out)``.
    """
    shape = tuple(images.shape[-ndim:])
    new = rescaled_shape(shape, pixel_size_in, pixel_size_out)
    return _rescale_to_shape(images, new), float(pixel_size_in) * shape[-1] / new[-1]


def radial_average(
    image: torch.Tensor,
    n_bins: int | None = None,
    rfft: bool = True,
    image_shape: Sequence[int] | None = None,
    centered: bool = False,
) -> torch.Tensor:
    """Rotational average of 2D spectra (or any function on a frequency grid), batched.

    image: ``(..., Y, X//2+1)`` rfft layout (default; ``image_shape`` ``(Y, X)`` defaults to even ``X``), or
        ``(..., Y, X)`` full layout with ``rfft=False`` (DC at ``[0, 0]``, or at ``[Y//2, X//2]`` if ``centered``).
    n_bins: number of shells, default ``min(Y, X)//2``. Shell ``i`` collects pixels whose frequency (cycles/pixel)
        rounds to ``i / (2 n_bins)``, i.e. Warp's 1D sampling (0 .. just below Nyquist); corners beyond are dropped.
    Returns ``(..., n_bins)`` means (0 for an empty shell).
    """
    if rfft:
        y, xr = image.shape[-2:]
        shape = tuple(image_shape) if image_shape is not None else (y, 2 * (xr - 1))
    else:
        shape = tuple(image.shape[-2:])
    if n_bins is None:
        n_bins = min(shape) // 2
    r = frequency_magnitude(shape, rfft=rfft, device=image.device, dtype=torch.float64)
    if centered and not rfft:
        r = torch.fft.fftshift(r, dim=(-2, -1))
    idx = torch.round(r * 2 * n_bins).long().flatten()
    keep = idx < n_bins
    idx = torch.where(keep, idx, torch.full_like(idx, n_bins))  # overflow bin, dropped below
    flat = image.reshape(-1, idx.numel())
    sums = torch.zeros(flat.shape[0], n_bins + 1, dtype=image.dtype, device=image.device)
    sums = sums.index_add(1, idx, flat)
    counts = torch.bincount(idx, minlength=n_bins + 1).to(sums.real.dtype if sums.is_complex() else sums.dtype)
    out = sums[:, :n_bins] / counts[:n_bins].clamp(min=1)
    return out.reshape(*image.shape[:-2], n_bins)


def tile_power_spectrum(
    image: torch.Tensor, box: int, rfft: bool = True, stride: int | None = None
) -> torch.Tensor:
    """Mean power spectrum of ``box``-sized tiles of ``image`` (periodogram averaging, as for CTF fitting).

    image: ``(..., Y, X)``; tiles start every ``stride`` pixels (default ``box // 2``: 50% overlap), each has its
    mean removed (so DC carries no tile-offset leakage), and ``|FFT|² / box²`` is averaged over tiles.
    Returns ``(..., box, box//2+1)`` (rfft layout) or ``(..., box, box)`` (full, non-centred) with ``rfft=False``.
    """
    stride = stride or max(1, box // 2)
    y, x = image.shape[-2:]
    if box > min(y, x):
        raise ValueError(f"box {box} is larger than the image {(y, x)}")
    lead = image.shape[:-2]
    img = image.reshape(-1, y, x)
    total = None
    count = 0
    for y0 in range(0, y - box + 1, stride):  # one row of tiles at a time bounds memory
        row = img[:, y0 : y0 + box].unfold(-1, box, stride)  # (B, box, n_tiles, box)
        row = row.permute(0, 2, 1, 3)
        row = row - row.mean(dim=(-2, -1), keepdim=True)
        spec = torch.fft.rfft2(row) if rfft else torch.fft.fft2(row)
        power = (spec.real**2 + spec.imag**2).sum(1)
        total = power if total is None else total + power
        count += row.shape[1]
    return (total / (count * box * box)).reshape(*lead, *total.shape[-2:])
