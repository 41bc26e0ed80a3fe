"""MRC/MRCS/.st/.rec/.map reading: the 1024-byte header, FEI1/FEI2 extended headers, modes 0/1/2/6/12 and 101.

The header is parsed here (not by mrcfile) so every failure names the file and what was wrong, and so mode 101
(4-bit, which mrcfile cannot read) goes through the same path. mrcfile is used only for its header dtypes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
from mrcfile.dtypes import HEADER_DTYPE, get_ext_header_dtype

from ..errors import UnreadableMovieError
from .raw import BinarySource, check_size

MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".rec", ".map", ".ali", ".preali", ".ccp4")

_HEADER_BYTES = 1024
_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16, 101: np.uint8}
_UNSUPPORTED = {3: "complex int16", 4: "complex float32", 16: "RGB uint8"}
_IMOD_STAMP = 1146047817  # 'IMOD' at byte 152; flag bit 0 at byte 156 says mode-0 bytes are signed
_VOLTAGE_LABEL = re.compile(r"voltage[ =:]+([0-9.]+) *kV", re.IGNORECASE)


@dataclass(frozen=True)
class MrcHeader:
    """What we use from an MRC header. ``shape`` is (sections, rows, columns) as stored; sizes in Å."""

    path: str
    shape: tuple[int, int, int]
    mode: int
    dtype: np.dtype
    data_offset: int
    frame_bytes: int
    axes: tuple[int, int, int]  # (mapc, mapr, maps): the spatial axis (1=X, 2=Y, 3=Z) of columns, rows, sections
    voxel_size: tuple[float, float, float] | None  # (x, y, z) spacing from cella / (mx, my, mz)
    pixel_size: float | None
    voltage: float | None
    exposure: float | None
    space_group: int = 0  # 0: image or image stack; 1-230 volume; 401-630 volume stack

    def source(self) -> BinarySource:
        return BinarySource(
            self.path, self.shape[0], self.shape[1:], self.dtype, self.data_offset, self.frame_bytes,
            packed4=self.mode == 101, pixel_size=self.pixel_size, voltage=self.voltage, exposure=self.exposure,
        )  # fmt: skip


def _plausible(h) -> bool:
    dims = (int(h["nx"]), int(h["ny"]), int(h["nz"]))
    mode = int(h["mode"])
    known = mode in _MODES or mode in _UNSUPPORTED
    return all(0 < d <= 1 << 20 for d in dims) and known and 0 <= int(h["nsymbt"]) < 1 << 31


def _parse_header(path: str, raw: bytes):
    """Header record in the byte order that makes sense (machine stamp first, then the other one)."""
    stamp = raw[212]
    orders = [">", "<"] if stamp == 0x11 else ["<", ">"]
    for order in orders:
        h = np.frombuffer(raw, HEADER_DTYPE.newbyteorder(order), count=1)[0]
        if _plausible(h):
            return h, order
    h = np.frombuffer(raw, HEADER_DTYPE.newbyteorder(orders[0]), count=1)[0]
    if int(h["mode"]) not in _MODES and int(h["mode"]) not in _UNSUPPORTED and h["map"] == b"MAP ":
        raise UnreadableMovieError(path, f"unsupported MRC mode {int(h['mode'])}")
    raise UnreadableMovieError(
        path,
        "not an MRC file: implausible header "
        f"(nx={int(h['nx'])}, ny={int(h['ny'])}, nz={int(h['nz'])}, mode={int(h['mode'])})",
    )


def _fei_metadata(ext: bytes, exttyp: bytes, order: str, nz: int) -> dict:
    """HT (kV), pixel size (Å) and total dose (e/Å²) from an EPU FEI1/FEI2 extended header, where valid.

    EPU stores SI units: HT in V, pixel size in m, dose in e/m² (1 e/Å² = 1e20 e/m²). Bitmask 1 marks valid
    fields (bit 5 HT, bit 6 dose, bit 14 pixel size X). A single image's dose is its exposure; for dose-fraction
    stacks (one record per frame, "Is dose fraction" set) we assume each record holds its fraction's dose and sum.
    """
    dtype = get_ext_header_dtype(exttyp, order)
    if dtype is None or len(ext) < dtype.itemsize:
        return {}
    first = np.frombuffer(ext, dtype, count=1)[0]
    stride = int(first["Metadata size"])
    if stride < dtype.itemsize:  # not really FEI
        return {}
    n = max(1, min(nz, len(ext) // stride))
    recs = [np.frombuffer(ext, dtype, count=1, offset=k * stride)[0] for k in range(n)]
    mask = int(first["Bitmask 1"])

    def valid(bit: int, value: float) -> bool:
        return bool(mask >> bit & 1) and np.isfinite(value) and value > 0

    out: dict = {}
    ht = float(first["HT"])
    if valid(5, ht):
        out["voltage"] = ht / 1000.0
    px = float(first["Pixel size X"])
    if valid(14, px):
        out["pixel_size"] = px * 1e10
    doses = [float(r["Dose"]) for r in recs]
    if valid(6, doses[0]):
        fractions = n > 1 and all(bool(r["Is dose fraction"]) for r in recs)
        out["exposure"] = (sum(doses) if fractions else doses[0]) * 1e-20
    return out


def read_mrc_header(path: str | os.PathLike) -> MrcHeader:
    """Parse and validate an MRC header; raise :class:`UnreadableMovieError` naming what is wrong."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(_HEADER_BYTES)
            if size < _HEADER_BYTES:
                raise UnreadableMovieError(path, f"not an MRC file: {size} bytes, shorter than the 1024-byte header")
            h, order = _parse_header(path, raw)
            nsymbt = int(h["nsymbt"])
            ext = f.read(nsymbt) if nsymbt else b""
    except OSError as e:
        if isinstance(e, UnreadableMovieError):
            raise
        raise UnreadableMovieError(path, f"cannot read: {e.strerror or e}") from e
    mode = int(h["mode"])
    if mode in _UNSUPPORTED:
        raise UnreadableMovieError(path, f"unsupported MRC mode {mode} ({_UNSUPPORTED[mode]})")
    nx, ny, nz = int(h["nx"]), int(h["ny"]), int(h["nz"])
    dtype = np.dtype(_MODES[mode]).newbyteorder(order)
    if mode == 0:
        imod_stamp, imod_flags = np.frombuffer(raw, np.dtype(np.int32).newbyteorder(order), count=2, offset=152)
        if imod_stamp == _IMOD_STAMP and not imod_flags & 1:  # IMOD/SerialEM: unsigned bytes unless flagged
            dtype = np.dtype(np.uint8)
    row_bytes = (nx + 1) // 2 if mode == 101 else nx * dtype.itemsize
    frame_bytes = ny * row_bytes
    offset = _HEADER_BYTES + nsymbt
    if size < offset:
        raise UnreadableMovieError(path, f"truncated: extended header needs {nsymbt} bytes, file is {size} bytes")
    check_size(path, nz, offset, frame_bytes)

    axes = (int(h["mapc"]), int(h["mapr"]), int(h["maps"]))
    if axes == (0, 0, 0):
        axes = (1, 2, 3)
    if sorted(axes) != [1, 2, 3]:
        raise UnreadableMovieError(path, f"bad header: mapc/mapr/maps = {axes} is not a permutation of 1, 2, 3")
    cell = tuple(float(c) for c in h["cella"].tolist())
    grid = (int(h["mx"]), int(h["my"]), int(h["mz"]))
    voxel = None
    if all(g > 0 for g in grid) and all(np.isfinite(cell)) and cell[0] > 0:
        voxel = tuple(c / g for c, g in zip(cell, grid))

    exttyp = bytes(h["exttyp"])
    fei = _fei_metadata(ext, exttyp, order, nz) if exttyp in (b"FEI1", b"FEI2") else {}
    voltage = fei.get("voltage")
    if voltage is None:
        labels = [bytes(lab).decode("ascii", "replace") for lab in h["label"][: max(0, min(10, int(h["nlabl"])))]]
        hits = [m for lab in labels if (m := _VOLTAGE_LABEL.search(lab))]
        voltage = float(hits[0].group(1)) if hits else None
    pixel_size = voxel[0] if voxel else fei.get("pixel_size")
    return MrcHeader(
        path, (nz, ny, nx), mode, dtype, offset, frame_bytes, axes, voxel, pixel_size, voltage, fei.get("exposure"),
        int(h["ispg"]),
    )  # fmt: skip


def read_mrc_volume(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """Whole MRC volume as float32 (z, y, x), honouring mapc/mapr/maps; voxel size (z, y, x) in Å or None."""
    hdr = read_mrc_header(path)
    stored = hdr.source().read_all()  # (sections, rows, columns)
    along = (hdr.axes[2], hdr.axes[1], hdr.axes[0])  # spatial axis of each stored dimension
    data = np.ascontiguousarray(stored.transpose([along.index(3), along.index(2), along.index(1)]), np.float32)
    voxel = None if hdr.voxel_size is None else hdr.voxel_size[::-1]
    return data, voxel
