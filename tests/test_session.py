"""The online session (issue 5, "Proof → Tests"): settings, readiness, `process --watch/--once`, crash safety,
quality filters, manual choices, the micrograph list and Dask — on small simulated movies with known defocus.

Every check compares with the simulation's truth or with an earlier state of the same folder: a step is "recomputed"
exactly when its record (settings key + completion time, as `napari-warp status --json` reports it) changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from napari_warp.core.errors import NapariWarpError
from napari_warp.core.io.star import read_star
from napari_warp.core.io.warp_xml import read_warp_xml
from napari_warp.core.session import (
    SETTINGS_FILE,
    MovieOptions,
    QualityFilters,
    ReadyTracker,
    Session,
    SessionSettings,
    apply_overrides,
    load_settings,
    process_item,
    save_settings,
    session_records,
    set_manual,
    write_micrograph_list,
)

ENV = {**os.environ, "NAPARI_WARP_DEVICE": "cpu"}
# (defocus Å, astigmatism Å, astigmatism angle °) of the three simulated movies; a real astigmatism makes its fit
# well determined, so runs can be compared to it (an astigmatism-free movie's fitted astigmatism is noise).
TRUTH = {"m12": (12000.0, 400.0, 30.0), "m16": (16000.0, 600.0, -50.0), "m21": (21000.0, 500.0, 70.0)}
FRAME_BYTES = 512 * 512 * 4
HEADER = 1024
FINAL = ("processed", "failed")


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def movies(tmp_path_factory) -> dict[str, bytes]:
    """The three simulated movies' MRC bytes (10 frames of 512², 1 Å/px, 3 e/Å² per frame), simulated once."""
    from napari_warp.core.io.mrc_write import write_mrc
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    d = tmp_path_factory.mktemp("movies")
    out = {}
    for seed, (name, (defocus, astig, angle)) in enumerate(TRUTH.items()):
        sim = simulate_movie(MovieSimulation(shape=(512, 512), n_frames=10, pixel_size=1.0, dose_per_frame=3.0,
                                             defocus=defocus, astigmatism=astig, astigmatism_angle=angle, mtf=None,
                                             seed=seed))
        assert sim.truth.ctf.defocus == defocus
        write_mrc(d / f"{name}.mrc", sim.frames.astype(np.float32), pixel_size=1.0)
        out[name] = (d / f"{name}.mrc").read_bytes()
        assert len(out[name]) == HEADER + 10 * FRAME_BYTES  # no extended header: frame offsets below rely on it
    return out


def put(folder: Path, movies: dict[str, bytes], names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or movies:
        (folder / f"{name}.mrc").write_bytes(movies[name])
    return folder


def napari_warp(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (a fresh interpreter), CPU only."""
    return subprocess.run([sys.executable, "-m", "napari_warp.cli", *map(str, args)], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def process_once(folder: Path, *extra) -> subprocess.CompletedProcess:
    r = napari_warp("process", folder, "--once", "--settle", "0.3", "--exposure", "3", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def once_here(folder: Path, *sets: str) -> list[dict]:
    """What `process FOLDER --once --exposure 3 [--set ...]` does, in this process (no interpreter start-up): the
    folder's settings with ``sets`` applied and saved, one `Session.run(once=True)`; returns the records of the items
    it processed."""
    settings = load_settings(folder) or apply_overrides(SessionSettings(), ["movie.exposure=3"])
    settings = apply_overrides(dataclasses.replace(settings, input=str(folder)), sets)
    save_settings(folder, settings)
    done: list[dict] = []
    Session(settings, folder, settle=0.3, poll=0.2, device="cpu", on_item=done.append).run(once=True)
    return done


def records(folder: Path) -> dict[str, dict]:
    """The folder's item records (in this process), by name, with the folder's own settings file."""
    settings = load_settings(folder) or SessionSettings()
    settings = dataclasses.replace(settings, input=str(folder))
    return {r["name"]: r for r in session_records(settings, folder)}


def status_json(folder: Path) -> dict[str, dict]:
    r = napari_warp("status", folder, "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return {rec["name"]: rec for rec in json.loads(r.stdout)}


def step_records(recs: dict[str, dict]) -> dict[str, dict[str, tuple]]:
    """Per item and step: (settings key, completion time) — what changes iff the step was recomputed."""
    return {n: {s: (v["key"], v["completed"]) for s, v in r["steps"].items()} for n, r in recs.items()}


def item_lines(text: str) -> list[str]:
    """The CLI's per-item result lines ("<name>: motion ... Å, defocus ... µm ...") from its stdout."""
    return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ": motion " in ln]


def names_in(lines: list[str]) -> list[str]:
    return sorted(ln.split(":", 1)[0] for ln in lines)


def assert_good(rec: dict, folder: Path) -> None:
    """A processed item: its defocus (µm) within 2 % of the truth, both step records present, its files exist."""
    name = rec["name"]
    defocus, astig, _ = TRUTH[name]
    assert rec["status"] == "processed", rec
    assert rec["error"] is None
    assert rec["metrics"]["defocus"] == pytest.approx(defocus / 1e4, rel=0.02), name
    assert abs(rec["metrics"]["astigmatism"] - astig) < 100, (name, rec["metrics"])
    for step in ("motion", "ctf"):
        s = rec["steps"][step]
        assert isinstance(s["key"], str) and s["key"] and isinstance(s["completed"], str) and s["completed"], s
        assert s["up_to_date"] is True
    for rel in (f"average/{name}.mrc", f"average/odd/{name}.mrc", f"average/even/{name}.mrc",
                f"motion/{name}.star", f"powerspectrum/{name}.mrc"):
        assert (folder / rel).is_file(), rel


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, proc: subprocess.Popen | None = None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the watcher exited (rc {proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_watcher(folder: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    with out.open("w") as fo, err.open("w") as fe:  # the child keeps its own copies of the descriptors
        proc = subprocess.Popen([sys.executable, "-m", "napari_warp.cli", "process", str(folder), "--watch",
                                 "--settle", "0.3", "--exposure", "3"], env=ENV, stdout=fo, stderr=fe)
    return proc, out, err


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# 1. settings
# ---------------------------------------------------------------------------------------------------------------
def test_settings_round_trip_overrides_and_errors(tmp_path):
    base = SessionSettings()
    s = SessionSettings(
        input="/data/session", pattern="*.tif *.eer", recursive=True, ctf_from="frames",
        movie=MovieOptions(pixel_size=0.834, exposure=1.25, gain="/data/gain.mrc", gain_flip_y=True, eer_group=40,
                           binning=2.0),
        motion=dataclasses.replace(base.motion, bfactor=-300.0, local_grid=(4, 6), band=(0.04, 0.3),
                                   global_temporal=8, dose_weighting=False),
        ctf=dataclasses.replace(base.ctf, window=384, grid=(3, 4), fit_phase=True, defocus_max=40000.0),
        filters=QualityFilters(defocus_min=0.5, defocus_max=3.0, astigmatism_sigma=2.5, resolution_max=4.0,
                               motion_max=10.0),
    )
    path = save_settings(tmp_path, s)
    assert path == tmp_path / SETTINGS_FILE
    back = load_settings(tmp_path)
    assert back == s
    assert back.ctf.window == 384 and type(back.ctf.window) is int
    assert back.motion.global_temporal == 8 and back.motion.dose_weighting is False
    assert load_settings(tmp_path / "nowhere") is None

    # human-readable TOML with the sections; per-movie values (pixel size, dose) are not template settings
    save_settings(tmp_path / "defaults", base)
    text = (tmp_path / "defaults" / SETTINGS_FILE).read_text()
    for line in ("[session]", "[movie]", "[motion]", "[ctf]", "[filters]", "window = 512", "bfactor = -500.0",
                 'ctf_from = "average"'):
        assert line in text.splitlines(), line
    sections = tomllib.loads(text)
    assert "pixel_size" not in sections["ctf"] and "exposure_per_frame" not in sections["motion"]
    # ... and editable by hand
    (tmp_path / "defaults" / SETTINGS_FILE).write_text(text.replace("window = 512", "window = 256"))
    assert load_settings(tmp_path / "defaults").ctf.window == 256

    o = apply_overrides(base, ["ctf.window=384", "motion.local_grid=3x3", "filters.defocus_max=3",
                               "session.ctf_from=frames", "motion.dose_weighting=false", "movie.exposure=1.5"])
    assert o.ctf.window == 384 and type(o.ctf.window) is int
    assert o.motion.local_grid == (3, 3)
    assert o.filters.defocus_max == 3.0 and type(o.filters.defocus_max) is float
    assert o.ctf_from == "frames"
    assert o.motion.dose_weighting is False
    assert o.movie.exposure == 1.5
    # nothing else moved
    assert dataclasses.replace(o, ctf_from="average", ctf=base.ctf, filters=base.filters, movie=base.movie,
                               motion=base.motion) == base
    assert o.ctf == dataclasses.replace(base.ctf, window=384)
    assert base.ctf.window == 512  # the input is not modified

    with pytest.raises(ValueError, match="nope"):
        apply_overrides(base, ["nope.window=3"])
    with pytest.raises(ValueError, match=r"ctf.*'wndow'"):
        apply_overrides(base, ["ctf.wndow=384"])
    with pytest.raises(ValueError, match=r"ctf\.window.*'abc'"):
        apply_overrides(base, ["ctf.window=abc"])
    with pytest.raises(ValueError, match=r"motion\.dose_weighting.*'maybe'"):
        apply_overrides(base, ["motion.dose_weighting=maybe"])
    with pytest.raises(ValueError, match="'xyz'"):
        apply_overrides(base, ["session.ctf_from=xyz"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(base, ["ctf.window"])
    with pytest.raises(ValueError, match="window"):
        apply_overrides(base, ["ctf.window=16"])  # CTFSettings refuses windows < 64 px

    # a settings file with an unknown key is refused with the key named
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SETTINGS_FILE).write_text("[ctf]\nwindw = 384\n")
    with pytest.raises(NapariWarpError, match="windw"):
        load_settings(tmp_path / "bad")


def test_override_of_optional_int_is_an_int():
    s = apply_overrides(SessionSettings(), ["motion.global_temporal=8"])
    assert s.motion.global_temporal == 8 and type(s.motion.global_temporal) is int


def test_override_of_optional_grid_is_ints(tmp_path):
    s = apply_overrides(SessionSettings(), ["motion.local_grid=3x3"])
    assert all(type(v) is int for v in s.motion.local_grid), s.motion.local_grid
    save_settings(tmp_path, s)
    assert "local_grid = [3, 3]" in (tmp_path / SETTINGS_FILE).read_text()


# ---------------------------------------------------------------------------------------------------------------
# 2. readiness
# ---------------------------------------------------------------------------------------------------------------
def test_ready_tracker_waits_for_unchanged_files(tmp_path):
    now = [100.0]
    tracker = ReadyTracker(settle=1.0, clock=lambda: now[0])
    a, empty = tmp_path / "a.mrc", tmp_path / "empty.mrc"
    a.write_bytes(b"x" * 1000)
    empty.touch()
    files = [a, empty]

    assert tracker.poll(files) == []  # never ready at first sight
    assert tracker.ready_since(a) == 100.0
    now[0] = 100.9
    assert tracker.poll(files) == []
    now[0] = 101.0
    assert tracker.poll(files) == [a]  # unchanged for `settle`
    now[0] = 101.2
    with a.open("ab") as f:  # it grows: wait again from now
        f.write(b"y" * 10)
    assert tracker.poll(files) == []
    assert tracker.ready_since(a) == 101.2
    now[0] = 102.1
    assert tracker.poll(files) == []
    now[0] = 102.2
    assert tracker.poll(files) == [a]
    # same size, new modification time (rewritten in place): not ready either
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    now[0] = 103.0
    assert tracker.poll(files) == []
    now[0] = 104.0
    assert tracker.poll(files) == [a]
    # an empty file is never ready, however long it stays empty
    now[0] = 1e6
    assert tracker.poll(files) == [a]
    # a file that disappears is forgotten, and starts over when it comes back
    a.unlink()
    assert tracker.poll(files) == [] and tracker.ready_since(a) is None
    a.write_bytes(b"z" * 10)
    assert tracker.poll(files) == []
    now[0] += 1.0
    assert tracker.poll(files) == [a]


# ---------------------------------------------------------------------------------------------------------------
# 3. process --watch while movies arrive
# ---------------------------------------------------------------------------------------------------------------
def test_watch_processes_arriving_movies_once_and_fails_bad_ones(tmp_path, movies):
    folder = tmp_path / "session"
    folder.mkdir()
    proc, out, err = start_watcher(folder, tmp_path)
    try:
        wait_for(lambda: (folder / SETTINGS_FILE).exists(), 60, "the watcher to start", proc=proc)
        time.sleep(0.5)
        (folder / "m12.mrc").write_bytes(movies["m12"])  # A: arrives at once

        # B: written slowly, 20 chunks over ~3 s; its item must not exist before the file is complete
        data = movies["m16"]
        chunks = np.linspace(0, len(data), 21).astype(int)
        seen_while_writing = []  # (its XML exists, its status), after each chunk
        with (folder / "m16.mrc").open("wb") as f:
            for lo, hi in zip(chunks[:-1], chunks[1:]):
                f.write(data[lo:hi])
                f.flush()
                time.sleep(0.15)
                if hi < len(data):
                    seen_while_writing.append(((folder / "m16.xml").exists(), records(folder)["m16"]["status"]))
        assert len(seen_while_writing) == 19
        assert set(seen_while_writing) == {(False, "unprocessed")}, "the movie still being written was processed"

        rng = np.random.default_rng(5)
        (folder / "corrupt.mrc").write_bytes(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes())
        # truncated: the header says 10 frames, the file holds 4.5 of them
        (folder / "truncated.mrc").write_bytes(movies["m21"][: HEADER + 9 * FRAME_BYTES // 2])

        names = {"m12", "m16", "corrupt", "truncated"}

        def all_final():
            recs = records(folder)
            return recs if set(recs) == names and all(r["status"] in FINAL for r in recs.values()) else None

        first = wait_for(all_final, 150, "all four items to be final", interval=0.5, proc=proc)
        time.sleep(2.5)  # at least two more polls of the watcher: nothing may be redone
        assert proc.poll() is None, "the watcher stopped on its own"
        later = records(folder)
        proc.send_signal(signal.SIGINT)  # Ctrl+C stops it cleanly
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)

    assert step_records(later) == step_records(first)
    recs = status_json(folder)  # what a user sees
    assert set(recs) == names
    assert step_records(recs) == step_records(first)
    assert_good(recs["m12"], folder)
    assert_good(recs["m16"], folder)
    assert recs["corrupt"]["status"] == "failed"
    assert "not an MRC file" in recs["corrupt"]["error"]
    assert recs["truncated"]["status"] == "failed"
    assert "truncated: 4 of 10 frames" in recs["truncated"]["error"]
    for bad in ("corrupt", "truncated"):
        assert not (folder / "average" / f"{bad}.mrc").exists()
        assert not any(s["key"] for s in recs[bad]["steps"].values())

    # each good item processed exactly once, each bad one failed exactly once (reported, not retried)
    stdout, stderr = out.read_text(), err.read_text()
    assert names_in(item_lines(stdout)) == ["m12", "m16"], stdout
    for bad in ("corrupt", "truncated"):
        assert stderr.count(f"{bad}: FAILED") == 1, stderr[-3000:]
    assert "m16: FAILED" not in stderr  # not tried (and failed) while it was being written
    assert "items" in stderr  # the live progress line

    # the micrograph list holds exactly the good items
    star = read_star(folder / "micrographs_ctf.star")
    assert sorted(star["micrographs"]["rlnMicrographName"]) == ["average/m12.mrc", "average/m16.mrc"]


# ---------------------------------------------------------------------------------------------------------------
# 4, 5. reprocessing only what is outdated
# ---------------------------------------------------------------------------------------------------------------
def test_second_once_run_recomputes_nothing(tmp_path, movies):
    folder = put(tmp_path / "s", movies, ["m12", "m21"])
    assert sorted(r["name"] for r in once_here(folder)) == ["m12", "m21"]
    before = records(folder)
    for rec in before.values():
        assert_good(rec, folder)
    xml_mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.xml")}

    run = process_once(folder)
    assert item_lines(run.stdout) == [], run.stdout
    assert "0 item(s) processed, 0 failed" in run.stderr
    after = status_json(folder)
    assert step_records(after) == step_records(before)
    assert {n: r["status"] for n, r in after.items()} == {"m12": "processed", "m21": "processed"}
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.xml")} == xml_mtimes


def test_setting_changes_recompute_the_step_and_downstream_only(tmp_path, movies):
    folder = put(tmp_path / "s", movies, ["m12", "m21"])
    once_here(folder)
    r0 = records(folder)
    for rec in r0.values():
        assert_good(rec, folder)
    s0 = step_records(r0)

    def changed(a, b, step):
        return {n for n in a if a[n][step] != b[n][step]}

    # a CTF setting from the command line: CTF recomputed for every item, motion not; the setting persists
    run = process_once(folder, "--set", "ctf.window=384")
    assert names_in(item_lines(run.stdout)) == ["m12", "m21"]
    assert "window = 384" in (folder / SETTINGS_FILE).read_text().splitlines()
    r1 = records(folder)
    s1 = step_records(r1)
    assert changed(s0, s1, "ctf") == {"m12", "m21"}
    assert changed(s0, s1, "motion") == set()
    for rec in r1.values():
        assert_good(rec, folder)
        assert read_warp_xml(folder / f"{rec['name']}.xml").get_params("OptionsCTF")["window"] == "384"

    # a motion setting: motion and CTF recomputed (CTF is fitted from the motion-corrected average)
    run = process_once(folder, "--set", "motion.bfactor=-400")
    assert names_in(item_lines(run.stdout)) == ["m12", "m21"]
    r2 = records(folder)
    s2 = step_records(r2)
    assert changed(s1, s2, "motion") == {"m12", "m21"}
    assert changed(s1, s2, "ctf") == {"m12", "m21"}
    assert load_settings(folder).motion.bfactor == -400.0
    assert load_settings(folder).ctf.window == 384  # earlier --set values persist
    for rec in r2.values():
        assert_good(rec, folder)
        assert read_warp_xml(folder / f"{rec['name']}.xml").get_params("OptionsMovement")["bfactor"] == "-400"

    # CTF from the raw frames: switching recomputes CTF only; then a motion change leaves CTF alone
    assert len(once_here(folder, "session.ctf_from=frames")) == 2
    s3 = step_records(records(folder))
    assert changed(s2, s3, "ctf") == {"m12", "m21"}
    assert changed(s2, s3, "motion") == set()
    assert len(once_here(folder, "motion.bfactor=-300")) == 2
    r4 = records(folder)
    s4 = step_records(r4)
    assert changed(s3, s4, "motion") == {"m12", "m21"}
    assert changed(s3, s4, "ctf") == set()
    for rec in r4.values():
        assert_good(rec, folder)
    # nothing left to do
    assert once_here(folder) == [] and step_records(records(folder)) == s4


# ---------------------------------------------------------------------------------------------------------------
# 6. crash safety
# ---------------------------------------------------------------------------------------------------------------
def test_kill_9_mid_run_loses_nothing(tmp_path, movies):
    folder = put(tmp_path / "s", movies)
    proc, _, _ = start_watcher(folder, tmp_path)
    seen = set()  # statuses seen while it ran
    try:
        def motion_done():
            if not (folder / SETTINGS_FILE).exists():
                return False
            recs = records(folder)
            seen.update(r["status"] for r in recs.values())
            return any(r["steps"].get("motion", {}).get("key") for r in recs.values())

        wait_for(motion_done, 120, "the first item's motion step", interval=0.05, proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    assert "processing" in seen  # the live process showed the item it computed

    # nothing broken: every XML parses, and an item has the files of every step its XML says is done
    for xml in folder.glob("*.xml"):
        read_warp_xml(xml)
    at_kill = records(folder)
    assert set(at_kill) == set(TRUTH)  # no temporary file became an item
    for name, rec in at_kill.items():
        assert rec["status"] in ("processed", "unprocessed", "outdated"), rec
        if rec["steps"].get("motion", {}).get("key"):
            assert (folder / "average" / f"{name}.mrc").is_file() and (folder / "motion" / f"{name}.star").is_file()
        if rec["steps"].get("ctf", {}).get("key"):
            assert (folder / "powerspectrum" / f"{name}.mrc").is_file()
    done = {n for n, r in at_kill.items() if r["status"] == "processed"}
    assert len(done) < len(TRUTH), "killed too late: every item was already processed"
    motion_kept = {n for n, r in at_kill.items() if r["steps"].get("motion", {}).get("up_to_date")}
    assert motion_kept  # the kill came after the first motion step

    run = process_once(folder)
    assert names_in(item_lines(run.stdout)) == sorted(set(TRUTH) - done)
    after = records(folder)
    for rec in after.values():
        assert_good(rec, folder)
    before, now = step_records(at_kill), step_records(after)
    for name in TRUTH:
        for step in ("motion", "ctf"):
            if at_kill[name]["steps"].get(step, {}).get("up_to_date"):
                assert now[name][step] == before[name][step], (name, step)  # completed work is kept
            else:
                assert now[name][step] != before[name].get(step), (name, step)


# ---------------------------------------------------------------------------------------------------------------
# 7. quality filters, manual choices, the micrograph list
# ---------------------------------------------------------------------------------------------------------------
def test_filters_manual_choices_and_micrograph_list(tmp_path, movies):
    folder = put(tmp_path / "s", movies, ["m12", "m21"])
    once_here(folder)
    settings = load_settings(folder)
    assert {n: r["status"] for n, r in records(folder).items()} == {"m12": "processed", "m21": "processed"}

    filtered = dataclasses.replace(settings, filters=QualityFilters(defocus_min=0.5, defocus_max=1.6))
    recs = {r["name"]: r for r in session_records(filtered, folder)}
    assert recs["m12"]["status"] == "processed" and recs["m12"]["filter_reasons"] == []
    assert recs["m21"]["status"] == "filtered"
    assert any("defocus" in why and "2.1" in why for why in recs["m21"]["filter_reasons"]), recs["m21"]
    # the list holds the passing item only
    star_path = write_micrograph_list(filtered, folder, list(recs.values()))
    assert star_path == folder / "micrographs_ctf.star"
    assert list(read_star(star_path)["micrographs"]["rlnMicrographName"]) == ["average/m12.mrc"]

    # manual include overrides the filter; manual exclude deselects a passing item
    set_manual(folder, folder / "m21.mrc", "include")
    set_manual(folder, folder / "m12.mrc", "exclude")
    recs = {r["name"]: r for r in session_records(filtered, folder)}
    assert recs["m21"]["status"] == "processed" and recs["m21"]["manual"] == "include"
    assert recs["m12"]["status"] == "deselected" and recs["m12"]["manual"] == "exclude"
    # the choices did not touch the step records
    assert step_records(recs) == step_records(records(folder))

    write_micrograph_list(filtered, folder, list(recs.values()))
    star = read_star(folder / "micrographs_ctf.star")
    mics = star["micrographs"]
    assert list(mics["rlnMicrographName"]) == ["average/m21.mrc"]  # relative to the folder
    assert list(mics["rlnMicrographMetadata"]) == ["motion/m21.star"]
    assert list(mics["rlnCtfPowerSpectrum"]) == ["powerspectrum/m21.mrc"]
    for rel in ("average/m21.mrc", "motion/m21.star", "powerspectrum/m21.mrc"):
        assert (folder / rel).is_file()
    ctf = read_warp_xml(folder / "m21.xml").get_params("CTF")
    defocus, delta = float(ctf["Defocus"]) * 1e4, float(ctf["DefocusDelta"]) * 1e4  # µm → Å
    row = mics.iloc[0]
    assert float(row["rlnDefocusU"]) == pytest.approx(defocus + delta / 2, abs=0.01)
    assert float(row["rlnDefocusV"]) == pytest.approx(defocus - delta / 2, abs=0.01)
    assert float(row["rlnDefocusAngle"]) == pytest.approx(float(ctf["DefocusAngle"]), abs=1e-3)
    true_defocus, true_astig, _ = TRUTH["m21"]
    assert (float(row["rlnDefocusU"]) + float(row["rlnDefocusV"])) / 2 == pytest.approx(true_defocus, rel=0.02)
    assert abs(float(row["rlnDefocusU"]) - float(row["rlnDefocusV"]) - true_astig) < 100
    optics = star["optics"]
    assert len(optics) == 1 and int(optics["rlnOpticsGroup"].iloc[0]) == int(row["rlnOpticsGroup"]) == 1
    assert float(optics["rlnMicrographPixelSize"].iloc[0]) == pytest.approx(1.0)
    assert float(optics["rlnVoltage"].iloc[0]) == pytest.approx(300.0)
    assert float(optics["rlnSphericalAberration"].iloc[0]) == pytest.approx(2.7)
    assert float(optics["rlnAmplitudeContrast"].iloc[0]) == pytest.approx(0.07)

    # clearing the manual choice gives the filters back the last word
    set_manual(folder, folder / "m21.mrc", None)
    recs = {r["name"]: r for r in session_records(filtered, folder)}
    assert recs["m21"]["status"] == "filtered" and recs["m21"]["manual"] is None


def test_filter_change_from_the_cli_rewrites_the_micrograph_list(tmp_path, movies):
    folder = put(tmp_path / "s", movies, ["m12", "m21"])
    once_here(folder)
    star = read_star(folder / "micrographs_ctf.star")
    assert sorted(star["micrographs"]["rlnMicrographName"]) == ["average/m12.mrc", "average/m21.mrc"]
    process_once(folder, "--set", "filters.defocus_max=1.6")
    assert records(folder)["m21"]["status"] == "filtered"
    star = read_star(folder / "micrographs_ctf.star")
    assert list(star["micrographs"]["rlnMicrographName"]) == ["average/m12.mrc"]


def test_step_failure_is_final_for_any_pixel_size(tmp_path, movies):
    from napari_warp.core.io.mrc_write import write_mrc

    folder = tmp_path / "s"
    folder.mkdir()
    frames = np.frombuffer(movies["m12"], np.float32, offset=HEADER).reshape(10, 512, 512)
    write_mrc(folder / "p15.mrc", frames, pixel_size=1.5)
    settings = apply_overrides(SessionSettings(input=str(folder)), ["movie.exposure=3", "motion.skip_first=50"])
    rec = process_item(folder / "p15.mrc", settings, folder, device="cpu")
    assert rec["status"] == "failed", rec
    assert "no frames left" in rec["error"]
    assert Session(settings, folder).todo([folder / "p15.mrc"]) == []  # not retried until file or settings change


def test_processing_status_seen_whatever_the_folder_spelling(tmp_path, movies, monkeypatch):
    folder = put(tmp_path / "s", movies, ["m12", "m21"])
    monkeypatch.chdir(tmp_path)
    settings = apply_overrides(SessionSettings(input="s"), ["movie.exposure=3"])
    save_settings(folder, settings)
    session = Session(settings, "s", settle=0.3, poll=0.2, device="cpu")
    worker = threading.Thread(target=session.run, kwargs={"once": True})
    seen = set()
    worker.start()
    try:
        while worker.is_alive():
            seen.update(r["status"] for r in records(folder).values())  # the absolute folder, as a GUI has it
            time.sleep(0.01)
    finally:
        session.stop()
        worker.join(timeout=120)
    assert {r["status"] for r in records(folder).values()} == {"processed"}
    assert "processing" in seen, seen


def test_step_failure_is_final_and_retried_after_a_settings_change(tmp_path, movies):
    folder = put(tmp_path / "s", movies, ["m12"])
    movie = folder / "m12.mrc"
    bad = apply_overrides(SessionSettings(input=str(folder)), ["movie.exposure=3", "motion.skip_first=50"])
    rec = process_item(movie, bad, folder, device="cpu")
    assert rec["status"] == "failed" and "no frames left" in rec["error"], rec
    assert Session(bad, folder).todo([movie]) == []
    good = apply_overrides(bad, ["motion.skip_first=0"])
    assert Session(good, folder).todo([movie]) == [movie]
    rec = process_item(movie, good, folder, device="cpu")
    assert_good(rec, folder)
    assert not read_warp_xml(folder / "m12.xml").get_attr("FailedReason")


# ---------------------------------------------------------------------------------------------------------------
# 8. Dask
# ---------------------------------------------------------------------------------------------------------------
def test_dask_local_cluster_gives_the_local_results(tmp_path, movies):
    pytest.importorskip("dask.distributed", reason="dask.distributed is not installed (pip install "
                                                   "'napari-warp[dask]')")
    local = put(tmp_path / "local", movies, ["m12", "m16"])
    dask = put(tmp_path / "dask", movies, ["m12", "m16"])
    # plus a corrupt file: failures come back from the workers too
    for folder in (local, dask):
        (folder / "corrupt.mrc").write_bytes(b"\x01" * 5000)
    once_here(local)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = napari_warp("process", dask, "--once", "--settle", "0.3", "--exposure", "3", "--dask", "local",
                      timeout=420, env={"TMPDIR": str(scratch)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (scratch / "dask-scratch-space").is_dir()  # a LocalCluster's workers ran (and left their lock files)
    a, b = records(local), status_json(dask)
    assert {n: r["status"] for n, r in a.items()} == {n: r["status"] for n, r in b.items()} == {
        "m12": "processed", "m16": "processed", "corrupt": "failed"}
    assert "not an MRC file" in b["corrupt"]["error"]
    for name in ("m12", "m16"):
        assert_good(b[name], dask)
        for key in ("defocus", "astigmatism", "astigmatism_angle"):
            assert b[name]["metrics"][key] == pytest.approx(a[name]["metrics"][key], rel=1e-3), (name, key)
        assert {s: v["key"] for s, v in b[name]["steps"].items()} == {s: v["key"] for s, v in a[name]["steps"].items()}


# ---------------------------------------------------------------------------------------------------------------
# 9. BoxNet picking as a session step
# ---------------------------------------------------------------------------------------------------------------
def test_picking_step_is_outdated_by_its_settings_and_the_model_content(tmp_path, movies):
    import torch

    from napari_warp.core.picking import BoxNet, PickingModel, save_model
    from napari_warp.core.picking.io import read_picks_star

    torch.manual_seed(0)
    model_path = save_model(PickingModel(BoxNet(width=4), name="unit", version="1"), tmp_path / "unit.pt")
    folder = put(tmp_path / "s", movies, ["m12"])
    once_here(folder)
    s0 = step_records(records(folder))
    assert "picking" not in s0["m12"]  # picking is off by default

    # switching picking on runs only the picking step; its files and record name the model
    done = once_here(folder, "session.pick=true", f"picking.model={model_path}", "picking.threshold=0.3",
                     "picking.diameter=120")
    assert len(done) == 1
    rec = records(folder)["m12"]
    s1 = step_records({"m12": rec})
    assert s1["m12"]["motion"] == s0["m12"]["motion"] and s1["m12"]["ctf"] == s0["m12"]["ctf"]
    assert rec["status"] == "processed" and rec["steps"]["picking"]["up_to_date"]
    table = read_picks_star(folder / "picks" / "m12.star")
    meta = read_warp_xml(folder / "m12.xml")
    assert meta.get_attr("BoxNetModel").startswith("unit v1 (")
    assert table.info["model"] == meta.get_attr("BoxNetModel")
    assert int(meta.get_attr("ParticleCount")) == len(table.yx) == rec["metrics"]["particles"]
    assert meta.get_params("OptionsBoxNet")["threshold"] == "0.3"
    mask = __import__("tifffile").imread(folder / "mask" / "m12.tif")
    assert mask.shape == (512, 512) and mask.dtype == np.uint8

    # a threshold change: picking only
    assert len(once_here(folder, "picking.threshold=0.4")) == 1
    s2 = step_records(records(folder))
    assert s2["m12"]["picking"] != s1["m12"]["picking"]
    assert s2["m12"]["motion"] == s1["m12"]["motion"] and s2["m12"]["ctf"] == s1["m12"]["ctf"]
    assert once_here(folder) == []

    # the same model file rewritten with other weights (a retrained model): picking is outdated again
    save_model(PickingModel(BoxNet(width=4), name="unit", version="1"), model_path)
    assert records(folder)["m12"]["status"] == "outdated"
    assert len(once_here(folder)) == 1
    s3 = step_records(records(folder))
    assert s3["m12"]["picking"] != s2["m12"]["picking"] and s3["m12"]["motion"] == s2["m12"]["motion"]

    # a motion change re-picks (the average changed); a particle-count filter filters the item
    assert len(once_here(folder, "motion.bfactor=-300", "filters.particles_min=100000")) == 1
    rec = records(folder)["m12"]
    assert step_records({"m12": rec})["m12"]["picking"] != s3["m12"]["picking"]
    assert rec["status"] == "filtered" and "particles" in rec["filter_reasons"][0]
