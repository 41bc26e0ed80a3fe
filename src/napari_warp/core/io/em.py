"""TOM/EM format: a 512-byte header (machine byte, data type code, x/y/z sizes, 40 int32 parameters), then data.

Parameters follow Warp's reading: ``emdata[0]`` voltage (V; values below 1000 are taken as kV) and ``emdata[6]``
pixel size in Å × 1000. Zero means unknown.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UnreadableMovieError
from .atomic import atomic_path
from .raw import BinarySource, check_size

EM_EXTENSIONS = (".em",)
_HEADER_BYTES = 512
_MACHINES = {0: ">", 1: "<", 2: ">", 3: ">", 4: ">", 5: ">", 6: "<"}  # OS-9, VAX, Convex, SGI, Sun, Mac, PC
_TYPES = {1: np.uint8, 2: np.int16, 4: np.int32, 5: np.float32, 9: np.float64}
_UNSUPPORTED = {3: "complex int16", 8: "complex float32", 10: "complex float64"}
_CODES = {np.dtype(v): k for k, v in _TYPES.items()}


def open_em(path: str | os.PathLike) -> BinarySource:
    """A :class:`BinarySource` over an EM file's sections (z as frames); raises on bad or truncated files."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(_HEADER_BYTES)
    except OSError as e:
        raise UnreadableMovieError(path, f"cannot read: {e.strerror or e}") from e
    if size < _HEADER_BYTES:
        raise UnreadableMovieError(path, f"not an EM file: {size} bytes, shorter than the 512-byte header")
    machine, code = raw[0], raw[3]
    if machine not in _MACHINES:
        raise UnreadableMovieError(path, f"not an EM file: machine byte {machine} is not one of {sorted(_MACHINES)}")
    if code in _UNSUPPORTED:
        raise UnreadableMovieError(path, f"unsupported EM data type {code} ({_UNSUPPORTED[code]})")
    if code not in _TYPES:
        raise UnreadableMovieError(path, f"not an EM file: unknown data type code {code}")
    order = _MACHINES[machine]
    i32 = np.dtype(np.int32).newbyteorder(order)
    nx, ny, nz = (int(v) for v in np.frombuffer(raw, i32, count=3, offset=4))
    if not all(0 < d <= 1 << 20 for d in (nx, ny, nz)):
        raise UnreadableMovieError(path, f"not an EM file: implausible size {nx}×{ny}×{nz}")
    params = np.frombuffer(raw, i32, count=40, offset=96)
    volt = int(params[0])
    voltage = volt / 1000.0 if volt >= 1000 else (float(volt) if volt > 0 else None)
    pixel_size = params[6] / 1000.0 if params[6] > 0 else None
    dtype = np.dtype(_TYPES[code]).newbyteorder(order)
    frame_bytes = nx * ny * dtype.itemsize
    check_size(path, nz, _HEADER_BYTES, frame_bytes)
    return BinarySource(path, nz, (ny, nx), dtype, _HEADER_BYTES, frame_bytes, pixel_size=pixel_size, voltage=voltage)


def write_em(
    path: str | os.PathLike, data: np.ndarray, pixel_size: float | None = None, voltage: float | None = None
) -> None:
    """Write (y, x) or (z, y, x) data as a little-endian (PC) EM file, atomically.

    ``data`` keeps its type when EM has one (uint8, int16, int32, float32, float64); anything else becomes float32.
    """
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"EM data must be 2D or 3D, got shape {data.shape}")
    dtype = data.dtype.newbyteorder("=") if data.dtype.newbyteorder("=") in _CODES else np.dtype(np.float32)
    header = np.zeros(_HEADER_BYTES, np.uint8)
    header[0], header[3] = 6, _CODES[dtype]
    header[4:16] = np.frombuffer(np.array(data.shape[::-1], "<i4").tobytes(), np.uint8)
    params = np.zeros(40, "<i4")
    params[0] = round(voltage * 1000) if voltage else 0
    params[6] = round(pixel_size * 1000) if pixel_size else 0
    header[96:256] = np.frombuffer(params.tobytes(), np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        np.ascontiguousarray(data, dtype.newbyteorder("<")).tofile(f)
