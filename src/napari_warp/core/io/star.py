"""STAR tables (RELION, Warp) over the ``starfile`` library, and particle-coordinate files.

STAR files carry ``rlnCoordinateX/Y`` (x first) in pixels of the stated micrograph; our arrays are ``(y, x)``.
:func:`read_coordinates` and :func:`write_coordinates` are the only places that swap the two.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import MetadataError
from .atomic import atomic_path

__all__ = ["CoordinateTable", "read_coordinates", "read_star", "write_coordinates", "write_star"]

COORD_X, COORD_Y = "rlnCoordinateX", "rlnCoordinateY"
SCORE = "rlnAutopickFigureOfMerit"
MICROGRAPH = "rlnMicrographName"

# Columns that name files or items stay strings, so that e.g. rlnTomoName "00254" keeps its leading zeros.
_STRING_SUFFIXES = ("Name", "File", "FileName", "Path", "Image", "Metadata", "Tomogram", "Spectrum", "Movie")
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|[^\s#]\S*|#')
_SIMPLE = "star_simple"  # DataFrame.attrs flag: the block was key-value pairs, write it back that way


# ----------------------------------------------------------------------------------------------------------------------
# generic tables


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    dict of str to pandas.DataFrame
        Block name (``"optics"`` for ``data_optics``, ``""`` for a bare ``data_``) to table. Key-value blocks become
        one-row tables flagged in ``df.attrs["star_simple"]`` so :func:`write_star` writes them back as key-value
        pairs. Name-like columns (``...Name``, ``...File``, ``...Image``, ...) are strings.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    MetadataError
        Not text, no ``data_`` block, rows whose value count differs from the loop header, or a parser failure.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetadataError(path, f"not a text STAR file ({exc.reason} at byte {exc.start})") from None
    names = _check_structure(text, path)
    as_string = sorted({n for n in names if n.endswith(_STRING_SUFFIXES)})
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=as_string)
    except Exception as exc:  # starfile/pandas raise many kinds; the caller needs one
        raise MetadataError(path, f"cannot parse STAR: {exc}") from None
    return {name: _as_frame(block) for name, block in blocks.items()}


def write_star(
    path: str | os.PathLike,
    blocks: Mapping[str, pd.DataFrame | Mapping],
    float_format: str | Callable[[float], str] | None = None,
) -> None:
    """Write data blocks to a STAR file atomically (a crash leaves the old file, never half a new one).

    Parameters
    ----------
    path : path-like
    blocks : mapping of str to DataFrame (loop block) or mapping (key-value block)
        Written in order as ``data_<name>``. One-row frames flagged by :func:`read_star` as key-value blocks are
        written back as key-value blocks.
    float_format : str or callable, optional
        printf format (``"%.6f"``) or function for float columns. The default writes the shortest text that reads
        back to the same float64, with a decimal point, so a read-write-read round trip keeps values and dtypes.
    """
    fmt = _shortest if float_format is None else float_format
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for name, block in blocks.items():
            f.write(_block_text(str(name), block, fmt))


def _shortest(value: float) -> str:
    return repr(float(value))


def _as_frame(block) -> pd.DataFrame:
    if block is None:  # "data_" with nothing after it
        return pd.DataFrame()
    if isinstance(block, dict):
        df = pd.DataFrame([block])
        df.attrs[_SIMPLE] = True
        return df
    return block.reset_index(drop=True)


def _block_text(name: str, block, float_format: str) -> str:
    if isinstance(block, pd.DataFrame):
        if block.attrs.get(_SIMPLE) and len(block) == 1:
            block = {k: v.item() if hasattr(v, "item") else v for k, v in block.iloc[0].items()}
    elif isinstance(block, Mapping):
        block = dict(block)
    else:
        raise TypeError(f"STAR block {name!r} must be a DataFrame or a mapping, not {type(block).__name__}")
    text = starfile.to_string({name: block}, float_format=float_format)
    first, _, rest = text.partition("\n")
    # drop starfile's time-stamped banner so identical tables give identical files
    return rest.lstrip("\n") if first.startswith("# Created by the starfile") else text


def _check_structure(text: str, path: Path) -> list[str]:
    """Validate the block/loop layout that starfile silently tolerates; return every column and key name."""
    names: list[str] = []
    n_blocks, state, n_cols = 0, None, 0  # state: None, "block", "header", "rows", "simple"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            n_blocks, state = n_blocks + 1, "block"
        elif line.startswith("loop_"):
            if state is None:
                raise MetadataError(path, f"line {lineno}: loop_ before any data_ block")
            state, n_cols = "header", 0
        elif line.startswith("_"):
            names.append(line.split()[0][1:])
            if state == "header":
                n_cols += 1
            elif state in ("block", "simple"):
                state = "simple"
                if len(_tokens(line)) < 2:
                    raise MetadataError(path, f"line {lineno}: key {names[-1]} has no value")
            else:
                raise MetadataError(path, f"line {lineno}: label {names[-1]} outside a block header")
        elif state in ("header", "rows"):
            n = len(_tokens(line))
            if n != n_cols:
                raise MetadataError(path, f"line {lineno}: {n} values in a row of a {n_cols}-column loop")
            state = "rows"
        else:
            raise MetadataError(path, f"line {lineno}: unexpected text {line[:40]!r}")
    if n_blocks == 0:
        raise MetadataError(path, "no data_ block")
    return names


def _tokens(line: str) -> list[str]:
    if '"' not in line and "'" not in line and "#" not in line:
        return line.split()
    out = []
    for tok in _TOKEN.findall(line):
        if tok == "#":  # trailing comment
            break
        out.append(tok)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# particle coordinates


@dataclass(frozen=True, eq=False)
class CoordinateTable:
    """Particle positions from a RELION/Warp coordinate or particle STAR file.

    Parameters
    ----------
    yx : numpy.ndarray
        ``(N, 2)`` float64 positions ``(y, x)`` in pixels of the micrograph the file refers to.
    score : numpy.ndarray or None
        ``(N,)`` ``rlnAutopickFigureOfMerit``, if present.
    micrograph_name : numpy.ndarray or None
        ``(N,)`` ``rlnMicrographName`` strings, if present.
    extra : pandas.DataFrame
        All other columns of the particle block, row-aligned with ``yx`` (e.g. ``rlnCoordinateZ``, angles, origins;
        origins and offsets are not applied to ``yx``).
    optics : pandas.DataFrame or None
        The ``data_optics`` block of RELION 3.1+ files.
    pixel_size : float or None
        Å per pixel of the micrographs the coordinates refer to, when the file states one value for all rows:
        ``rlnMicrographPixelSize`` of the rows' optics groups, or RELION 3.0's
        ``rlnDetectorPixelSize`` (µm) * 1e4 / ``rlnMagnification`` as Warp writes them.
    """

    yx: np.ndarray
    score: np.ndarray | None = None
    micrograph_name: np.ndarray | None = None
    extra: pd.DataFrame | None = None
    optics: pd.DataFrame | None = None
    pixel_size: float | None = None

    def __len__(self) -> int:
        return len(self.yx)

    def features(self) -> dict[str, np.ndarray]:
        """Per-particle columns for a napari Points layer: ``score`` (if any), then the ``extra`` columns."""
        feats = {} if self.score is None else {"score": self.score}
        if self.extra is not None:
            feats.update({str(c): self.extra[c].to_numpy() for c in self.extra.columns})
        return feats

    def subset(self, rows) -> CoordinateTable:
        """The particles selected by ``rows`` (boolean mask or integer indices)."""
        idx = np.arange(len(self))[rows]
        return CoordinateTable(
            yx=self.yx[idx],
            score=None if self.score is None else self.score[idx],
            micrograph_name=None if self.micrograph_name is None else self.micrograph_name[idx],
            extra=None if self.extra is None else self.extra.iloc[idx].reset_index(drop=True),
            optics=self.optics,
            pixel_size=self.pixel_size,
        )

    def by_micrograph(self) -> dict[str, CoordinateTable]:
        """Split by ``rlnMicrographName`` in order of first appearance; ``{"": self}`` when names are absent."""
        if self.micrograph_name is None:
            return {"": self}
        names = pd.unique(self.micrograph_name)
        return {str(n): self.subset(self.micrograph_name == n) for n in names}


def read_coordinates(path: str | os.PathLike) -> CoordinateTable:
    """Read particle coordinates: RELION 3.0 (one block), 3.1+ (``data_optics`` + ``data_particles``), or a plain
    coordinate file (``rlnCoordinateX/Y`` only).

    Raises
    ------
    MetadataError
        No block holds ``rlnCoordinateX`` and ``rlnCoordinateY``, or they are not numbers.
    """
    blocks = read_star(path)
    candidates = [n for n, df in blocks.items() if {COORD_X, COORD_Y} <= set(df.columns)]
    if not candidates:
        raise MetadataError(path, f"no data block with {COORD_X} and {COORD_Y} (blocks: {list(blocks)})")
    name = "particles" if "particles" in candidates else candidates[0]
    df = blocks[name]
    try:
        yx = np.stack([df[COORD_Y].to_numpy(np.float64), df[COORD_X].to_numpy(np.float64)], axis=1).reshape(-1, 2)
        score = df[SCORE].to_numpy(np.float64) if SCORE in df else None
    except (TypeError, ValueError):
        raise MetadataError(path, f"data_{name}: coordinates or scores are not numbers") from None
    mics = df[MICROGRAPH].astype(str).to_numpy() if MICROGRAPH in df else None
    extra = df.drop(columns=[c for c in (COORD_X, COORD_Y, SCORE, MICROGRAPH) if c in df]).reset_index(drop=True)
    optics = blocks.get("optics")
    return CoordinateTable(
        yx=yx, score=score, micrograph_name=mics, extra=extra, optics=optics, pixel_size=_pixel_size(df, optics)
    )


def _pixel_size(df: pd.DataFrame, optics: pd.DataFrame | None) -> float | None:
    sizes = None
    if optics is not None and {"rlnOpticsGroup", "rlnMicrographPixelSize"} <= set(optics.columns):
        table = dict(zip(optics["rlnOpticsGroup"], optics["rlnMicrographPixelSize"]))
        groups = df["rlnOpticsGroup"] if "rlnOpticsGroup" in df else list(table)[:1] * max(len(df), 1)
        sizes = [table.get(g) for g in groups]
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(df.columns):  # RELION 3.0 / Warp
        sizes = (df["rlnDetectorPixelSize"] * 1e4 / df["rlnMagnification"]).tolist()
    if not sizes or any(v is None for v in sizes):
        return None
    try:
        unique = np.unique(np.asarray(sizes, dtype=np.float64))
    except (TypeError, ValueError):
        return None
    return float(unique[0]) if len(unique) == 1 else None


def write_coordinates(
    path: str | os.PathLike,
    yx,
    score=None,
    micrograph_name: str | Sequence[str] | None = None,
    extra: Mapping[str, Sequence] | pd.DataFrame | None = None,
) -> None:
    """Write a RELION coordinate STAR file (one ``data_`` block), atomically.

    Parameters
    ----------
    path : path-like
    yx : array-like
        ``(N, 2)`` positions ``(y, x)`` in pixels; written as ``rlnCoordinateX``, ``rlnCoordinateY``.
    score : array-like, optional
        ``(N,)`` figures of merit (``rlnAutopickFigureOfMerit``).
    micrograph_name : str or sequence of str, optional
        ``rlnMicrographName``: one name for all particles, or one per particle.
    extra : mapping or DataFrame, optional
        More columns by STAR label (``"rlnAngleRot"``; a leading ``_`` is dropped), each of length N.
    """
    yx = np.asarray(yx, dtype=np.float64)
    if yx.ndim != 2 or yx.shape[1] != 2:
        raise ValueError(f"yx must be (N, 2), got {yx.shape}")
    if not np.isfinite(yx).all():
        raise ValueError("yx holds NaN or infinite coordinates")
    n = len(yx)
    cols: dict[str, object] = {COORD_X: yx[:, 1], COORD_Y: yx[:, 0]}
    if score is not None:
        cols[SCORE] = _column(score, n, SCORE, np.float64)
    if micrograph_name is not None:
        names = [micrograph_name] * n if isinstance(micrograph_name, (str, os.PathLike)) else micrograph_name
        cols[MICROGRAPH] = _column([os.fspath(m) for m in names], n, MICROGRAPH, object)
    for label, values in (extra.items() if extra is not None else ()):
        cols[str(label).lstrip("_")] = _column(values, n, label, None)
    write_star(path, {"": pd.DataFrame(cols)})


def _column(values, n: int, label, dtype) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"column {label}: expected {n} values, got shape {arr.shape}")
    return arr
