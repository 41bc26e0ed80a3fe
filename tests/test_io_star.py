"""STAR tables and coordinate files: real RELION/Warp files, round trips, corrupt input, atomic writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_warp.core.errors import MetadataError
from napari_warp.core.io.star import read_coordinates, read_star, write_coordinates, write_star

EMPIAR = "metadata/empiar10164-TS_01"
RELION5 = "metadata/pytom-match-pick/relion5_project_example/Tomograms/job009"

RELION30_PICKS = """
data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnClassNumber #3
_rlnAutopickFigureOfMerit #4
_rlnMicrographName #5
  1024.500000   200.250000            0     0.875000 MotionCorr/job002/Movies/mic_001.mrc
    12.000000  3000.000000            0    -0.125000 MotionCorr/job002/Movies/mic_001.mrc
"""

RELION31_PARTICLES = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnImagePixelSize #3
_rlnVoltage #4
_rlnMicrographPixelSize #5
opticsGroup1            1     1.060000   300.000000     0.530000

# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnAngleRot #3
_rlnOriginXAngst #4
_rlnMicrographName #5
_rlnImageName #6
_rlnOpticsGroup #7
   100.000000   400.000000    12.500000     1.060000 "mics/a b.mrc" 000001@Extract/job005/a.mrcs 1
   150.500000   350.000000   -30.000000     0.000000 "mics/a b.mrc" 000002@Extract/job005/a.mrcs 1
   900.000000    50.000000    90.000000    -2.120000 mics/c.mrc 000001@Extract/job005/c.mrcs 1
"""

# Warp's BoxNet output: RELION 3.0 layout, pixel size as detector pixel (µm) over magnification
WARP_PICKS = """
data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnMagnification #3
_rlnDetectorPixelSize #4
_rlnMicrographName #5
_rlnAutopickFigureOfMerit #6
2011.5	77	10000	0.834	00254.tif	3.5
1	2	10000	0.834	00255.tif	1.25
3	4	10000	0.834	00254.tif	2
"""

PLAIN_COORDS = """
# version 30001

data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
   613.000000  3201.000000
  1848.000000    99.000000
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# generic tables from real files


def test_read_warp_reference_star(data_dir):
    blocks = read_star(data_dir / "warp-reference/TS_1.star")
    assert list(blocks) == ["points", "tilts", "mappings"]
    assert blocks["points"].shape == (27, 3) and blocks["tilts"].shape == (41, 5)
    assert blocks["mappings"].shape == (1107, 10)  # 27 points x 41 tilts
    np.testing.assert_array_equal(blocks["points"].iloc[0], [-500, -500, -500])
    tilt = blocks["tilts"].iloc[0]
    assert tilt["imageName"] == "../2/2Dvs3D_53-1_00041_-40.0_Jul31_11.05.12.tif"
    assert tilt["voltage"] == 300 and tilt["cs"] == 3.2728
    first = blocks["mappings"].iloc[0]
    assert first["defocusU"] == 28371.7539 and first["defocusV"] == 28157.627 and first["defocusAngle"] == 26.262


def test_read_relion_files(data_dir):
    ctf = read_star(data_dir / EMPIAR / "relion_ctf_estimation_output.star")
    assert list(ctf) == ["optics", "micrographs"]
    optics = ctf["optics"].iloc[0]
    assert optics["rlnVoltage"] == 300 and optics["rlnSphericalAberration"] == 2.7
    assert optics["rlnMicrographPixelSize"] == 1.35 and optics["rlnOpticsGroupName"] == "opticsGroup1"
    mic = ctf["micrographs"]
    assert mic.shape == (41, 9)
    assert mic["rlnDefocusU"].iloc[0] == 39224.277344 and mic["rlnDefocusV"].iloc[0] == 39029.84375
    assert mic["rlnCtfImage"].iloc[0] == "CtfFind/job004/movies/TS_01_000_0_0_PS.ctf:mrc"

    ts = read_star(data_dir / EMPIAR / "tilt_series.star")
    assert list(ts) == ["optics", "global"]
    assert ts["global"]["rlnTomoTiltSeriesStarFile"].iloc[0] == "test_output/tilt_series/my_prefix_TS_01.star"
    tilts = read_star(data_dir / EMPIAR / "my_prefix_TS_01.star")["tilt_images"]
    assert len(tilts) == 41 and tilts["rlnTomoNominalStageTiltAngle"].iloc[0] == -59.9986

    tomos = read_star(data_dir / RELION5 / "tomograms.star")["global"]
    assert tomos.shape == (10, 13)
    assert tomos["rlnTomoName"].iloc[0] == "tomo200528_100" and tomos["rlnVoltage"].iloc[0] == 200
    assert tomos["rlnTomoTiltSeriesPixelSize"].iloc[0] == 1.724 and tomos["rlnTomoSizeZ"].iloc[0] == 2000
    per_tilt = read_star(data_dir / RELION5 / "tilt_series/tomo200528_107.star")
    assert list(per_tilt) == ["tomo200528_107"] and per_tilt["tomo200528_107"].shape == (35, 25)


def test_real_star_files_round_trip(data_dir, tmp_path):
    paths = sorted(data_dir.glob("metadata/**/*.star")) + [data_dir / "warp-reference/TS_1.star"]
    assert len(paths) >= 8
    for path in paths:
        blocks = read_star(path)
        write_star(tmp_path / "copy.star", blocks)
        again = read_star(tmp_path / "copy.star")
        assert list(again) == list(blocks), path.name
        for name in blocks:  # same values and dtypes: floats keep a decimal point, names stay strings
            pd.testing.assert_frame_equal(again[name], blocks[name], check_exact=True, obj=f"{path.name}:{name}")


def test_name_columns_stay_strings_and_simple_blocks_survive(tmp_path):
    path = tmp_path / "t.star"
    write_star(
        path,
        {
            "general": {"rlnTomoSubTomosAre2DStacks": 1, "rlnTomoName": "007"},
            "global": pd.DataFrame({"rlnTomoName": ["00254", "00255"], "rlnTomoSizeX": [4000, 4096],
                                    "rlnTomoHand": [-1.0, 1.0]}),
        },
    )
    text = path.read_text()
    assert text.startswith("data_general\n") and "Created by" not in text  # no time stamp: reproducible files
    assert "_rlnTomoSubTomosAre2DStacks\t\t\t1" in text.split("data_global")[0]
    blocks = read_star(path)
    assert blocks["global"]["rlnTomoName"].tolist() == ["00254", "00255"]
    assert blocks["global"]["rlnTomoHand"].dtype == np.float64 and blocks["global"]["rlnTomoSizeX"].dtype == np.int64
    general = blocks["general"]
    assert general.attrs["star_simple"] and general["rlnTomoName"].iloc[0] == "007"
    write_star(tmp_path / "again.star", blocks)
    assert (tmp_path / "again.star").read_text() == text


# ---------------------------------------------------------------------------------------------------------------------
# corrupt input


@pytest.mark.parametrize(
    "content, reason",
    [
        (RELION30_PICKS.rstrip() + "\n  5.0 6.0 0\n", "line 12: 3 values in a row of a 5-column loop"),  # truncated
        (RELION30_PICKS + "  1 2 3 4 5 6\n", "6 values"),
        ("", "no data_ block"),
        ("just some text\n", "unexpected text"),
        ("loop_\n_rlnCoordinateX #1\n1\n", "loop_ before any data_ block"),
        ("data_x\n_rlnKey\n", "key rlnKey has no value"),
    ],
)
def test_corrupt_star_raises_metadata_error(tmp_path, content, reason):
    path = _write(tmp_path, "bad.star", content)
    with pytest.raises(MetadataError, match=reason) as info:
        read_star(path)
    assert info.value.path == str(path)


def test_binary_and_missing_files(tmp_path):
    binary = tmp_path / "movie.star"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MetadataError, match="not a text STAR file"):
        read_star(binary)
    with pytest.raises(FileNotFoundError):
        read_star(tmp_path / "absent.star")


def test_write_is_atomic(tmp_path):
    path = tmp_path / "picks.star"
    write_star(path, {"": pd.DataFrame({"rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0]})})
    before = path.read_bytes()
    big = pd.DataFrame({"rlnCoordinateX": np.arange(10000.0), "rlnCoordinateY": np.arange(10000.0)})
    with pytest.raises(TypeError, match="block 'broken'"):
        # the first block is written to the temp file, then the second one fails half-way through the file
        write_star(path, {"first": big, "broken": 42})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.star"]  # no temp file left behind

    fresh = tmp_path / "new.star"
    with pytest.raises(TypeError):
        write_star(fresh, {"broken": [1, 2]})
    assert not fresh.exists()


# ---------------------------------------------------------------------------------------------------------------------
# coordinates


def test_read_relion30_picks(tmp_path):
    table = read_coordinates(_write(tmp_path, "mic_001_autopick.star", RELION30_PICKS))
    np.testing.assert_array_equal(table.yx, [[200.25, 1024.5], [3000.0, 12.0]])  # (y, x) from X, Y
    np.testing.assert_array_equal(table.score, [0.875, -0.125])
    assert table.micrograph_name.tolist() == ["MotionCorr/job002/Movies/mic_001.mrc"] * 2
    assert list(table.extra.columns) == ["rlnClassNumber"] and table.optics is None
    assert len(table) == 2


def test_read_relion31_particles(tmp_path):
    table = read_coordinates(_write(tmp_path, "particles.star", RELION31_PARTICLES))
    np.testing.assert_array_equal(table.yx, [[400, 100], [350, 150.5], [50, 900]])
    assert table.score is None
    assert table.micrograph_name.tolist() == ["mics/a b.mrc", "mics/a b.mrc", "mics/c.mrc"]
    assert table.extra["rlnAngleRot"].tolist() == [12.5, -30.0, 90.0]
    assert table.extra["rlnOriginXAngst"].iloc[0] == 1.06  # offsets are reported, not applied
    assert table.extra["rlnImageName"].iloc[1] == "000002@Extract/job005/a.mrcs"
    assert table.optics["rlnImagePixelSize"].iloc[0] == 1.06
    assert table.pixel_size == 0.53  # micrograph pixels, not the extracted particles' 1.06


def test_read_warp_picks_split_by_micrograph(tmp_path):
    table = read_coordinates(_write(tmp_path, "boxnet.star", WARP_PICKS))
    assert table.pixel_size == pytest.approx(0.834)
    assert table.micrograph_name.tolist() == ["00254.tif", "00255.tif", "00254.tif"]  # not numbers
    parts = table.by_micrograph()
    assert list(parts) == ["00254.tif", "00255.tif"]
    np.testing.assert_array_equal(parts["00254.tif"].yx, [[77, 2011.5], [4, 3]])
    np.testing.assert_array_equal(parts["00254.tif"].score, [3.5, 2.0])
    feats = parts["00255.tif"].features()
    assert list(feats) == ["score", "rlnMagnification", "rlnDetectorPixelSize"]
    assert feats["score"].tolist() == [1.25] and feats["rlnMagnification"].tolist() == [10000]
    plain = read_coordinates(_write(tmp_path, "plain.star", PLAIN_COORDS))
    assert list(plain.by_micrograph()) == [""] and plain.pixel_size is None and plain.features() == {}


def test_read_plain_coordinates(tmp_path):
    table = read_coordinates(_write(tmp_path, "mic.star", PLAIN_COORDS))
    np.testing.assert_array_equal(table.yx, [[3201, 613], [99, 1848]])
    assert table.yx.dtype == np.float64
    assert table.score is None and table.micrograph_name is None and table.extra.shape == (2, 0)


def test_coordinates_required(data_dir):
    with pytest.raises(MetadataError, match="no data block with rlnCoordinateX and rlnCoordinateY"):
        read_coordinates(data_dir / RELION5 / "tomograms.star")


def test_write_coordinates_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    yx = rng.uniform(0, 4096, size=(50, 2))
    score = rng.normal(size=50)
    path = tmp_path / "picks.star"
    write_coordinates(path, yx, score=score, micrograph_name="average/mic 01.mrc",
                      extra={"_rlnClassNumber": np.ones(50, dtype=int), "rlnAngleRot": np.linspace(0, 90, 50)})
    text = path.read_text()
    assert text.startswith("data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnAutopickFigureOfMerit #3\n")
    first_row = text.split("_rlnAngleRot #6\n")[1].splitlines()[0].split("\t")
    assert float(first_row[0]) == yx[0, 1] and float(first_row[1]) == yx[0, 0]  # X first on disk
    assert first_row[3] == '"average/mic 01.mrc"'

    table = read_coordinates(path)
    np.testing.assert_array_equal(table.yx, yx)  # exact: shortest round-trip floats
    np.testing.assert_array_equal(table.score, score)
    assert set(table.micrograph_name) == {"average/mic 01.mrc"}
    assert table.extra["rlnClassNumber"].dtype == np.int64
    np.testing.assert_array_equal(table.extra["rlnAngleRot"], np.linspace(0, 90, 50))


def test_write_coordinates_edge_cases(tmp_path):
    path = tmp_path / "none.star"
    write_coordinates(path, np.zeros((0, 2)), score=[])
    empty = read_coordinates(path)
    assert empty.yx.shape == (0, 2) and empty.score.shape == (0,)

    write_coordinates(path, [[1, 2], [3, 4]], micrograph_name=["a.mrc", "b.mrc"])
    assert read_coordinates(path).micrograph_name.tolist() == ["a.mrc", "b.mrc"]

    with pytest.raises(ValueError, match=r"yx must be \(N, 2\)"):
        write_coordinates(path, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="expected 2 values"):
        write_coordinates(path, [[1, 2], [3, 4]], score=[1.0])
    with pytest.raises(ValueError, match="NaN"):
        write_coordinates(path, [[np.nan, 2]])
