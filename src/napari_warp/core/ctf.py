"""The CTF in Å and Warp's conventions (``CTF.cs`` / ``GPU.CreateCTF``), differentiable in torch.

Model (pinned against Warp's ``ctf_reference.mrc`` to ~1e-5):

    λ      = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))                     Å, V in volts (Warp's constant)
    Δf(θ)  = defocus + astigmatism/2 · cos(2 (θ − astigmatism_angle))      Å, θ = atan2(fy, fx): from the x axis
    χ(f,θ) = π λ Δf(θ) f² − π/2 Cs λ³ f⁴ + phase_shift + asin(amplitude)
    CTF    = scale · sin χ · exp(bfactor/4 · f²)

so the value at DC is ``+scale·sin(phase_shift + asin(amplitude))`` (e.g. +0.07), ``defocus_u = defocus +
astigmatism/2`` lies along ``astigmatism_angle`` measured counter-clockwise from +x toward +y, and (as in Warp's XML)
a *negative* bfactor damps. Frequencies come from ``core.fourier`` (Warp's +0.5 Nyquist row), and anisotropic
magnification scales the radius as Warp's ``GetCTFCoords``: ``f = f_px / (pixel_size + pixel_size_delta ·
cos(2 (θ − pixel_size_angle)))``.

Why not call torch-ctf for the numbers: its astigmatism enters through ``sqrt((u − v)/2)`` (NaN for u < v and an
infinite gradient at zero astigmatism, which is where fits start), its frequency grid puts the even-size Nyquist row at
−0.5 (differs from Warp on that row for astigmatic CTFs), its wavelength uses CODATA constants rather than Warp's, and
it has no B-factor/scale. Its unit conventions are mapped by ``torch_ctf_arguments`` and the tests prove both models
agree wherever torch-ctf is defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .fourier import fft_frequencies, rfft_frequencies

__all__ = [
    "CTFParams",
    "electron_wavelength",
    "ctf_2d",
    "ctf_2d_tensor",
    "ctf_1d",
    "ctf_1d_tensor",
    "ctf_frequencies",
    "ctf_zeros",
    "torch_ctf_arguments",
]


@dataclass(frozen=True)
class CTFParams:
    """CTF parameters in Å, degrees, kV, mm.

    pixel_size: Å/pixel. defocus: mean defocus in Å, positive = under-focus (Warp µm × 1e4).
    astigmatism: Å, Warp's DefocusDelta = defocus_u − defocus_v (not half of it, unlike torch-ctf).
    astigmatism_angle: degrees of the defocus_u direction from the +x axis (Warp's DefocusAngle).
    voltage: kV. cs: mm. amplitude: amplitude-contrast fraction.
    phase_shift: degrees (Warp stores units of π: 0.4 → 72°).
    bfactor: Å², Warp's sign (envelope exp(bfactor/4·f²); negative damps). scale: CTF oscillates in ±scale.
    pixel_size_delta: Å (Warp's PixelSizeDelta), pixel_size_angle: degrees — anisotropic magnification.
    """

    pixel_size: float
    defocus: float
    astigmatism: float = 0.0
    astigmatism_angle: float = 0.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude: float = 0.07
    phase_shift: float = 0.0
    bfactor: float = 0.0
    scale: float = 1.0
    pixel_size_delta: float = 0.0
    pixel_size_angle: float = 0.0

    @property
    def defocus_u(self) -> float:
        """Defocus along ``astigmatism_angle`` (Å)."""
        return self.defocus + 0.5 * self.astigmatism

    @property
    def defocus_v(self) -> float:
        """Defocus perpendicular to ``astigmatism_angle`` (Å)."""
        return self.defocus - 0.5 * self.astigmatism

    @classmethod
    def from_uv(cls, defocus_u: float, defocus_v: float, astigmatism_angle: float = 0.0, **kwargs) -> CTFParams:
        """From RELION-style ``defocus_u/v`` (Å) and angle (degrees); other fields as keywords."""
        return cls(
            defocus=0.5 * (defocus_u + defocus_v),
            astigmatism=defocus_u - defocus_v,
            astigmatism_angle=astigmatism_angle,
            **kwargs,
        )

    @classmethod
    def from_warp(
        cls,
        pixel_size: float,
        defocus_um: float,
        defocus_delta_um: float = 0.0,
        defocus_angle_deg: float = 0.0,
        phase_shift_pi: float = 0.0,
        **kwargs,
    ) -> CTFParams:
        """From Warp's own units (µm defocus and DefocusDelta, phase shift in π); other fields as keywords."""
        return cls(
            pixel_size=pixel_size,
            defocus=defocus_um * 1e4,
            astigmatism=defocus_delta_um * 1e4,
            astigmatism_angle=defocus_angle_deg,
            phase_shift=phase_shift_pi * 180.0,
            **kwargs,
        )

    def with_(self, **changes) -> CTFParams:
        """A copy with some fields changed."""
        return replace(self, **changes)


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (Warp's formula; 300 kV → 0.01969)."""
    v = voltage_kv * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    return 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))


def _t(x, like: torch.Tensor) -> torch.Tensor:
    """Scalar or tensor parameter -> tensor on ``like``'s device/dtype (keeps autograd)."""
    return torch.as_tensor(x, device=like.device, dtype=like.dtype)


def _chi(f2, defocus, voltage, cs, amplitude, phase_shift_deg):
    """Warp's phase χ (radians) for squared frequency ``f2`` (1/Å²) and defocus (Å); all broadcast."""
    lam = electron_wavelength(voltage)
    return (
        math.pi * lam * defocus * f2
        - 0.5 * math.pi * (cs * 1e7) * lam**3 * f2**2
        + torch.deg2rad(phase_shift_deg)
        + torch.asin(amplitude)
    )


def ctf_2d_tensor(
    freqs: torch.Tensor,
    defocus,
    astigmatism=0.0,
    angle_deg=0.0,
    voltage=300.0,
    cs=2.7,
    amplitude=0.07,
    phase_shift_deg=0.0,
    bfactor=0.0,
    scale=1.0,
) -> torch.Tensor:
    """Differentiable 2D CTF on a given frequency grid.

    freqs: ``(..., Y, X', 2)`` of ``(fy, fx)`` in 1/Å (e.g. ``rfft_frequencies(shape, pixel_size)``).
    defocus (Å, positive under-focus), astigmatism (Å, u − v), angle_deg (of defocus_u, from +x), voltage (kV),
    cs (mm), amplitude, phase_shift_deg, bfactor (Å², Warp sign), scale: floats or tensors of batch shape ``(...)``
    (may require grad), broadcast with each other and with the batch axes of ``freqs``.
    Returns ``(..., Y, X')``.
    """
    p = [_t(x, freqs)[..., None, None] for x in
         (defocus, astigmatism, angle_deg, voltage, cs, amplitude, phase_shift_deg, bfactor, scale)]
    defocus, astigmatism, angle, voltage, cs, amplitude, phase_shift, bfactor, scale = p
    fy, fx = freqs[..., 0], freqs[..., 1]
    f2 = fy * fy + fx * fx
    theta = torch.atan2(fy, fx)  # from +x toward +y; DC gives 0 (harmless, f2 = 0 there)
    df = defocus + 0.5 * astigmatism * torch.cos(2.0 * (theta - torch.deg2rad(angle)))
    chi = _chi(f2, df, voltage, cs, amplitude, phase_shift)
    return scale * torch.sin(chi) * torch.exp(0.25 * bfactor * f2)


def _stack(params: Sequence[CTFParams], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], device=like.device, dtype=like.dtype)


def ctf_frequencies(
    params: CTFParams | Sequence[CTFParams],
    shape: Sequence[int],
    rfft: bool = True,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Frequency grid(s) in 1/Å for ``params``, with anisotropic magnification applied as Warp does.

    Returns ``(Y, X', 2)`` for one CTFParams, ``(P, Y, X', 2)`` for a sequence of P.
    """
    single = isinstance(params, CTFParams)
    plist = [params] if single else list(params)
    grid = (rfft_frequencies if rfft else fft_frequencies)(shape, 1.0, device=device, dtype=dtype)
    px = _stack(plist, "pixel_size", grid)[:, None, None]
    delta = _stack(plist, "pixel_size_delta", grid)[:, None, None]
    angle = torch.deg2rad(_stack(plist, "pixel_size_angle", grid))[:, None, None]
    theta = torch.atan2(grid[..., 0], grid[..., 1])
    eff = px + delta * torch.cos(2.0 * (theta - angle))  # (P, Y, X'): Warp's effective pixel size per direction
    freqs = grid / eff[..., None]
    return freqs[0] if single else freqs


def ctf_2d(
    params: CTFParams | Sequence[CTFParams],
    shape: Sequence[int],
    rfft: bool = True,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Warp's 2D CTF image(s) for an image of ``shape`` ``(Y, X)``.

    rfft: half layout ``(Y, X//2+1)`` with DC at ``[0, 0]`` (Warp's ``GetCTFCoords`` layout); else full ``(Y, X)``
    non-centred (``torch.fft.fftshift`` it for display).
    Returns ``(Y, X')`` for one CTFParams, ``(P, Y, X')`` for a sequence of P.
    """
    single = isinstance(params, CTFParams)
    plist = [params] if single else list(params)
    freqs = ctf_frequencies(plist, shape, rfft=rfft, device=device, dtype=dtype)
    names = ("defocus", "astigmatism", "astigmatism_angle", "voltage", "cs", "amplitude", "phase_shift",
             "bfactor", "scale")
    out = ctf_2d_tensor(freqs, *[_stack(plist, n, freqs) for n in names])
    return out[0] if single else out


def ctf_1d_tensor(
    freqs: torch.Tensor, defocus, voltage=300.0, cs=2.7, amplitude=0.07, phase_shift_deg=0.0, bfactor=0.0, scale=1.0
) -> torch.Tensor:
    """Differentiable rotationally symmetric CTF: ``freqs (..., n)`` in 1/Å, parameters ``(...)`` -> ``(..., n)``."""
    p = [_t(x, freqs)[..., None] for x in (defocus, voltage, cs, amplitude, phase_shift_deg, bfactor, scale)]
    defocus, voltage, cs, amplitude, phase_shift, bfactor, scale = p
    f2 = freqs * freqs
    return scale * torch.sin(_chi(f2, defocus, voltage, cs, amplitude, phase_shift)) * torch.exp(0.25 * bfactor * f2)


def ctf_1d(
    params: CTFParams | Sequence[CTFParams], n: int, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Warp's 1D CTF (mean defocus, astigmatism ignored) at ``n`` frequencies ``i / (2 n pixel_size)``, i < n.

    The sampling is Warp's (``CTF.Get1D``): 0 up to one step below Nyquist, the same shells as
    ``fourier.radial_average(..., n_bins=n)``. Returns ``(n,)``, or ``(P, n)`` for a sequence of P.
    """
    single = isinstance(params, CTFParams)
    plist = [params] if single else list(params)
    i = torch.arange(n, device=device, dtype=dtype)
    freqs = i / (2 * n * _stack(plist, "pixel_size", i)[:, None])  # (P, n) in 1/Å
    names = ("defocus", "voltage", "cs", "amplitude", "phase_shift", "bfactor", "scale")
    out = ctf_1d_tensor(freqs, *[_stack(plist, k, i) for k in names])
    return out[0] if single else out


def ctf_zeros(params: CTFParams, n_zeros: int = 10, angle_deg: float | None = None) -> torch.Tensor:
    """Spatial frequencies (1/Å) of the first ``n_zeros`` CTF zeros (under-focus), ``(n_zeros,)`` float64.

    Along ``angle_deg`` (degrees from +x) when given, else for the mean defocus. Solves χ(f) = kπ as a quadratic
    in f²; envelope and scale do not move zeros. Zeros that do not exist (past the Cs turning point) are NaN.
    """
    df = params.defocus
    if angle_deg is not None:
        df += 0.5 * params.astigmatism * math.cos(2 * math.radians(angle_deg - params.astigmatism_angle))
    lam = electron_wavelength(params.voltage)
    a = -0.5 * math.pi * params.cs * 1e7 * lam**3
    b = math.pi * lam * df
    phi = math.radians(params.phase_shift) + math.asin(params.amplitude)
    k0 = math.floor(phi / math.pi) + 1
    k = torch.arange(k0, k0 + n_zeros, dtype=torch.float64)
    c = phi - k * math.pi  # a u² + b u + c = 0 with u = f²
    if a == 0:
        u = -c / b
    else:
        disc = b * b - 4 * a * c
        u = (-b + torch.sqrt(disc)) / (2 * a)  # the smaller positive root for a < 0 < b
    return torch.sqrt(u)


def torch_ctf_arguments(params: CTFParams) -> dict:
    """Our parameters in torch-ctf's units (µm, half-astigmatism), for ``torch_ctf.calculate_ctf_2d``.

    torch-ctf: ``defocus`` = (u + v)/2 µm, ``astigmatism`` = (u − v)/2 µm (must be ≥ 0), angle in degrees from +x
    (its docstring says y, its code and our test say x), phase shift in degrees; no B-factor or scale.
    """
    if params.astigmatism < 0:
        params = params.with_(astigmatism=-params.astigmatism, astigmatism_angle=params.astigmatism_angle + 90.0)
    return dict(
        defocus=params.defocus * 1e-4,
        astigmatism=0.5 * params.astigmatism * 1e-4,
        astigmatism_angle=params.astigmatism_angle,
        voltage=params.voltage,
        spherical_aberration=params.cs,
        amplitude_contrast=params.amplitude,
        phase_shift=params.phase_shift,
        pixel_size=params.pixel_size,
    )
