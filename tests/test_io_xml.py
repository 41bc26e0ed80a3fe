"""Warp XML: values read from Warp's own files, exact round trips, the synthetic Movie layout, and errors."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from napari_warp.core.errors import MetadataError
from napari_warp.core.io.warp_xml import (
    CTF_GRID_FACTORS,
    GridData,
    WarpMetadata,
    ctf_from_params,
    format_value,
    params_from_ctf,
    parse_floats,
    read_warp_xml,
)

REAL_XMLS = {
    "TS_1": "warp-reference/TS_1.xml",
    "00254": "warp-reference/00254.xml",
    "xf_00254": "warp-reference/xf_import/00254.xml",
    "gs04": "metadata/pytom-match-pick/warptools_xml_example/gs04_ts_003.xml",
}


@pytest.fixture(scope="module")
def ts1(data_dir):
    return read_warp_xml(data_dir / REAL_XMLS["TS_1"])


def _same_tree(a: ET.Element, b: ET.Element) -> bool:
    return (
        a.tag == b.tag
        and list(a.attrib.items()) == list(b.attrib.items())
        and (a.text or "") == (b.text or "")
        and len(a) == len(b)
        and all(_same_tree(x, y) for x, y in zip(a, b))
    )


# ---------------------------------------------------------------------------------------------------------------------
# concrete values from Warp's files


def test_ts1_root_and_lists(ts1):
    assert ts1.kind == "TiltSeries"
    assert ts1.get_bool("AreAnglesInverted") is False
    assert ts1.get_bool("UnselectManual") is None  # TiltSeries writes an unset bool? as ""
    assert ts1.get_float("Bfactor") == pytest.approx(-16.02326)
    assert ts1.get_float("CTFResolutionEstimate") == pytest.approx(4.8)
    np.testing.assert_allclose(ts1.get_floats("PlaneNormal"), [-0.16420516, 0.022072515, 0.98617923])
    np.testing.assert_allclose(ts1.get_floats("MagnificationCorrection"), [1.0062196, 0.00422745, 0.004283654, 1.0009562])

    angles = ts1.get_list("Angles")
    assert angles.shape == (41,) and angles[0] == 40.01 and angles[-1] == -39.98
    dose = ts1.get_list("Dose")
    assert dose[0] == 120 and dose[20] == 0 and dose.max() == 120
    use = ts1.get_list("UseTilt", bool)
    assert use.dtype == bool and use.shape == (41,) and use.all()
    assert ts1.get_list("AxisAngle")[0] == pytest.approx(-85.60053)
    assert ts1.get_list("AxisOffsetX")[0] == pytest.approx(12.05431)
    assert ts1.get_list("AxisOffsetY")[-1] == pytest.approx(-60.133255)
    paths = ts1.get_list("MoviePath", str)
    assert len(paths) == 41 and paths[0] == "../2/2Dvs3D_53-1_00041_-40.0_Jul31_11.05.12.tif"
    np.testing.assert_allclose(ts1.get_list("FOVFraction")[:2], [0.9912, 0.9909])


def test_ts1_params_and_ctf_units(ts1):
    opts = ts1.get_params("OptionsCTF")
    assert opts["PixelSize"] == "0.834" and opts["Voltage"] == "300" and opts["Window"] == "512"
    assert opts["GainFlipY"] == "True" and opts["GainFlipX"] == "False"
    assert opts["GainPath"].endswith("EMPIAR-10491-full/gain_ref.mrc")
    np.testing.assert_array_equal(parse_floats(opts["GridDims"]), [5, 5, 1])

    params = ts1.get_params("CTF")
    assert list(params)[:3] == ["PixelSize", "ZernikeCoeffsOdd", "BeamTilt2"]  # document order
    assert params["Defocus"] == "2.835209"
    assert parse_floats(params["ZernikeCoeffsOdd"]).shape == (12,)
    ctf = ctf_from_params(params)
    assert ctf["defocus_a"] == pytest.approx(28352.09)  # 2.835209 µm, positive = under-focus
    assert ctf["defocus_delta_a"] == pytest.approx(252.866887649325)  # u - v
    assert ctf["defocus_angle_deg"] == 27
    assert ctf["cs_mm"] == pytest.approx(3.27283443186616)  # refined Cs, not the 2.7 of OptionsCTF
    assert ctf["voltage_kv"] == 300 and ctf["pixel_size_a"] == 0.834 and ctf["amplitude"] == 0.1
    assert ctf["phase_shift_deg"] == 0


def test_ts1_grids_axis_order(ts1):
    g = ts1.get_grid("GridCTF")
    assert g.shape == (41, 1, 1) and g.margins == (0.0, 0.0, 0.0)
    assert g.values[0, 0, 0] == 2.8969412 and g.values[40, 0, 0] == 2.753071
    np.testing.assert_allclose(g.scaled(CTF_GRID_FACTORS["GridCTF"]).values[0, 0, 0], 28969.412)

    mx = ts1.get_grid("GridMovementX")  # Width 6, Height 4, Depth 41 -> (Z, Y, X)
    assert mx.shape == (41, 4, 6)
    assert mx.values[0, 0, 0] == -1.3210737
    assert mx.values[0, 0, 1] == -0.3384567  # <Node X="1" Y="0" Z="0">
    assert mx.values[0, 1, 0] == -4.029536  # <Node X="0" Y="1" Z="0">
    assert mx.values[40, 3, 5] == 3.588982
    assert ts1.get_grid("GridMovementY").values[0, 0, 0] == 5.059104
    assert ts1.get_grid("GridDoseWeights").values[40, 0, 0] == 0.18469273
    assert ts1.get_grid("GridAngleX").shape == (41, 1, 1)

    warp4d = ts1.get_grid("GridVolumeWarpX")  # LinearGrid4D: Duration, W index, no margins
    assert warp4d.shape == (1, 1, 1, 1) and warp4d.margins is None
    assert not g.values.flags.writeable


def test_ts1_point_lists(ts1):
    tilt_ids = [int(e.get("ID")) for e in ts1.root if e.tag == "TiltPS1D"]
    assert tilt_ids == list(range(41))
    ps = ts1.get_points("TiltPS1D", id=0)
    assert ps.shape == (256, 2)  # Window 512 -> 256 shells, x in cycles/pixel up to Nyquist
    np.testing.assert_array_equal(ps[:2], [[0, 7522.36], [0.001953125, 2216.87]])
    assert ps[-1, 0] == pytest.approx(0.49804688)
    np.testing.assert_array_equal(ts1.get_points("TiltPS1D", id=40)[0], [0, 9998.032])
    assert ts1.get_points("PS1D").shape == (256, 2)
    assert ts1.get_points("SimulatedScale")[0, 0] == 0.04260254


def test_other_tilt_series_values(data_dir):
    m = read_warp_xml(data_dir / REAL_XMLS["00254"])
    assert m.get_bool("AreAnglesInverted") is True
    assert m.get_list("Angles")[0] == -60.01 and m.get_list("AxisAngle")[0] == pytest.approx(-4.2999988)
    ctf = ctf_from_params(m.get_params("CTF"))
    assert ctf["pixel_size_a"] == 1.7005 and ctf["defocus_a"] == pytest.approx(18350.82)
    assert ctf["defocus_angle_deg"] == 69
    assert m.get_grid("GridCTF").values[-1, 0, 0] == 1.7434809

    xf = read_warp_xml(data_dir / REAL_XMLS["xf_00254"])  # made by C# ImportAlignments: no CTF fit yet
    assert not xf.has("OptionsCTF") and not xf.has("PS1D")
    np.testing.assert_array_equal(xf.get_points("SimulatedScale"), [[0, 1], [1, 1]])
    assert xf.get_list("AxisOffsetX")[0] == 271.82022
    assert xf.get_list("AxisAngle")[0] == pytest.approx(-4.2999735)
    assert xf.get_float("CTFResolutionEstimate") == 0

    gs = read_warp_xml(data_dir / REAL_XMLS["gs04"])
    assert "LevelAngleX" not in gs.attrs  # WarpTools versions differ in which attributes they write
    assert gs.get_list("Angles").shape == (47,) and gs.get_list("Dose")[0] == 140.97852
    assert gs.get_list("MoviePath", str)[0].endswith(".eer")
    opts = gs.get_params("OptionsCTF")
    assert opts["PixelSize"] == "0.7303" and opts["Window"] == "768"
    assert opts["RangeMin"] == "0.0486866666666666666666666667"  # C# decimal text is kept verbatim
    assert gs.get_points("TiltPS1D", id=0)[1, 0] == 0.0013020834  # 1/768
    assert gs.get_grid("GridCTF").shape == (47, 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("key", list(REAL_XMLS))
def test_real_xml_round_trip_is_byte_exact(data_dir, tmp_path, key):
    src = data_dir / REAL_XMLS[key]
    raw = src.read_bytes()
    meta = read_warp_xml(src)
    assert meta.to_bytes() == raw

    out = meta.write(tmp_path / "copy.xml")
    assert out.read_bytes() == raw
    assert _same_tree(read_warp_xml(out).root, meta.root)

    # decode and re-encode every grid, list and point list: Warp's number formatting is reproduced exactly
    again = meta.copy()
    for name in set(meta.names()):
        if name.startswith("Grid"):
            again.set_grid(name, meta.get_grid(name))
    for name in ("Angles", "Dose", "AxisAngle", "AxisOffsetX", "AxisOffsetY", "FOVFraction"):
        if meta.has(name):
            again.set_list(name, meta.get_list(name))
    again.set_list("UseTilt", meta.get_list("UseTilt", bool))
    again.set_list("MoviePath", meta.get_list("MoviePath", str))
    for el in meta.root:
        if el.tag in ("TiltPS1D", "TiltSimulatedScale"):
            again.set_points(el.tag, meta.get_points(el.tag, int(el.get("ID"))), int(el.get("ID")))
        elif el.tag in ("PS1D", "SimulatedScale"):
            again.set_points(el.tag, meta.get_points(el.tag))
    assert again.to_bytes() == raw


def test_unknown_content_survives(ts1, tmp_path):
    meta = ts1.copy()
    meta.attrs["FutureAttribute"] = "x & <y>"
    extra = ET.SubElement(meta.root, "FutureSection", {"Kind": 'a "quoted"\nvalue'})
    ET.SubElement(extra, "Item").text = "line1\nline2 & more"
    meta.set_params("CTF", {"Defocus": 3.1, "NewParam": True})
    meta.write(tmp_path / "ts.xml")

    back = read_warp_xml(tmp_path / "ts.xml")
    assert _same_tree(back.root, meta.root)
    assert back.attrs["FutureAttribute"] == "x & <y>"
    assert back.element("FutureSection").get("Kind") == 'a "quoted"\nvalue'
    assert back.names()[: len(ts1.names())] == ts1.names()
    params = back.get_params("CTF")
    assert params["Defocus"] == "3.1" and params["NewParam"] == "True"
    assert list(params)[-1] == "NewParam" and list(params)[:12] == list(ts1.get_params("CTF"))[:12]
    assert ts1.get_params("CTF")["Defocus"] == "2.835209"  # copy() is deep


def test_synthetic_movie_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    meta = WarpMetadata.new(
        "Movie",
        {"DataDirectory": "", "UnselectFilter": False, "UnselectManual": "null", "CTFResolutionEstimate": 3.2,
         "MeanFrameMovement": 1.75, "MaskPercentage": -1, "Bfactor": 0, "Weight": 1,
         "MagnificationCorrection": "1, 0, 0, 1"},
    )
    meta.set_params("OptionsCTF", {"Window": 512, "PixelSize": 0.834, "Voltage": 300, "GainFlipY": True})
    ps1d = np.stack([np.arange(256) / 512, rng.normal(size=256)], axis=1)
    meta.set_points("PS1D", ps1d)
    ctf_in = {"pixel_size_a": 0.834, "defocus_a": 25000.0, "defocus_delta_a": 400.0, "defocus_angle_deg": 33.5,
              "phase_shift_deg": 72.0, "voltage_kv": 300.0, "cs_mm": 2.7, "amplitude": 0.07}
    meta.set_params("CTF", params_from_ctf(ctf_in))
    grid_ctf = GridData(2.5 + 0.01 * rng.normal(size=(1, 3, 4)), margins=(0.0, 1 / 6, 1 / 8))
    motion_x = GridData(np.cumsum(rng.normal(size=(20, 1, 1)), axis=0))
    local_x = GridData(rng.normal(size=(4, 5, 5)).astype(np.float32))
    meta.set_grid("GridCTF", grid_ctf)
    meta.set_grid("GridMovementX", motion_x)
    meta.set_grid("GridLocalMovementX", local_x)
    meta.set_grid("GridVolumeWarpX", GridData(np.zeros((2, 1, 1, 3))))
    meta.set_attr("UnselectManual", None)
    path = meta.write(tmp_path / "movie.xml")

    raw = path.read_bytes()
    assert raw.startswith(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\n<Movie DataDirectory=""')
    assert not raw.endswith(b"\n")
    text = raw.decode("utf-8-sig")
    assert '\t<CTF>\n\t\t<Param Name="PixelSize" Value="0.834" />\n\t\t<Param Name="Defocus" Value="2.5" />' in text
    assert '<Param Name="PhaseShift" Value="0.4" />' in text  # 72° = 0.4 π
    assert '<Param Name="DefocusDelta" Value="0.04" />' in text
    assert '<GridCTF Width="4" Height="3" Depth="1" MarginX="0.125" MarginY="0.16666666666666666" MarginZ="0">' in text
    assert '\t\t<Node X="1" Y="0" Z="0" Value=' in text.split("<GridCTF")[1].splitlines()[2]  # x fastest
    assert '<GridVolumeWarpX Width="3" Height="1" Depth="1" Duration="2">' in text
    assert '<Node X="2" Y="0" Z="0" W="1" Value="0" />' in text
    assert 'UnselectManual="null"' in text and 'UnselectFilter="False"' in text

    back = read_warp_xml(path)
    assert back.kind == "Movie" and back.to_bytes() == raw
    assert back.get_bool("UnselectManual") is None and back.get_float("MeanFrameMovement") == 1.75
    assert back.get_params("OptionsCTF")["GainFlipY"] == "True"
    np.testing.assert_array_equal(back.get_points("PS1D"), ps1d)  # shortest repr: exact
    ctf_out = ctf_from_params(back.get_params("CTF"))
    assert ctf_out == pytest.approx(ctf_in, rel=1e-12)
    for name, grid in [("GridCTF", grid_ctf), ("GridMovementX", motion_x), ("GridLocalMovementX", local_x)]:
        got = back.get_grid(name)
        np.testing.assert_array_equal(got.values, grid.values)
        assert got.margins == pytest.approx(grid.margins)
    assert back.get_grid("GridVolumeWarpX").shape == (2, 1, 1, 3)


def test_tilt_lists_write_in_warp_format():
    meta = WarpMetadata.new("TiltSeries")
    meta.set_attr("UnselectManual", None)
    assert meta.attrs["UnselectManual"] == "" and meta.get_bool("UnselectManual") is None
    meta.set_list("Angles", np.array([-3.0, 0.0, 3.01]))
    meta.set_list("UseTilt", np.array([True, False, True]))
    meta.set_list("AxisAngle", np.array([84.500114], dtype=np.float32))
    meta.set_list("MoviePath", ["a b.tif", "c.eer"])
    text = meta.to_bytes().decode("utf-8-sig")
    assert "<Angles>-3\n0\n3.01</Angles>" in text
    assert "<UseTilt>True\nFalse\nTrue</UseTilt>" in text
    assert "<AxisAngle>84.500114</AxisAngle>" in text  # float32 shortest repr, as C# writes a float
    assert meta.get_list("MoviePath", str) == ["a b.tif", "c.eer"]
    np.testing.assert_array_equal(meta.get_list("UseTilt", bool), [True, False, True])
    meta.set_list("Angles", [])
    assert meta.get_list("Angles").shape == (0,)


def test_format_value_matches_csharp_invariant():
    assert format_value(True) == "True" and format_value(np.bool_(False)) == "False"
    assert format_value(300) == "300" and format_value(np.int64(-3)) == "-3"
    assert format_value(1.0) == "1" and format_value(-0.5) == "-0.5" and format_value(0.1) == "0.1"
    assert format_value(np.float32(2.8969412)) == "2.8969412"
    assert format_value(1e-5) == "1E-05" and format_value(1.5e20) == "1.5E+20"
    assert format_value(float("nan")) == "NaN" and format_value(float("-inf")) == "-Infinity"
    assert format_value("As is") == "As is"
    with pytest.raises(TypeError):
        format_value(object())


def test_ctf_unit_conversion_round_trip(ts1):
    params = ts1.get_params("CTF")
    back = params_from_ctf(ctf_from_params(params))
    for name, text in back.items():
        assert float(text) == float(params[name]), name
    assert back["Defocus"] == "2.835209" and back["DefocusDelta"] == "0.0252866887649325"  # no float noise
    assert ctf_from_params({"PhaseShift": "0.4"}) == {"phase_shift_deg": pytest.approx(72.0)}
    with pytest.raises(KeyError):
        params_from_ctf({"defocus_um": 1.0})


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_malformed_xml_raises_metadata_error(data_dir, tmp_path):
    truncated = tmp_path / "TS_1.xml"
    truncated.write_bytes((data_dir / REAL_XMLS["TS_1"]).read_bytes()[:5000])
    with pytest.raises(MetadataError, match="TS_1.xml: malformed XML") as info:
        read_warp_xml(truncated)
    assert info.value.path == str(truncated)

    garbage = tmp_path / "garbage.xml"
    garbage.write_bytes(b"\x00\x01not xml at all")
    with pytest.raises(MetadataError):
        read_warp_xml(garbage)

    other = tmp_path / "settings.xml"
    other.write_text('<?xml version="1.0"?><Settings />')
    with pytest.raises(MetadataError, match="root element <Settings>"):
        read_warp_xml(other)
    assert read_warp_xml(other, kinds=None).kind == "Settings"

    with pytest.raises(FileNotFoundError):
        read_warp_xml(tmp_path / "absent.xml")


def test_bad_values_raise_metadata_error(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(
        '<Movie Bfactor="abc" UnselectFilter="maybe">'
        '<GridCTF Width="2" Height="1" Depth="1"><Node X="0" Y="0" Z="0" Value="1" /></GridCTF>'
        '<GridMovementX Width="1" Height="1" Depth="1"><Node X="3" Y="0" Z="0" Value="1" /></GridMovementX>'
        "<PS1D>0|1;0.5</PS1D><Dose>1\nx</Dose></Movie>"
    )
    meta = read_warp_xml(path)
    for call in (
        lambda: meta.get_float("Bfactor"),
        lambda: meta.get_bool("UnselectFilter"),
        lambda: meta.get_grid("GridCTF"),  # 1 node for a 2x1x1 grid
        lambda: meta.get_grid("GridMovementX"),  # index outside the grid
        lambda: meta.get_points("PS1D"),
        lambda: meta.get_list("Dose"),
    ):
        with pytest.raises(MetadataError, match="bad.xml"):
            call()
    with pytest.raises(KeyError):
        meta.get_grid("GridLocalMovementX")
    assert meta.get_float("Absent", 7.0) == 7.0


def test_defocus_delta_is_u_minus_v_in_warps_own_evaluation(ts1, data_dir):
    """Warp's C# evaluation of TS_1 (TS_1.star) pins the meaning of the XML's per-tilt CTF grids."""
    from napari_warp.core.io.star import read_star

    mappings = read_star(data_dir / "warp-reference/TS_1.star")["mappings"]
    first_tilt = mappings[mappings["tiltID"] == 1]
    delta_a = ts1.get_grid("GridCTFDefocusDelta").scaled(CTF_GRID_FACTORS["GridCTFDefocusDelta"]).values[0, 0, 0]
    np.testing.assert_allclose(first_tilt["defocusU"] - first_tilt["defocusV"], delta_a, atol=0.01)
    np.testing.assert_allclose(first_tilt["defocusAngle"], ts1.get_grid("GridCTFDefocusAngle").values[0, 0, 0],
                               atol=1e-3)
