"""Gain references (Warp's flip/transpose order, normalisation, mismatch hints) and defect maps (image, text)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_warp.core.errors import GainReferenceError
from napari_warp.core.io.gain import defect_fill, orient, read_defect_mask
from napari_warp.core.io.movie import open_movie
from napari_warp.core.io.mrc_write import write_mrc

rng = np.random.default_rng(4)
NY, NX = 12, 20


@pytest.fixture
def movie(tmp_path):
    data = rng.poisson(5, (3, NY, NX)).astype(np.float32) + 1
    write_mrc(tmp_path / "m.mrcs", data, 1.0)
    return tmp_path / "m.mrcs", data


def _norm(g):
    return g / g.mean(dtype=np.float64)


def test_gain_multiplies_after_normalising_to_mean_one(tmp_path, movie):
    path, data = movie
    gain = rng.uniform(2, 4, (NY, NX)).astype(np.float32)
    write_mrc(tmp_path / "g.mrc", gain, 1.0)
    np.testing.assert_allclose(open_movie(path, tmp_path / "g.mrc").frames(), data * _norm(gain), rtol=1e-5)


@pytest.mark.parametrize(
    ("fx", "fy", "tr", "expect"),
    [
        (True, False, False, lambda g: g[:, ::-1]),
        (False, True, False, lambda g: g[::-1, :]),
        (True, False, True, lambda g: g[:, ::-1].T),  # Warp: flip X first, transpose last
        (True, True, True, lambda g: g[::-1, ::-1].T),
    ],
)
def test_flips_and_transpose_in_warps_order(tmp_path, movie, fx, fy, tr, expect):
    path, data = movie
    shape = (NX, NY) if tr else (NY, NX)
    gain = rng.uniform(1, 3, shape).astype(np.float32)
    write_mrc(tmp_path / "g.mrc", gain, 1.0)
    m = open_movie(path, tmp_path / "g.mrc", gain_flip_x=fx, gain_flip_y=fy, gain_transpose=tr)
    np.testing.assert_allclose(m.frames(), data * _norm(expect(gain)), rtol=1e-5)
    if fx and tr and not fy:  # the other order would give a different, wrong gain
        assert not np.allclose(expect(gain), gain.T[:, ::-1])
    np.testing.assert_array_equal(orient(gain, fx, fy, tr), expect(gain))


def test_tiff_gain_is_read_flipped_like_tiff_movies(tmp_path, movie):
    path, data = movie
    gain = rng.uniform(1, 3, (NY, NX)).astype(np.float32)
    tifffile.imwrite(tmp_path / "g.tif", gain)
    np.testing.assert_allclose(open_movie(path, tmp_path / "g.tif").frames(), data * _norm(gain[::-1]), rtol=1e-5)


def test_mismatch_says_which_transform_fits(tmp_path, movie):
    path, _ = movie
    write_mrc(tmp_path / "t.mrc", np.ones((NX, NY), np.float32), 1.0)
    msg = f"gain is {NY}×{NX} but movie is {NX}×{NY}: try gain_transpose=True"
    with pytest.raises(GainReferenceError, match=msg):
        open_movie(path, tmp_path / "t.mrc")
    write_mrc(tmp_path / "s.mrc", np.ones((NY, NX), np.float32), 1.0)
    with pytest.raises(GainReferenceError, match="try gain_transpose=False"):
        open_movie(path, tmp_path / "s.mrc", gain_transpose=True)
    write_mrc(tmp_path / "x2.mrc", np.ones((2 * NY, 2 * NX), np.float32), 1.0)
    with pytest.raises(GainReferenceError, match="2× the movie") as e:
        open_movie(path, tmp_path / "x2.mrc")
    assert str(e.value).startswith(str(tmp_path / "x2.mrc"))


def test_unreadable_gain_files(tmp_path, movie):
    path, _ = movie
    (tmp_path / "junk.mrc").write_bytes(b"\x01" * 2000)
    with pytest.raises(GainReferenceError, match="junk.mrc: not an MRC file"):
        open_movie(path, tmp_path / "junk.mrc")
    with pytest.raises(GainReferenceError, match="no such file"):
        open_movie(path, tmp_path / "missing.mrc")
    (tmp_path / "g.dm4").write_bytes(b"\0" * 10)
    with pytest.raises(GainReferenceError, match="dm2mrc"):
        open_movie(path, tmp_path / "g.dm4")
    write_mrc(tmp_path / "stack.mrc", np.ones((2, NY, NX), np.float32), 1.0)
    with pytest.raises(GainReferenceError, match="has 2 images"):
        open_movie(path, tmp_path / "stack.mrc")


def test_dead_gain_pixels_become_defects(tmp_path):
    y, x = np.mgrid[0:24, 0:32].astype(np.float32)
    plane = 50 + 2 * x + 3 * y  # linear: a symmetric neighbourhood mean restores it exactly
    write_mrc(tmp_path / "p.mrc", plane, 1.0)
    gain = np.ones(plane.shape, np.float32)
    gain[12, 15] = 0
    write_mrc(tmp_path / "g.mrc", gain, 1.0)
    f = open_movie(tmp_path / "p.mrc", tmp_path / "g.mrc").frames()[0]
    scale = 1 / gain[gain > 0].mean()
    np.testing.assert_allclose(f, plane * scale, rtol=1e-5)


def test_defects_from_an_image_and_from_text_agree(tmp_path):
    y, x = np.mgrid[0:40, 0:48].astype(np.float32)
    plane = 100 + x - 0.5 * y
    frame = plane.copy()
    frame[20, 24] = 1e6  # hot pixel
    frame[:, 10] = 0  # dead column
    frame[30:33, 5:9] = -7  # a small dead block
    write_mrc(tmp_path / "f.mrc", frame, 1.0)
    mask = np.zeros(plane.shape, np.uint8)
    mask[20, 24] = 1
    mask[:, 10] = 1
    mask[30:33, 5:9] = 1
    write_mrc(tmp_path / "d.mrc", mask.astype(np.int16), 1.0, dtype=np.int16)
    (tmp_path / "d.txt").write_text("# x y w h\n24 20 1 1\n10 0 1 40\n5, 30, 4, 3  # block\n\n")
    a = open_movie(tmp_path / "f.mrc", defects=tmp_path / "d.mrc").frames()[0]
    b = open_movie(tmp_path / "f.mrc", defects=tmp_path / "d.txt").frames()[0]
    np.testing.assert_array_equal(a, b)
    good = mask == 0
    np.testing.assert_array_equal(a[good], frame[good])
    assert a[20, 24] == pytest.approx(plane[20, 24], abs=1e-3)  # isolated: exact on a plane
    np.testing.assert_allclose(a[5:22, 10], plane[5:22, 10], atol=1e-3)  # column, away from the rest
    assert np.all(np.abs(a[30:33, 5:9] - plane[30:33, 5:9]) < 3)  # block: near the plane, no -7 left


def test_defect_text_errors(tmp_path):
    (tmp_path / "bad.txt").write_text("1 2 3\n")
    with pytest.raises(GainReferenceError, match=r"bad.txt: line 1: expected 'x y w h'"):
        read_defect_mask(tmp_path / "bad.txt", (8, 8))
    (tmp_path / "out.txt").write_text("0 0 1 1\n100 0 2 2\n")
    with pytest.raises(GainReferenceError, match="line 2: rectangle 100 0 2 2 lies outside the 8×8 frame"):
        read_defect_mask(tmp_path / "out.txt", (8, 8))
    (tmp_path / "clip.txt").write_text("6 6 5 5\n")
    assert read_defect_mask(tmp_path / "clip.txt", (8, 8)).sum() == 4  # clipped at the edge


def test_defect_text_follows_the_gain_transforms(tmp_path, movie):
    path, data = movie
    (tmp_path / "d.txt").write_text("0 0 1 1\n")  # top-left of the reference grid
    m = open_movie(path, defects=tmp_path / "d.txt", gain_flip_x=True)
    f = m.frames()
    assert not np.array_equal(f[:, 0, NX - 1], data[:, 0, NX - 1])  # moved to the right edge and filled
    np.testing.assert_array_equal(f[:, 0, 0], data[:, 0, 0])


def test_defect_fill_grows_for_large_defects_and_refuses_all_bad():
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True
    fill = defect_fill(mask)
    frame = np.full((64, 64), 5.0, np.float32)
    frame[mask] = np.nan
    fill.apply(frame)
    np.testing.assert_allclose(frame, 5.0, rtol=1e-6)
    assert defect_fill(np.zeros((4, 4), bool)) is None
    with pytest.raises(ValueError, match="every pixel"):
        defect_fill(np.ones((4, 4), bool))


def test_gain_and_defects_apply_before_binning(tmp_path):
    import torch

    from napari_warp.core.fourier import fourier_crop

    data = rng.poisson(5, (2, 16, 24)).astype(np.float32)
    write_mrc(tmp_path / "m.mrcs", data, 1.0)
    gain = rng.uniform(1, 2, (16, 24)).astype(np.float32)
    write_mrc(tmp_path / "g.mrc", gain, 1.0)
    m = open_movie(tmp_path / "m.mrcs", tmp_path / "g.mrc", binning=2)
    assert m.shape == (2, 8, 12) and m.pixel_size == pytest.approx(2.0)
    np.testing.assert_allclose(m.frames(), fourier_crop(torch.as_tensor(data * _norm(gain)), (8, 12)).numpy(), rtol=1e-4, atol=1e-4)
