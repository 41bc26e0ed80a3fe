"""Particle picks on micrographs: our per-item picks STAR files, and other tools' pick files.

Coordinates
    Everywhere here a pick is ``(y, x)`` in pixels of the micrograph it was picked on: x is the column, y the row,
    origin at the top-left of the array as stored in the MRC file (row 0 is the first row in the file), which is the
    ``(y, x)`` order of our arrays and napari's. Every format read below uses x = column and y = row of the file's
    data in the same way (EMAN's "lower-left" corner is the smallest (x, y) of the box in file order), so no format
    flips an axis; only the origin (box corner or centre) and the unit differ:

    ============================  ===================================================================================
    format                        stored position → centre ``(y, x)`` in pixels
    ============================  ===================================================================================
    RELION 3.0 / 3.1+ STAR        ``rlnCoordinateX/Y``: centre in pixels (origin offsets of refined particles are
                                  not applied). Score: ``rlnAutopickFigureOfMerit``. Key: ``rlnMicrographName``
                                  (or ``rlnTomoName``) stem; per-micrograph files without it are keyed by the file
                                  stem less ``_autopick`` / ``_manualpick``.
    RELION 5 STAR                 ``rlnCenteredCoordinateX/YAngst``: Å from the micrograph centre;
                                  ``x = x_Å / pixel_size + nx / 2`` (RELION's ``getParticleCoordDecenteredPixel``
                                  adds the float centre ``size / 2``); needs ``micrograph_shape`` and ``pixel_size``.
    cryoSPARC ``.cs``             ``location/center_x_frac * nx``, ``location/center_y_frac * ny`` with
                                  ``location/micrograph_shape = (ny, nx)``. Score: ``pick_stats/ncc_score``.
                                  Key: stem of ``location/micrograph_path``.
    EMAN ``.box``                 ``x y w h`` box corner; centre = corner + size / 2. Key: file stem.
    crYOLO ``.cbox``              STAR ``data_cryolo`` loop ``_CoordinateX _CoordinateY _Width _Height _Confidence``
                                  (or older whitespace ``x y w h confidence``): corner + size / 2. Key: file stem.
    Topaz text                    ``image_name x_coord y_coord [score]`` tab-separated, centre in pixels of the
                                  image Topaz was given (scale them yourself if it was downsampled).
    ============================  ===================================================================================

:func:`write_picks_star` writes our own per-item file: a RELION coordinate loop (``rlnCoordinateX``,
``rlnCoordinateY``, ``rlnAutopickFigureOfMerit``) that RELION reads as it is, followed by a ``data_napari_warp``
key-value block (micrograph, model, diameter, threshold, software version) for reproducibility.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ... import __version__
from ..errors import MetadataError
from ..io.star import read_star, write_star

__all__ = ["PickImportError", "PickTable", "match_picks_to_items", "read_picks", "read_picks_star", "write_picks_star"]

COORD_X, COORD_Y, SCORE = "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"
CENTERED_X, CENTERED_Y = "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst"
INFO_BLOCK = "napari_warp"
# data_napari_warp keys -> PickTable.info keys ("...Name" keys stay strings when read back)
_INFO_KEYS = {
    "nwMicrographName": "micrograph_name",
    "nwModelName": "model",
    "nwDiameterAngst": "diameter",
    "nwThreshold": "threshold",
    "nwSoftwareVersion": "version",
}
# suffixes that picking and motion-correction tools add to a micrograph's name, stripped when matching to items
_SUFFIXES = ("_autopick", "_manualpick", "_doseweighted", "_dw", "_aligned", "_patch", "_cryolo", "_topaz")
_CRYOSPARC_UID = re.compile(r"^\d{12,}_")  # cryoSPARC prefixes the files it imports with a numeric UID
_SEPARATOR = re.compile(r"[_.\-]")
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,9}$")  # ".mrc", ".tomostar"; not ".5" in "mic_1.5"


class PickImportError(MetadataError, ValueError):
    """A pick file that cannot be imported: unknown format, no coordinates, a missing micrograph size or pixel size,
    or no micrograph in it that matches an item. The message starts with the file name, then what was expected."""


@dataclass(frozen=True, eq=False)
class PickTable:
    """Picks on one micrograph.

    Parameters
    ----------
    yx : numpy.ndarray
        ``(N, 2)`` float64 centres ``(y, x)`` in pixels of the micrograph (see the module docstring).
    score : numpy.ndarray
        ``(N,)`` float64 pick scores; NaN where the source has none.
    diameter : float or None
        Particle diameter in Å, when the file states it (our own picks STAR).
    info : dict
        Reproducibility record of our own picks STAR: ``micrograph_name``, ``model``, ``diameter`` (Å),
        ``threshold``, ``version`` (napari-warp); keys absent from the file are absent here.
    """

    yx: np.ndarray
    score: np.ndarray
    diameter: float | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        yx = np.asarray(self.yx, dtype=np.float64)
        yx = yx.reshape(0, 2) if yx.size == 0 else yx
        score = np.asarray(self.score, dtype=np.float64).reshape(-1)
        if yx.ndim != 2 or yx.shape[1] != 2 or score.shape != (len(yx),):
            raise ValueError(f"PickTable needs yx (N, 2) and score (N,), got {yx.shape} and {score.shape}")
        object.__setattr__(self, "yx", yx)
        object.__setattr__(self, "score", score)

    def __len__(self) -> int:
        return len(self.yx)


# ----------------------------------------------------------------------------------------------------------------------
# our per-item picks STAR


def write_picks_star(
    path: str | os.PathLike,
    yx,
    score=None,
    *,
    micrograph_name: str,
    model: str | None = None,
    diameter: float | None = None,
    threshold: float | None = None,
) -> Path:
    """Write one micrograph's picks as a RELION coordinate STAR file, atomically, and return its path.

    Parameters
    ----------
    path : path-like
    yx : array-like
        ``(N, 2)`` centres ``(y, x)`` in pixels of the micrograph; written as ``rlnCoordinateX = x``,
        ``rlnCoordinateY = y``.
    score : array-like, optional
        ``(N,)`` scores, written as ``rlnAutopickFigureOfMerit``; the column is left out when None.
    micrograph_name : str
        The micrograph (item) the picks belong to.
    model, diameter, threshold : optional
        Picking model name/version, particle diameter (Å) and score threshold, recorded in ``data_napari_warp``.
    """
    yx = np.asarray(yx, dtype=np.float64)
    yx = yx.reshape(0, 2) if yx.size == 0 else yx
    if yx.ndim != 2 or yx.shape[1] != 2:
        raise ValueError(f"yx must be (N, 2), got {yx.shape}")
    if not np.isfinite(yx).all():
        raise ValueError("yx holds NaN or infinite coordinates")
    coords = {COORD_X: yx[:, 1], COORD_Y: yx[:, 0]}
    if score is not None:
        score = np.asarray(score, dtype=np.float64).reshape(-1)
        if score.shape != (len(yx),):
            raise ValueError(f"score must have {len(yx)} values, got {score.shape}")
        coords[SCORE] = score
    values = {
        "nwMicrographName": str(micrograph_name),
        "nwModelName": None if model is None else str(model),
        "nwDiameterAngst": None if diameter is None else float(diameter),
        "nwThreshold": None if threshold is None else float(threshold),
        "nwSoftwareVersion": __version__,
    }
    info = {k: v for k, v in values.items() if v is not None}
    write_star(path, {"": pd.DataFrame(coords), INFO_BLOCK: info})
    return Path(path)


def read_picks_star(path: str | os.PathLike) -> PickTable:
    """Read a picks STAR written by :func:`write_picks_star`, or any RELION coordinate/particle STAR file.

    All rows of the coordinate block are returned, whatever their ``rlnMicrographName``; use :func:`read_picks` to
    split a multi-micrograph file.

    Raises
    ------
    PickImportError
        Not a STAR file, or no block with ``rlnCoordinateX`` and ``rlnCoordinateY``.
    """
    path = Path(path)
    blocks = _read_star(path)
    df = _coordinate_block(blocks, path)
    if not {COORD_X, COORD_Y} <= set(df.columns):
        raise PickImportError(path, f"no data block with {COORD_X} and {COORD_Y} (blocks: {list(blocks)})")
    info = _info(blocks)
    return PickTable(_relion_yx(df, path), _score(df, SCORE), diameter=info.get("diameter"), info=info)


# ----------------------------------------------------------------------------------------------------------------------
# other tools' picks


def read_picks(
    path: str | os.PathLike,
    *,
    micrograph_shape: tuple[int, int] | None = None,
    pixel_size: float | None = None,
) -> dict[str, PickTable]:
    """Read a pick file of RELION, cryoSPARC, EMAN, crYOLO or Topaz (see the module docstring).

    Parameters
    ----------
    path : path-like
        ``.star``, ``.cs``, ``.box``, ``.cbox``, or a Topaz text table; the format is taken from the extension and,
        failing that, from the content.
    micrograph_shape : (ny, nx), optional
        Micrograph size in pixels: needed for RELION 5 centred coordinates, and cryoSPARC tables without
        ``location/micrograph_shape``.
    pixel_size : float, optional
        Å per pixel of the micrographs; needed for RELION 5 centred coordinates.

    Returns
    -------
    dict of str to PickTable
        Micrograph stem (file name without folders and extension) to its picks, in order of first appearance.

    Raises
    ------
    FileNotFoundError
    PickImportError
        Unknown format, no coordinates, or a needed ``micrograph_shape`` / ``pixel_size`` not given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pick file")
    if path.suffix.lower() == ".cs":
        return _read_cryosparc(path, micrograph_shape)
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    first = next((line.split() for line in head.splitlines() if line.strip() and not line.startswith("#")), [])
    if path.suffix.lower() == ".star" or (first and first[0].startswith("data_")):
        blocks = _read_star(path)
        if any({"CoordinateX", "CoordinateY"} <= set(df.columns) for df in blocks.values()):
            return _read_cbox_star(path, blocks)
        return _read_relion(path, blocks, micrograph_shape, pixel_size)
    if {"image_name", "x_coord", "y_coord"} <= set(first):
        return _read_topaz(path)
    if path.suffix.lower() == ".cbox":
        return _read_cbox_text(path)
    if path.suffix.lower() == ".box" or _is_number(first[0] if first else ""):
        return _read_box(path)
    raise PickImportError(
        path, "unknown pick format: expected a RELION .star, cryoSPARC .cs, EMAN .box, crYOLO .cbox or Topaz table"
    )


def _read_relion(path: Path, blocks, shape, pixel_size) -> dict[str, PickTable]:
    df = _coordinate_block(blocks, path)
    yx, score = _relion_yx(df, path, shape, pixel_size), _score(df, SCORE)
    name_col = next((c for c in ("rlnMicrographName", "rlnTomoName") if c in df.columns), None)
    if name_col is None:  # one file per micrograph
        name = _info(blocks).get("micrograph_name")
        key = _stem(name) if name else _strip_suffixes(_stem(path.name), ("_autopick", "_manualpick"))
        return {key: PickTable(yx, score)}
    return _group([_stem(n) for n in df[name_col].astype(str)], yx, score)


def _read_cryosparc(path: Path, shape) -> dict[str, PickTable]:
    try:
        cs = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PickImportError(path, f"not a cryoSPARC .cs table (a numpy structured array): {exc}") from None
    names = cs.dtype.names or ()
    need = ("location/micrograph_path", "location/center_x_frac", "location/center_y_frac")
    if missing := [n for n in need if n not in names]:
        raise PickImportError(path, f"no particle locations: fields {missing} missing (has {list(names)[:8]} ...)")
    if "location/micrograph_shape" in names:
        ny, nx = np.asarray(cs["location/micrograph_shape"], dtype=np.float64).reshape(-1, 2).T
    elif shape is not None:
        ny, nx = float(shape[0]), float(shape[1])
    else:
        raise PickImportError(path, "no location/micrograph_shape field: pass micrograph_shape=(ny, nx) in pixels")
    x = np.asarray(cs["location/center_x_frac"], dtype=np.float64) * nx
    y = np.asarray(cs["location/center_y_frac"], dtype=np.float64) * ny
    score = _score(cs, "pick_stats/ncc_score")
    keys = [_stem(p.decode() if isinstance(p, bytes) else str(p)) for p in cs["location/micrograph_path"]]
    return _group(keys, np.stack([y, x], axis=1), score)


def _read_box(path: Path) -> dict[str, PickTable]:
    rows = _numeric_rows(path, 4, "x y width height")
    centre = rows[:, 0:2] + rows[:, 2:4] / 2
    return {_stem(path.name): PickTable(centre[:, ::-1], np.full(len(rows), np.nan))}


def _read_cbox_text(path: Path) -> dict[str, PickTable]:
    rows = _numeric_rows(path, 5, "x y width height confidence")
    centre = rows[:, 0:2] + rows[:, 2:4] / 2
    return {_stem(path.name): PickTable(centre[:, ::-1], rows[:, 4])}


def _read_cbox_star(path: Path, blocks) -> dict[str, PickTable]:
    name = "cryolo" if "cryolo" in blocks else next(n for n, df in blocks.items() if "CoordinateX" in df.columns)
    df = blocks[name]
    if missing := [c for c in ("Width", "Height") if c not in df.columns]:
        raise PickImportError(path, f"data_{name}: box corners without {missing}; cannot find the box centres")
    try:
        corner = df[["CoordinateY", "CoordinateX"]].to_numpy(np.float64)
        size = df[["Height", "Width"]].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise PickImportError(path, f"data_{name}: coordinates or box sizes are not numbers") from None
    return {_stem(path.name): PickTable(corner + size / 2, _score(df, "Confidence"))}


def _read_topaz(path: Path) -> dict[str, PickTable]:
    df = pd.read_csv(path, sep="\t", dtype={"image_name": str})
    if "x_coord" not in df.columns:  # space-separated variant
        df = pd.read_csv(path, sep=r"\s+", dtype={"image_name": str})
    try:
        yx = df[["y_coord", "x_coord"]].to_numpy(np.float64)
    except (TypeError, ValueError, KeyError):
        raise PickImportError(path, "Topaz table: x_coord / y_coord are not numbers") from None
    return _group([_stem(n) for n in df["image_name"].astype(str)], yx, _score(df, "score"))


# ----------------------------------------------------------------------------------------------------------------------
# matching picks to items


def match_picks_to_items(
    tables: Mapping[str, PickTable], item_names: Sequence[str], *, source: str | os.PathLike = "picks"
) -> tuple[dict[str, PickTable], list[str]]:
    """Assign imported picks to session items by micrograph name.

    A source key matches an item when it is (best first) the same name; the same name, ignoring case, a cryoSPARC
    UID prefix and suffixes such as ``_autopick``, ``_manualpick``, ``_DW``, ``_doseweighted``, ``_aligned``,
    ``_patch``; or starts with the item's name followed by ``_``, ``-`` or ``.`` (so ``mic_1`` never takes
    ``mic_10``'s picks). Each item takes at most one key and each key goes to at most one item.

    Parameters
    ----------
    tables : mapping of str to PickTable
        From :func:`read_picks` (or several merged).
    item_names : sequence of str
        The session's item names.
    source : str or path-like
        Named in the error message (the pick file or folder).

    Returns
    -------
    matched : dict of str to PickTable
        Item name to its picks, in ``item_names`` order; items without picks are absent.
    unmatched : list of str
        Source keys that matched no item.

    Raises
    ------
    PickImportError
        There are items, but no key matches any of them.
    """
    items = list(dict.fromkeys(item_names))
    by_norm: dict[str, list[str]] = {}
    for item in items:
        by_norm.setdefault(_normalize(item), []).append(item)
    exact = set(items)
    pairs = []  # (rank, leftover length, key order, item, key): best first after sorting
    for order, key in enumerate(tables):
        if key in exact:
            pairs.append((0, 0, order, key, key))
        norm = _normalize(key)
        pairs += [(1, 0, order, item, key) for item in by_norm.get(norm, ())]
        for sep in _SEPARATOR.finditer(norm):
            pairs += [(2, len(norm) - sep.start(), order, item, key) for item in by_norm.get(norm[: sep.start()], ())]
    assigned: dict[str, str] = {}  # item -> key
    taken: set[str] = set()
    for *_, item, key in sorted(pairs, key=lambda p: p[:3]):
        if item not in assigned and key not in taken:
            assigned[item] = key
            taken.add(key)
    if items and not assigned:
        keys, names = _examples(list(tables)), _examples(items)
        raise PickImportError(
            source,
            f"no micrograph in the picks ({len(tables)}: {keys}) matches an item ({len(items)}: {names}); expected "
            "each micrograph named like its item, optionally with a suffix such as _autopick or _doseweighted",
        )
    return {item: tables[assigned[item]] for item in items if item in assigned}, [k for k in tables if k not in taken]


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _read_star(path: Path) -> dict[str, pd.DataFrame]:
    try:
        return read_star(path)
    except MetadataError as exc:
        raise PickImportError(path, exc.reason) from None


def _coordinate_block(blocks: Mapping[str, pd.DataFrame], path: Path) -> pd.DataFrame:
    """The particle block: ``data_particles`` if it holds coordinates, else the first block that does."""
    found = [n for n, df in blocks.items() if {COORD_X, COORD_Y} <= set(df.columns)]
    found += [n for n, df in blocks.items() if {CENTERED_X, CENTERED_Y} <= set(df.columns) and n not in found]
    if not found:
        raise PickImportError(
            path,
            f"no coordinates: expected a data block with {COORD_X}/{COORD_Y} or {CENTERED_X}/{CENTERED_Y} "
            f"(blocks: {', '.join('data_' + n for n in blocks)})",
        )
    return blocks["particles" if "particles" in found else found[0]]


def _relion_yx(df: pd.DataFrame, path: Path, shape=None, pixel_size=None) -> np.ndarray:
    try:
        if {COORD_X, COORD_Y} <= set(df.columns):
            return df[[COORD_Y, COORD_X]].to_numpy(np.float64).reshape(-1, 2)
        yx_angst = df[[CENTERED_Y, CENTERED_X]].to_numpy(np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise PickImportError(path, "coordinates are not numbers") from None
    missing = [n for n, v in (("micrograph_shape=(ny, nx)", shape), ("pixel_size (Å)", pixel_size)) if v is None]
    if missing:
        raise PickImportError(
            path,
            f"coordinates are RELION 5 {CENTERED_X}/{CENTERED_Y} (Å from the micrograph centre); "
            f"converting them to pixels needs {' and '.join(missing)}",
        )
    return yx_angst / float(pixel_size) + np.asarray(shape[:2], dtype=np.float64) / 2


def _score(table: pd.DataFrame | np.ndarray, name: str) -> np.ndarray:
    """Column ``name`` of a table or structured array as float64 (non-numbers become NaN); all NaN if absent."""
    names = table.columns if isinstance(table, pd.DataFrame) else (table.dtype.names or ())
    if name not in names:
        return np.full(len(table), np.nan)
    return pd.to_numeric(pd.Series(np.asarray(table[name]).reshape(-1)), errors="coerce").to_numpy(np.float64)


def _info(blocks: Mapping[str, pd.DataFrame]) -> dict:
    block = blocks.get(INFO_BLOCK)
    if block is None or len(block) != 1:
        return {}
    row = block.iloc[0]
    info = {}
    for key, name in _INFO_KEYS.items():
        if key in row.index and not pd.isna(row[key]):
            info[name] = float(row[key]) if name in ("diameter", "threshold") else str(row[key])
    return info


def _group(keys: list[str], yx: np.ndarray, score: np.ndarray) -> dict[str, PickTable]:
    keys_arr = np.asarray(keys, dtype=object)
    return {k: PickTable(yx[keys_arr == k], score[keys_arr == k]) for k in dict.fromkeys(keys)}


def _numeric_rows(path: Path, ncols: int, what: str) -> np.ndarray:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            values = [float(w) for w in words[:ncols]]
        except ValueError:
            values = []
        if len(values) < ncols:
            raise PickImportError(path, f"line {lineno}: expected at least {ncols} numbers ({what}), got {line[:60]!r}")
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(-1, ncols)


def _stem(name: str) -> str:
    """File name without folders and extension; ``"a/b/mic_1.mrc"``, ``"mic_1.st:mrc"`` and ``"mic_1"`` → ``mic_1``."""
    name = re.sub(r":mrcs?$", "", name.strip().replace("\\", "/")).rsplit("/", 1)[-1]
    return _EXTENSION.sub("", name)


def _strip_suffixes(name: str, suffixes: Sequence[str]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for suffix in suffixes:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


def _normalize(name: str) -> str:
    return _strip_suffixes(_CRYOSPARC_UID.sub("", _stem(name)).lower(), _SUFFIXES)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "none"
