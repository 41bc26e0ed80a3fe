"""Lazy movies from any supported file: ``open_movie`` -> :class:`Movie` (gain, defects, binning applied per frame).

Formats: MRC/MRCS/.st/.rec/.map (modes 0, 1, 2, 6, 12, 101), multi-page TIFF (LZW/deflate), EER, TOM/EM and
headerless raw (:class:`RawLayout`). A micrograph is a 1-frame movie. Nothing is decoded until ``frames()`` or a
dask chunk asks; frames are decoded in parallel threads (imagecodecs and file reads release the GIL).

Per frame: read -> float32 -> × gain (÷ for EER) -> fill defects -> optional Fourier-crop binning.
Orientation follows Warp: TIFF data are flipped in y on reading, MRC/EER/EM/raw are read as stored.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..device import to_numpy
from ..errors import UnreadableMovieError
from ..fourier import fourier_crop
from .eer import EER_EXTENSIONS, EerSource, group_for_dose
from .em import EM_EXTENSIONS, open_em
from .gain import Correction, prepare_correction
from .mrc import MRC_EXTENSIONS, read_mrc_header, read_mrc_volume
from .mrc_write import write_mrc
from .raw import RawLayout, open_raw
from .tiff import TIFF_EXTENSIONS, TiffSource, imagej_slices, read_tiff_image_stack

__all__ = [
    "Movie", "RawLayout", "open_movie", "read_volume", "is_volume", "write_mrc", "binned_shape",
]  # fmt: skip


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _frame_indices(index, n: int) -> list[int]:
    """int / slice / sequence of ints / bool mask -> list of frame numbers in 0..n-1."""
    if isinstance(index, slice):
        return list(range(*index.indices(n)))
    if isinstance(index, (int, np.integer)):
        index = [index]
    arr = np.asarray(index)
    if arr.size == 0:
        return []
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean frame mask has shape {arr.shape}, movie has {n} frames")
        return np.flatnonzero(arr).tolist()
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise IndexError(f"frame index must be an int, a slice or a sequence of ints, not {index!r}")
    if arr.min() < -n or arr.max() >= n:
        raise IndexError(f"frame index out of range for a movie of {n} frames: {index!r}")
    return (arr % n).tolist()


def binned_shape(shape: tuple[int, int], binning: float) -> tuple[int, int]:
    """Frame size (y, x) after Fourier-crop binning: each side rounded, then made even (as Warp does)."""
    if binning == 1:
        return tuple(shape)
    return tuple(max(2, int(round(s / binning)) // 2 * 2) for s in shape)


@dataclass(frozen=True, eq=False)
class Movie:
    """A lazily read movie (frames, y, x); see :func:`open_movie`.

    Attributes
    ----------
    path
        The file.
    shape
        (frames, y, x) as returned: after EER grouping/upsampling and binning.
    pixel_size
        Å per returned pixel, or None when unknown.
    voltage
        Acceleration voltage in kV, or None.
    exposure
        Total dose in the returned frames, e/Å², or None.
    frames_per_group
        Raw EER frames summed into each returned frame (1 for other formats).
    dtype
        Type of the frames returned (float32).
    """

    path: Path
    shape: tuple[int, int, int]
    pixel_size: float | None
    voltage: float | None
    exposure: float | None
    frames_per_group: int = 1
    dtype: np.dtype = np.dtype(np.float32)
    _source: Any = field(default=None, repr=False)
    _correction: Correction = field(default_factory=Correction, repr=False)
    _token: str = field(default="", repr=False)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(y, x) of the frames as rendered from the file, before binning (the movie's own pixel grid)."""
        return tuple(self._source.frame_shape) if self._source is not None else tuple(self.shape[1:])

    @property
    def binning(self) -> float:
        """Stored over returned frame width: 1 unless binned on load."""
        return self.stored_shape[1] / self.shape[2]

    def __len__(self) -> int:
        return self.shape[0]

    def frames(self, index: int | slice | Sequence[int] = slice(None), *, workers: int | None = None) -> np.ndarray:
        """Decode and correct frames.

        Parameters
        ----------
        index
            Frame number, slice, sequence of frame numbers or boolean mask.
        workers
            Threads decoding frames in parallel (default: all available cores).

        Returns
        -------
        float32 array (n, y, x) -- n = 1 for an int index.
        """
        idx = _frame_indices(index, len(self))
        out = np.empty((len(idx), *self.shape[1:]), np.float32)
        n_workers = min(len(idx), workers or _default_workers())
        if n_workers <= 1:
            for k, i in enumerate(idx):
                self._render(i, out[k])
        else:
            with ThreadPoolExecutor(n_workers) as ex:
                list(ex.map(lambda k: self._render(idx[k], out[k]), range(len(idx))))
        return out

    def _render(self, i: int, out: np.ndarray) -> None:
        try:
            raw = self._source.read_frame(i)
            if raw.shape == out.shape:
                self._correction.apply(raw, out)
            else:  # binning: correct at full size, then crop the spectrum
                full = np.empty(raw.shape, np.float32)
                self._correction.apply(raw, full)
                out[...] = to_numpy(fourier_crop(torch.from_numpy(full), out.shape))
        except (UnreadableMovieError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 -- decoder errors of every kind become one, naming the file
            raise UnreadableMovieError(self.path, f"frame {i}: {type(e).__name__}: {e}") from e

    def __getitem__(self, key):
        """numpy-style indexing (frames decoded on demand); lets dask and napari use the movie as an array."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            e = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:e] + (slice(None),) * (3 - len(key) + 1) + key[e + 1 :]
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            return self.frames(first)[0][rest]
        return self.frames(first)[(slice(None), *rest)]

    def to_dask(self):
        """A dask array (frames, y, x) float32 with one chunk per frame (for napari)."""
        import dask.array as da

        return da.from_array(
            self, chunks=(1, *self.shape[1:]), name=f"napari-warp-movie-{self._token}", asarray=False, fancy=False,
            lock=False, meta=np.empty((0, 0, 0), np.float32),
        )  # fmt: skip

    def close(self) -> None:
        """Release open file handles (they reopen on the next read)."""
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Movie:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(1024)
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "tiff"
    if len(head) == 1024 and head[208:212] == b"MAP ":
        return "mrc"
    return None


def _format(path: Path) -> str | None:
    """'mrc', 'tiff', 'eer' or 'em' from the extension, else from the first bytes (TIFF magic, MRC 'MAP ')."""
    ext = path.suffix.lower()
    known = {"mrc": MRC_EXTENSIONS, "tiff": TIFF_EXTENSIONS, "eer": EER_EXTENSIONS, "em": EM_EXTENSIONS}
    return next((kind for kind, exts in known.items() if ext in exts), None) or _sniff(path)


def _open_source(path: Path, raw: RawLayout | None, eer_upsampling: int):
    if raw is not None:
        return open_raw(path, raw)
    kind = _format(path)
    if kind == "mrc":
        return read_mrc_header(path).source()
    if kind == "tiff":
        return TiffSource(path)
    if kind == "eer":
        return EerSource(path, eer_upsampling)
    if kind == "em":
        return open_em(path)
    raise UnreadableMovieError(
        path, f"unrecognised format (extension {path.suffix or 'none'!r}); pass raw=RawLayout(...) for headerless data"
    )


def open_movie(
    path: str | os.PathLike,
    gain: str | os.PathLike | None = None,
    defects: str | os.PathLike | None = None,
    *,
    gain_flip_x: bool = False,
    gain_flip_y: bool = False,
    gain_transpose: bool = False,
    binning: float = 1.0,
    eer_group: int | None = None,
    eer_dose_per_group: float | None = None,
    eer_upsampling: int = 1,
    raw: RawLayout | None = None,
    pixel_size: float | None = None,
    exposure: float | None = None,
) -> Movie:
    """Open a movie or micrograph lazily; the header is read and checked now, frames when asked.

    Parameters
    ----------
    path
        MRC/MRCS/.st/.rec/.map, TIFF, EER, EM, or any file when ``raw`` describes it.
    gain, defects
        Gain reference (MRC, TIFF/.gain, EM) and defect map (image, nonzero = bad; or text ``x y w h`` per line).
    gain_flip_x, gain_flip_y, gain_transpose
        Warp's reference transforms, applied to gain and defects in that order.
    binning
        Fourier-crop binning factor >= 1 (pixel size scales by the actual size ratio).
    eer_group, eer_dose_per_group
        EER only: raw frames per returned frame, or the e/Å² each returned frame should hold (needs the exposure).
        Default: every raw frame. Raw frames after the last whole group are dropped.
    eer_upsampling
        EER only: render at 1×, 2× or 4× the physical pixel grid.
    raw
        Layout of a headerless file; when given, the file is read as raw whatever its extension.
    pixel_size
        Å per stored pixel (for EER: per physical pixel), overriding the header.
    exposure
        Total e/Å² of the whole recording, overriding the header (EER: of all raw frames).

    Raises
    ------
    UnreadableMovieError
        Missing, truncated, corrupt or unsupported file (the message names the file and the problem).
    GainReferenceError
        Unreadable gain/defect file, or one that does not fit the movie (with a hint which transform would).
    """
    path = Path(path)
    if not (math.isfinite(binning) and binning >= 1):
        raise ValueError(f"binning must be a finite number >= 1, not {binning!r}")
    if eer_group is not None and eer_dose_per_group is not None:
        raise ValueError("give eer_group or eer_dose_per_group, not both")
    if not path.is_file():
        raise UnreadableMovieError(path, "no such file" if not path.exists() else "not a file")
    try:
        src = _open_source(path, raw, eer_upsampling)
    except UnreadableMovieError:
        raise
    except OSError as e:
        raise UnreadableMovieError(path, f"cannot read: {e.strerror or e}") from e
    total = exposure if exposure is not None else src.exposure
    is_eer = isinstance(src, EerSource)
    if is_eer:
        group = (
            group_for_dose(eer_dose_per_group, total, src.n_raw, str(path)) if eer_dose_per_group is not None
            else eer_group or 1
        )  # fmt: skip
        src.with_group(group)
        total = total * src.n_frames * src.group / src.n_raw if total else None  # dose in the frames returned
        ps = pixel_size / eer_upsampling if pixel_size is not None else src.pixel_size
    else:
        group = 1
        ps = pixel_size if pixel_size is not None else src.pixel_size
    correction = prepare_correction(
        src.frame_shape, gain, defects, flip_x=gain_flip_x, flip_y=gain_flip_y, transpose=gain_transpose,
        eer_upsampling=eer_upsampling if is_eer else 0,
    )  # fmt: skip
    out = binned_shape(src.frame_shape, binning)
    if ps is not None:
        ps = float(ps) * src.frame_shape[1] / out[1]
    st = path.stat()
    settings = (gain, defects, gain_flip_x, gain_flip_y, gain_transpose, binning, group, eer_upsampling, raw)
    token = hashlib.sha1(repr((str(path.resolve()), st.st_size, st.st_mtime_ns, settings)).encode()).hexdigest()
    return Movie(
        path, (src.n_frames, *out), ps, src.voltage, total, group, np.dtype(np.float32), src, correction, token[:16]
    )


def read_volume(path: str | os.PathLike, *, per_axis: bool = False):
    """Read a 3D map or tomogram (MRC family, EM, TIFF stack) whole.

    Returns
    -------
    (data, voxel_size)
        ``data`` float32 (z, y, x); ``voxel_size`` in Å from the header: the x spacing, or with ``per_axis`` a
        (z, y, x) tuple; None when the file does not say.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableMovieError(path, "no such file" if not path.exists() else "not a file")
    kind = _format(path)
    if kind == "mrc":
        data, voxel = read_mrc_volume(path)
    elif kind == "em":
        src = open_em(path)
        data = src.read_all().astype(np.float32)
        voxel = (src.pixel_size,) * 3 if src.pixel_size else None
    elif kind == "tiff":
        stack, voxel = read_tiff_image_stack(path)
        data = stack.astype(np.float32)
    else:
        raise UnreadableMovieError(path, f"unrecognised volume format (extension {path.suffix or 'none'!r})")
    if voxel is None:
        return data, None
    return data, tuple(float(v) for v in voxel) if per_axis else float(voxel[2])


def is_volume(path: str | os.PathLike) -> bool:
    """Whether a file holds a 3D volume rather than images or a movie (for readers choosing a layer type).

    MRC family: more than one section and a volume space group (1-230, or 401-630 for volume stacks; image
    stacks use 0). TIFF: an ImageJ hyperstack with several z slices. EM: more than one section (TOM/PyTom use
    EM for volumes). Unreadable files raise :class:`UnreadableMovieError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableMovieError(path, "no such file" if not path.exists() else "not a file")
    kind = _format(path)
    if kind == "mrc":
        h = read_mrc_header(path)
        return h.shape[0] > 1 and (1 <= h.space_group <= 230 or 401 <= h.space_group <= 630)
    if kind == "em":
        return open_em(path).n_frames > 1
    if kind == "tiff":
        return imagej_slices(path) > 1
    return False
