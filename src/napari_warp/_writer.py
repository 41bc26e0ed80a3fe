"""napari layer data -> files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_points(path: str, data, meta: dict) -> list[str]:
    """Points layer -> RELION coordinate STAR (rlnCoordinateX/Y in pixels of the layer's own sampling).

    Layer data is kept in pixels (the pixel size lives in ``scale``), so nothing is converted here. A ``score``
    feature becomes rlnAutopickFigureOfMerit.
    """
    from .core.io.star import write_coordinates

    yx = np.asarray(data, dtype=float).reshape(-1, 2)
    if yx.size and np.asarray(data).shape[-1] != 2:
        raise ValueError(f"{path}: only 2D points can be written as coordinates, got {np.asarray(data).shape[-1]}D")
    features = meta.get("features")
    score = None
    if features is not None and "score" in getattr(features, "columns", ()):
        score = np.asarray(features["score"], dtype=float)
    micrograph = (meta.get("metadata") or {}).get("micrograph")
    if not str(path).endswith(".star"):
        path = f"{path}.star"
    write_coordinates(Path(path), yx, score=score, micrograph_name=micrograph)
    return [str(path)]
