"""Export for RELION: per-movie motion STAR files (RELION 3.1 polishing) and ``corrected_micrographs.star``.

Everything here converts *our* conventions into RELION's and back, in one place:

Our motion convention (``core.motion``, ``core.simulate``): ``shifts(yx, f) = (dy, dx)`` px, *a feature at p in the
aligned average is found at p + shift in frame f*; positions ``(y, x)`` are 0-based pixel indices of the arrays as
read from the file (row 0 = the first row stored in the MRC).

RELION 3.1 convention (``src/micrograph_model.{h,cpp}``, ``src/motioncorr_runner.cpp``, ``src/jaz/micrograph_handler.cpp``):

* ``data_global_shift``: ``rlnMicrographShiftX/Y`` per 1-based ``rlnMicrographFrameNumber``, in UNBINNED pixels of
  the original movie, and of opposite sign to ours: a feature at p in the aligned sum is at ``p − (ShiftX, ShiftY)``
  in frame f. So ``(dy, dx) = −(ShiftY, ShiftX)``. Evidence: (1) ``MotioncorrRunner::alignPatch`` takes the peak of
  ``IFFT((Fref − Fframe) · conj(Fframe))`` as the shift ``s`` (frame(r) = ref(r + s)) and then moves each frame by
  ``+s`` (``shiftNonSquareImageInFourierTransform(F, −s/N)`` multiplies by ``exp(+2πi k·(−s)/N)``); (2) polishing
  initialises particle tracks as ``−(sx, sy)`` (``MicrographHandler::loadMovie``); (3) empirically,
  ``relion_run_motioncorr --use_own`` on a simulated movie whose true last-frame shift is (dy, dx) = (−10.46, +17.05)
  px writes (ShiftX, ShiftY) = (−16.75, +10.53), and with ``--bin_factor 2`` the same numbers (unbinned px) beside
  ``rlnImageSizeX/Y`` of the unbinned movie; (4) ``relion_motion_refine`` reading files written here produces
  particle tracks equal to our shifts to its print precision (``tests/test_interop_relion.py`` checks (3) and (4)
  every run). RELION's x is the fast (column) axis, its y the row index in file order, like ours.
* ``data_local_motion_model`` (``rlnMotionModelVersion`` 1, ``ThirdOrderPolynomialModel::getShiftAt``): 36 rows of
  (``rlnMotionModelCoeffsIdx``, ``rlnMotionModelCoeff``); indices 0–17 are ``coeffX``, 18–35 ``coeffY``. With
  ``x = X / width − 0.5``, ``y = Y / height − 0.5`` (X, Y: 0-based unbinned movie pixels; width/height: the movie's
  ``rlnImageSizeX/Y``) and ``z = frame − rlnMicrographStartFrame`` (frame 1-based, so ``z`` counts *frames*, not
  normalised time, and is 0 at the start frame)::

      shift = Σ_j Σ_e c[3 j + (e − 1)] · s_j(x, y) · z^e,   s = (1, x, x², y, y², xy),  e = 1, 2, 3

  i.e. ``c0 z + c1 z² + c2 z³ + (c3 z + c4 z² + c5 z³) x + (c6..c8) x² + (c9..c11) y + (c12..c14) y² + (c15..c17) xy``.
  The total shift at (X, Y, frame) is ``global_shift[frame] + polynomial`` (``Micrograph::getShiftAt``), still in
  unbinned pixels and RELION's sign. (RELION's own motioncorr fits the polynomial in *binned* pixels when it bins
  early, although ``getShiftAt`` documents unbinned ones; we always write unbinned pixels.) The polynomial has no
  term constant in z, so it cannot describe deformation at the start frame; our averages sit at the mean position
  of the exposure, so by default we choose the start frame where our local field is best represented
  (``relion_motion_from_model``; RELION 3.1 reads ``rlnMicrographStartFrame`` only in ``getShiftAt`` and plots).
* ``rlnAccumMotionTotal/Early/Late``: sums of the global step lengths ``|g(f) − g(f−1)|`` over frames 2..F, split at
  ``frame <= (cutoff − pre_exposure) / dose_per_frame`` (cutoff 4 e/Å²); RELION's labels say Å but its code sums
  unbinned *pixels* — we reproduce the code.

RELION's STAR reader stops a loop at the first empty line and finds blocks by name (``data_general``,
``data_global_shift``, ``data_local_motion_model``, ``data_hot_pixels``); ``core.io.star.write_star`` writes a blank
line after every loop. Paths in these files are read by RELION relative to its project directory (the working
directory it runs in): see ``project_dir`` below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import MetadataError
from .io.star import read_star, write_star

__all__ = [
    "RelionMotion",
    "CorrectedMicrograph",
    "relion_polynomial_basis",
    "fit_relion_polynomial",
    "relion_motion_from_model",
    "motion_star_blocks",
    "write_motion_star",
    "read_relion_motion",
    "read_relion_motion_star",
    "accumulated_motion",
    "write_corrected_micrographs_star",
    "MOTION_MODEL_NULL",
    "MOTION_MODEL_THIRD_ORDER_POLYNOMIAL",
]

MOTION_MODEL_NULL = 0
MOTION_MODEL_THIRD_ORDER_POLYNOMIAL = 1
_N_COEFFS = 18  # per dimension (ThirdOrderPolynomialModel::NUM_COEFFS_PER_DIM)
_LOCAL_TOL = 1e-6  # px: a field whose spatial variation stays below this is global-only


# ---------------------------------------------------------------------------------------------------------------
# RELION's third-order polynomial
# ---------------------------------------------------------------------------------------------------------------
def relion_polynomial_basis(x, y, z) -> np.ndarray:
    """RELION's 18 basis functions ``(..., 18)`` at normalised ``x``, ``y`` and frame offset ``z`` (broadcast).

    Column ``3 j + (e − 1)`` is ``s_j(x, y) · z^e`` with ``s = (1, x, x², y, y², xy)``, ``e = 1, 2, 3`` — the order of
    ``ThirdOrderPolynomialModel::getShiftAt`` and of RELION's own fit in ``MotioncorrRunner``.
    """
    x, y, z = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (x, y, z)))
    spatial = (np.ones_like(x), x, x * x, y, y * y, x * y)
    powers = (z, z * z, z * z * z)
    return np.stack([s * p for s in spatial for p in powers], axis=-1)


def _normalised(yx: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """RELION's ``x = X / width − 0.5``, ``y = Y / height − 0.5`` of unbinned pixel positions ``(P, 2)`` (y, x)."""
    return yx[:, 1] / shape[1] - 0.5, yx[:, 0] / shape[0] - 0.5


def fit_relion_polynomial(
    shifts: np.ndarray, yx: np.ndarray, shape: tuple[int, int], first_frame: int = 1
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Least-squares split of a sampled shift field (RELION sign, unbinned px) into global shifts + polynomial.

    shifts: ``(F, P, 2)`` RELION ``(ShiftX, ShiftY)`` at unbinned positions ``yx`` ``(P, 2)`` (y, x) of every frame;
    shape: ``(height, width)`` of the movie; first_frame: ``rlnMicrographStartFrame`` (1-based).

    Minimises ``Σ_{p,f} |shifts − g(f) − L(p, f)|²`` over per-frame global shifts ``g`` and the polynomial ``L``.
    The polynomial's spatially constant terms (coefficients 0–2) duplicate ``g`` and are fixed at 0, so ``g(f)`` is
    the spatial mean of ``shifts − L``. ``L`` is 0 at ``z = 0`` by construction: spatial deformation at the start
    frame cannot be represented and stays in the residual.

    Returns ``(global (F, 2), coeffs (2, 18) for (x, y) or None when the field is spatially uniform, rms)`` with
    ``rms`` the root-mean-square residual length (px) over all samples.
    """
    shifts = np.asarray(shifts, dtype=np.float64)
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    n_frames, n_pos = shifts.shape[:2]
    spread = np.abs(shifts - shifts.mean(axis=1, keepdims=True)).max(initial=0.0)
    if spread < _LOCAL_TOL:
        return shifts[:, 0, :].copy(), None, float(spread)
    x, y = _normalised(yx, shape)
    z = np.arange(n_frames, dtype=np.float64) + 1 - first_frame
    zs = max(1.0, float(np.abs(z).max()))  # scale z for conditioning; coefficients are rescaled below
    basis = relion_polynomial_basis(x[None, :], y[None, :], (z / zs)[:, None])  # (F, P, 18)
    basis = basis[..., 3:]  # drop the spatially constant terms (in the global shifts)
    centred_basis = basis - basis.mean(axis=1, keepdims=True)
    centred_target = shifts - shifts.mean(axis=1, keepdims=True)
    a = centred_basis.reshape(n_frames * n_pos, -1)
    b = centred_target.reshape(n_frames * n_pos, 2)
    # normal equations by einsum (no threaded BLAS on a tall, skinny matrix: it stalls on a busy machine);
    # columns are O(1) after the z scaling, so squaring the condition number is harmless
    sol, *_ = np.linalg.lstsq(np.einsum("ni,nj->ij", a, a), np.einsum("ni,nd->id", a, b), rcond=None)  # (15, 2)
    coeffs = np.zeros((2, _N_COEFFS))
    coeffs[:, 3:] = sol.T
    coeffs /= zs ** (np.arange(_N_COEFFS) % 3 + 1)  # undo the z scaling: c_e(z) = c_e(z/zs) / zs^e
    local = np.einsum("fpk,dk->fpd", relion_polynomial_basis(x[None, :], y[None, :], z[:, None]), coeffs)
    global_shifts = (shifts - local).mean(axis=1)
    residual = shifts - local - global_shifts[:, None, :]
    rms = float(np.sqrt(np.mean(np.sum(residual**2, axis=-1))))
    return global_shifts, coeffs, rms


# ---------------------------------------------------------------------------------------------------------------
# the motion of one movie, in RELION's terms
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RelionMotion:
    """One movie's motion as RELION 3.1 stores it, with evaluation in *our* convention.

    shape: ``(height, width)`` of the movie, unbinned px (``rlnImageSizeY/X``). relion_global: ``(F, 2)`` RELION
    ``(ShiftX, ShiftY)`` per frame, unbinned px, RELION's sign. coeffs: ``(2, 18)`` polynomial for (x, y) or None.
    first_frame: ``rlnMicrographStartFrame``. general: every ``data_general`` value by label. fit_rms: residual (px)
    of the polynomial fit when made from one of our models (None when read from a file).
    """

    shape: tuple[int, int]
    relion_global: np.ndarray
    coeffs: np.ndarray | None = None
    first_frame: int = 1
    general: dict = field(default_factory=dict)
    hot_pixels: np.ndarray | None = None  # (N, 2) int (y, x)
    fit_rms: float | None = None

    @property
    def n_frames(self) -> int:
        return len(self.relion_global)

    @property
    def global_shifts(self) -> np.ndarray:
        """``(F, 2)`` global shifts ``(dy, dx)`` in our convention, unbinned movie px."""
        return -self.relion_global[:, ::-1].copy()

    def relion_shifts(self, yx, frames: Sequence[int] | None = None) -> np.ndarray:
        """RELION's ``Micrograph::getShiftAt`` ``(F', P, 2)`` = (ShiftX, ShiftY) at unbinned ``yx`` ``(P, 2)``."""
        yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
        idx = np.arange(self.n_frames) if frames is None else np.asarray(frames, dtype=int)
        out = np.repeat(self.relion_global[idx][:, None, :], len(yx), axis=1)
        if self.coeffs is not None:
            x, y = _normalised(yx, self.shape)
            z = idx.astype(np.float64) + 1 - self.first_frame
            out = out + np.einsum("fpk,dk->fpd", relion_polynomial_basis(x[None], y[None], z[:, None]), self.coeffs)
        return out

    def shifts(self, yx, frames: Sequence[int] | None = None) -> np.ndarray:
        """Total shifts ``(F', P, 2)`` ``(dy, dx)`` in our convention at unbinned ``yx`` ``(P, 2)`` (y, x) px."""
        return -self.relion_shifts(yx, frames)[..., ::-1]


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _sample_lattice(shape: tuple[int, int], n: int) -> np.ndarray:
    ys = np.linspace(0.0, shape[0] - 1.0, n)
    xs = np.linspace(0.0, shape[1] - 1.0, n)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gy.ravel(), gx.ravel()], axis=1)


def relion_motion_from_model(
    model,
    *,
    original_pixel_size: float | None = None,
    movie_shape: tuple[int, int] | None = None,
    first_frame: int | str | None = "auto",
    samples: int = 17,
) -> RelionMotion:
    """Convert one of our motion models to RELION's global shifts + third-order polynomial.

    model: anything with ``shape`` (Y, X), ``n_frames``, ``pixel_size`` (Å) and ``shifts(yx, frames=None) -> (F, P, 2)``
    (``core.motion.MotionModel``). original_pixel_size: Å/px of the movie as stored (default: the model's);
    shifts and positions are rescaled from the model's pixels to these. movie_shape: ``(Y, X)`` of the stored movie
    (default: the model's shape rescaled). samples: the field is sampled on ``samples × samples`` positions spanning
    the image, at every frame, and fitted by ``fit_relion_polynomial``.
    first_frame: ``rlnMicrographStartFrame`` (1-based), where RELION's polynomial is zero. ``"auto"`` (or None)
    picks the frame that minimises the fit residual: our aligned average sits at the *mean* position of the
    exposure, so the local field is not zero at frame 1, and RELION's polynomial cannot represent deformation at its
    start frame. (RELION 3.1 reads the start frame only there and in its own plots.)
    A model without spatial variation gives ``coeffs=None``, start frame 1 and exactly its own global shifts
    (negated, x/y swapped).
    """
    shape_model = tuple(int(s) for s in model.shape)
    pixel_size = float(getattr(model, "pixel_size", 0.0) or 0.0)
    scale = 1.0 if original_pixel_size is None or pixel_size <= 0 else pixel_size / float(original_pixel_size)
    if movie_shape is None:
        movie_shape = (int(round(shape_model[0] * scale)), int(round(shape_model[1] * scale)))
    movie_shape = (int(movie_shape[0]), int(movie_shape[1]))
    yx = _sample_lattice(movie_shape, samples)
    ours = _to_numpy(model.shifts(yx / scale)) * scale  # (F, P, 2) (dy, dx), movie px
    if ours.ndim != 3 or ours.shape[1:] != (len(yx), 2):
        raise ValueError(f"model.shifts returned shape {ours.shape}, expected (F, {len(yx)}, 2)")
    relion = -ours[..., ::-1]
    auto = first_frame is None or first_frame == "auto"
    if auto:
        first_frame = _best_start_frame(relion, yx, movie_shape)
    global_shifts, coeffs, rms = fit_relion_polynomial(relion, yx, movie_shape, int(first_frame))
    if coeffs is None and auto:
        first_frame = 1
    return RelionMotion(shape=movie_shape, relion_global=global_shifts, coeffs=coeffs, first_frame=int(first_frame),
                        fit_rms=rms)


def _best_start_frame(relion: np.ndarray, yx: np.ndarray, shape: tuple[int, int], coarse: int = 24) -> int:
    """The 1-based start frame with the smallest polynomial-fit residual (coarse search, then its neighbours)."""
    n = relion.shape[0]
    rms = {}

    def score(f: int) -> float:
        if f not in rms:
            rms[f] = fit_relion_polynomial(relion, yx, shape, f)[2]
        return rms[f]

    if np.abs(relion - relion.mean(axis=1, keepdims=True)).max(initial=0.0) < _LOCAL_TOL:
        return 1  # rigid: nothing to place
    candidates = np.unique(np.round(np.linspace(1, n, min(n, coarse))).astype(int))
    best = min(candidates, key=lambda f: (score(int(f)), f))
    step = max(1, int(np.ceil((n - 1) / max(1, len(candidates) - 1))))
    for f in range(max(1, best - step + 1), min(n, best + step - 1) + 1):
        score(f)
    return int(min(rms, key=lambda f: (rms[f], f)))


# ---------------------------------------------------------------------------------------------------------------
# motion STAR files
# ---------------------------------------------------------------------------------------------------------------
def _star_path(p: str | os.PathLike, project_dir: Path | None) -> str:
    """A path as RELION should read it: relative paths stay as given (already relative to the project directory);
    absolute ones become relative to ``project_dir`` when one is given, else stay absolute."""
    p = os.fspath(p)
    if not os.path.isabs(p):
        return Path(p).as_posix()
    if project_dir is None:
        return Path(p).as_posix()
    return Path(os.path.relpath(p, project_dir)).as_posix()


def _project_dir(project_dir: str | os.PathLike | None) -> Path | None:
    return None if project_dir is None else Path(os.path.abspath(project_dir))


def motion_star_blocks(
    motion: RelionMotion,
    movie_name: str,
    *,
    gain_name: str | None = None,
    binning: float = 1.0,
    original_pixel_size: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    voltage: float,
) -> dict[str, object]:
    """The STAR blocks of a RELION 3.1 motion file (``Micrograph::write`` layout), names already as written."""
    height, width = motion.shape
    general: dict[str, object] = {
        "rlnImageSizeX": int(width),
        "rlnImageSizeY": int(height),
        "rlnImageSizeZ": int(motion.n_frames),
        "rlnMicrographMovieName": movie_name,
    }
    if gain_name:
        general["rlnMicrographGainName"] = gain_name
    general.update({
        "rlnMicrographBinning": float(binning),
        "rlnMicrographOriginalPixelSize": float(original_pixel_size),
        "rlnMicrographDoseRate": float(dose_per_frame),
        "rlnMicrographPreExposure": float(pre_exposure),
        "rlnVoltage": float(voltage),
        "rlnMicrographStartFrame": int(motion.first_frame),
        "rlnMotionModelVersion": MOTION_MODEL_NULL if motion.coeffs is None else MOTION_MODEL_THIRD_ORDER_POLYNOMIAL,
    })
    blocks: dict[str, object] = {"general": general}
    blocks["global_shift"] = pd.DataFrame({
        "rlnMicrographFrameNumber": np.arange(1, motion.n_frames + 1, dtype=np.int64),
        "rlnMicrographShiftX": motion.relion_global[:, 0].astype(np.float64),
        "rlnMicrographShiftY": motion.relion_global[:, 1].astype(np.float64),
    })
    if motion.coeffs is not None:
        blocks["local_motion_model"] = pd.DataFrame({
            "rlnMotionModelCoeffsIdx": np.arange(2 * _N_COEFFS, dtype=np.int64),
            "rlnMotionModelCoeff": np.asarray(motion.coeffs, dtype=np.float64).reshape(-1),
        })
    if motion.hot_pixels is not None and len(motion.hot_pixels):
        hot = np.asarray(motion.hot_pixels).reshape(-1, 2)
        blocks["hot_pixels"] = pd.DataFrame({
            "rlnCoordinateX": hot[:, 1].astype(np.float64), "rlnCoordinateY": hot[:, 0].astype(np.float64)
        })
    return blocks


def write_motion_star(
    path: str | os.PathLike,
    model,
    movie_path: str | os.PathLike,
    *,
    gain_path: str | os.PathLike | None = None,
    binning: float = 1.0,
    original_pixel_size: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    voltage: float,
    first_frame: int | str | None = "auto",
    movie_shape: tuple[int, int] | None = None,
    hot_pixels=None,
    project_dir: str | os.PathLike | None = None,
    samples: int = 17,
) -> RelionMotion:
    """Write one movie's motion as a RELION 3.1 motion STAR file (``rlnMicrographMetadata``), atomically.

    model: a ``core.motion.MotionModel`` (or any object with ``shape``, ``n_frames``, ``pixel_size``, ``shifts``), or a
    ``RelionMotion`` written as is. movie_path / gain_path: the raw movie and gain reference RELION should read.
    binning: ``rlnMicrographBinning`` — how much the written average is binned relative to the movie.
    original_pixel_size: Å/px of the movie as stored; dose_per_frame, pre_exposure: e/Å²; voltage: kV.
    first_frame: ``rlnMicrographStartFrame`` (1-based; the polynomial is 0 there), or ``"auto"`` (default): the
    frame that lets the polynomial reproduce our local field best (see ``relion_motion_from_model``).
    movie_shape: ``(Y, X)`` of the stored movie when the model was fitted at another sampling. hot_pixels: ``(N, 2)`` (y, x) movie pixels RELION
    should treat as defects (``data_hot_pixels``).
    project_dir: RELION resolves relative paths from the directory it runs in (its project directory). Relative
    paths are written unchanged (taken to be relative to that directory already); absolute ones are written relative
    to ``project_dir`` when given (a relocatable project, as Warp writes), else absolute (valid from anywhere).

    Returns the ``RelionMotion`` written (``fit_rms`` tells how well the polynomial reproduces the local field).
    """
    if isinstance(model, RelionMotion):
        motion = model
    else:
        motion = relion_motion_from_model(model, original_pixel_size=original_pixel_size, movie_shape=movie_shape,
                                          first_frame=first_frame, samples=samples)
    if hot_pixels is not None:
        motion = replace(motion, hot_pixels=np.asarray(hot_pixels).reshape(-1, 2))
    root = _project_dir(project_dir)
    blocks = motion_star_blocks(
        motion, _star_path(movie_path, root),
        gain_name=None if gain_path is None else _star_path(gain_path, root), binning=binning,
        original_pixel_size=original_pixel_size, dose_per_frame=dose_per_frame, pre_exposure=pre_exposure,
        voltage=voltage,
    )
    write_star(path, blocks)
    motion.general = dict(blocks["general"])
    return motion


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def read_relion_motion(path: str | os.PathLike) -> RelionMotion:
    """Read a RELION 3.0/3.1 motion STAR file (ours or RELION's own) as ``RelionMotion``.

    Frames missing from ``data_global_shift`` are NaN. Raises ``MetadataError`` for a file RELION would reject
    (no size or movie name in ``data_general``, a bad global shift table, an incomplete polynomial).
    """
    blocks = read_star(path)
    if "general" not in blocks or len(blocks["general"]) != 1:
        raise MetadataError(path, "no data_general key-value block")
    general = {str(k): _scalar(v) for k, v in blocks["general"].iloc[0].items()}
    for key in ("rlnImageSizeX", "rlnImageSizeY", "rlnImageSizeZ", "rlnMicrographMovieName"):
        if key not in general:
            raise MetadataError(path, f"data_general lacks {key}")
    n_frames = int(general["rlnImageSizeZ"])
    shape = (int(general["rlnImageSizeY"]), int(general["rlnImageSizeX"]))
    table = blocks.get("global_shift")
    cols = ("rlnMicrographFrameNumber", "rlnMicrographShiftX", "rlnMicrographShiftY")
    if table is None or not set(cols) <= set(table.columns):
        raise MetadataError(path, "data_global_shift lacks rlnMicrographFrameNumber/ShiftX/ShiftY")
    relion_global = np.full((n_frames, 2), np.nan)
    frames = table[cols[0]].to_numpy(np.int64)
    if frames.min(initial=1) < 1 or frames.max(initial=1) > n_frames:
        raise MetadataError(path, f"frame numbers outside 1..{n_frames}")
    relion_global[frames - 1, 0] = table[cols[1]].to_numpy(np.float64)
    relion_global[frames - 1, 1] = table[cols[2]].to_numpy(np.float64)
    coeffs = None
    version = int(general.get("rlnMotionModelVersion", MOTION_MODEL_NULL))
    if version == MOTION_MODEL_THIRD_ORDER_POLYNOMIAL:
        model = blocks.get("local_motion_model")
        if model is None or not {"rlnMotionModelCoeffsIdx", "rlnMotionModelCoeff"} <= set(model.columns):
            raise MetadataError(path, "rlnMotionModelVersion 1 but no data_local_motion_model coefficients")
        idx = model["rlnMotionModelCoeffsIdx"].to_numpy(np.int64)
        if len(idx) != 2 * _N_COEFFS or sorted(idx.tolist()) != list(range(2 * _N_COEFFS)):
            raise MetadataError(path, f"data_local_motion_model needs indices 0..{2 * _N_COEFFS - 1} once each")
        flat = np.zeros(2 * _N_COEFFS)
        flat[idx] = model["rlnMotionModelCoeff"].to_numpy(np.float64)
        coeffs = flat.reshape(2, _N_COEFFS)
    hot = blocks.get("hot_pixels")
    hot_yx = None
    if hot is not None and {"rlnCoordinateX", "rlnCoordinateY"} <= set(hot.columns) and len(hot):
        hot_yx = np.stack([hot["rlnCoordinateY"].to_numpy(), hot["rlnCoordinateX"].to_numpy()], 1).astype(int)
    return RelionMotion(shape=shape, relion_global=relion_global, coeffs=coeffs,
                        first_frame=int(general.get("rlnMicrographStartFrame", 1)), general=general,
                        hot_pixels=hot_yx)


def read_relion_motion_star(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Global shifts ``(F, 2)`` ``(dy, dx)`` in OUR convention (unbinned movie px) and the ``data_general`` values
    of a RELION motion STAR file. For local shifts use ``read_relion_motion(path).shifts(yx)``."""
    motion = read_relion_motion(path)
    return motion.global_shifts, motion.general


# ---------------------------------------------------------------------------------------------------------------
# corrected_micrographs.star
# ---------------------------------------------------------------------------------------------------------------
def accumulated_motion(
    relion_global: np.ndarray, dose_per_frame: float, pre_exposure: float = 0.0, cutoff: float = 4.0
) -> tuple[float, float, float]:
    """``rlnAccumMotionTotal/Early/Late`` exactly as ``relion_run_motioncorr`` computes them: sums of global step
    lengths (unbinned px) over frames 2..F, "early" for 1-based frames ``<= (cutoff − pre_exposure) / dose``.
    Unobserved (NaN) frames are skipped and the next step is taken from the last observed one."""
    g = np.asarray(relion_global, dtype=np.float64).reshape(-1, 2)
    cutoff_frame = (cutoff - pre_exposure) / dose_per_frame if dose_per_frame else math.inf
    total = early = late = 0.0
    old = np.zeros(2)
    for i, s in enumerate(g):
        frame = i + 1
        if not np.all(np.isfinite(s)):
            continue
        if frame >= 2:
            d = float(np.hypot(*(s - old)))
            total += d
            if frame <= cutoff_frame:
                early += d
            else:
                late += d
        old = s
    return total, early, late


@dataclass(frozen=True)
class CorrectedMicrograph:
    """One row of ``corrected_micrographs.star``.

    micrograph: the motion-corrected average (``rlnMicrographName``); metadata: its motion STAR
    (``rlnMicrographMetadata``); pixel_size: Å/px of the average (``rlnMicrographPixelSize``); original_pixel_size:
    Å/px of the movie; voltage kV, cs mm, amplitude_contrast fraction; optics_group_name: None for
    ``opticsGroup<n>``. accum_motion: (total, early, late) px, or None to compute it from the metadata file as
    RELION does (dose cutoff ``dose_motionstats_cutoff``). ctf: RELION CTF columns (``rlnDefocusU`` ... in RELION's
    units) to add, as in ``micrographs_ctf.star``; all rows must have the same keys.
    """

    micrograph: str | os.PathLike
    metadata: str | os.PathLike
    pixel_size: float
    original_pixel_size: float
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    optics_group_name: str | None = None
    accum_motion: tuple[float, float, float] | None = None
    ctf: Mapping | None = None


def _optics_key(r: CorrectedMicrograph) -> tuple:
    return (r.optics_group_name, float(r.original_pixel_size), float(r.pixel_size), float(r.voltage), float(r.cs),
            float(r.amplitude_contrast))


def write_corrected_micrographs_star(
    path: str | os.PathLike,
    rows: Sequence[CorrectedMicrograph | Mapping],
    *,
    project_dir: str | os.PathLike | None = None,
    dose_motionstats_cutoff: float = 4.0,
) -> pd.DataFrame:
    """Write RELION 3.1's ``corrected_micrographs.star`` (``data_optics`` + ``data_micrographs``), atomically.

    rows: ``CorrectedMicrograph`` or mappings with its field names. Optics groups are numbered 1.. in order of first
    appearance of distinct (name, pixel sizes, voltage, Cs, amplitude contrast). Paths: as in ``write_motion_star``
    (relative ones unchanged, absolute ones relative to ``project_dir`` when given); when the accumulated motion
    must be computed, a relative metadata path is opened from ``project_dir`` (default: the current directory).
    Returns the micrographs table written.
    """
    rows = [r if isinstance(r, CorrectedMicrograph) else CorrectedMicrograph(**dict(r)) for r in rows]
    if not rows:
        raise ValueError("no micrographs to write")
    root = _project_dir(project_dir)
    groups: dict[tuple, int] = {}
    for r in rows:
        groups.setdefault(_optics_key(r), len(groups) + 1)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [k[0] or f"opticsGroup{n}" for k, n in groups.items()],
        "rlnOpticsGroup": np.array(list(groups.values()), dtype=np.int64),
        "rlnMicrographOriginalPixelSize": [k[1] for k in groups],
        "rlnVoltage": [k[3] for k in groups],
        "rlnSphericalAberration": [k[4] for k in groups],
        "rlnAmplitudeContrast": [k[5] for k in groups],
        "rlnMicrographPixelSize": [k[2] for k in groups],
    })
    accum = []
    for r in rows:
        if r.accum_motion is not None:
            accum.append(tuple(float(v) for v in r.accum_motion))
            continue
        meta = Path(os.fspath(r.metadata))
        meta = meta if meta.is_absolute() or root is None else root / meta
        m = read_relion_motion(meta)
        dose = float(m.general.get("rlnMicrographDoseRate", 0.0) or 0.0)
        pre = float(m.general.get("rlnMicrographPreExposure", 0.0) or 0.0)
        accum.append(accumulated_motion(m.relion_global, dose, pre, dose_motionstats_cutoff))
    accum = np.asarray(accum, dtype=np.float64).reshape(-1, 3)
    micrographs = pd.DataFrame({
        "rlnMicrographName": [_star_path(r.micrograph, root) for r in rows],
        "rlnMicrographMetadata": [_star_path(r.metadata, root) for r in rows],
        "rlnOpticsGroup": np.array([groups[_optics_key(r)] for r in rows], dtype=np.int64),
        "rlnAccumMotionTotal": accum[:, 0],
        "rlnAccumMotionEarly": accum[:, 1],
        "rlnAccumMotionLate": accum[:, 2],
    })
    ctf_keys = [tuple(r.ctf) if r.ctf else () for r in rows]
    if any(ctf_keys):
        if len(set(ctf_keys)) != 1:
            raise ValueError("either all micrographs carry the same CTF columns or none do")
        for key in ctf_keys[0]:
            values = [r.ctf[key] for r in rows]
            micrographs[key] = [_star_path(v, root) if key == "rlnCtfPowerSpectrum" else v for v in values]
    write_star(path, {"optics": optics, "micrographs": micrographs})
    return micrographs
