"""EER reading against files written here with known electron positions (a small EER encoder + BigTIFF writer)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from napari_warp.core.errors import GainReferenceError, UnreadableMovieError
from napari_warp.core.io.movie import open_movie
from napari_warp.core.io.mrc_write import write_mrc

H = W = 32  # physical sensor pixels


def encode_eer(py, px, sy, sx, h, w, skipbits=7) -> bytes:
    """EER bit stream (LSB first): per event a run length of ``skipbits``, then 2+2 sub-pixel bits.

    A run of all ones continues without an event; sub-pixel positions are stored XOR 2 (EER's convention); the
    stream ends with a run reaching the last pixel. ``sy, sx`` are sub-pixel rows/columns 0..3 on the 4× grid.
    """
    p = np.asarray(py) * w + np.asarray(px)
    order = np.argsort(p)
    assert np.all(np.diff(p[order]) > 0), "at most one event per physical pixel and frame"
    acc, nbits, cur, full = 0, 0, 0, (1 << skipbits) - 1

    def put(value, n):
        nonlocal acc, nbits
        acc |= int(value) << nbits
        nbits += n

    def run(gap):
        while gap >= full:
            put(full, skipbits)
            gap -= full
        put(gap, skipbits)

    for k in order:
        run(int(p[k]) - cur)
        put(int(sx[k]) ^ 2, 2)
        put(int(sy[k]) ^ 2, 2)
        cur = int(p[k]) + 1
    run(h * w - cur)
    n = (nbits + 7) // 8 + 4  # decoders read ahead a few bytes
    return acc.to_bytes(n + n % 2, "little")


def write_eer(path, strips, h, w, compression=65001, bits=None, xml=None):
    """A minimal little-endian BigTIFF, one strip per page, EER tags as EPU writes them."""
    out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
    link = 8
    for k, strip in enumerate(strips):
        data_at = len(out)
        out += strip + b"\0" * (len(strip) % 2)
        tags = [(256, 4, 1, w), (257, 4, 1, h), (259, 3, 1, compression), (262, 3, 1, 1), (273, 16, 1, data_at),
                (277, 3, 1, 1), (278, 4, 1, h), (279, 16, 1, len(strip))]  # fmt: skip
        if bits:
            tags += [(65007, 3, 1, bits[0]), (65008, 3, 1, bits[1]), (65009, 3, 1, bits[2])]
        if xml is not None and k == 0:
            tags.append((65001, 7, len(xml), len(out)))
            out += xml + b"\0" * (len(xml) % 2)
        struct.pack_into("<Q", out, link, len(out))
        out += struct.pack("<Q", len(tags))
        for tag, typ, count, value in sorted(tags):
            fmt = {3: "<HHQH6x", 4: "<HHQI4x"}.get(typ, "<HHQQ")
            out += struct.pack(fmt, tag, typ, count, value)
        link = len(out)
        out += struct.pack("<Q", 0)
    path.write_bytes(bytes(out))


def _metadata(total_dose_per_px=None, pixel_m=None, n=None) -> bytes:
    items = []
    if total_dose_per_px is not None:
        items.append(f'<item name="totalDose" unit="e/pixel">{total_dose_per_px}</item>')
    if pixel_m is not None:
        items += [f'<item name="sensorPixelSize.{a}" unit="m">{pixel_m}</item>' for a in ("width", "height")]
    if n is not None:
        items.append(f'<item name="numberOfFrames">{n}</item>')
    return ("<metadata>" + "".join(items) + "</metadata>").encode()


@pytest.fixture(scope="module")
def events():
    """Per raw frame: (py, px, sy, sx) of ~40 electrons at distinct physical pixels."""
    rng = np.random.default_rng(7)
    frames = []
    for _ in range(10):
        idx = rng.choice(H * W, 40, replace=False)
        frames.append((idx // W, idx % W, rng.integers(0, 4, 40), rng.integers(0, 4, 40)))
    return frames


def _expected(events, group, up):
    n = len(events) // group
    out = np.zeros((n, H * up, W * up))
    for k in range(n * group):
        py, px, sy, sx = events[k]
        np.add.at(out[k // group], (py * up + sy // (4 // up), px * up + sx // (4 // up)), 1)
    return out


@pytest.fixture(scope="module")
def eer_path(tmp_path_factory, events):
    path = tmp_path_factory.mktemp("eer") / "movie.eer"
    xml = _metadata(total_dose_per_px=2.0, pixel_m=1.5e-10, n=len(events))
    write_eer(path, [encode_eer(*e, H, W) for e in events], H, W, xml=xml)
    return path


@pytest.mark.parametrize("up", [1, 2, 4])
@pytest.mark.parametrize("group", [1, 3])
def test_grouping_and_upsampling_put_electrons_where_they_were(eer_path, events, group, up):
    m = open_movie(eer_path, eer_group=group, eer_upsampling=up)
    assert m.shape == (len(events) // group, H * up, W * up)
    assert m.frames_per_group == group
    np.testing.assert_array_equal(m.frames(), _expected(events, group, up))
    assert m.pixel_size == pytest.approx(1.5 / up)


def test_metadata_gives_pixel_size_and_exposure(eer_path, events):
    m = open_movie(eer_path)
    assert m.pixel_size == pytest.approx(1.5)
    assert m.exposure == pytest.approx(2.0 / 1.5**2)  # e/pixel over the pixel area
    assert m.voltage is None
    assert len(m) == len(events)


def test_dose_grouping_drops_the_remainder_and_reports_the_dose_kept(eer_path, events):
    per_raw = 2.0 / 1.5**2 / len(events)
    m = open_movie(eer_path, eer_dose_per_group=3.1 * per_raw)  # -> 3 raw frames per group, 1 left over
    assert m.frames_per_group == 3 and len(m) == 3
    assert m.exposure == pytest.approx(9 * per_raw)
    np.testing.assert_array_equal(m.frames(), _expected(events, 3, 1))
    # an explicit exposure replaces the file's; the group follows from it
    m2 = open_movie(eer_path, eer_dose_per_group=1.0, exposure=5.0)
    assert m2.frames_per_group == 2 and m2.exposure == pytest.approx(5.0)


def test_dose_grouping_without_exposure_is_refused(tmp_path, events):
    path = tmp_path / "nodose.eer"
    write_eer(path, [encode_eer(*e, H, W) for e in events[:4]], H, W)
    with pytest.raises(UnreadableMovieError, match="exposure"):
        open_movie(path, eer_dose_per_group=1.0)
    m = open_movie(path)
    assert m.pixel_size is None and m.exposure is None and len(m) == 4


def test_eight_bit_runs_with_tagged_bit_sizes(tmp_path, events):
    path = tmp_path / "v2.eer"
    write_eer(path, [encode_eer(*e, H, W, skipbits=8) for e in events], H, W, compression=65002, bits=(8, 2, 2))
    m = open_movie(path, eer_group=2, eer_upsampling=4)
    np.testing.assert_array_equal(m.frames(), _expected(events, 2, 4))


def test_long_runs_use_continuation_codes(tmp_path):
    h = w = 64  # 4096 pixels: gaps far above 127
    py, px, sy, sx = np.array([0, 40, 63]), np.array([3, 17, 63]), np.array([1, 2, 3]), np.array([0, 3, 1])
    path = tmp_path / "sparse.eer"
    write_eer(path, [encode_eer(py, px, sy, sx, h, w)], h, w)
    f = open_movie(path, eer_upsampling=4).frames()[0]
    assert f.sum() == 3 and f[4 * py + sy, 4 * px + sx].tolist() == [1, 1, 1]


def test_gain_divides_and_is_repeated_to_the_rendered_grid(tmp_path, eer_path, events):
    rng = np.random.default_rng(3)
    gain = rng.uniform(0.5, 1.5, (H, W)).astype(np.float32)
    write_mrc(tmp_path / "gain.mrc", gain, 1.5)
    m = open_movie(eer_path, tmp_path / "gain.mrc", eer_group=5, eer_upsampling=2)
    g = np.repeat(np.repeat(gain / gain.mean(dtype=np.float64), 2, 0), 2, 1)
    np.testing.assert_allclose(m.frames(), _expected(events, 5, 2) / g, rtol=1e-5)


def test_gain_of_the_wrong_size_says_which_upsampling_fits(tmp_path, eer_path):
    write_mrc(tmp_path / "g8k.mrc", np.ones((2 * H, 2 * W), np.float32), 1.0)
    with pytest.raises(GainReferenceError, match="try eer_upsampling=2"):
        open_movie(eer_path, tmp_path / "g8k.mrc", eer_upsampling=4)


def test_truncated_eer_names_the_frames_present(tmp_path, eer_path):
    data = eer_path.read_bytes()
    cut = tmp_path / "cut.eer"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableMovieError, match=r"cut\.eer: truncated: \d+ of 10 frames"):
        open_movie(cut)


def test_bad_upsampling_is_a_value_error(eer_path):
    with pytest.raises(ValueError, match="eer_upsampling"):
        open_movie(eer_path, eer_upsampling=3)


def test_group_by_count_and_by_dose_are_exclusive(eer_path):
    with pytest.raises(ValueError, match="not both"):
        open_movie(eer_path, eer_group=2, eer_dose_per_group=1.0)
