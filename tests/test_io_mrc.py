"""MRC reading (all modes incl. 4-bit), header metadata, corrupt files, and the atomic writer."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from mrcfile.dtypes import HEADER_DTYPE

from napari_warp.core.errors import UnreadableMovieError
from napari_warp.core.io.movie import open_movie, read_volume
from napari_warp.core.io.mrc import read_mrc_header
from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.io.raw import pack_4bit, unpack_4bit

rng = np.random.default_rng(1)


def _header(nx, ny, nz, mode, *, order="<", ps=1.0) -> bytes:
    h = np.zeros(1, HEADER_DTYPE.newbyteorder(order))
    h["nx"], h["ny"], h["nz"], h["mode"] = nx, ny, nz, mode
    h["mx"], h["my"], h["mz"] = nx, ny, nz
    h["cella"] = (nx * ps, ny * ps, nz * ps)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    h["map"] = b"MAP "
    h["machst"] = [0x44, 0x44, 0, 0] if order == "<" else [0x11, 0x11, 0, 0]
    h["nversion"] = 20140
    return h.tobytes()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.uint16, np.float16])
def test_modes_0_1_2_6_12_round_trip(tmp_path, dtype):
    data = rng.integers(-100 if np.dtype(dtype).kind != "u" else 0, 100, (3, 12, 10)).astype(dtype)
    with mrcfile.new(tmp_path / "m.mrcs") as m:
        m.set_data(data)
        m.voxel_size = 1.25
    movie = open_movie(tmp_path / "m.mrcs")
    assert movie.shape == (3, 12, 10) and movie.dtype == np.float32 and movie.pixel_size == pytest.approx(1.25)
    np.testing.assert_array_equal(movie.frames(), data.astype(np.float32))


def test_big_endian_header_and_data(tmp_path):
    data = rng.integers(0, 1000, (2, 5, 7)).astype(">i2")
    (tmp_path / "be.mrc").write_bytes(_header(7, 5, 2, 1, order=">") + data.tobytes())
    np.testing.assert_array_equal(open_movie(tmp_path / "be.mrc").frames(), data.astype(np.float32))


@pytest.mark.parametrize("nx", [8, 7])
def test_mode_101_four_bit_low_nibble_first(tmp_path, nx):
    data = rng.integers(0, 16, (3, 5, nx)).astype(np.uint8)
    packed = pack_4bit(data)
    assert packed.shape == (3, 5, (nx + 1) // 2)
    assert packed[0, 0, 0] == data[0, 0, 0] | (data[0, 0, 1] << 4)  # SerialEM/IMOD order
    (tmp_path / "p.mrc").write_bytes(_header(nx, 5, 3, 101) + packed.tobytes())
    movie = open_movie(tmp_path / "p.mrc")
    assert movie.shape == (3, 5, nx)
    np.testing.assert_array_equal(movie.frames(), data)
    np.testing.assert_array_equal(unpack_4bit(packed, nx), data)


def test_mode_0_is_unsigned_when_imod_says_so(tmp_path):
    data = np.array([[[-1, 5], [-128, 127]]], np.int8)
    raw = bytearray(_header(2, 2, 1, 0) + data.tobytes())
    assert open_movie_bytes(tmp_path, raw)[0, 1, 0] == -128  # plain MRC2014: signed
    raw[152:160] = np.array([1146047817, 0], "<i4").tobytes()  # IMOD stamp, flags bit 0 clear: unsigned
    assert open_movie_bytes(tmp_path, raw)[0].tolist() == [[255, 5], [128, 127]]


def open_movie_bytes(tmp_path, raw) -> np.ndarray:
    path = tmp_path / "b.mrc"
    path.write_bytes(bytes(raw))
    return open_movie(path).frames()


def test_truncated_mrc_counts_the_complete_frames(tmp_path):
    data = np.zeros((40, 16, 16), np.float32)
    write_mrc(tmp_path / "full.mrcs", data, 1.0)
    raw = (tmp_path / "full.mrcs").read_bytes()
    (tmp_path / "cut.mrcs").write_bytes(raw[: 1024 + int(12.5 * 16 * 16 * 4)])
    with pytest.raises(UnreadableMovieError, match=r"cut\.mrcs: truncated: 12 of 40 frames"):
        open_movie(tmp_path / "cut.mrcs")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff" * 4000, "not an MRC file: implausible header"),
        (b"tiny", "shorter than the 1024-byte header"),
        (_header(4, 4, 1, 3) + bytes(64), r"unsupported MRC mode 3 \(complex int16\)"),
        (_header(4, 4, 1, 7) + bytes(64), "unsupported MRC mode 7"),
    ],
)
def test_corrupt_mrc_raises_with_file_and_reason(tmp_path, content, match):
    path = tmp_path / "bad.mrc"
    path.write_bytes(content)
    with pytest.raises(UnreadableMovieError, match=match) as e:
        open_movie(path)
    assert str(e.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(UnreadableMovieError, match="no such file"):
        open_movie(tmp_path / "nothing.mrc")


def test_write_mrc_carries_pixel_size_and_voltage_atomically(tmp_path):
    data = rng.normal(size=(2, 6, 8)).astype(np.float32)
    write_mrc(tmp_path / "w.mrc", data, 0.834, voltage=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.mrc"]  # no temp file left behind
    h = read_mrc_header(tmp_path / "w.mrc")
    assert h.mode == 2 and h.pixel_size == pytest.approx(0.834, abs=1e-6) and h.voltage == 200
    with mrcfile.open(tmp_path / "w.mrc") as m:  # other programs see the same
        assert m.voxel_size.x == pytest.approx(0.834, abs=1e-6)
        np.testing.assert_array_equal(m.data, data)
    movie = open_movie(tmp_path / "w.mrc")
    assert movie.voltage == 200 and movie.exposure is None
    np.testing.assert_array_equal(movie.frames(), data)


def test_write_mrc_float16_image_and_volume(tmp_path):
    img = rng.normal(size=(6, 8)).astype(np.float32)
    write_mrc(tmp_path / "h.mrc", img, 1.5, dtype=np.float16)
    assert read_mrc_header(tmp_path / "h.mrc").mode == 12
    np.testing.assert_array_equal(open_movie(tmp_path / "h.mrc").frames()[0], img.astype(np.float16))
    vol = rng.normal(size=(4, 6, 8)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", vol, 2.0, volume=True)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        assert m.is_volume()
    data, voxel = read_volume(tmp_path / "v.mrc")
    np.testing.assert_array_equal(data, vol)
    assert voxel == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cannot write MRC"):
        write_mrc(tmp_path / "x.mrc", img, 1.0, dtype=np.float64)


def test_failed_write_leaves_the_old_file(tmp_path):
    write_mrc(tmp_path / "keep.mrc", np.ones((2, 2), np.float32), 1.0)
    with pytest.raises(ValueError):
        write_mrc(tmp_path / "keep.mrc", np.ones((2, 2, 2, 2)), 1.0)
    assert open_movie(tmp_path / "keep.mrc").shape == (1, 2, 2)


@pytest.mark.realdata
def test_epu_micrograph_header(data_dir):
    """EPU 2.9 FEI2 header: HT 300000 V, pixel 6.6655e-11 m, dose 4.117e21 e/m² = 41.17 e/Å² (1 Å² = 1e-20 m²)."""
    m = open_movie(data_dir / "micrographs" / "epu2.9_example.mrc")
    assert m.shape == (1, 4096, 4096)
    assert m.pixel_size == pytest.approx(0.66655, abs=1e-4)
    assert m.voltage == pytest.approx(300.0)
    assert m.exposure == pytest.approx(41.2, abs=0.1)
    with mrcfile.mmap(data_dir / "micrographs" / "epu2.9_example.mrc", permissive=True) as ref:
        np.testing.assert_array_equal(m.frames()[0, ::64, ::64], ref.data[::64, ::64])


@pytest.mark.realdata
def test_emdb_maps_honour_axis_order_and_voxel_size(data_dir):
    folder = data_dir / "maps" / "emdb-small"
    data, voxel = read_volume(folder / "EMD-3197.map")
    assert data.shape == (20, 20, 20) and data.dtype == np.float32 and voxel == pytest.approx(11.4)
    with mrcfile.open(folder / "EMD-3197.map", permissive=True) as ref:
        np.testing.assert_array_equal(data, ref.data)
    data, voxel = read_volume(folder / "EMD-3001.map", per_axis=True)  # mapc, mapr, maps = 3, 1, 2
    with mrcfile.open(folder / "EMD-3001.map", permissive=True) as ref:
        np.testing.assert_array_equal(data, ref.data.transpose(2, 0, 1))  # stored (Y, X, Z) -> (Z, Y, X)
        h = ref.header
        expect = (h.cella.z / h.mz, h.cella.y / h.my, h.cella.x / h.mx)
    assert data.shape == (73, 25, 43)
    assert voxel == pytest.approx(expect)
