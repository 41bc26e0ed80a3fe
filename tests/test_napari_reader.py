"""Widget-free tests of the npe2 reader/writer and the layer conversions (no Qt needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_warp._layers import contrast_limits, points_layer, tracks_layer
from napari_warp._reader import get_reader
from napari_warp._writer import write_points
from napari_warp.core.errors import UnreadableMovieError
from napari_warp.core.io.movie import write_mrc


def test_get_reader_routes_by_extension(tmp_path):
    for name in ["a.mrc", "a.mrcs", "a.st", "a.rec", "a.map", "a.tif", "a.tiff", "a.eer", "a.em", "a.star"]:
        assert callable(get_reader(str(tmp_path / name))), name
    assert get_reader(str(tmp_path / "a.png")) is None
    assert get_reader([str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")]) is None


def test_movie_is_lazy_stack_in_angstrom(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.poisson(2.0, size=(5, 64, 48)).astype(np.float32)
    path = tmp_path / "movie.mrcs"
    write_mrc(path, frames, pixel_size=1.25)
    [(data, meta, kind)] = get_reader(str(path))(str(path))
    assert kind == "image"
    assert data.shape == (5, 64, 48)
    assert hasattr(data, "dask") or type(data).__module__.startswith("dask")  # lazy, not read in full
    assert meta["scale"] == (1.0, 1.25, 1.25)
    assert meta["units"][1:] == ("angstrom", "angstrom")
    np.testing.assert_array_equal(np.asarray(data[3]), frames[3])


def test_single_micrograph_is_2d(tmp_path):
    img = np.arange(32 * 40, dtype=np.float32).reshape(32, 40)
    path = tmp_path / "mic.mrc"
    write_mrc(path, img, pixel_size=0.8)
    [(data, meta, _)] = get_reader(str(path))(str(path))
    assert np.asarray(data).shape == (32, 40)
    assert meta["scale"] == (0.8, 0.8)


def test_volume_has_isotropic_voxel_scale(tmp_path):
    vol = np.random.default_rng(1).normal(size=(8, 12, 16)).astype(np.float32)
    path = tmp_path / "tomo.rec"
    write_mrc(path, vol, pixel_size=10.5)
    [(data, meta, _)] = get_reader(str(path))(str(path))
    assert data.shape == (8, 12, 16)
    assert meta["scale"] == (10.5, 10.5, 10.5)
    np.testing.assert_allclose(data, vol)


def test_real_map_voxel_size(data_dir):
    """EMD-3197: a 20³ sub-tomogram average at 11.4 Å/voxel (header values)."""
    path = data_dir / "maps" / "emdb-small" / "EMD-3197.map"
    [(data, meta, _)] = get_reader(str(path))(str(path))
    assert data.shape == (20, 20, 20)
    assert meta["scale"] == pytest.approx((11.4, 11.4, 11.4))


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "broken.mrc"
    path.write_bytes(b"this is not an MRC file" * 3)
    with pytest.raises(UnreadableMovieError, match="broken.mrc"):
        get_reader(str(path))(str(path))


def test_points_star_round_trip(tmp_path):
    yx = np.array([[10.5, 20.25], [100.0, 3.0], [7.0, 8.0]])
    score = np.array([0.9, 0.5, 0.99])
    import pandas as pd

    meta = {"features": pd.DataFrame({"score": score}), "metadata": {"micrograph": "mic_001.mrc"}}
    [written] = write_points(str(tmp_path / "picks.star"), yx, meta)
    layers = get_reader(written)(written)
    assert len(layers) == 1
    data, meta2, kind = layers[0]
    assert kind == "points"
    np.testing.assert_allclose(data, yx)
    np.testing.assert_allclose(np.asarray(meta2["features"]["score"]), score)


def test_star_x_is_second_axis(tmp_path):
    """STAR's rlnCoordinateX is the column (x) index: napari's second axis."""
    path = tmp_path / "c.star"
    path.write_text("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n 30.0 5.0\n 1.0 2.0\n")
    [(data, _, _)] = get_reader(str(path))(str(path))
    np.testing.assert_allclose(data, [[5.0, 30.0], [2.0, 1.0]])


def test_layer_helpers():
    lo, hi = contrast_limits(np.zeros((10, 10)))
    assert hi > lo
    data, meta, _ = points_layer(np.zeros((0, 2)), 1.5, "empty", diameter=150.0)
    assert data.shape == (0, 2) and meta["size"] == pytest.approx(100.0)
    shifts = np.zeros((4, 2, 2))
    shifts[:, 1, 1] = np.arange(4)
    paths, meta, kind = tracks_layer(np.array([[0.0, 0.0], [10.0, 10.0]]), shifts, 1.0, "t", exaggerate=10.0)
    assert kind == "shapes" and len(paths) == 2
    np.testing.assert_allclose(paths[1][:, 1], 10.0 + 10.0 * np.arange(4))
