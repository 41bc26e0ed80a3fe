"""Frames stored back to back at a fixed stride: headerless raw files, and the data part of MRC and EM files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import UnreadableMovieError

_BYTEORDERS = {"<": "<", "little": "<", ">": ">", "big": ">", "=": "=", "native": "="}


@dataclass(frozen=True)
class RawLayout:
    """How frames lie in a headerless file.

    Parameters
    ----------
    width, height
        Frame size in pixels (x, y).
    frames
        Number of frames; ``None`` infers it from the file size (which must then hold whole frames).
    dtype
        Element type, e.g. ``"uint8"``, ``"uint16"``, ``"float32"``.
    offset
        Bytes to skip before the first frame (a header we do not parse).
    byteorder
        ``"<"``/``"little"`` or ``">"``/``"big"``.
    """

    width: int
    height: int
    frames: int | None = None
    dtype: str = "float32"
    offset: int = 0
    byteorder: str = "<"

    def __post_init__(self):
        if self.width < 1 or self.height < 1 or (self.frames is not None and self.frames < 1) or self.offset < 0:
            raise ValueError(f"invalid RawLayout {self}: sizes must be positive, offset non-negative")
        if self.byteorder not in _BYTEORDERS:
            raise ValueError(f"invalid byteorder {self.byteorder!r}: use '<'/'little' or '>'/'big'")
        dt = np.dtype(self.dtype)
        if dt.kind not in "biuf":
            raise ValueError(f"unsupported raw dtype {self.dtype!r}: use an integer or float type")


@dataclass(frozen=True)
class BinarySource:
    """Frames of ``frame_shape`` at ``data_offset + i * frame_bytes``, read one at a time (thread-safe).

    ``dtype`` carries the stored byte order; ``packed4`` marks IMOD/SerialEM mode-101 data (two 4-bit pixels per
    byte, low nibble first, each row padded to a whole byte).
    """

    path: str
    n_frames: int
    frame_shape: tuple[int, int]
    dtype: np.dtype
    data_offset: int
    frame_bytes: int
    packed4: bool = False
    pixel_size: float | None = None
    voltage: float | None = None
    exposure: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_frames, *self.frame_shape)

    def read_frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as a native-endian array (y, x) of the stored type (uint8 for 4-bit data)."""
        buf = bytearray(self.frame_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + i * self.frame_bytes)
            got = f.readinto(buf)
        if got != self.frame_bytes:  # the file shrank after it was opened
            raise UnreadableMovieError(self.path, f"truncated: frame {i} has {got} of {self.frame_bytes} bytes")
        a = np.frombuffer(buf, dtype=self.dtype)
        if self.packed4:
            ny, nx = self.frame_shape
            return unpack_4bit(a.reshape(ny, -1), nx)
        a = a.reshape(self.frame_shape)
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

    def read_all(self) -> np.ndarray:
        """All frames (n, y, x) in one read (for small volumes)."""
        return np.stack([self.read_frame(i) for i in range(self.n_frames)]) if self.n_frames else np.empty(
            (0, *self.frame_shape), self.dtype
        )


def unpack_4bit(packed: np.ndarray, nx: int) -> np.ndarray:
    """Mode-101 rows (..., ceil(nx/2)) uint8 -> pixels (..., nx) uint8 in 0..15; low nibble is the left pixel."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :nx]


def pack_4bit(data: np.ndarray) -> np.ndarray:
    """Pixels (..., nx) in 0..15 -> mode-101 rows (..., ceil(nx/2)) uint8 (odd rows padded with a zero nibble)."""
    data = np.asarray(data)
    if data.size and (data.min() < 0 or data.max() > 15):
        raise ValueError("4-bit packing needs values in 0..15")
    nx = data.shape[-1]
    padded = np.zeros(data.shape[:-1] + (nx + nx % 2,), np.uint8)
    padded[..., :nx] = data
    return (padded[..., 0::2] | (padded[..., 1::2] << 4)).astype(np.uint8)


def check_size(path: str, n_frames: int, data_offset: int, frame_bytes: int) -> None:
    """Raise when the file holds fewer bytes than its header promises (e.g. still being written)."""
    size = os.path.getsize(path)
    need = data_offset + n_frames * frame_bytes
    if size < need:
        complete = max(0, (size - data_offset) // frame_bytes) if frame_bytes else 0
        raise UnreadableMovieError(
            path, f"truncated: {complete} of {n_frames} frames (file is {size} bytes, header says {need})"
        )


def open_raw(path: str | os.PathLike, layout: RawLayout) -> BinarySource:
    """A :class:`BinarySource` for a headerless file described by ``layout``."""
    path = os.fspath(path)
    dtype = np.dtype(layout.dtype).newbyteorder(_BYTEORDERS[layout.byteorder])
    frame_bytes = layout.width * layout.height * dtype.itemsize
    n = layout.frames
    if n is None:
        avail = os.path.getsize(path) - layout.offset
        if avail < frame_bytes or avail % frame_bytes:
            raise UnreadableMovieError(
                path,
                f"{max(avail, 0)} bytes after offset {layout.offset} are not a whole number of "
                f"{layout.width}×{layout.height} {np.dtype(layout.dtype).name} frames",
            )
        n = avail // frame_bytes
    check_size(path, n, layout.offset, frame_bytes)
    return BinarySource(path, n, (layout.height, layout.width), dtype, layout.offset, frame_bytes)
