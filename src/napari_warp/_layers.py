"""Core results -> napari LayerData tuples, with physical scale in Å.

This is the one module that converts between pixel coordinates (what ``core`` and STAR files use) and napari's
world coordinates (Å, through each layer's ``scale``). Layer *data* stays in pixels of its own sampling, so a
Points layer written back to STAR needs no conversion; ``scale`` carries the pixel size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LayerData = tuple[Any, dict, str]

UNIT = "angstrom"


def _scale(pixel_size: float | None, ndim: int) -> tuple[float, ...]:
    ps = float(pixel_size) if pixel_size else 1.0
    return (1.0,) * (ndim - 2) + (ps, ps) if ndim >= 2 else (ps,)


def _units(pixel_size: float | None, ndim: int) -> tuple[str, ...]:
    # Without a pixel size the honest unit is the pixel.
    unit = UNIT if pixel_size else "pixel"
    return ("pixel",) * (ndim - 2) + (unit, unit)


def contrast_limits(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Percentile contrast limits from (a subsample of) an image; never a zero-width range."""
    flat = np.asarray(image, dtype=np.float32).ravel()
    if flat.size > 1_000_000:
        flat = flat[:: flat.size // 1_000_000]
    lo, hi = np.percentile(flat, [low, high]) if flat.size else (0.0, 1.0)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(np.nanmin(flat, initial=0.0)), float(np.nanmax(flat, initial=1.0))
        hi = hi if hi > lo else lo + 1.0
    return float(lo), float(hi)


def image_layer(
    data,
    pixel_size: float | None,
    name: str,
    *,
    axis_labels: tuple[str, ...] | None = None,
    preview: np.ndarray | None = None,
    **kwargs,
) -> LayerData:
    """An Image layer in Å. ``data`` is (y, x), (frames, y, x) or (z, y, x); may be lazy (dask).

    ``preview`` is a small in-memory slice used for contrast limits, so a lazy movie is not read in full.
    """
    ndim = len(data.shape)
    if "contrast_limits" not in kwargs:
        kwargs["contrast_limits"] = contrast_limits(preview if preview is not None else np.asarray(data))
    if axis_labels is None:
        axis_labels = ("frame", "y", "x")[-ndim:] if ndim <= 3 else tuple(f"axis {i}" for i in range(ndim))
    meta = {
        "name": name,
        "scale": _scale(pixel_size, ndim),
        "units": _units(pixel_size, ndim),
        "axis_labels": axis_labels,
        "metadata": {"pixel_size": pixel_size, **kwargs.pop("metadata", {})},
        **kwargs,
    }
    return (data, meta, "image")


def movie_layer(movie, name: str | None = None, open_options: dict | None = None) -> LayerData:
    """A lazy (frames, y, x) Image layer from a :class:`napari_warp.core.io.movie.Movie`; 2D for one frame.

    ``open_options`` (the ``open_movie`` keywords used: gain, defects, flips, ...) are kept in the layer metadata,
    so processing docks re-open the movie exactly as shown.
    """
    name = name or movie.path.name
    preview = movie.frames(0)[0]
    metadata = {"path": str(movie.path), "voltage": movie.voltage, "exposure": movie.exposure,
                "open_options": dict(open_options or {})}
    if movie.shape[0] == 1:
        return image_layer(preview, movie.pixel_size, name, metadata=metadata)
    return image_layer(movie.to_dask(), movie.pixel_size, name, preview=preview, metadata=metadata)


def volume_layer(volume: np.ndarray, voxel_size: float | None, name: str) -> LayerData:
    """A (z, y, x) Image layer with isotropic voxel size in Å."""
    vs = float(voxel_size) if voxel_size else 1.0
    unit = UNIT if voxel_size else "pixel"
    data, meta, kind = image_layer(volume, voxel_size, name, axis_labels=("z", "y", "x"))
    meta["scale"] = (vs, vs, vs)
    meta["units"] = (unit, unit, unit)
    return data, meta, kind


def points_layer(
    yx: np.ndarray,
    pixel_size: float | None,
    name: str,
    *,
    features: dict | None = None,
    diameter: float | None = None,
    **kwargs,
) -> LayerData:
    """A Points layer from (N, 2) pixel (y, x) positions; ``diameter`` in Å sets the marker size."""
    yx = np.asarray(yx, dtype=float).reshape(-1, 2)
    ps = float(pixel_size) if pixel_size else 1.0
    size = (diameter / ps) if diameter else 20.0
    meta = {
        "name": name,
        "scale": (ps, ps),
        "units": _units(pixel_size, 2),
        "size": size,
        "face_color": "transparent",
        "border_color": "yellow",
        "border_width": 0.08,
        "symbol": "disc",
        "metadata": {"pixel_size": pixel_size},
        **kwargs,
    }
    if features:
        meta["features"] = features
    return (yx, meta, "points")


def track_positions(shape: tuple[int, int], n: int | tuple[int, int] = 5) -> np.ndarray:
    """``(ny*nx, 2)`` pixel (y, x) positions on a regular ``n`` (or ``(nx, ny)``) lattice over 10–90 % of ``shape``,
    where motion tracks are drawn."""
    nx, ny = (n, n) if isinstance(n, int) else n
    ys = np.linspace(0.1, 0.9, ny) * (shape[0] - 1)
    xs = np.linspace(0.1, 0.9, nx) * (shape[1] - 1)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def motion_tracks_layer(model, name: str, exaggerate: float = 20.0) -> LayerData:
    """A fitted motion model's tracks (global + local) on a lattice matching its local grid, as Warp draws them."""
    gy, gx = model.local_grids[0].dims[-2:]
    positions = track_positions(tuple(model.shape), (5, 5) if gx * gy == 1 else (gx, gy))  # global only: 5×5
    return tracks_layer(positions, model.shifts(positions), model.pixel_size, name, exaggerate)


def tracks_layer(
    positions: np.ndarray,
    shifts: np.ndarray,
    pixel_size: float | None,
    name: str,
    exaggerate: float = 1.0,
    edge_color: str = "cyan",
) -> LayerData:
    """Motion tracks as Shapes paths, as Warp draws them: for P positions (P, 2) and shifts (F, P, 2) in pixels,
    one path per position through ``position + exaggerate * shift[f]``."""
    positions = np.asarray(positions, dtype=float).reshape(-1, 2)
    shifts = np.asarray(shifts, dtype=float)
    paths = list(np.moveaxis(positions[None] + exaggerate * shifts, 1, 0))  # P arrays of (F, 2)
    ps = float(pixel_size) if pixel_size else 1.0
    meta = {
        "name": name,
        "shape_type": "path",
        "edge_color": edge_color,
        "edge_width": 2.0,
        "scale": (ps, ps),
        "units": _units(pixel_size, 2),
        "metadata": {"exaggeration": exaggerate},
    }
    return (paths, meta, "shapes")


def layer_pixel_size(layer) -> float | None:
    """The Å/px of a layer's (y, x) data: ``metadata["pixel_size"]``, else its x scale when its units are Å.

    None when neither says (a layer in pixels); a layer binned for display reports its own (binned) sampling.
    """
    meta = getattr(layer, "metadata", None) or {}
    if meta.get("pixel_size"):
        return float(meta["pixel_size"])
    units = getattr(layer, "units", None)
    if units is not None and len(units) and str(units[-1]) in (UNIT, "Å"):
        return float(layer.scale[-1])
    return None


def defocus_layer(
    fit,
    pixel_size_shown: float | tuple[float, float],
    shape_shown: tuple[int, ...],
    name: str,
    *,
    translate: tuple[float, float] = (0.0, 0.0),
    max_size: int = 1024,
    **kwargs,
) -> LayerData:
    """The local defocus of a CTF fit as a translucent Image overlay in µm, aligned with the micrograph shown.

    fit: a ``core.ctf_fit.CTFFit``. pixel_size_shown: Å/px (or ``(y, x)`` Å/px) of the displayed micrograph, whose
    (y, x) shape is ``shape_shown`` (leading axes, e.g. frames, are ignored) and whose world offset is ``translate``
    (Å). The map spans the displayed image exactly; it is sampled at most ``max_size`` px per side (defocus is smooth)
    with the scale stretched to keep the extent. Values are µm (Å / 1e4); contrast limits are the map's range, padded
    by ±0.01 µm so they never have zero width.
    """
    ys, xs = (int(v) for v in tuple(shape_shown)[-2:])
    psy, psx = (pixel_size_shown, pixel_size_shown) if np.isscalar(pixel_size_shown) else pixel_size_shown
    psy = float(psy) if psy else 1.0
    psx = float(psx) if psx else 1.0
    ny, nx = min(ys, int(max_size)), min(xs, int(max_size))
    values = fit.defocus_map((ny, nx)).astype(np.float32) / 1e4  # µm
    # map pixel j covers shown pixels [j·ys/ny − 0.5, (j+1)·ys/ny − 0.5): same extent, centres aligned
    sy, sx = ys / ny, xs / nx
    lo, hi = float(values.min()), float(values.max())
    meta = {
        "name": name,
        "scale": (psy * sy, psx * sx),
        "translate": (float(translate[0]) + psy * (sy - 1) / 2, float(translate[1]) + psx * (sx - 1) / 2),
        "units": _units(pixel_size_shown, 2),
        "axis_labels": ("y", "x"),
        "colormap": "turbo",
        "opacity": 0.4,
        "blending": "translucent_no_depth",
        "contrast_limits": (lo - 0.01, hi + 0.01),
        "interpolation2d": "linear",
        "metadata": {
            "units": "µm",
            "quantity": "local defocus",
            "napari_warp_role": "defocus",
            "defocus_mean_um": fit.defocus / 1e4,
            "pixel_size": psx * sx,
            **kwargs.pop("metadata", {}),
        },
        **kwargs,
    }
    return (values, meta, "image")


def deconvolved_layer(
    image: np.ndarray,
    pixel_size: float | None,
    name: str,
    *,
    translate: tuple[float, float] = (0.0, 0.0),
    **kwargs,
) -> LayerData:
    """A CTF-deconvolved micrograph ``(Y, X)`` as an Image layer in Å (percentile contrast), offset by ``translate``."""
    metadata = {"napari_warp_role": "deconvolved", **kwargs.pop("metadata", {})}
    return image_layer(image, pixel_size, name, translate=tuple(float(t) for t in translate), metadata=metadata,
                       **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# BoxNet picks and artifact masks
# ---------------------------------------------------------------------------------------------------------------
PICKS_COLORS = ("#ff5252", "#ffd740", "#69f0ae")  # score colours: threshold (red), yellow, 1 (green)
MANUAL_SCORE = 1.0  # score shown and exported for a pick without one (added by hand, or imported without scores)
# The mask/training Labels convention (values of a Labels layer painted for BoxNet):
NOTHING, ARTIFACT, IGNORE = 0, 2, 3
LABEL_MEANING = {
    NOTHING: "nothing (background or particles; particles come from the Points layer)",
    ARTIFACT: "artifact: ice, carbon, ethane drops, aggregates; never picked, trains the artifact class",
    IGNORE: "ignore: uncertain areas, left out of training",
}
MASK_COLORS = {NOTHING: "transparent", ARTIFACT: "#ff5a36", IGNORE: "#4fc3f7", None: "transparent"}


def picks_layer(
    yx: np.ndarray,
    score: np.ndarray | None,
    pixel_size: float | None,
    diameter: float,
    name: str,
    *,
    threshold: float | None = None,
    metadata: dict | None = None,
    **kwargs,
) -> LayerData:
    """BoxNet picks as a Points layer: thin circles one particle diameter across, coloured by score.

    yx: ``(N, 2)`` (y, x) pixels of the micrograph; score: ``(N,)`` (NaN or None: ``MANUAL_SCORE``, as are points
    added by hand later, through ``feature_defaults``). pixel_size: Å/px of the micrograph; diameter: Å.
    napari's Points ``size`` is the marker *diameter* in data pixels, drawn times ``scale``: ``diameter /
    pixel_size`` px makes the circle exactly one particle diameter (Å) across on screen. A transparent disc with a
    coloured border (10 % of the size) leaves the particle visible (napari's "ring" symbol covers its outer half).
    The border colour maps score from ``threshold`` (or 0.5) to 1 through ``PICKS_COLORS`` (red, yellow, green).
    """
    yx = np.asarray(yx, dtype=float).reshape(-1, 2)
    score = np.full(len(yx), np.nan) if score is None else np.asarray(score, dtype=float).reshape(-1)
    if score.shape != (len(yx),):
        raise ValueError(f"picks_layer: score must have {len(yx)} values, got {score.shape}")
    score = np.where(np.isfinite(score), score, MANUAL_SCORE)
    ps = float(pixel_size) if pixel_size else 1.0
    meta = {
        "name": name,
        "scale": (ps, ps),
        "units": _units(pixel_size, 2),
        "size": float(diameter) / ps,
        "symbol": "disc",
        "features": {"score": score},
        "feature_defaults": {"score": MANUAL_SCORE},
        "face_color": "transparent",
        "border_color": "score",
        "border_colormap": picks_colormap(),
        "border_contrast_limits": score_limits(threshold),
        "border_width": 0.1,
        "border_width_is_relative": True,
        "metadata": {
            "napari_warp_role": "picks",
            "pixel_size": pixel_size,
            "diameter": float(diameter),
            "threshold": None if threshold is None else float(threshold),
            "score": f"BoxNet particle softmax; {MANUAL_SCORE:g} for picks without a score (manual)",
            **(metadata or {}),
        },
        **kwargs,
    }
    return (yx, meta, "points")


def picks_colormap():
    """The score colormap of picks layers (red at the threshold, yellow, green at 1): bright on grey micrographs."""
    from napari.utils.colormaps import Colormap

    return Colormap(colors=list(PICKS_COLORS), controls=[0.0, 0.5, 1.0], name="pick score")


def score_limits(threshold: float | None) -> tuple[float, float]:
    """Score colour range of a picks layer: from the threshold (0.5 without one; never empty) to 1."""
    lo = 0.5 if threshold is None else float(threshold)
    return (min(lo, 0.99), 1.0)


def mask_layer(
    mask: np.ndarray,
    pixel_size: float | None,
    name: str,
    *,
    ignore: np.ndarray | None = None,
    metadata: dict | None = None,
    **kwargs,
) -> LayerData:
    """An artifact mask ``(Y, X)`` (bool, at the micrograph's sampling) as a Labels layer for viewing and painting.

    Values follow the BoxNet training convention (``LABEL_MEANING``): 0 nothing, 2 artifact (``mask``), 3 ignore
    (``ignore``, optional bool); 1 is not used (particles are the Points layer). Artifacts are red, ignored areas
    light blue, the rest transparent.
    """
    data = np.zeros(np.shape(mask), dtype=np.uint8)
    data[np.asarray(mask, dtype=bool)] = ARTIFACT
    if ignore is not None:
        data[np.asarray(ignore, dtype=bool)] = IGNORE
    meta = {
        "name": name,
        "scale": _scale(pixel_size, 2),
        "units": _units(pixel_size, 2),
        "colormap": dict(MASK_COLORS),
        "opacity": 0.45,
        "metadata": {
            "napari_warp_role": "artifacts",
            "pixel_size": pixel_size,
            "labels": {str(k): v for k, v in LABEL_MEANING.items()},
            **(metadata or {}),
        },
        **kwargs,
    }
    return (data, meta, "labels")


def masks_from_labels(data) -> tuple[np.ndarray, np.ndarray]:
    """Bool ``(artifact, ignore)`` masks from painted Labels data (``ARTIFACT`` and ``IGNORE`` values)."""
    data = np.asarray(data)
    return data == ARTIFACT, data == IGNORE


def points_in_image_pixels(points, image) -> np.ndarray:
    """``(N, 2)`` (y, x) pixels of ``image``'s data for the last two axes of a Points layer's data, through world
    coordinates (scale and translate of both layers), so points drawn on any layer land on the right pixels."""
    yx = np.asarray(points.data, dtype=float)[:, -2:].reshape(-1, 2)
    world = yx * np.asarray(points.scale[-2:], dtype=float) + np.asarray(points.translate[-2:], dtype=float)
    return (world - np.asarray(image.translate[-2:], dtype=float)) / np.asarray(image.scale[-2:], dtype=float)
