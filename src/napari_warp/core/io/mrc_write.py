"""Atomic MRC writing with the pixel size (and voltage) in the header."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import mrcfile
import numpy as np

from .atomic import atomic_path

_WRITABLE = (np.float32, np.float16, np.int8, np.int16, np.uint16)


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    pixel_size: float | None,
    dtype=np.float32,
    voltage: float | None = None,
    *,
    volume: bool = False,
) -> None:
    """Write an image (y, x), a stack (n, y, x) or, with ``volume=True``, a volume (z, y, x) to an MRC file.

    The file appears in one rename (never half-written). ``pixel_size`` (Å) goes into the cell dimensions;
    ``voltage`` (kV), which MRC2014 has no field for, into a label that :func:`read_mrc_header` reads back.

    Parameters
    ----------
    data
        Array (y, x) or (n, y, x).
    dtype
        Stored type: float32 (mode 2, default), float16 (mode 12), or int8/int16/uint16 (modes 0/1/6).
    """
    dtype = np.dtype(dtype)
    if dtype not in [np.dtype(t) for t in _WRITABLE]:
        raise ValueError(f"cannot write MRC as {dtype}: use float32, float16, int8, int16 or uint16")
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"MRC data must be 2D or 3D, got shape {data.shape}")
    if dtype.kind in "iu" and data.dtype.kind == "f":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    data = np.ascontiguousarray(data, dtype=dtype)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if data.ndim == 3:
                mrc.set_volume() if volume else mrc.set_image_stack()
            if pixel_size is not None:
                mrc.voxel_size = float(pixel_size)
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            mrc.header.label[0] = f"napari-warp {stamp}".encode()
            nlabl = 1
            if voltage is not None:
                mrc.header.label[1] = f"voltage {float(voltage):g} kV".encode()
                nlabl = 2
            mrc.header.nlabl = nlabl
