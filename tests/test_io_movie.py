"""The Movie API (lazy frames, indexing, dask), Fourier binning, EM and headerless raw files."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_warp.core.errors import UnreadableMovieError
from napari_warp.core.io.em import write_em
from napari_warp.core.io.movie import RawLayout, binned_shape, open_movie, read_volume
from napari_warp.core.io.mrc_write import write_mrc

rng = np.random.default_rng(3)


@pytest.fixture
def stack(tmp_path):
    data = rng.normal(10, 2, (6, 16, 20)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", data, 1.0)
    return tmp_path / "s.mrcs", data


def test_frames_accepts_int_slice_sequence_and_mask(stack):
    path, data = stack
    m = open_movie(path)
    assert len(m) == 6 and m.ndim == 3 and m.dtype == np.float32
    np.testing.assert_array_equal(m.frames(), data)
    np.testing.assert_array_equal(m.frames(2), data[2:3])
    np.testing.assert_array_equal(m.frames(-1), data[5:6])
    np.testing.assert_array_equal(m.frames(slice(1, None, 2)), data[1::2])
    np.testing.assert_array_equal(m.frames([4, 0]), data[[4, 0]])
    np.testing.assert_array_equal(m.frames(np.arange(6) % 2 == 0), data[::2])
    assert m.frames([]).shape == (0, 16, 20)
    with pytest.raises(IndexError):
        m.frames(6)
    np.testing.assert_array_equal(m[3, 2:4, 5], data[3, 2:4, 5])
    np.testing.assert_array_equal(m[..., 1], data[..., 1])


def test_to_dask_has_one_chunk_per_frame(stack):
    path, data = stack
    d = open_movie(path).to_dask()
    assert isinstance(d, da.Array) and d.shape == data.shape and d.dtype == np.float32
    assert d.chunks == ((1,) * 6, (16,), (20,))
    np.testing.assert_array_equal(d[2:4].compute(), data[2:4])
    np.testing.assert_allclose(d.mean(axis=0).compute(), data.mean(axis=0), rtol=1e-6)


def test_binning_keeps_a_low_frequency_wave_and_scales_the_pixel_size(tmp_path):
    y, x = np.mgrid[0:128, 0:256].astype(np.float64)
    wave = 10 + 3 * np.cos(2 * np.pi * (x / 32 + y / 64))
    write_mrc(tmp_path / "w.mrc", wave, 0.8)
    m = open_movie(tmp_path / "w.mrc", binning=2)
    assert m.shape == (1, 64, 128) and m.pixel_size == pytest.approx(1.6)
    yb, xb = np.mgrid[0:64, 0:128]
    np.testing.assert_allclose(m.frames()[0], 10 + 3 * np.cos(2 * np.pi * (xb / 16 + yb / 32)), atol=1e-3)
    m = open_movie(tmp_path / "w.mrc", binning=1.5)
    assert m.shape == (1, 84, 170)  # rounded, then even (Warp's rule)
    assert m.pixel_size == pytest.approx(0.8 * 256 / 170)  # the true spacing of the cropped grid
    assert m.frames().mean() == pytest.approx(10, abs=1e-3)


def test_binning_rejects_factors_below_one(stack):
    with pytest.raises(ValueError, match="binning"):
        open_movie(stack[0], binning=0.5)


def test_binned_shape_rounds_to_even():
    assert binned_shape((4096, 4096), 2) == (2048, 2048) and binned_shape((7, 9), 1) == (7, 9)


def test_em_round_trip_with_header_values(tmp_path):
    data = rng.normal(size=(3, 10, 12)).astype(np.float32)
    write_em(tmp_path / "s.em", data, pixel_size=1.234, voltage=300)
    m = open_movie(tmp_path / "s.em")
    assert m.shape == (3, 10, 12) and m.pixel_size == pytest.approx(1.234) and m.voltage == 300
    np.testing.assert_array_equal(m.frames(), data)
    ints = rng.integers(-500, 500, (12, 10)).astype(np.int16)
    write_em(tmp_path / "i.em", ints)
    vol, voxel = read_volume(tmp_path / "i.em")
    assert voxel is None
    np.testing.assert_array_equal(vol[0], ints)


def test_big_endian_em_and_bad_em_files(tmp_path):
    data = rng.normal(size=(2, 4, 5)).astype(">f4")
    header = bytearray(512)
    header[0], header[3] = 5, 5  # Mac (big-endian), float
    header[4:16] = np.array([5, 4, 2], ">i4").tobytes()
    (tmp_path / "be.em").write_bytes(bytes(header) + data.tobytes())
    np.testing.assert_array_equal(open_movie(tmp_path / "be.em").frames(), data)
    (tmp_path / "cut.em").write_bytes(bytes(header) + data.tobytes()[:100])
    with pytest.raises(UnreadableMovieError, match=r"truncated: 1 of 2 frames"):
        open_movie(tmp_path / "cut.em")
    header[3] = 8
    (tmp_path / "cplx.em").write_bytes(bytes(header) + data.tobytes())
    with pytest.raises(UnreadableMovieError, match=r"unsupported EM data type 8 \(complex float32\)"):
        open_movie(tmp_path / "cplx.em")


def test_raw_layout_with_offset_and_byte_order(tmp_path):
    data = rng.integers(0, 4000, (4, 6, 9)).astype(">u2")
    (tmp_path / "frames").write_bytes(b"\0" * 100 + data.tobytes())
    layout = RawLayout(9, 6, None, "uint16", offset=100, byteorder="big")
    m = open_movie(tmp_path / "frames", raw=layout, pixel_size=0.5)
    assert m.shape == (4, 6, 9) and m.pixel_size == 0.5
    np.testing.assert_array_equal(m.frames(), data.astype(np.float32))
    with pytest.raises(UnreadableMovieError, match="unrecognised format.*RawLayout"):
        open_movie(tmp_path / "frames")  # never guessed: only when a layout is given
    with pytest.raises(UnreadableMovieError, match="truncated: 4 of 5 frames"):
        open_movie(tmp_path / "frames", raw=RawLayout(9, 6, 5, "uint16", 100, ">"))
    with pytest.raises(UnreadableMovieError, match="not a whole number"):
        open_movie(tmp_path / "frames", raw=RawLayout(10, 6, None, "uint16", 100, ">"))
    with pytest.raises(ValueError):
        RawLayout(0, 6)


def test_a_file_that_changes_under_us_names_the_frame(stack):
    path, _ = stack
    m = open_movie(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UnreadableMovieError, match="truncated: frame 5"):
        m.frames(5)


@pytest.mark.realdata
def test_real_em_templates_match_their_mrc_conversion(data_dir):
    folder = data_dir / "maps" / "ribosome-templates"
    for name in ("human_ribo_21A.em", "emd_1480.map.em_bin_4.em"):
        em, voxel = read_volume(folder / name)
        mrc, _ = read_volume(folder / f"{name}.converted.mrc")
        assert voxel is None  # not recorded in these headers
        np.testing.assert_array_equal(em, mrc)


def test_is_volume_follows_the_header(tmp_path):
    from napari_warp.core.io.movie import is_volume

    data = np.zeros((3, 4, 5), np.float32)
    write_mrc(tmp_path / "stack.mrcs", data, 1.0)
    write_mrc(tmp_path / "vol.mrc", data, 1.0, volume=True)
    write_mrc(tmp_path / "img.mrc", data[0], 1.0)
    assert [is_volume(tmp_path / n) for n in ("stack.mrcs", "vol.mrc", "img.mrc")] == [False, True, False]
    write_em(tmp_path / "v.em", data)
    assert is_volume(tmp_path / "v.em")


@pytest.mark.realdata
def test_is_volume_on_real_files(data_dir):
    from napari_warp.core.io.movie import is_volume

    assert is_volume(data_dir / "maps" / "emdb-small" / "EMD-3197.map")
    assert is_volume(data_dir / "tomograms" / "microtubules" / "13pf_MT.tif")  # ImageJ z slices
    assert not is_volume(data_dir / "micrographs" / "epu2.9_example.mrc")
