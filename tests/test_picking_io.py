"""Pick files: our per-item STAR round trip, other tools' formats with exact coordinates, matching, errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_warp.core.errors import MetadataError
from napari_warp.core.io.star import read_coordinates
from napari_warp.core.picking.io import (
    PickImportError,
    PickTable,
    match_picks_to_items,
    read_picks,
    read_picks_star,
    write_picks_star,
)

RELION30 = """
data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnAutopickFigureOfMerit #3
_rlnMicrographName #4
  1024.5   200.25  0.875 MotionCorr/job002/Movies/mic_001.mrc
    12.0  3000.0  -0.125 MotionCorr/job002/Movies/mic_001.mrc
   300.0    40.0   0.5   MotionCorr/job002/Movies/mic_002.mrc
"""

RELION31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographPixelSize #3
opticsGroup1            1     0.830000

# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnMicrographName #3
_rlnOpticsGroup #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
  100.0  200.0  Movies/FoilHole_1_Data_2.mrc  1  3.5  -1.0
  150.0  250.0  Movies/FoilHole_1_Data_3.mrc  1  0.0   0.0
"""

RELION5 = """
# version 50001

data_particles

loop_
_rlnTomoName #1
_rlnCenteredCoordinateXAngst #2
_rlnCenteredCoordinateYAngst #3
_rlnAutopickFigureOfMerit #4
mic_007   0.0     0.0     1.5
mic_007  -20.0   10.0     2.5
"""

CBOX_STAR = """
data_global

_cbox_format_version 1.0

data_cryolo

loop_
_CoordinateX #1
_CoordinateY #2
_CoordinateZ #3
_Width #4
_Height #5
_Depth #6
_EstWidth #7
_EstHeight #8
_Confidence #9
_NumBoxes #10
_Angle #11
10.0 20.0 <NA> 100 120 <NA> 90 95 0.8 <NA> <NA>
30.5 40.0 <NA> 64 64 <NA> 60 62 0.25 <NA> <NA>
"""


def _write(path, text):
    path.write_text(text.lstrip("\n"))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# our picks STAR


def test_picks_star_round_trip(tmp_path):
    yx = np.array([[10.25, 300.5], [2047.0, 0.125], [512.0, 1024.75]])
    score = np.array([0.9, -0.25, 0.5])
    path = write_picks_star(
        tmp_path / "mic_001.star",
        yx,
        score,
        micrograph_name="mic_001",
        model="boxnet-2.0",
        diameter=180.0,
        threshold=0.35,
    )
    table = read_picks_star(path)
    np.testing.assert_array_equal(table.yx, yx)
    np.testing.assert_array_equal(table.score, score)
    assert table.diameter == 180.0
    assert table.info["micrograph_name"] == "mic_001"
    assert table.info["model"] == "boxnet-2.0"
    assert table.info["threshold"] == 0.35
    assert table.info["version"]
    # RELION-style: x is the column (yx[:, 1]); a generic RELION reader sees the same numbers
    text = path.read_text()
    assert "rlnCoordinateX" in text and "data_napari_warp" in text
    coords = read_coordinates(path)
    np.testing.assert_array_equal(coords.yx, yx)
    # the import path keys it by the recorded micrograph name
    ((key, imported),) = read_picks(path).items()
    assert key == "mic_001"
    np.testing.assert_array_equal(imported.yx, yx)


def test_picks_star_without_scores_and_empty(tmp_path):
    path = write_picks_star(tmp_path / "a.star", [[1.0, 2.0]], micrograph_name="a")
    table = read_picks_star(path)
    np.testing.assert_array_equal(table.yx, [[1.0, 2.0]])
    assert np.isnan(table.score).all() and table.score.shape == (1,)
    assert "rlnAutopickFigureOfMerit" not in path.read_text()
    assert table.diameter is None and "model" not in table.info

    empty = read_picks_star(write_picks_star(tmp_path / "e.star", np.zeros((0, 2)), [], micrograph_name="e"))
    assert empty.yx.shape == (0, 2) and empty.score.shape == (0,)


def test_picks_star_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="yx"):
        write_picks_star(tmp_path / "a.star", np.zeros((3, 3)), micrograph_name="a")
    with pytest.raises(ValueError, match="score"):
        write_picks_star(tmp_path / "a.star", np.zeros((3, 2)), np.zeros(2), micrograph_name="a")
    assert list(tmp_path.iterdir()) == []


def test_picks_star_is_atomic(tmp_path, monkeypatch):
    path = write_picks_star(tmp_path / "mic.star", [[5.0, 6.0]], [0.5], micrograph_name="mic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mic.star"]  # no temp file left behind
    before = path.read_bytes()

    import starfile

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(starfile, "to_string", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_picks_star(path, [[7.0, 8.0], [9.0, 10.0]], [0.1, 0.2], micrograph_name="mic")
    assert path.read_bytes() == before  # the old file survives a failed write intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mic.star"]


# ----------------------------------------------------------------------------------------------------------------------
# RELION


def test_relion30_multi_micrograph(tmp_path):
    tables = read_picks(_write(tmp_path / "autopick.star", RELION30))
    assert list(tables) == ["mic_001", "mic_002"]
    np.testing.assert_array_equal(tables["mic_001"].yx, [[200.25, 1024.5], [3000.0, 12.0]])
    np.testing.assert_array_equal(tables["mic_001"].score, [0.875, -0.125])
    np.testing.assert_array_equal(tables["mic_002"].yx, [[40.0, 300.0]])


def test_relion31_particles_with_optics(tmp_path):
    tables = read_picks(_write(tmp_path / "particles.star", RELION31))
    assert list(tables) == ["FoilHole_1_Data_2", "FoilHole_1_Data_3"]
    np.testing.assert_array_equal(tables["FoilHole_1_Data_2"].yx, [[200.0, 100.0]])  # origins not applied
    np.testing.assert_array_equal(tables["FoilHole_1_Data_3"].yx, [[250.0, 150.0]])
    assert np.isnan(tables["FoilHole_1_Data_2"].score).all()


def test_relion_per_micrograph_file_keyed_by_stem(tmp_path):
    text = "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n 11.0 22.0\n 33.5 44.5\n"
    tables = read_picks(_write(tmp_path / "mic_042_autopick.star", text))
    assert list(tables) == ["mic_042"]
    np.testing.assert_array_equal(tables["mic_042"].yx, [[22.0, 11.0], [44.5, 33.5]])
    assert list(read_picks(_write(tmp_path / "mic_043_manualpick.star", text))) == ["mic_043"]


def test_relion5_centered_angstrom(tmp_path):
    path = _write(tmp_path / "r5.star", RELION5)
    # x_px = x_A / pixel_size + nx / 2 (RELION's float centre): shape (ny, nx) = (300, 400), 2 Å/px
    tables = read_picks(path, micrograph_shape=(300, 400), pixel_size=2.0)
    np.testing.assert_array_equal(tables["mic_007"].yx, [[150.0, 200.0], [155.0, 190.0]])
    np.testing.assert_array_equal(tables["mic_007"].score, [1.5, 2.5])
    # odd size: the centre is 4.5, not 4 or 5
    odd = read_picks(path, micrograph_shape=(9, 9), pixel_size=10.0)["mic_007"]
    np.testing.assert_array_equal(odd.yx[0], [4.5, 4.5])

    with pytest.raises(PickImportError, match=r"r5\.star.*micrograph_shape.*pixel_size"):
        read_picks(path)
    with pytest.raises(PickImportError, match=r"r5\.star.*needs pixel_size") as err:
        read_picks(path, micrograph_shape=(300, 400))
    assert "micrograph_shape" not in str(err.value).split("needs")[1]


# ----------------------------------------------------------------------------------------------------------------------
# cryoSPARC, EMAN, crYOLO, Topaz


def _cs(fields, rows):
    return np.array(rows, dtype=fields)


def test_cryosparc_cs(tmp_path):
    fields = [
        ("uid", "<u8"),
        ("location/micrograph_path", "S128"),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
        ("pick_stats/ncc_score", "<f4"),
    ]
    m1 = b"J3/motioncorrected/012345678901234567890_mic_1_patch_aligned_doseweighted.mrc"
    m2 = b"J3/motioncorrected/098765432109876543210_mic_2_patch_aligned_doseweighted.mrc"
    rows = [
        (1, m1, (1000, 2000), 0.25, 0.5, 0.75),
        (2, m1, (1000, 2000), 0.5, 0.125, 0.5),
        (3, m2, (800, 600), 0.75, 0.25, 0.25),
    ]
    path = tmp_path / "picked_particles.cs"
    with open(path, "wb") as f:  # np.save(path) would append ".npy"
        np.save(f, _cs(fields, rows))
    tables = read_picks(path)
    k1 = "012345678901234567890_mic_1_patch_aligned_doseweighted"
    k2 = "098765432109876543210_mic_2_patch_aligned_doseweighted"
    assert list(tables) == [k1, k2]
    np.testing.assert_array_equal(tables[k1].yx, [[500.0, 500.0], [125.0, 1000.0]])  # (frac_y * ny, frac_x * nx)
    np.testing.assert_array_equal(tables[k1].score, [0.75, 0.5])
    np.testing.assert_array_equal(tables[k2].yx, [[200.0, 450.0]])
    # the UID prefix and the motion-correction suffixes do not stop matching
    matched, unmatched = match_picks_to_items(tables, ["mic_1", "mic_2", "mic_3"])
    assert list(matched) == ["mic_1", "mic_2"] and unmatched == []

    # without the shape field, micrograph_shape must be given
    no_shape = _cs([f for f in fields if f[0] != "location/micrograph_shape"], [r[:2] + r[3:] for r in rows])
    with open(path, "wb") as f:
        np.save(f, no_shape)
    with pytest.raises(PickImportError, match=r"picked_particles\.cs.*micrograph_shape"):
        read_picks(path)
    np.testing.assert_array_equal(read_picks(path, micrograph_shape=(100, 200))[k2].yx, [[25.0, 150.0]])


def test_eman_box_corner_to_centre(tmp_path):
    path = _write(tmp_path / "mic_5.box", "100\t200\t64\t64\n10 20 100 50 -3\n\n")
    ((key, table),) = read_picks(path).items()
    assert key == "mic_5"
    np.testing.assert_array_equal(table.yx, [[232.0, 132.0], [45.0, 60.0]])
    assert np.isnan(table.score).all()
    # an empty box file is a micrograph with no picks
    assert len(read_picks(_write(tmp_path / "mic_6.box", ""))["mic_6"]) == 0


def test_cryolo_cbox_star_and_text(tmp_path):
    ((key, table),) = read_picks(_write(tmp_path / "mic_9.cbox", CBOX_STAR)).items()
    assert key == "mic_9"
    np.testing.assert_array_equal(table.yx, [[80.0, 60.0], [72.0, 62.5]])  # corner + (height, width) / 2
    np.testing.assert_array_equal(table.score, [0.8, 0.25])

    ((key, table),) = read_picks(_write(tmp_path / "old.cbox", "10 20 100 120 0.8\n30.5 40 64 64 0.25\n")).items()
    assert key == "old"
    np.testing.assert_array_equal(table.yx, [[80.0, 60.0], [72.0, 62.5]])
    np.testing.assert_array_equal(table.score, [0.8, 0.25])


def test_topaz_table(tmp_path):
    text = "image_name\tx_coord\ty_coord\tscore\nmic_1\t100\t200\t-1.5\nmic_2\t7\t8\t3.25\nmic_1\t300\t400\t0.5\n"
    tables = read_picks(_write(tmp_path / "predicted.txt", text))
    assert list(tables) == ["mic_1", "mic_2"]
    np.testing.assert_array_equal(tables["mic_1"].yx, [[200.0, 100.0], [400.0, 300.0]])
    np.testing.assert_array_equal(tables["mic_1"].score, [-1.5, 0.5])
    np.testing.assert_array_equal(tables["mic_2"].yx, [[8.0, 7.0]])
    # manual picks without scores, space-separated
    tables = read_picks(_write(tmp_path / "manual.txt", "image_name x_coord y_coord\n0042 5 6\n"))
    assert list(tables) == ["0042"]
    np.testing.assert_array_equal(tables["0042"].yx, [[6.0, 5.0]])
    assert np.isnan(tables["0042"].score).all()


# ----------------------------------------------------------------------------------------------------------------------
# matching


def _t(n):
    return PickTable(np.full((n, 2), float(n)), np.zeros(n))


def test_match_by_stem_with_suffixes():
    tables = {
        "mic_1_autopick": _t(1),
        "MIC_2_DW": _t(2),
        "mic_3_doseweighted": _t(3),
        "mic_10": _t(10),
        "mic_4_aligned_extra": _t(4),
        "stray": _t(5),
    }
    matched, unmatched = match_picks_to_items(tables, ["mic_1", "mic_2", "mic_3", "mic_4", "mic_10", "mic_11"])
    assert {k: len(v) for k, v in matched.items()} == {"mic_1": 1, "mic_2": 2, "mic_3": 3, "mic_4": 4, "mic_10": 10}
    assert list(matched) == ["mic_1", "mic_2", "mic_3", "mic_4", "mic_10"]  # item order
    assert unmatched == ["stray"]


def test_match_prefers_exact_and_respects_name_boundaries():
    # "mic_1" must not take "mic_10"'s picks; the exact name beats a longer one with a suffix
    tables = {"mic_10_autopick": _t(10), "mic_1_autopick": _t(1), "mic_1": _t(7)}
    matched, unmatched = match_picks_to_items(tables, ["mic_1", "mic_10"])
    assert len(matched["mic_1"]) == 7 and len(matched["mic_10"]) == 10
    assert unmatched == ["mic_1_autopick"]
    matched, _ = match_picks_to_items({"mic_10": _t(10)}, ["mic_1", "mic_10"])
    assert list(matched) == ["mic_10"]


def test_match_nothing_raises_with_source_name():
    with pytest.raises(PickImportError, match=r"^picks_folder: no micrograph .*other_1.*mic_1") as err:
        match_picks_to_items({"other_1": _t(1)}, ["mic_1", "mic_2"], source="picks_folder")
    assert isinstance(err.value, ValueError) and isinstance(err.value, MetadataError)
    assert err.value.path == "picks_folder"
    assert match_picks_to_items({"a": _t(1)}, []) == ({}, ["a"])


# ----------------------------------------------------------------------------------------------------------------------
# errors


def test_files_without_coordinates_raise(tmp_path):
    optics_only = "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnMicrographPixelSize #2\n1 0.83\n"
    path = _write(tmp_path / "optics.star", optics_only)
    with pytest.raises(PickImportError, match=r"optics\.star: no coordinates.*rlnCoordinateX.*data_optics"):
        read_picks(path)
    with pytest.raises(PickImportError, match=r"optics\.star"):
        read_picks_star(path)
    with pytest.raises(PickImportError, match=r"empty\.star: no data_ block"):
        read_picks(_write(tmp_path / "empty.star", ""))
    with pytest.raises(PickImportError, match=r"bad\.box: line 2: expected at least 4 numbers"):
        read_picks(_write(tmp_path / "bad.box", "1 2 3 4\n1 2 x 4\n"))
    with pytest.raises(PickImportError, match=r"notes\.txt: unknown pick format"):
        read_picks(_write(tmp_path / "notes.txt", "hello world\n"))
    with pytest.raises(PickImportError, match=r"junk\.cs: not a cryoSPARC"):
        read_picks(_write(tmp_path / "junk.cs", "not numpy"))
    with pytest.raises(FileNotFoundError):
        read_picks(tmp_path / "missing.star")
