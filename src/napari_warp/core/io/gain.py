"""Gain references and defect maps: reading, Warp's orientation transforms, shape checks, per-frame correction.

Warp's order, applied to the gain and to the defect map alike: flip X (mirror columns), then flip Y (mirror rows),
then transpose. Like Warp, the gain is normalised to mean 1 (so frames stay in counts) and EER frames are divided
by it (EPU's EER ``.gain`` files are the detector's response) while all other frames are multiplied. Gain pixels
that are zero, negative or not finite are treated as defects. Defects are filled, as in Warp's ``DefectModel``,
with the mean of the good pixels within a disk of radius 4 (grown until it holds >= 49 of them).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from ..errors import GainReferenceError, UnreadableMovieError

_IMAGE_EXTENSIONS = (".mrc", ".mrcs", ".tif", ".tiff", ".gain", ".em")


def read_reference(path: str | os.PathLike, what: str = "gain") -> np.ndarray:
    """A single-image reference (MRC, TIFF/.gain, EM) as float32 (y, x), in our reading convention."""
    from .em import open_em
    from .mrc import read_mrc_header
    from .tiff import TiffSource

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise GainReferenceError(path, "no such file")
    try:
        if ext in (".mrc", ".mrcs"):
            src = read_mrc_header(path).source()
        elif ext in (".tif", ".tiff", ".gain"):
            src = TiffSource(path)
        elif ext == ".em":
            src = open_em(path)
        elif ext in (".dm4", ".dm3"):
            raise GainReferenceError(path, f"unsupported {what} format {ext}: convert it to MRC (IMOD dm2mrc)")
        else:
            raise GainReferenceError(path, f"unsupported {what} format {ext or '(no extension)'}: use MRC or TIFF")
        if src.n_frames != 1:
            raise GainReferenceError(path, f"{what} has {src.n_frames} images; expected 1")
        return np.asarray(src.read_frame(0), dtype=np.float32)
    except UnreadableMovieError as e:
        raise GainReferenceError(path, e.reason) from e


def orient(ref: np.ndarray, flip_x: bool = False, flip_y: bool = False, transpose: bool = False) -> np.ndarray:
    """Apply Warp's reference transforms to (y, x): flip X, then flip Y, then transpose."""
    if flip_x:
        ref = ref[:, ::-1]
    if flip_y:
        ref = ref[::-1, :]
    if transpose:
        ref = ref.T
    return np.ascontiguousarray(ref)


def _wh(shape) -> str:
    return f"{shape[1]}×{shape[0]}"


def fit_to_frame(
    ref: np.ndarray, frame_shape: tuple[int, int], path: str, what: str, transposed: bool, eer_upsampling: int = 0
) -> np.ndarray:
    """Return ``ref`` (already oriented) at ``frame_shape``, or raise :class:`GainReferenceError` with a hint.

    For EER movies (``eer_upsampling`` > 0) a reference on the physical grid is repeated to the rendered grid.
    """
    rs, fs = tuple(ref.shape), tuple(frame_shape)
    if rs == fs:
        return ref
    if eer_upsampling and all(f == r * eer_upsampling for f, r in zip(fs, rs)):
        return np.repeat(np.repeat(ref, eer_upsampling, 0), eer_upsampling, 1)
    hint = ""
    if rs[::-1] == fs:
        hint = f"try gain_transpose={not transposed}"
    elif eer_upsampling:
        physical = (fs[0] // eer_upsampling, fs[1] // eer_upsampling)
        for s in (rs, rs[::-1]):
            fits = [u for u in (1, 2, 4) if (physical[0] * u, physical[1] * u) == s]
            if fits:
                hint = f"try eer_upsampling={fits[0]}" + ("" if s == rs else f" and gain_transpose={not transposed}")
                break
    if not hint and all(r % f == 0 for r, f in zip(rs, fs)) and rs[0] // fs[0] == rs[1] // fs[1]:
        hint = f"the {what} is {rs[0] // fs[0]}× the movie: a super-resolution {what} for binned movies?"
    elif not hint and all(f % r == 0 for r, f in zip(rs, fs)) and fs[0] // rs[0] == fs[1] // rs[1]:
        hint = f"the movie is {fs[0] // rs[0]}× the {what}: super-resolution movies with a binned {what}?"
    size = _wh(rs) + (f" ({_wh(rs[::-1])} before gain_transpose)" if transposed else "")
    msg = f"{what} is {size} but movie is {_wh(fs)}" + (f": {hint}" if hint else "") + " (sizes are width×height)"
    raise GainReferenceError(path, msg)


_RECT = re.compile(r"^\s*(-?\d+)[\s,;]+(-?\d+)[\s,;]+(\d+)[\s,;]+(\d+)\s*$")


def read_defect_mask(path: str | os.PathLike, grid_shape: tuple[int, int]) -> np.ndarray:
    """Defects as bool (y, x): an image (nonzero = bad) or a text file of rectangles ``x y w h`` per line.

    Text rectangles are in pixels of ``grid_shape`` (x = column, y = row, as our readers return them), clipped
    to it; ``#`` starts a comment.
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in _IMAGE_EXTENSIONS:
        return read_reference(path, "defect map") != 0
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GainReferenceError(path, f"cannot read defect list: {e}") from e
    ny, nx = grid_shape
    mask = np.zeros(grid_shape, bool)
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = _RECT.match(text)
        if not m:
            raise GainReferenceError(path, f"line {n}: expected 'x y w h', got {line.strip()!r}")
        x, y, w, h = (int(v) for v in m.groups())
        if x >= nx or y >= ny or x + w <= 0 or y + h <= 0:
            raise GainReferenceError(path, f"line {n}: rectangle {x} {y} {w} {h} lies outside the {nx}×{ny} frame")
        mask[max(y, 0) : y + h, max(x, 0) : x + w] = True
    return mask


@dataclass(frozen=True)
class DefectFill:
    """Bad pixels (flat indices, n) and the mean-of-good-neighbours operator (n × pixels, sparse)."""

    index: np.ndarray
    weights: scipy.sparse.csr_matrix

    def apply(self, frame: np.ndarray) -> None:
        """Fill the bad pixels of a contiguous (y, x) float32 frame in place."""
        flat = frame.reshape(-1)
        flat[self.index] = self.weights @ flat


def _disk(r: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    keep = (dy**2 + dx**2 <= r * r) & ((dy != 0) | (dx != 0))
    return dy[keep], dx[keep]


def defect_fill(mask: np.ndarray, min_radius: int = 4, max_radius: int = 64) -> DefectFill | None:
    """Build the fill operator for ``mask`` (y, x) bool; ``None`` when nothing is bad.

    Each bad pixel takes the mean of the good pixels within radius ``r`` (from ``min_radius``, grown until there
    are round(π r0²) - 1 of them; r grows by 1 up to 16, then by half). Pixels still short of neighbours at
    ``max_radius`` take the nearest good pixel.
    """
    mask = np.asarray(mask, bool)
    ny, nx = mask.shape
    bad = np.flatnonzero(mask)
    if bad.size == 0:
        return None
    if bad.size == mask.size:
        raise ValueError("every pixel is marked defective")
    need = int(round(np.pi * min_radius**2)) - 1
    flat_mask = mask.ravel()
    rows, cols, vals = [], [], []
    pending = np.arange(bad.size)
    r = min_radius
    while pending.size and r <= max_radius:
        dy, dx = _disk(r)
        step = max(1, (1 << 22) // dy.size)  # bound the (pixels × offsets) work arrays
        left = []
        for s in range(0, pending.size, step):
            k = pending[s : s + step]
            yy = (bad[k] // nx)[:, None] + dy
            xx = (bad[k] % nx)[:, None] + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            flat = np.where(inside, yy * nx + xx, 0)
            good = inside & ~flat_mask[flat]
            count = good.sum(1)
            done = count >= need
            kk, jj = np.nonzero(good[done])
            rows.append(k[done][kk])
            cols.append(flat[done][kk, jj])
            vals.append(1.0 / count[done][kk])
            left.append(k[~done])
        pending = np.concatenate(left)
        r = min(max_radius, r + 1 if r < 16 else r + r // 2) if r < max_radius else max_radius + 1
    if pending.size:  # very large defects: nearest good pixel
        from scipy.ndimage import distance_transform_edt

        _, (iy, ix) = distance_transform_edt(mask, return_indices=True)
        p = bad[pending]
        rows.append(pending)
        cols.append(iy.ravel()[p] * nx + ix.ravel()[p])
        vals.append(np.ones(pending.size))
    w = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),  # float64: exact means
        shape=(bad.size, mask.size),
    )
    return DefectFill(bad, w)


@dataclass(frozen=True)
class Correction:
    """Per-frame gain and defect correction at the movie's frame size."""

    gain: np.ndarray | None = None  # (y, x) float32 multiplier
    defects: DefectFill | None = None

    def apply(self, raw: np.ndarray, out: np.ndarray) -> None:
        """``out`` (y, x) float32 <- ``raw`` × gain, defects filled."""
        if self.gain is not None:
            np.multiply(raw, self.gain, out=out, casting="unsafe")
        else:
            out[...] = raw
        if self.defects is not None:
            self.defects.apply(out)


def prepare_correction(
    frame_shape: tuple[int, int],
    gain: str | os.PathLike | None = None,
    defects: str | os.PathLike | None = None,
    *,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
    eer_upsampling: int = 0,
) -> Correction:
    """Read, orient, check and normalise the gain and defect map for frames of ``frame_shape`` (y, x).

    ``eer_upsampling`` > 0 marks an EER movie rendered at that factor: the gain is divided instead of multiplied,
    and references on the physical grid are repeated to the rendered one.
    """
    g = None
    bad = np.zeros(frame_shape, bool)
    if gain is not None:
        gpath = os.fspath(gain)
        ref = read_reference(gpath, "gain")
        grid = ref.shape
        g = fit_to_frame(orient(ref, flip_x, flip_y, transpose), frame_shape, gpath, "gain", transpose, eer_upsampling)
        valid = np.isfinite(g) & (g > 0)
        if not valid.any():
            raise GainReferenceError(gpath, "gain reference has no positive values")
        g = np.where(valid, g / g[valid].mean(dtype=np.float64), 1.0).astype(np.float32)
        if eer_upsampling:
            g = (1.0 / g).astype(np.float32)
        bad |= ~valid
    else:
        physical = tuple(s // max(eer_upsampling, 1) for s in frame_shape)
        grid = physical[::-1] if transpose else physical
    if defects is not None:
        dpath = os.fspath(defects)
        m = read_defect_mask(dpath, grid)
        bad |= fit_to_frame(orient(m, flip_x, flip_y, transpose), frame_shape, dpath, "defect map", transpose,
                            eer_upsampling)  # fmt: skip
    try:
        fill = defect_fill(bad)
    except ValueError as e:
        raise GainReferenceError(os.fspath(defects if defects is not None else gain), str(e)) from e
    return Correction(g, fill)
