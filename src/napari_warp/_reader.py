"""File -> napari layer data. No Qt imports, no message boxes: errors carry the file name and the reason."""

from __future__ import annotations

from pathlib import Path

MOVIE_EXTENSIONS = (".mrc", ".mrcs", ".st", ".tif", ".tiff", ".eer", ".em")
VOLUME_EXTENSIONS = (".rec", ".map")
STAR_EXTENSIONS = (".star",)


def get_reader(path):
    """npe2 reader contribution: a reader function for one supported path, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    suffix = Path(str(path)).suffix.lower()
    if suffix in STAR_EXTENSIONS:
        return read_star_points
    if suffix in MOVIE_EXTENSIONS + VOLUME_EXTENSIONS:
        return read_image
    return None


def read_image(path) -> list:
    """Movies and stacks as lazy (frames, y, x) images, maps and tomograms as (z, y, x) volumes, scale in Å."""
    from ._layers import movie_layer, volume_layer
    from .core.io.movie import is_volume, open_movie, read_volume

    path = Path(path[0] if isinstance(path, list) else path)
    if path.suffix.lower() in VOLUME_EXTENSIONS or is_volume(path):
        volume, voxel_size = read_volume(path)
        return [volume_layer(volume, voxel_size, path.name)]
    return [movie_layer(open_movie(path))]


def read_star_points(path) -> list:
    """A particle/coordinate STAR file -> one Points layer per micrograph (pixel coordinates, score feature)."""
    from ._layers import points_layer
    from .core.io.star import read_coordinates

    path = Path(path[0] if isinstance(path, list) else path)
    table = read_coordinates(path)
    layers = []
    for name, sub in table.by_micrograph().items():
        label = f"{path.stem}: {Path(name).name}" if name else path.stem
        layers.append(
            points_layer(
                sub.yx,
                sub.pixel_size,
                label,
                features=sub.features(),
                metadata={"source": str(path), "micrograph": name},
            )
        )
    return layers
