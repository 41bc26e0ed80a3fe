"""Multi-page TIFF movies (LZW, deflate, none) through tifffile: pages decoded lazily, one per frame, thread-safe.

Orientation: like Warp, TIFF images (movies, gain references, ``.gain``) are flipped in y on reading, so that they
share MRC's convention (Warp's ``WARP_DONT_FLIPY`` is our ``NAPARI_WARP_DONT_FLIPY``). MRC, EER, EM and raw data
are read as stored. This keeps Warp's gain flip/transpose settings valid for the same files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading

import numpy as np

from ..errors import UnreadableMovieError

TIFF_EXTENSIONS = (".tif", ".tiff", ".gain")
EER_COMPRESSIONS = (65000, 65001, 65002)


def flip_y() -> bool:
    """Whether TIFF data are flipped in y (Warp's default; ``NAPARI_WARP_DONT_FLIPY`` turns it off)."""
    return not os.environ.get("NAPARI_WARP_DONT_FLIPY")


class _Collect(logging.Filter):
    """Swallow and keep tifffile's log records from this thread (we raise our own error instead)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record):
        if threading.get_ident() != self.thread:
            return True
        self.messages.append(record.getMessage())
        return False


@contextlib.contextmanager
def _tifffile_log():
    log = logging.getLogger("tifffile")
    f = _Collect()
    log.addFilter(f)
    try:
        yield f.messages
    finally:
        log.removeFilter(f)


def open_tiff(path: str, **kwargs):
    """``tifffile.TiffFile`` with library errors turned into :class:`UnreadableMovieError`."""
    import tifffile

    try:
        return tifffile.TiffFile(path, **kwargs)
    except (tifffile.TiffFileError, ValueError, struct.error, EOFError) as e:
        raise UnreadableMovieError(path, f"not a readable TIFF file: {e}") from e
    except OSError as e:
        raise UnreadableMovieError(path, f"cannot read: {e.strerror or e}") from e


def declared_frames(tif) -> int | None:
    """Frame count promised by tifffile's shaped or ImageJ metadata, if any."""
    with contextlib.suppress(Exception):
        shaped = tif.shaped_metadata
        if shaped and len(shaped[0].get("shape", ())) == 3:
            return int(shaped[0]["shape"][0])
    with contextlib.suppress(Exception):
        ij = tif.imagej_metadata
        if ij and "images" in ij:
            return int(ij["images"])
    return None


def load_pages(path: str, tif, *, eer: bool, declared: int | None = None) -> list:
    """Validated frame pages: uniform 2D shape and type, every page's data inside the file.

    Raises :class:`UnreadableMovieError` for truncated files ("truncated: 12 of 40 frames") and odd layouts.
    """
    size = os.path.getsize(path)
    pages: list = []
    with _tifffile_log() as messages:
        try:
            for p in tif.pages:
                pages.append(p)
        except Exception as e:  # noqa: BLE001 -- tifffile raises many kinds on a cut or corrupt IFD
            messages.append(f"page directory {len(pages)} is unreadable ({e})")
    if eer:
        pages = [p for p in pages if p.compression in EER_COMPRESSIONS]  # skip EPU's integrated image, if any
    if not pages:
        why = f": {messages[-1]}" if messages else ""
        raise UnreadableMovieError(path, "no image pages" + (" with EER compression" if eer else "") + why)
    first = pages[0]
    for k, p in enumerate(pages):
        if len(p.shape) != 2:
            raise UnreadableMovieError(path, f"unsupported TIFF layout: page {k} has shape {p.shape}, expected 2D")
        if p.shape != first.shape or p.dtype != first.dtype:
            raise UnreadableMovieError(
                path, f"page {k} is {p.shape} {p.dtype}, page 0 is {first.shape} {first.dtype}: not one movie"
            )
    ends = [max((int(o) + int(c) for o, c in zip(p.dataoffsets, p.databytecounts)), default=0) for p in pages]
    complete = next((k for k, e in enumerate(ends) if e > size), len(pages))
    total = max(declared or 0, len(pages))
    if complete < total:
        raise UnreadableMovieError(path, f"truncated: {complete} of {total} frames (file is {size} bytes)")
    broken = [m for m in messages if "invalid page offset" in m or "page directory" in m]
    if broken:
        raise UnreadableMovieError(path, f"truncated or corrupt: {complete} frames readable, then {broken[0]}")
    return pages


class TiffSource:
    """One frame per TIFF page; ``read_frame`` decodes a single page (safe to call from many threads).

    Pickles without its file handle (reopened on first use), so it travels to Dask workers.
    """

    pixel_size = None
    voltage = None
    exposure = None

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        tif = open_tiff(self.path)
        try:
            pages = load_pages(self.path, tif, eer=False, declared=declared_frames(tif))
        except BaseException:
            tif.close()
            raise
        if pages[0].compression in EER_COMPRESSIONS:
            tif.close()
            raise UnreadableMovieError(self.path, "this TIFF holds EER frames: open it as .eer")
        self.n_frames = len(pages)
        self.frame_shape = tuple(pages[0].shape)
        self.dtype = np.dtype(pages[0].dtype)
        self.flip = flip_y()
        self._tif, self._pages, self._lock = tif, pages, threading.RLock()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_frames, *self.frame_shape)

    def _handles(self):
        with self._lock:
            if self._tif is None:
                self._tif = open_tiff(self.path)
                self._pages = list(self._tif.pages)
            return self._pages

    def read_frame(self, i: int) -> np.ndarray:
        """Page ``i`` decoded, (y, x) in the stored dtype (a y-flipped view by default)."""
        pages = self._handles()
        a = pages[i].asarray(lock=self._lock, maxworkers=1)  # lock guards only the file reads; decode runs free
        return a[::-1] if self.flip else a

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
            self._tif, self._pages = None, None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_tif=None, _pages=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


_UNITS_A = {"nm": 10.0, "nanometer": 10.0, "micron": 1e4, "um": 1e4, "µm": 1e4, "\\u00B5m": 1e4, "a": 1.0,
            "å": 1.0, "angstrom": 1.0, "\\u00C5": 1.0}  # fmt: skip


def imagej_slices(path: str | os.PathLike) -> int:
    """Number of z slices an ImageJ hyperstack declares (0 when the file has no ImageJ metadata)."""
    tif = open_tiff(os.fspath(path))
    try:
        ij = tif.imagej_metadata or {}
        return int(ij.get("slices", 0)) if int(ij.get("frames", 1)) <= 1 else 0
    except (TypeError, ValueError):
        return 0
    finally:
        tif.close()


def read_tiff_image_stack(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """All pages as (n, y, x) in the stored dtype (y-flipped like movies); ImageJ voxel size (z, y, x) in Å."""
    src = TiffSource(path)
    try:
        data = np.stack([src.read_frame(i) for i in range(src.n_frames)])
        voxel = None
        with contextlib.suppress(Exception):
            ij = src._tif.imagej_metadata or {}
            scale = _UNITS_A.get(str(ij.get("unit", "")).strip().lower())
            xres, yres = src._pages[0].resolution
            if scale and xres > 0 and yres > 0:
                z = float(ij.get("spacing", 1.0 / xres))
                voxel = (z * scale, scale / yres, scale / xres)
    finally:
        src.close()
    return data, voxel
