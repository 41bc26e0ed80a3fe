"""Importing other tools' picks into a session's items (issue 7, "Import"): RELION 3.1 (optics, binned coordinates),
RELION 5 (centred Å), EMAN .box and cryoSPARC .cs files into a tiny processed session (test_session_export's: three
256² movies at 2 Å/px), converted to pixels of our averages; kept by the BoxNet step; exported with our local CTF;
our own particles_all.star imported back; the `napari-warp import-picks` command."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from test_session_export import BOX, records, run_once, star_items

from napari_warp.cli import main
from napari_warp.core.io.star import read_star
from napari_warp.core.io.warp_xml import read_warp_xml
from napari_warp.core.picking.io import PickImportError, read_picks_star
from napari_warp.core.session import import_session_picks, load_settings

PS = 2.0  # Å/px of the session's averages
SHAPE = np.array([256.0, 256.0])  # (ny, nx) of the averages


def _truth(seed: int, n: int) -> np.ndarray:
    """``n`` sub-pixel positions (y, x) in px of our averages, away from the edges."""
    return np.random.default_rng(seed).uniform(40.0, 216.0, (n, 2))


TRUTH = {"m0": _truth(10, 5), "m1": _truth(11, 3), "m2": _truth(12, 4)}
SCORES = {name: np.linspace(0.1, 0.9, len(yx)) for name, yx in TRUTH.items()}



def settings_of(folder: Path):
    return dataclasses.replace(load_settings(folder), input=str(folder))


def picks_of(folder: Path, name: str):
    return read_picks_star(folder / "picks" / f"{name}.star")


# ---------------------------------------------------------------------------------------------------------------
# other tools' files, written as those tools write them
# ---------------------------------------------------------------------------------------------------------------
def relion31(path: Path, names: list[str], pixel_size: float, extra: tuple[str, ...] = ()) -> Path:
    """A RELION 3.1 particle STAR (optics table) whose coordinates are in px of micrographs at ``pixel_size``."""
    rows = []
    for name in names:
        for (y, x), s in zip(TRUTH[name] * PS / pixel_size, SCORES[name]):
            rows.append(f"{x:.5f} {y:.5f} {s:.3f} MotionCorr/job002/Movies/{name}_doseweighted.mrc 1")
    rows += [f"10.0 20.0 0.5 MotionCorr/job002/Movies/{name}.mrc 1" for name in extra]
    path.write_text("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
                    f"_rlnMicrographPixelSize #3\n_rlnVoltage #4\nopticsGroup1 1 {pixel_size:.4f} 300.0\n\n"
                    "# version 30001\n\ndata_particles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
                    "_rlnAutopickFigureOfMerit #3\n_rlnMicrographName #4\n_rlnOpticsGroup #5\n"
                    + "\n".join(rows) + "\n")
    return path


def relion5(path: Path, name: str, yx: np.ndarray) -> Path:
    """RELION 5 centred coordinates: Å from the micrograph centre."""
    angst = (yx - SHAPE / 2) * PS
    rows = "\n".join(f"{name}.mrc {x:.5f} {y:.5f}" for y, x in angst)
    path.write_text("# version 50001\n\ndata_particles\n\nloop_\n_rlnMicrographName #1\n"
                    f"_rlnCenteredCoordinateXAngst #2\n_rlnCenteredCoordinateYAngst #3\n{rows}\n")
    return path


def eman_box(path: Path, yx: np.ndarray, pixel_size: float, box: int = 40) -> Path:
    """EMAN .box: box corners ``x y w h`` in px of micrographs at ``pixel_size``."""
    corner = yx * PS / pixel_size - box / 2
    path.write_text("".join(f"{x:.4f}\t{y:.4f}\t{box}\t{box}\n" for y, x in corner))
    return path


def cryosparc_cs(path: Path, names: list[str], frame: tuple[int, int]) -> Path:
    """A cryoSPARC particle table: positions as fractions of its micrographs (``frame`` (ny, nx), here binned 2×),
    micrograph paths with cryoSPARC's UID prefix and suffixes."""
    dtype = [("uid", "<u8"), ("location/micrograph_path", "S96"), ("location/micrograph_shape", "<u4", (2,)),
             ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"), ("pick_stats/ncc_score", "<f4")]
    rows = [(i, f"J7/motioncorrected/012345678901234567_{name}_patch_aligned_doseweighted.mrc".encode(), frame,
             x / SHAPE[1], y / SHAPE[0], s)
            for name in names for i, ((y, x), s) in enumerate(zip(TRUTH[name], SCORES[name]))]
    with open(path, "wb") as f:  # np.save(path) would add ".npy"
        np.save(f, np.array(rows, dtype=dtype))
    return path


# ---------------------------------------------------------------------------------------------------------------
# the core
# ---------------------------------------------------------------------------------------------------------------
def test_import_converts_each_format_to_pixels_of_the_averages(session, tmp_path):
    m1_before = (session / "picks" / "m1.star").read_bytes()
    star = relion31(tmp_path / "particles.star", ["m0"], pixel_size=4.0, extra=("FoilHole_99_Data_1",))
    cs = cryosparc_cs(tmp_path / "P3_J7_picked.cs", ["m2"], frame=(128, 128))
    summary = import_session_picks(session, [star, cs], settings_of(session))
    assert [(r["name"], r["picks"], r["outside"]) for r in summary.items] == [("m0", 5, 0), ("m2", 4, 0)]
    assert summary.total == 9
    assert summary.unmatched == {str(star): ["FoilHole_99_Data_1"]} and summary.untouched == ["m1"]
    assert "4 Å/px" in summary.sampling[str(star)] and "128×128" in summary.sampling[str(cs)]
    for name in ("m0", "m2"):  # binned 2× in both files (RELION's optics table says so; cryoSPARC's fractions)
        table = picks_of(session, name)
        np.testing.assert_allclose(table.yx, TRUTH[name], atol=0.01)
        np.testing.assert_allclose(table.score, SCORES[name], atol=1e-3)
    assert (session / "picks" / "m1.star").read_bytes() == m1_before  # no picks in the files: left alone
    # the source is recorded in the picks STAR and the XML
    info = picks_of(session, "m0").info
    assert info["model"] == f"imported from {star.resolve()} (RELION 3.1)" and info["diameter"] == 80.0
    meta = read_warp_xml(session / "m2.xml")
    assert meta.get_attr("PickingSource") == "imported" and int(meta.get_attr("ParticleCount")) == 4
    assert meta.get_attr("PickingImportedFrom") == f"{cs.resolve()} (cryoSPARC)"
    assert read_warp_xml(session / "m1.xml").get_attr("PickingSource") is None

    # EMAN boxes picked at 1 Å/px: read at the item's 2 Å/px they land outside the micrograph (reported) ...
    box = eman_box(tmp_path / "m1.box", TRUTH["m1"], pixel_size=1.0)
    wrong = import_session_picks(session, [box], settings_of(session))
    assert wrong.items[0]["outside"] > 0 and "each item's pixel size" in wrong.sampling[str(box)]
    # ... and right with the coordinates' pixel size; the diameter is recorded
    right = import_session_picks(session, [box], settings_of(session), pixel_size=1.0, diameter=120.0)
    assert right.items == [{"name": "m1", "picks": 3, "files": [str(box)], "outside": 0}]
    assert right.untouched == ["m0", "m2"] and right.unmatched == {}
    table = picks_of(session, "m1")
    np.testing.assert_allclose(table.yx, TRUTH["m1"], atol=0.01)
    assert np.isnan(table.score).all() and table.diameter == 120.0
    assert table.info["model"].endswith("m1.box (EMAN)")

    # RELION 5 centred Å (no pixel size needed), added to the item's picks rather than replacing them
    extra = _truth(13, 2)
    import_session_picks(session, [relion5(tmp_path / "centred.star", "m1", extra)], settings_of(session),
                         pixel_size=7.0, replace=False)
    np.testing.assert_allclose(picks_of(session, "m1").yx, np.vstack([TRUTH["m1"], extra]), atol=0.01)
    assert int(read_warp_xml(session / "m1.xml").get_attr("ParticleCount")) == 5


def test_errors_name_the_file_and_write_nothing(session, tmp_path):
    before = {p.name: p.read_bytes() for p in (session / "picks").iterdir()}
    good = relion31(tmp_path / "good.star", ["m0"], pixel_size=2.0)
    nothing = eman_box(tmp_path / "FoilHole_1_Data_2.box", TRUTH["m0"], pixel_size=2.0)
    with pytest.raises(PickImportError, match=r"FoilHole_1_Data_2\.box: no micrograph.*FoilHole_1_Data_2.*m0"):
        import_session_picks(session, [good, nothing], settings_of(session))
    garbage = tmp_path / "broken.star"
    garbage.write_text("data_particles\nloop_\n_rlnSomething #1\n1\n")
    with pytest.raises(PickImportError, match=r"broken\.star: no coordinates"):
        import_session_picks(session, [good, garbage], settings_of(session))
    with pytest.raises(FileNotFoundError, match="missing.star"):
        import_session_picks(session, [good, tmp_path / "missing.star"], settings_of(session))
    # optics groups at different pixel sizes cannot be told apart per micrograph here: asked for
    two = tmp_path / "two_optics.star"
    two.write_text(good.read_text().replace("opticsGroup1 1 2.0000 300.0", "opticsGroup1 1 2.0 300.0\nog2 2 1.0 300"))
    with pytest.raises(PickImportError, match="different micrograph pixel sizes"):
        import_session_picks(session, [two], settings_of(session))
    assert {p.name: p.read_bytes() for p in (session / "picks").iterdir()} == before  # all read before writing


# ---------------------------------------------------------------------------------------------------------------
# the session: picking keeps imported picks, export uses them with the local CTF
# ---------------------------------------------------------------------------------------------------------------
def test_imported_picks_are_kept_by_boxnet_and_exported_with_the_local_ctf(session, tmp_path):
    from napari_warp.core.item import load_ctf

    import_session_picks(session, [relion31(tmp_path / "p.star", ["m0", "m1"], pixel_size=4.0)], settings_of(session))
    imported = {n: (session / "picks" / f"{n}.star").read_bytes() for n in ("m0", "m1")}
    done = run_once(session, "session.pick=true", "session.extract=true", f"export.box_size={BOX}",
                    "export.invert=false", "export.normalize=false")
    assert sorted(r["name"] for r in done) == ["m0", "m1", "m2"]
    recs = records(session)
    assert all(r["status"] == "processed" and r["steps"]["picking"]["up_to_date"] for r in recs.values()), recs
    for name, content in imported.items():  # BoxNet left the imported picks alone ...
        assert (session / "picks" / f"{name}.star").read_bytes() == content
        assert read_warp_xml(session / f"{name}.xml").get_attr("PickingSource") == "imported"
    m2 = read_warp_xml(session / "m2.xml")  # ... and picked the item without imported picks
    assert m2.get_attr("PickingSource") == "boxnet" and m2.get_attr("PickingKey")
    assert picks_of(session, "m2").info["model"] == m2.get_attr("BoxNetModel")

    # the exported particles are the imported picks, with our local defocus at each
    counts = star_items(session / "particles_all.star")
    assert counts["particles/m0.mrcs"] == 5 and counts["particles/m1.mrcs"] == 3
    parts = read_star(session / "particles_all.star")["particles"]
    for name in ("m0", "m1"):
        assert mrcfile.read(session / "particles" / f"{name}.mrcs").shape == (len(TRUTH[name]), BOX, BOX)
        rows = parts[parts["rlnMicrographName"] == f"average/{name}.mrc"]
        np.testing.assert_allclose(rows[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(), TRUTH[name], atol=0.01)
        local = load_ctf(session, session / f"{name}.mrc").defocus_at(TRUTH[name])
        np.testing.assert_allclose((rows["rlnDefocusU"] + rows["rlnDefocusV"]).to_numpy() / 2, local, atol=0.5)
        assert np.ptp(local) > 5.0  # local: not one defocus for the micrograph

    # nothing to do again with picking on; imported picks edited (re-imported) re-export that item only
    assert run_once(session) == []
    import_session_picks(session, [relion31(tmp_path / "q.star", ["m0"], pixel_size=2.0)], settings_of(session),
                         replace=False)
    assert {n: r["status"] for n, r in records(session).items()} == {"m0": "outdated", "m1": "processed",
                                                                      "m2": "processed"}
    assert [r["name"] for r in run_once(session)] == ["m0"]
    assert mrcfile.read(session / "particles" / "m0.mrcs").shape[0] == 10
    # deleting imported picks is how BoxNet is asked to pick the item again
    (session / "picks" / "m1.star").unlink()
    assert not records(session)["m1"]["steps"]["picking"]["up_to_date"]
    assert [r["name"] for r in run_once(session)] == ["m1"]
    assert read_warp_xml(session / "m1.xml").get_attr("PickingSource") == "boxnet"
    assert picks_of(session, "m1").info["model"] == read_warp_xml(session / "m1.xml").get_attr("BoxNetModel")


def test_our_particle_star_imports_back_to_the_same_coordinates(session, tmp_path):
    run_once(session, "session.extract=true", f"export.box_size={BOX}", "export.pixel_size=4")  # images at 4 Å/px
    original = {n: picks_of(session, n).yx for n in ("m0", "m1", "m2")}
    star = tmp_path / "particles_all.star"
    shutil.copy(session / "particles_all.star", star)
    optics = read_star(star)["optics"]
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(4.0, rel=0.01)
    assert "rlnImageName" in read_star(star)["particles"]
    for path in (session / "picks").iterdir():
        path.unlink()
    summary = import_session_picks(session, [star], settings_of(session))
    assert summary.unmatched == {} and summary.untouched == [] and "2 Å/px" in summary.sampling[str(star)]
    for name, yx in original.items():  # coordinates in px of the micrograph (2 Å/px), not of the images
        np.testing.assert_allclose(picks_of(session, name).yx, yx, atol=0.01)
        assert picks_of(session, name).info["model"].endswith("(RELION 3.1)")
    assert records(session)["m0"]["status"] == "outdated"  # the same picks, another file: exported again


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------
def test_cli_import_picks_then_export(session, tmp_path, capsys):
    star = relion31(tmp_path / "particles.star", ["m0"], pixel_size=4.0, extra=("FoilHole_99_Data_1",))
    box = eman_box(tmp_path / "m1_autopick.box", TRUTH["m1"], pixel_size=1.0)
    assert main(["import-picks", str(session), str(star), str(box), "--pixel-size", "1"]) == 0  # 1 Å/px: both
    assert "(given)" in capsys.readouterr().out
    np.testing.assert_allclose(picks_of(session, "m1").yx, TRUTH["m1"], atol=0.01)

    assert main(["import-picks", str(session), str(star), "--diameter", "90", "--export", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    imported = [ln for ln in cap.out.splitlines() if ln.startswith("m0 ") and " picks " in ln]
    assert len(imported) == 1 and "5 picks  from particles.star" in imported[0]
    assert f"{star}: 1 micrograph(s) match no item: FoilHole_99_Data_1" in cap.out
    assert "(left as they were): m1, m2" in cap.out and "5 picks imported into 1 item(s)" in cap.out
    assert "3 item(s) exported in this run" in cap.out  # then the export, as `napari-warp export`
    assert picks_of(session, "m0").diameter == 90.0
    assert star_items(session / "particles_all.star") == {"particles/m0.mrcs": 5, "particles/m1.mrcs": 3,
                                                         "particles/m2.mrcs": len(picks_of(session, "m2"))}
    assert load_settings(session).extract is True


def test_cli_import_picks_errors(session, tmp_path, capsys):
    nothing = eman_box(tmp_path / "FoilHole_1_Data_2.box", TRUTH["m0"], pixel_size=2.0)
    assert main(["import-picks", str(session), str(nothing)]) == 2
    err = capsys.readouterr().err
    assert str(nothing) in err and "matches an item" in err
    garbage = tmp_path / "broken.cs"
    garbage.write_bytes(b"not a numpy table")
    assert main(["import-picks", str(session), str(garbage)]) == 2
    assert str(garbage) in capsys.readouterr().err
    assert main(["import-picks", str(session), str(tmp_path / "gone.star")]) == 2
    assert "gone.star: no such pick file" in capsys.readouterr().err
    assert main(["import-picks", str(session / "nowhere"), str(nothing)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_help_names_import_picks(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["import-picks", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--pixel-size", "--diameter", "--append", "--export", "RELION", "cryoSPARC", "EMAN", "crYOLO",
                   "Topaz", "Å"):
        assert option in text, option
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "import-picks" in capsys.readouterr().out
