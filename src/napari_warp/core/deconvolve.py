"""Warp's Wiener-like CTF deconvolution filter (Tegunov & Cramer 2019, Methods, "Deconvolution"), global and local.

The filter, for every rfft sample at ``r = |frequency|`` in cycles/pixel (Warp's grid, ``core.fourier``):

    CTF(r, θ)  Warp's 2D CTF at r / pixel_size (1/Å) and θ = atan2(fy, fx): astigmatism, amplitude contrast and
               phase shift included; no envelope (the B-factor is ignored)
    H(r)       = 1 − (cos(min(1, 2r / highpass_nyquist) · π) · 0.5 + 0.5)
               raised-cosine high-pass: 0 at DC, 1 from ``highpass_nyquist`` × Nyquist (r = highpass_nyquist / 2) on
    SSNR(r)    = exp(−r · 2 · F · 100 / pixel_size) · 10^(3 S) · H(r)
    W(r, θ)    = CTF / (CTF² + 1 / max(1e-15, SSNR))
    output     = IFFT(FFT(image − mean) · W)

The paper writes ``SSNR_f = exp(−100 F f) · 10^(3S) · H_f``; the ``f`` there is ``2 r / pixel_size`` (twice the
spatial frequency in 1/Å), as in Warp's own GPU kernel (``DeconvolveCTF``), so that the defaults strength S = 1,
fall-off F = 1 and ``highpass_nyquist`` = 0.02 reproduce Warp's output. Because H(0) = 0 the DC term is removed (the
output is mean-free); we also subtract the mean before the FFT so a large offset cannot leak through float rounding.

``wiener_filter`` is dimension-generic (any rfft grid, 2D or 3D) so tomogram deconvolution can reuse it.

Local CTF: with a ``defocus_map`` (the fitted local defocus per pixel, Å), the image is deconvolved once per
defocus *level* — K levels evenly spanning the map's range, at most ``LEVEL_SPACING`` Å apart and at most
``MAX_LEVELS`` of them — in batches (one forward FFT, K filters, K inverse FFTs, chunked to bound memory), and each
output pixel is the linear interpolation between the two levels bracketing its own defocus. The interpolation is
done as a sum over levels with hat-function weights, so chunking the levels changes nothing. A map that is constant
to within ``CONSTANT_MAP_TOLERANCE`` Å uses one global filter at the map's mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .ctf import CTFParams, ctf_2d
from .device import get_device
from .fourier import frequency_magnitude

__all__ = [
    "CONSTANT_MAP_TOLERANCE",
    "LEVEL_SPACING",
    "MAX_LEVELS",
    "adhoc_ssnr",
    "deconvolution_filter",
    "deconvolve",
    "defocus_levels",
    "highpass_raised_cosine",
    "wiener_filter",
]

LEVEL_SPACING = 100.0  # Å: neighbouring defocus levels of a local deconvolution differ by at most this ...
MAX_LEVELS = 16  # ... unless the map's range needs more levels than this; then they are spread evenly.
CONSTANT_MAP_TOLERANCE = 5.0  # Å: a defocus map with a smaller range is treated as constant (one global filter)
_CHUNK_ELEMENTS = 2**25  # real samples per batch of inverse FFTs (~128 MB float32 + its spectrum)


def highpass_raised_cosine(r: torch.Tensor, highpass_nyquist: float = 0.02) -> torch.Tensor:
    """Warp's raised-cosine high-pass ``H``: 0 at DC rising to 1 at ``highpass_nyquist`` × Nyquist.

    r: ``(...)`` frequency magnitudes in cycles/pixel (Nyquist = 0.5). ``highpass_nyquist <= 0`` disables it (H = 1).
    Returns ``(...)``, same dtype as r.
    """
    if highpass_nyquist <= 0:
        return torch.ones_like(r)
    x = torch.clamp(2.0 * r / highpass_nyquist, max=1.0)
    return 1.0 - (torch.cos(x * math.pi) * 0.5 + 0.5)


def adhoc_ssnr(
    r: torch.Tensor,
    pixel_size: float,
    strength: float = 1.0,
    falloff: float = 1.0,
    highpass_nyquist: float = 0.02,
) -> torch.Tensor:
    """Warp's assumed SSNR ``exp(−r·2·falloff·100/pixel_size) · 10^(3·strength) · H(r)``.

    r: ``(...)`` cycles/pixel; pixel_size: Å/pixel. Returns ``(...)``.
    """
    decay = torch.exp(r * (-2.0 * falloff * 100.0 / pixel_size))
    return decay * (10.0 ** (3.0 * strength)) * highpass_raised_cosine(r, highpass_nyquist)


def wiener_filter(
    ctf: torch.Tensor,
    r: torch.Tensor,
    pixel_size: float,
    strength: float = 1.0,
    falloff: float = 1.0,
    highpass_nyquist: float = 0.02,
) -> torch.Tensor:
    """Warp's Wiener-like deconvolution filter ``CTF / (CTF² + 1/max(1e-15, SSNR))``.

    ctf: ``(...)`` CTF values on any frequency grid (2D rfft ``(Y, X//2+1)``, 3D ``(Z, Y, X//2+1)``, a 1D profile).
    r: same shape as ctf (or broadcastable to it), frequency magnitudes in cycles/pixel.
    pixel_size: Å/pixel (a float, or a tensor broadcastable against ctf, e.g. ``(K, 1, 1)`` for a batch of grids).
    strength S, falloff F and highpass_nyquist as in the module docstring.
    Returns ``(...)`` real filter values; 0 at DC (where H = 0).
    """
    ssnr = adhoc_ssnr(r, pixel_size, strength, falloff, highpass_nyquist)
    return ctf / (ctf * ctf + 1.0 / torch.clamp(ssnr, min=1e-15))


def deconvolution_filter(
    ctf: CTFParams | list[CTFParams],
    shape: tuple[int, int],
    strength: float = 1.0,
    falloff: float = 1.0,
    highpass_nyquist: float = 0.02,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The 2D deconvolution filter(s) for an image of ``shape`` ``(Y, X)`` on its rfft grid.

    ctf: one CTFParams (its pixel_size sets the frequency scale; bfactor is ignored) or a list of K.
    Returns ``(Y, X//2+1)``, or ``(K, Y, X//2+1)`` for a list.
    """
    single = isinstance(ctf, CTFParams)
    plist = [ctf] if single else list(ctf)
    values = ctf_2d([p.with_(bfactor=0.0) for p in plist], shape, rfft=True, device=device, dtype=dtype)
    r = frequency_magnitude(shape, 1.0, rfft=True, device=device, dtype=dtype)
    pixel_size = torch.tensor([p.pixel_size for p in plist], device=device, dtype=dtype)[:, None, None]
    out = wiener_filter(values, r, pixel_size, strength, falloff, highpass_nyquist)
    return out[0] if single else out


def defocus_levels(
    dmin: float, dmax: float, spacing: float = LEVEL_SPACING, max_levels: int = MAX_LEVELS
) -> np.ndarray:
    """Evenly spaced defocus levels (Å) from ``dmin`` to ``dmax``, at most ``spacing`` apart, 2..max_levels of them.

    Returns ``(K,)`` float64, first ``dmin`` and last ``dmax``.
    """
    n = math.ceil((dmax - dmin) / spacing - 1e-9) + 1
    return np.linspace(dmin, dmax, int(min(max(n, 2), max(max_levels, 2))))


def _as_image_tensor(image, device) -> tuple[torch.Tensor, bool]:
    """Image -> float tensor on the compute device; returns (tensor, came_as_torch)."""
    if isinstance(image, torch.Tensor):
        dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
        dev = torch.device(device) if device is not None else image.device
        return image.to(device=dev, dtype=dtype), True
    return torch.as_tensor(np.asarray(image, dtype=np.float32), device=get_device(device)), False


def _defocus_map_tensor(defocus_map, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """Defocus map (Å) -> ``(Y, X)`` tensor on ``like``'s device; other 2D shapes are resampled bilinearly.

    A coarser map (e.g. the CTF fit's grid evaluated at its own resolution) is stretched over the image with pixel
    centres aligned (``align_corners=False``).
    """
    if isinstance(defocus_map, torch.Tensor):
        d = defocus_map.to(device=like.device, dtype=torch.float64)
    else:
        d = torch.tensor(np.asarray(defocus_map, dtype=np.float64), device=like.device)  # copies read-only views
    if d.ndim != 2:
        raise ValueError(f"defocus_map must be 2D (Y, X), got shape {tuple(d.shape)}")
    if tuple(d.shape) != tuple(shape):
        d = torch.nn.functional.interpolate(d[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
    return d


def _apply_filters(spectrum: torch.Tensor, filters: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``irfft2(spectrum · filters)``: spectrum ``(Y, X//2+1)``, filters ``(..., Y, X//2+1)`` -> ``(..., Y, X)``."""
    return torch.fft.irfft2(spectrum * filters, s=shape)


def _deconvolve_local(
    spectrum: torch.Tensor,
    shape: tuple[int, int],
    ctf: CTFParams,
    dmap: torch.Tensor,
    levels: np.ndarray,
    kwargs: dict,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Sum over defocus levels of (hat-function weight per pixel) × (image deconvolved at that level).

    spectrum: ``(Y, X//2+1)`` complex; dmap: ``(Y, X)`` Å; levels: ``(K,)`` Å, evenly spaced. Returns ``(Y, X)``.
    The weights of the two levels bracketing a pixel's defocus are ``1 − t`` and ``t`` (linear interpolation).
    """
    k = len(levels)
    t = ((dmap - levels[0]) / (levels[-1] - levels[0]) * (k - 1)).clamp(0, k - 1)  # (Y, X) fractional level
    out = torch.zeros(shape, device=spectrum.device, dtype=dtype)
    chunk = max(1, _CHUNK_ELEMENTS // (shape[0] * shape[1]))
    for start in range(0, k, chunk):
        idx = range(start, min(start + chunk, k))
        params = [ctf.with_(defocus=float(levels[i])) for i in idx]
        filters = deconvolution_filter(params, shape, device=spectrum.device, dtype=dtype, **kwargs)
        images = _apply_filters(spectrum, filters, shape)  # (k', Y, X)
        pos = torch.tensor(list(idx), device=spectrum.device, dtype=t.dtype)[:, None, None]
        weights = torch.clamp(1.0 - (t[None] - pos).abs(), min=0.0).to(dtype)  # (k', Y, X)
        out += (weights * images).sum(0)
    return out


def deconvolve(
    image,
    ctf: CTFParams,
    strength: float = 1.0,
    falloff: float = 1.0,
    highpass_nyquist: float = 0.02,
    defocus_map=None,
    device=None,
):
    """Deconvolve a 2D micrograph with Warp's Wiener-like filter, globally or with a local defocus map.

    image: ``(Y, X)`` numpy array or torch tensor; its pixel size is ``ctf.pixel_size`` (Å).
    ctf: the micrograph's CTF (defocus, astigmatism, phase shift, ...; bfactor is ignored).
    strength, falloff, highpass_nyquist: Warp's S, F and high-pass cutoff (fraction of Nyquist).
    defocus_map: optional ``(Y, X)`` local defocus in Å (positive under-focus), e.g. the CTF fit's grid evaluated
        per pixel; replaces ``ctf.defocus`` pixel by pixel (astigmatism and the rest stay). Other 2D shapes are
        resampled bilinearly to the image.
    device: compute device; default the tensor's own device, or ``core.device.get_device()`` for numpy input.
    Returns ``(Y, X)``: numpy float32 for numpy input; a torch tensor (float32, or float64 if the input was) on the
    compute device for torch input. The output has (about) zero mean.
    """
    x, was_torch = _as_image_tensor(image, device)
    if x.ndim != 2:
        raise ValueError(f"deconvolve expects a 2D image (Y, X), got shape {tuple(x.shape)}")
    shape = (int(x.shape[0]), int(x.shape[1]))
    kwargs = {"strength": strength, "falloff": falloff, "highpass_nyquist": highpass_nyquist}
    spectrum = torch.fft.rfft2(x - x.mean())

    out = None
    if defocus_map is not None:
        dmap = _defocus_map_tensor(defocus_map, shape, x)
        dmin, dmax = float(dmap.min()), float(dmap.max())
        if dmax - dmin < CONSTANT_MAP_TOLERANCE:
            ctf = ctf.with_(defocus=float(dmap.mean()))
        else:
            out = _deconvolve_local(spectrum, shape, ctf, dmap, defocus_levels(dmin, dmax), kwargs, x.dtype)
    if out is None:
        filt = deconvolution_filter(ctf, shape, device=x.device, dtype=x.dtype, **kwargs)
        out = _apply_filters(spectrum, filt, shape)
    if was_torch:
        return out
    return out.cpu().numpy().astype(np.float32, copy=False)
