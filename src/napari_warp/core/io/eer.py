"""Thermo Fisher EER movies: pages found by tifffile, events decoded by imagecodecs, summed in groups of raw frames.

Rendering: ``upsampling`` 1, 2 or 4 places each event on the physical pixel grid, or uses the top one or both
of its 2+2 sub-pixel bits (4K, 8K, 16K on a Falcon 4). Grouping: output frame ``k`` is the sum of raw frames
``k*group ... (k+1)*group - 1``; raw frames left over after the last whole group are dropped, as in Warp and
RELION. EER frames are not flipped (Warp reads them as stored).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from ..errors import UnreadableMovieError
from .tiff import load_pages, open_tiff

EER_EXTENSIONS = (".eer",)
_SUPERRES = {1: 0, 2: 1, 4: 2}  # upsampling -> sub-pixel bits used per axis (imagecodecs "superres")


def _metadata(tif) -> dict:
    with contextlib.suppress(Exception):
        return dict(tif.eer_metadata or {})
    return {}


def _pixel_size(meta: dict) -> float | None:
    """Physical pixel size at the specimen in Å from ``sensorPixelSize`` (metres in EPU's metadata)."""
    v = meta.get("sensorPixelSize.width")
    nested = meta.get("sensorPixelSize")
    if v is None and isinstance(nested, dict):
        v = nested.get("width")
    with contextlib.suppress(TypeError, ValueError):
        v = float(v)
        if v > 0:
            return v * 1e10 if v < 1e-6 else v  # metres in EPU files; a value >= 1e-6 can only be Å
    return None


def _exposure(meta: dict, pixel_size: float | None) -> float | None:
    """Total dose in e/Å² from ``totalDose``, which EPU gives per physical pixel (unit ``e/pixel``)."""
    with contextlib.suppress(TypeError, ValueError):
        dose = float(meta.get("totalDose"))
        unit = str(meta.get("totalDose.unit", "e/pixel")).lower().replace(" ", "")
        if dose > 0:
            if "pix" in unit or unit in ("e", "e-", "counts"):
                return dose / pixel_size**2 if pixel_size else None
            if "m^2" in unit or "m2" in unit or "m²" in unit:
                return dose * 1e-20
            return dose  # e/Å²
    return None


class EerSource:
    """Raw EER frames summed in groups; ``read_frame(k)`` renders group ``k`` as uint16 counts (y, x).

    tifffile parses the pages once; strips are then read directly and decoded by ``imagecodecs.eer_decode``
    (thread-safe, releases the GIL). ``pixel_size`` (Å) is the rendered pixel (physical / upsampling);
    ``exposure`` (e/Å²) is the file's total dose; ``n_raw`` the number of raw frames.
    """

    voltage = None

    def __init__(self, path: str | os.PathLike, upsampling: int = 1, group: int = 1):
        if upsampling not in _SUPERRES:
            raise ValueError(f"eer_upsampling must be 1, 2 or 4, not {upsampling!r}")
        self.path = os.fspath(path)
        self.upsampling = upsampling
        tif = open_tiff(self.path)
        try:
            meta = _metadata(tif)
            declared = meta.get("numberOfFrames")
            pages = load_pages(self.path, tif, eer=True, declared=int(declared) if declared else None)
            self._strips, self._bits = _strips(self.path, pages)
            physical = tuple(pages[0].shape)
        finally:
            tif.close()
        self.n_raw = len(self._strips)
        self.frame_shape = (physical[0] * upsampling, physical[1] * upsampling)
        ps = _pixel_size(meta)
        self.physical_pixel_size = ps
        self.pixel_size = ps / upsampling if ps else None
        self.exposure = _exposure(meta, ps)
        self.group = 1
        self.with_group(group)

    def with_group(self, group: int) -> EerSource:
        """Set the number of raw frames per returned frame (in place; returns self)."""
        if int(group) < 1:
            raise ValueError(f"eer_group must be >= 1, not {group!r}")
        self.group = min(int(group), self.n_raw)
        return self

    @property
    def n_frames(self) -> int:
        return self.n_raw // self.group

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_frames, *self.frame_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def read_frame(self, k: int) -> np.ndarray:
        """Sum of raw frames ``k*group ... (k+1)*group - 1`` as uint16 event counts (y, x)."""
        import imagecodecs

        acc = np.zeros(self.frame_shape, np.uint16)
        level = _SUPERRES[self.upsampling]
        with open(self.path, "rb") as f:
            for j in range(k * self.group, (k + 1) * self.group):
                offset, count = self._strips[j]
                f.seek(offset)
                data = f.read(count)
                if len(data) != count:
                    raise UnreadableMovieError(self.path, f"truncated: raw frame {j} has {len(data)} of {count} bytes")
                acc += imagecodecs.eer_decode(data, self.frame_shape, *self._bits[j], superres=level)
        return acc


def _strips(path: str, pages) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(offset, bytes) of each page's single strip, and its (run, horizontal, vertical) bit sizes."""
    strips, bits = [], []
    for k, p in enumerate(pages):
        if len(p.dataoffsets) != 1:
            raise UnreadableMovieError(path, f"unsupported EER layout: frame {k} has {len(p.dataoffsets)} strips")
        strips.append((int(p.dataoffsets[0]), int(p.databytecounts[0])))
        if p.compression == 65002:
            bits.append(tuple(int(p.tags.valueof(t, d)) for t, d in ((65007, 7), (65008, 2), (65009, 2))))
        else:
            bits.append((8, 2, 2) if p.compression == 65000 else (7, 2, 2))
    return np.array(strips, np.int64), bits


def group_for_dose(dose_per_group: float, exposure: float | None, n_raw: int, path: str) -> int:
    """Raw frames per group so each group holds about ``dose_per_group`` e/Å² (at least 1, at most all)."""
    if dose_per_group <= 0:
        raise ValueError(f"eer_dose_per_group must be > 0, not {dose_per_group!r}")
    if not exposure:
        raise UnreadableMovieError(
            path, "EER dose grouping needs the total exposure, which this file's metadata lacks: pass exposure="
        )
    per_raw = exposure / n_raw
    return int(min(n_raw, max(1, round(dose_per_group / per_raw))))
