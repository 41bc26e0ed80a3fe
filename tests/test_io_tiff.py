"""TIFF movies: LZW/deflate round trips, Warp's y flip, truncated and garbage files, parallel decoding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile

from napari_warp.core.errors import UnreadableMovieError
from napari_warp.core.io.movie import open_movie, read_volume

rng = np.random.default_rng(2)


@pytest.fixture(scope="module")
def counts():
    return rng.poisson(1.0, (8, 48, 40)).astype(np.uint16)


@pytest.mark.parametrize("compression", ["lzw", "zlib", None])
def test_round_trip_is_flipped_in_y_like_warp(tmp_path, counts, compression):
    tifffile.imwrite(tmp_path / "m.tif", counts, compression=compression)
    m = open_movie(tmp_path / "m.tif")
    assert m.shape == counts.shape and m.pixel_size is None and m.voltage is None and m.exposure is None
    np.testing.assert_array_equal(m.frames(), counts[:, ::-1, :])  # TIFF rows top-down -> MRC convention


def test_flip_can_be_turned_off(tmp_path, counts, monkeypatch):
    tifffile.imwrite(tmp_path / "m.tif", counts, compression="lzw")
    monkeypatch.setenv("NAPARI_WARP_DONT_FLIPY", "1")
    np.testing.assert_array_equal(open_movie(tmp_path / "m.tif").frames(), counts)


def test_uint8_pages_decode_the_same_in_parallel_and_serially(tmp_path):
    data = rng.poisson(1.0, (12, 64, 64)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "m.tiff", data, compression="lzw")
    m = open_movie(tmp_path / "m.tiff", pixel_size=1.1, exposure=30)
    np.testing.assert_array_equal(m.frames(workers=4), m.frames(workers=1))
    assert m.pixel_size == 1.1 and m.exposure == 30


def test_a_pickled_movie_reopens_its_file(tmp_path, counts):
    tifffile.imwrite(tmp_path / "m.tif", counts, compression="lzw")
    m = open_movie(tmp_path / "m.tif")
    m.frames(0)
    clone = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(clone.frames([1, 5]), m.frames([1, 5]))


@pytest.mark.parametrize(("fraction", "match"), [(0.4, r"truncated: \d of 8 frames"), (0.97, "truncated: 7 of 8")])
def test_truncated_tiff(tmp_path, counts, fraction, match):
    tifffile.imwrite(tmp_path / "full.tif", counts, compression="lzw")
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(UnreadableMovieError, match=match) as e:
        open_movie(tmp_path / "cut.tif")
    assert "cut.tif" in str(e.value)


def test_garbage_tiff(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"this is not an image" * 10)
    with pytest.raises(UnreadableMovieError, match="junk.tif: not a readable TIFF"):
        open_movie(tmp_path / "junk.tif")


def test_pages_of_different_sizes_are_not_a_movie(tmp_path):
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tw:
        tw.write(np.zeros((8, 8), np.uint8))
        tw.write(np.zeros((8, 9), np.uint8))
    with pytest.raises(UnreadableMovieError, match="not one movie"):
        open_movie(tmp_path / "mixed.tif")


def test_an_extensionless_tiff_is_recognised_by_its_magic(tmp_path, counts):
    tifffile.imwrite(tmp_path / "noext", counts[:2])
    assert open_movie(tmp_path / "noext").shape == (2, 48, 40)


@pytest.mark.realdata
def test_imagej_tomogram_volume(data_dir):
    path = data_dir / "tomograms" / "microtubules" / "13pf_MT.tif"
    data, voxel = read_volume(path)
    assert data.shape == (36, 206, 94) and voxel == pytest.approx(10.52, abs=1e-3)  # 1.052 nm
    np.testing.assert_array_equal(data, tifffile.imread(path)[:, ::-1].astype(np.float32))
