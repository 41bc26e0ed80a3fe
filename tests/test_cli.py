"""The README's main command, headless, on a small movie: outputs exist and carry the simulation's truth."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_warp.cli import main
from napari_warp.core.io.star import read_coordinates, read_star
from napari_warp.core.picking.io import read_picks_star


def test_demo_headless(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--out", str(out), "--size", "512", "--frames", "16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shape"] == [16, 512, 512]
    assert summary["pixel_size_A"] == pytest.approx(1.0)
    assert summary["voltage_kV"] == pytest.approx(300.0)
    assert summary["exposure_e_per_A2"] == pytest.approx(32.0)  # 2 e/Å² × 16 frames
    for name in ["gain.mrc", "average.mrc", "spectrum.mrc", "truth_particles.star", "tracks.npz"]:
        assert (out / name).is_file(), name
    with mrcfile.open(out / "average.mrc") as m:
        avg = m.data.copy()
        assert float(m.voxel_size.x) == pytest.approx(1.0)
    # gain applied: the average counts per pixel equal the dose per frame × pixel area (2 e/Å² × 1 Å²)
    assert avg.mean() == pytest.approx(2.0, rel=0.05)
    assert len(read_coordinates(out / "truth_particles.star")) == summary["true_particles"] > 0
    # the movies arrived one by one into the session folder and were processed online, each exactly as Warp lays out
    session = out / "session"
    assert [i["status"] for i in summary["items"]] == ["processed"] * 3
    for i, item in enumerate(summary["items"]):
        name = f"movie_{i:03d}"
        assert item["name"] == name
        for rel in [f"{name}.xml", f"average/{name}.mrc", f"average/odd/{name}.mrc", f"motion/{name}.star",
                    f"powerspectrum/{name}.mrc"]:
            assert (session / rel).is_file(), rel
        # each movie has its own defocus; CTF fitted from its aligned average finds it
        assert item["ctf_defocus_A"] == pytest.approx(item["true_defocus_A"], rel=0.01)
        # one camera, one gain reference: every average is flat (a wrong reference leaves a ~5 % blotch)
        avg_i = mrcfile.read(session / f"average/{name}.mrc").astype(np.float64)
        assert gaussian_filter(avg_i, 32).std() / avg_i.mean() < 0.01, name
        assert (session / f"picks/{name}.star").is_file() and (session / f"mask/{name}.tif").is_file()
    assert (session / "micrographs_ctf.star").is_file() and (session / "napari-warp.settings.toml").is_file()
    # 15 px of drift at 2 e/Å² per frame: a failed or sign-flipped fit is off by several px
    assert summary["motion_rms_error_px"] < 1.0
    # CTF of the showcase's aligned average, against the simulation's defocus plane
    assert summary["ctf_defocus_A"] == pytest.approx(summary["true_defocus_A"], rel=0.01)
    assert summary["ctf_local_defocus_rms_error_A"] < 0.02 * summary["true_defocus_A"]
    # BoxNet picked the showcase with the shipped model (its truth: the simulated particle centres)
    assert summary["boxnet_precision"] >= 0.7 and summary["boxnet_recall"] >= 0.7, summary
    # particles out while collecting: one 128² stack at 2 Å/px per movie, one row per pick in the session's STAR
    n_picks = [len(read_picks_star(session / f"picks/movie_{i:03d}.star").yx) for i in range(3)]
    stacks = [mrcfile.read(session / f"particles/movie_{i:03d}.mrcs") for i in range(3)]
    assert [s.shape for s in stacks] == [(n, 128, 128) for n in n_picks]
    assert summary["particles_exported"] == sum(n_picks) > 0
    rows = read_star(summary["particles_star"])["particles"]
    assert len(rows) == sum(n_picks) and (rows["rlnDefocusU"] > 0).all()
    assert "results in" in capsys.readouterr().out


def test_demo_spectrum_shows_true_ctf(tmp_path):
    """The demo's movie spectrum carries the simulation's Thon rings: its rotational average, detrended,
    correlates with the true CTF² over 1/16–1/3.3 Å⁻¹; the display puts the true CTF² in its right half."""
    from scipy.ndimage import uniform_filter1d

    from napari_warp.core.ctf import ctf_1d, ctf_2d
    from napari_warp.core.demo import demo_simulation, movie_average_and_spectrum, spectrum_display
    from napari_warp.core.fourier import radial_average
    from napari_warp.core.io.movie import open_movie, write_mrc
    from napari_warp.core.simulate import simulate_movie

    sim = simulate_movie(demo_simulation(size=512, frames=12))
    write_mrc(tmp_path / "m.mrcs", sim.frames, pixel_size=sim.pixel_size)
    write_mrc(tmp_path / "g.mrc", sim.gain, pixel_size=sim.pixel_size)
    movie = open_movie(tmp_path / "m.mrcs", gain=tmp_path / "g.mrc")
    box = 256
    _, power = movie_average_and_spectrum(movie, box=box)
    profile = radial_average(torch.as_tensor(power[:, : box // 2 + 1]), image_shape=(box, box)).numpy()

    def detrend(v):
        return v - uniform_filter1d(v, 9)

    band = slice(16, 78)  # shells i/256 Å⁻¹
    truth = ctf_1d(sim.truth.ctf, box // 2).numpy() ** 2
    wrong = ctf_1d(sim.truth.ctf.with_(defocus=sim.truth.ctf.defocus * 1.15), box // 2).numpy() ** 2
    r_true = np.corrcoef(detrend(profile)[band], detrend(truth)[band])[0, 1]
    r_wrong = np.corrcoef(detrend(profile)[band], detrend(wrong)[band])[0, 1]
    assert r_true > 0.6 and r_true > r_wrong + 0.4, (r_true, r_wrong)

    display = spectrum_display(power, sim.truth.ctf)
    model = np.fft.fftshift(ctf_2d(sim.truth.ctf.with_(bfactor=0.0), (box, box), rfft=False).numpy() ** 2)
    # where rings are resolved the display's right half is the true CTF² (supersampling only smooths it)
    yy, xx = np.mgrid[-box // 2 : box // 2, 0 : box // 2]
    resolved = np.hypot(yy, xx) < 40
    shown, true = display[:, box // 2 :][resolved], model[:, box // 2 :][resolved]
    assert np.corrcoef(shown, true)[0, 1] > 0.95
    assert 0.0 <= display.min() and display.max() <= 1.0


def test_motion_cli_writes_warp_and_relion_files(tmp_path, capsys):
    """`napari-warp motion` on two simulated movies: averages, halves, XML and STAR files, with the fitted global
    motion (read back from the RELION motion STAR) matching the simulation's truth."""
    from napari_warp.core.export import read_relion_motion_star
    from napari_warp.core.io.movie import write_mrc
    from napari_warp.core.io.star import read_star
    from napari_warp.core.io.warp_xml import read_warp_xml
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    movies, truths = [], []
    for seed in (1, 2):
        # 16 e/px per frame: enough signal that per-frame shifts are measurable to a few tenths of a pixel
        sim = simulate_movie(MovieSimulation(shape=(384, 384), n_frames=10, pixel_size=2.0, dose_per_frame=4.0,
                                             drift=24.0, local_amplitude=0.0, seed=seed))
        path = tmp_path / f"mov{seed}.mrcs"
        write_mrc(path, sim.frames, pixel_size=sim.pixel_size, voltage=300.0)
        movies.append(str(path))
        truths.append(sim.truth)
    out = tmp_path / "proc"
    assert main(["motion", *movies, "--exposure", "4", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "mov1.mrcs" in printed and "Å" in printed
    for seed, truth in zip((1, 2), truths):
        name = f"mov{seed}"
        for rel in [f"{name}.xml", f"average/{name}.mrc", f"average/odd/{name}.mrc", f"average/even/{name}.mrc",
                    f"motion/{name}.star"]:
            assert (out / rel).is_file(), rel
        meta = read_warp_xml(out / f"{name}.xml")
        assert meta.get_params("OptionsMovement")["exposure_per_frame"] == "4"
        assert meta.get_grid("GridMovementX").values.shape[0] == 10
        shifts, general = read_relion_motion_star(out / f"motion/{name}.star")
        true = truth.shifts([[192.0, 192.0]])[:, 0]
        err = (shifts - shifts.mean(0)) - (true - true.mean(0))
        assert np.sqrt((err**2).sum(-1).mean()) < 0.3
    star = read_star(out / "corrected_micrographs.star")
    assert len(star["micrographs"]) == 2 and "rlnMicrographMetadata" in star["micrographs"]


def test_motion_cli_reports_unreadable_movie(tmp_path, capsys):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"\0" * 100)
    assert main(["motion", str(bad), "--exposure", "1", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.mrc" in err and "Traceback" not in err


def test_ctf_cli_fits_micrographs_and_reports_bad_ones(tmp_path, capsys):
    from napari_warp.core.io.mrc_write import write_mrc
    from napari_warp.core.io.warp_xml import read_warp_xml
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    sim = simulate_movie(MovieSimulation(shape=(768, 768), n_frames=2, pixel_size=1.2, defocus=18000.0,
                                         astigmatism=500.0, astigmatism_angle=-40.0, drift=0.0, local_amplitude=0.0,
                                         dose_per_frame=20.0, seed=8))
    good = tmp_path / "mic.mrc"
    write_mrc(good, sim.frames.sum(0).astype(np.float32), pixel_size=1.2)
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"not an mrc file")
    out = tmp_path / "proc"
    code = main(["ctf", str(good), str(bad), "--out", str(out), "--range", "25:3.5", "--grid", "2x2"])
    assert code == 1  # one input failed, the other was processed
    err = capsys.readouterr().err
    assert "broken.mrc" in err
    meta = read_warp_xml(out / "mic.xml")
    p = meta.get_params("CTF")
    assert float(p["Defocus"]) == pytest.approx(1.8, rel=0.005)  # µm, Warp's unit
    assert float(p["DefocusDelta"]) == pytest.approx(0.05, abs=0.008)
    opts = meta.get_params("OptionsCTF")
    assert float(opts["range_min"]) == pytest.approx(2 * 1.2 / 25) and float(opts["range_max"]) == pytest.approx(
        2 * 1.2 / 3.5)
    assert meta.get_grid("GridCTF").values.shape == (1, 2, 2)
    # a fit range finer than Nyquist is refused with the numbers in the message
    assert main(["ctf", str(good), "--out", str(out), "--range", "25:2"]) == 1
    assert "finer than Nyquist" in capsys.readouterr().err
