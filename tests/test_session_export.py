"""Particle export as a session step (issue 7): settings, per-item stacks from the movies, the session-wide STAR
files, outdated-ness by settings and picks content, and the `napari-warp export` command — on tiny simulated movies
(256², 6 frames, 2 Å/px) whose picks are the simulation's particle centres."""

from __future__ import annotations

import dataclasses
import time
import tomllib
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from napari_warp.cli import main
from napari_warp.core.errors import NapariWarpError
from napari_warp.core.io.star import read_star
from napari_warp.core.io.warp_xml import read_warp_xml
from napari_warp.core.particles import ExportSettings
from napari_warp.core.picking.io import read_picks_star, write_picks_star
from napari_warp.core.session import (
    SETTINGS_FILE,
    Session,
    SessionSettings,
    apply_overrides,
    load_settings,
    save_settings,
    session_records,
    set_manual,
)

DEFOCI = {"m0": 12000.0, "m1": 15000.0, "m2": 18000.0}  # Å
N_PICKS = {"m0": 6, "m1": 4, "m2": 5}
BOX = 48  # px


def _simulate(name: str, seed: int):
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    return simulate_movie(MovieSimulation(shape=(256, 256), n_frames=6, pixel_size=2.0, dose_per_frame=5.0,
                                          defocus=DEFOCI.get(name, 14000.0), mtf=None, seed=seed, n_particles=10,
                                          particle_diameter=80.0, drift=12.0), device="cpu")


def _put_picks(folder: Path, name: str, yx) -> None:
    yx = np.asarray(yx, dtype=np.float64)
    write_picks_star(folder / "picks" / f"{name}.star", yx, np.linspace(0.6, 0.9, len(yx)),
                     micrograph_name=f"{name}.mrc", diameter=80.0)


def make_session(folder: Path) -> Path:
    """Three movies processed (motion, CTF of the average), without export; picks = the first particle centres."""
    from napari_warp.core.io.mrc_write import write_mrc

    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(DEFOCI):
        sim = _simulate(name, seed)
        write_mrc(folder / f"{name}.mrc", sim.frames.astype(np.float32), pixel_size=2.0)
        _put_picks(folder, name, sim.truth.particles[: N_PICKS[name]])
        time.sleep(0.02)  # acquisition order = modification time
    settings = apply_overrides(SessionSettings(input=str(folder)), ["movie.exposure=5", "ctf.window=128"])
    save_settings(folder, settings)
    Session(settings, folder, settle=0.1, device="cpu").run(once=True)
    return folder



def run_once(folder: Path, *sets: str) -> list[dict]:
    """`process FOLDER --once --set ...` in this process; the records of the items it worked on."""
    settings = apply_overrides(dataclasses.replace(load_settings(folder), input=str(folder)), sets)
    save_settings(folder, settings)
    done: list[dict] = []
    Session(settings, folder, settle=0.1, poll=0.1, device="cpu", on_item=done.append).run(once=True)
    return done


def records(folder: Path) -> dict[str, dict]:
    settings = dataclasses.replace(load_settings(folder), input=str(folder))
    return {r["name"]: r for r in session_records(settings, folder)}


def step_records(recs: dict) -> dict:
    return {n: {s: (v["key"], v["completed"]) for s, v in r["steps"].items()} for n, r in recs.items()}


def star_items(path: Path) -> dict[str, int]:
    """Particles per stack named in a particle STAR file."""
    names = read_star(path)["particles"]["rlnImageName"].str.split("@").str[1]
    return names.value_counts().to_dict()


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def crop_at(image: np.ndarray, yx, box: int) -> np.ndarray:
    """``box``² of ``image`` with the sub-pixel point ``yx`` moved onto pixel ``box // 2``."""
    from napari_warp.core.fourier import fourier_shift

    c = np.array(image.shape) // 2
    moved = fourier_shift(torch.as_tensor(image, dtype=torch.float64), torch.as_tensor(c - np.asarray(yx))).numpy()
    return moved[c[0] - box // 2 : c[0] + box // 2, c[1] - box // 2 : c[1] + box // 2]


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
def test_export_section_round_trip_and_overrides(tmp_path):
    base = SessionSettings()
    assert base.extract is False and base.export == ExportSettings()
    s = apply_overrides(base, ["session.extract=true", "export.box_size=256", "export.pixel_size=1.7",
                               "export.diameter=180", "export.invert=false", "export.halves=on"])
    assert s.extract is True
    assert s.export == ExportSettings(box_size=256, pixel_size=1.7, diameter=180.0, invert=False, halves=True)
    assert type(s.export.box_size) is int
    save_settings(tmp_path, s)
    text = (tmp_path / SETTINGS_FILE).read_text()
    sections = tomllib.loads(text)
    assert sections["export"]["box_size"] == 256 and sections["session"]["extract"] is True
    assert load_settings(tmp_path) == s
    # "auto" is None (the micrograph's pixel size, 75 % of the box) and survives the file
    auto = apply_overrides(s, ["export.pixel_size=auto", "export.diameter=none"])
    assert auto.export.pixel_size is None and auto.export.diameter is None
    save_settings(tmp_path, auto)
    assert load_settings(tmp_path).export == auto.export
    # errors name the setting
    with pytest.raises(ValueError, match=r"\[export\].*even"):
        apply_overrides(base, ["export.box_size=129"])
    with pytest.raises(ValueError, match=r"export.*'boxsize'"):
        apply_overrides(base, ["export.boxsize=64"])
    (tmp_path / SETTINGS_FILE).write_text(text.replace("box_size = 256", "box_size = 7"))
    with pytest.raises(NapariWarpError, match=rf"{SETTINGS_FILE}.*box_size"):
        load_settings(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# the step in the session loop
# ---------------------------------------------------------------------------------------------------------------
def test_process_exports_particles_from_the_movies(session):
    from napari_warp.core.io.movie import read_volume
    from napari_warp.core.io.mrc_write import write_mrc

    before = step_records(records(session))
    # a new movie whose picks were imported before it was processed: all its steps run in one go (decoded frames)
    sim = _simulate("m3", 3)
    write_mrc(session / "m3.mrc", sim.frames.astype(np.float32), pixel_size=2.0)
    _put_picks(session, "m3", sim.truth.particles[:3])
    done = run_once(session, "session.extract=true", f"export.box_size={BOX}", "export.invert=false",
                    "export.normalize=false")
    assert sorted(r["name"] for r in done) == ["m0", "m1", "m2", "m3"]
    recs = records(session)
    after = step_records(recs)
    for name in DEFOCI:  # only the export ran for the processed items
        assert after[name]["motion"] == before[name]["motion"] and after[name]["ctf"] == before[name]["ctf"]
    counts = {**N_PICKS, "m3": 3}
    for name, n in counts.items():
        rec = recs[name]
        assert rec["status"] == "processed" and rec["steps"]["export"]["up_to_date"], rec
        assert rec["metrics"]["exported"] == n
        with mrcfile.open(session / "particles" / f"{name}.mrcs") as m:
            assert m.data.shape == (n, BOX, BOX) and float(m.voxel_size.x) == pytest.approx(2.0)
        meta = read_warp_xml(session / f"{name}.xml")
        assert int(meta.get_attr("ExportedParticles")) == n and meta.get_attr("ExportKey")
        assert meta.get_params("OptionsExport")["box_size"] == str(BOX)
    assert not (session / "particles" / "odd").exists()  # no halves asked for

    # the particles are the aligned average's (same motion model and dose weights): a wrong motion sign or frame
    # range would blur them (the drift is 6 px)
    for name in ("m1", "m3"):
        avg = read_volume(session / "average" / f"{name}.mrc")[0][0].astype(np.float64)
        stack = mrcfile.read(session / "particles" / f"{name}.mrcs")
        yx = read_picks_star(session / "picks" / f"{name}.star").yx
        inside = [i for i, p in enumerate(yx) if np.all(p > BOX / 2 + 8) and np.all(p < 256 - BOX / 2 - 8)]
        assert inside, name
        for i in inside:
            assert ncc(stack[i], crop_at(avg, yx[i], BOX)) > 0.97, (name, i)

    # the session-wide lists: RELION 3.1 with optics, paths relative to the folder
    star = read_star(session / "particles_all.star")
    assert star_items(session / "particles_all.star") == {f"particles/{n}.mrcs": c for n, c in counts.items()}
    assert star_items(session / "particles_good.star") == star_items(session / "particles_all.star")
    optics = star["optics"]
    assert len(optics) == 1 and int(optics["rlnImageSize"].iloc[0]) == BOX
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(2.0)
    parts = star["particles"]
    assert set(parts["rlnMicrographName"]) == {f"average/{n}.mrc" for n in counts}
    m1 = parts[parts["rlnMicrographName"] == "average/m1.mrc"]
    np.testing.assert_allclose(m1[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(),
                               read_picks_star(session / "picks" / "m1.star").yx)
    assert (m1["rlnDefocusU"] + m1["rlnDefocusV"]).mean() / 2 == pytest.approx(DEFOCI["m1"], rel=0.03)

    # nothing left to do: an unchanged run exports nothing and rewrites no XML
    xml = {p.name: p.stat().st_mtime_ns for p in session.glob("*.xml")}
    assert run_once(session) == []
    assert {p.name: p.stat().st_mtime_ns for p in session.glob("*.xml")} == xml


def test_items_without_picks_export_nothing(session, capsys):
    (session / "picks" / "m1.star").unlink()
    run_once(session, "session.extract=true", f"export.box_size={BOX}")
    rec = records(session)["m1"]
    assert rec["status"] == "processed" and rec["metrics"]["exported"] == 0
    assert not (session / "particles" / "m1.mrcs").exists()
    assert "particles/m1.mrcs" not in star_items(session / "particles_all.star")
    assert main(["status", str(session)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("m1 "))
    assert "no picks: nothing exported" in line
    assert f"{N_PICKS['m0']} particles exported" in next(ln for ln in out.splitlines() if ln.startswith("m0 "))
    assert "particles_all.star" in out and "particles_good.star" in out
    # picks arriving later (imported, or a picking run) make it outdated; it is exported then
    _put_picks(session, "m1", [[100.0, 100.0], [150.0, 120.0]])
    assert records(session)["m1"]["status"] == "outdated"
    assert [r["name"] for r in run_once(session)] == ["m1"]
    assert mrcfile.read(session / "particles" / "m1.mrcs").shape == (2, BOX, BOX)


def test_lists_follow_filters_and_manual_choices(session):
    run_once(session, "session.extract=true", f"export.box_size={BOX}")
    everything = {f"particles/{n}.mrcs": c for n, c in N_PICKS.items()}
    assert star_items(session / "particles_good.star") == everything
    # excluding an item (the session dock's Exclude) rewrites the lists on the next pass, exporting nothing
    set_manual(session, session / "m1.mrc", "exclude")
    assert run_once(session) == []
    assert star_items(session / "particles_all.star") == everything
    assert star_items(session / "particles_good.star") == {k: v for k, v in everything.items() if "m1" not in k}
    # a defocus filter drops m2 (1.8 µm) from the good list too; a manual include brings m1 back
    set_manual(session, session / "m1.mrc", "include")
    assert run_once(session, "filters.defocus_max=1.6") == []
    assert records(session)["m2"]["status"] == "filtered"
    assert star_items(session / "particles_all.star") == everything
    assert set(star_items(session / "particles_good.star")) == {"particles/m0.mrcs", "particles/m1.mrcs"}
    # nothing passes: no good list rather than a stale one
    for name in ("m0", "m1"):
        set_manual(session, session / f"{name}.mrc", "exclude")
    run_once(session)
    assert not (session / "particles_good.star").exists() and (session / "particles_all.star").exists()


def test_export_is_outdated_by_its_settings_and_the_picks_content(session):
    from napari_warp.core.item import save_item_picks

    run_once(session, "session.extract=true", f"export.box_size={BOX}")
    s0 = step_records(records(session))
    # an export setting: every item is exported again, nothing else recomputed
    assert sorted(r["name"] for r in run_once(session, "export.box_size=32", "export.halves=true")) == sorted(DEFOCI)
    s1 = step_records(records(session))
    for name in DEFOCI:
        assert s1[name]["export"] != s0[name]["export"]
        assert s1[name]["motion"] == s0[name]["motion"] and s1[name]["ctf"] == s0[name]["ctf"]
        odd = mrcfile.read(session / "particles" / "odd" / f"{name}.mrcs")
        even = mrcfile.read(session / "particles" / "even" / f"{name}.mrcs")
        full = mrcfile.read(session / "particles" / f"{name}.mrcs")
        assert full.shape == (N_PICKS[name], 32, 32)
        np.testing.assert_allclose(odd + even, full, atol=1e-4)
    # the picks file rewritten with the same content (a save without edits): still up to date
    picks = read_picks_star(session / "picks" / "m2.star")
    time.sleep(0.01)
    save_item_picks(session, session / "m2.mrc", picks.yx, picks.score)
    assert records(session)["m2"]["status"] == "processed"
    # picks edited by hand (one removed, one added) and saved: only that item is exported again
    edited = np.vstack([picks.yx[1:], [[128.0, 128.0]]])
    save_item_picks(session, session / "m2.mrc", edited, np.r_[picks.score[1:], 1.0])
    assert int(read_warp_xml(session / "m2.xml").get_attr("ParticleCount")) == len(edited)
    assert read_picks_star(session / "picks" / "m2.star").info["diameter"] == 80.0  # the record is kept
    recs = records(session)
    assert recs["m2"]["status"] == "outdated" and not recs["m2"]["steps"]["export"]["up_to_date"]
    assert recs["m2"]["steps"]["motion"]["up_to_date"] and recs["m0"]["status"] == "processed"
    assert [r["name"] for r in run_once(session)] == ["m2"]
    s2 = step_records(records(session))
    assert {n for n in DEFOCI if s2[n]["export"] != s1[n]["export"]} == {"m2"}
    stack = mrcfile.read(session / "particles" / "m2.mrcs")
    assert stack.shape == (len(edited), 32, 32)
    assert star_items(session / "particles_all.star")["particles/m2.mrcs"] == len(edited)
    # switching the halves off removes them (no stale halves beside new stacks)
    run_once(session, "export.halves=false")
    assert not (session / "particles" / "odd" / "m2.mrcs").exists()


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------
def test_cli_export_round_trip(session, capsys):
    set_manual(session, session / "m1.mrc", "exclude")
    assert main(["export", str(session), "--box", "40", "--pixel-size", "3", "--diameter", "60", "--halves",
                 "--items", "good", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    settings = load_settings(session)
    assert settings.extract is True
    assert settings.export == ExportSettings(box_size=40, pixel_size=3.0, diameter=60.0, halves=True)
    lines = {ln.split()[0]: ln for ln in cap.out.splitlines() if ln[:2] in ("m0", "m1", "m2")}
    assert "6 particles" in lines["m0"] and "exported" in lines["m0"]
    assert "skipped" in lines["m1"] and "excluded manually" in lines["m1"]
    n_good = N_PICKS["m0"] + N_PICKS["m2"]
    assert f"{n_good} particles in 2 item(s); 2 item(s) exported in this run" in cap.out
    assert str(session / "particles_good.star") in cap.out and "exporting particles" in cap.err  # progress bar
    assert not (session / "particles" / "m1.mrcs").exists()
    with mrcfile.open(session / "particles" / "m0.mrcs") as m:
        # 40 px at ~3 Å/px (the reached pixel size, within 0.5 % for a 40 px box) from 2 Å/px frames
        assert m.data.shape == (6, 40, 40) and float(m.voxel_size.x) == pytest.approx(3.0, rel=0.005)
    assert (session / "particles" / "odd" / "m0.mrcs").exists()
    assert star_items(session / "particles_good.star") == {"particles/m0.mrcs": 6, "particles/m2.mrcs": 5}

    # again, all items: only the one not exported yet is exported
    assert main(["export", str(session), "--items", "all", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1 item(s) exported in this run" in out
    assert star_items(session / "particles_all.star") == {f"particles/{n}.mrcs": c for n, c in N_PICKS.items()}
    assert "particles/m1.mrcs" not in star_items(session / "particles_good.star")
    assert main(["export", str(session), "--device", "cpu"]) == 0
    assert "0 item(s) exported in this run" in capsys.readouterr().out


def test_cli_export_failure_and_errors(session, capsys):
    # a diameter wider than the box leaves no background to normalise on: the items fail, naming why
    assert main(["export", str(session), "--box", "32", "--diameter", "500", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "no background" in out
    rec = records(session)["m0"]
    assert rec["status"] == "failed" and "no background" in rec["error"]
    # an odd box is refused before anything runs, naming the setting
    assert main(["export", str(session), "--box", "33"]) == 2
    assert "box_size" in capsys.readouterr().err
    assert main(["export", str(session / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    # a valid diameter retries the failed items
    assert main(["export", str(session), "--diameter", "60", "--device", "cpu"]) == 0
    assert records(session)["m0"]["status"] == "processed"


def test_cli_help_names_the_export_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--box", "--pixel-size", "--diameter", "--no-invert", "--no-normalize", "--halves",
                   "--phase-flip", "--items", "--set", "Å/px", "particles_all.star"):
        assert option in text, option
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "export" in capsys.readouterr().out
