"""RELION 3.1's own binaries read what core.export writes, and agree with our sign conventions.

* ``relion_run_motioncorr --use_own`` on a simulated movie with a known, asymmetric drift: its motion STAR, read by
  ``read_relion_motion_star``, matches the truth (evidence for ``(dy, dx) = −(ShiftY, ShiftX)``).
* ``relion_motion_refine`` (Bayesian polishing) reads our ``corrected_micrographs.star`` and motion STAR files
  (global + third-order polynomial, and global-only). With one particle per micrograph it skips its own
  optimisation and writes the initial tracks it evaluated from our files (``Micrograph::getShiftAt``) to
  ``<mic>_tracks.star``; those must equal our shifts at the particle positions to RELION's print precision.
* ``relion_run_motioncorr --only_do_unfinished`` finds our average + motion STAR in its output folder, parses the
  STAR and computes ``rlnAccumMotionTotal/Early/Late`` from it: they must equal ours.

Skipped when RELION is not installed (Debian: ``apt-get install relion``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_warp.core.export import (
    CorrectedMicrograph,
    accumulated_motion,
    read_relion_motion_star,
    write_corrected_micrographs_star,
    write_motion_star,
)
from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.io.star import read_star, write_star
from napari_warp.core.motion import MotionModel
from napari_warp.core.simulate import MovieSimulation, simulate_movie

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("relion_run_motioncorr") is None or shutil.which("relion_motion_refine") is None,
        reason="RELION 3.1 binaries (relion_run_motioncorr, relion_motion_refine) not on PATH; "
        "install with `apt-get install -y relion`",
    ),
]

ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "2"}


def _relion(args: list[str], cwd: Path, timeout: float = 60) -> str:
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


grid_model = MotionModel.from_nodes


def _optics(**extra) -> pd.DataFrame:
    cols = dict(rlnOpticsGroupName=["opticsGroup1"], rlnOpticsGroup=[1], rlnMicrographOriginalPixelSize=[1.0],
                rlnVoltage=[300.0], rlnSphericalAberration=[2.7], rlnAmplitudeContrast=[0.1])
    cols.update({k: [v] for k, v in extra.items()})
    return pd.DataFrame(cols)


# ---------------------------------------------------------------------------------------------------------------
def test_relion_motioncorr_sign_convention(tmp_path):
    # seed 7: drift (dy, dx) ≈ (−10.5, +17) px, so a sign error or an x/y swap is unmistakable
    sim = simulate_movie(MovieSimulation(shape=(256, 384), n_frames=10, pixel_size=1.0, dose_per_frame=4.0,
                                         drift=20.0, local_amplitude=0.0, seed=7))
    write_mrc(tmp_path / "mov.mrcs", sim.frames, 1.0)
    write_star(tmp_path / "movies.star", {
        "optics": _optics(),
        "movies": pd.DataFrame({"rlnMicrographMovieName": ["mov.mrcs"], "rlnOpticsGroup": [1]}),
    })
    _relion(["relion_run_motioncorr", "--i", "movies.star", "--o", "MC/", "--use_own", "--j", "2",
             "--patch_x", "1", "--patch_y", "1", "--bfactor", "150", "--dose_weighting", "--angpix", "1",
             "--voltage", "300", "--dose_per_frame", "4"], tmp_path)
    shifts, general = read_relion_motion_star(tmp_path / "MC" / "mov.star")
    truth = sim.truth.global_shifts
    assert shifts.shape == truth.shape and general["rlnImageSizeX"] == 384 and general["rlnImageSizeY"] == 256
    rms = np.sqrt(np.mean(np.sum((shifts - truth) ** 2, axis=-1)))
    assert rms < 0.6, f"RELION vs truth RMS {rms:.2f} px"
    assert np.abs(truth[-1]).min() > 8  # both axes moved a lot, in opposite directions
    table = read_star(tmp_path / "MC" / "mov.star")["global_shift"]  # the raw file: ShiftX ≈ −dx, ShiftY ≈ −dy
    assert table["rlnMicrographShiftX"].iloc[-1] == pytest.approx(-truth[-1, 1], abs=1.0)
    assert table["rlnMicrographShiftY"].iloc[-1] == pytest.approx(-truth[-1, 0], abs=1.0)


# ---------------------------------------------------------------------------------------------------------------
SHAPE, N_FRAMES, PIXEL = (256, 384), 8, 1.0
POSITIONS = np.array([[40.0, 50.0], [128.0, 192.0], [220.0, 330.0], [30.0, 360.0], [200.0, 20.0]])  # (y, x)


def _models():
    rng = np.random.default_rng(11)
    g = np.cumsum(rng.normal(scale=1.0, size=(N_FRAMES, 2)), axis=0) + np.array([[-6.0, 11.0]]) * np.linspace(
        0, 1, N_FRAMES)[:, None]
    g -= g[3]  # our reference need not be frame 1: RELION must keep the offsets as written
    local = rng.normal(scale=2.0, size=(2, 1, 3, 3))
    local -= local.mean(axis=(-2, -1), keepdims=True)
    # zero mean over frames, as fit_motion references its models: the export picks a start frame > 1, so RELION
    # evaluates its polynomial at negative z for the earlier frames
    profile = np.linspace(0, 1, 3) ** 0.5
    local = local * (profile - np.mean(np.linspace(0, 1, N_FRAMES) ** 0.5))[None, :, None, None]
    return grid_model(g, local, SHAPE, PIXEL), grid_model(g[::-1] * 0.5, None, SHAPE, PIXEL)


@pytest.fixture(scope="module")
def polish_project(tmp_path_factory):
    """A tiny RELION project: one movie, our motion STARs (one micrograph per particle), particles, references."""
    root = tmp_path_factory.mktemp("polish")
    rng = np.random.default_rng(0)
    write_mrc(root / "frames" / "mov.mrcs", rng.poisson(2.0, size=(N_FRAMES, *SHAPE)).astype(np.float32), PIXEL)
    local_model, global_model = _models()
    motions, rows, particles = [], [], []
    for k, (y, x) in enumerate(POSITIONS):
        model = global_model if k == len(POSITIONS) - 1 else local_model
        star = root / "motion" / f"mic{k}.star"
        motions.append(write_motion_star(star, model, root / "frames" / "mov.mrcs", original_pixel_size=PIXEL,
                                         dose_per_frame=1.5, pre_exposure=0.5, voltage=300.0, project_dir=root))
        rows.append(CorrectedMicrograph(root / "average" / f"mic{k}.mrc", star, pixel_size=PIXEL,
                                        original_pixel_size=PIXEL))
        particles.append(dict(
            rlnCoordinateX=x, rlnCoordinateY=y, rlnImageName=f"{k + 1:06d}@particles.mrcs",
            rlnMicrographName=f"average/mic{k}.mrc", rlnOpticsGroup=1, rlnAngleRot=10.0 * k, rlnAngleTilt=90.0,
            rlnAnglePsi=0.0, rlnOriginXAngst=0.0, rlnOriginYAngst=0.0, rlnDefocusU=15000.0, rlnDefocusV=15000.0,
            rlnDefocusAngle=0.0, rlnRandomSubset=k % 2 + 1,
        ))
    write_corrected_micrographs_star(root / "corrected_micrographs.star", rows, project_dir=root)
    write_star(root / "particles.star", {
        "optics": _optics(rlnImagePixelSize=PIXEL, rlnImageSize=32, rlnImageDimensionality=2),
        "particles": pd.DataFrame(particles),
    })
    vol = rng.normal(size=(32, 32, 32)).astype(np.float32)
    write_mrc(root / "half1.mrc", vol, PIXEL, volume=True)
    write_mrc(root / "half2.mrc", vol, PIXEL, volume=True)
    write_star(root / "fsc.star", {"fsc": pd.DataFrame({"rlnSpectralIndex": np.arange(17),
                                                       "rlnFourierShellCorrelationCorrected": np.ones(17)})})
    return root, motions, (local_model, global_model)


def test_relion_polishing_reads_our_motion(polish_project):
    root, motions, (local_model, global_model) = polish_project
    out = _relion(["relion_motion_refine", "--i", "particles.star", "--o", "Polish/",
                   "--corr_mic", "corrected_micrographs.star", "--m1", "half1.mrc", "--m2", "half2.mrc",
                   "--f", "fsc.star", "--angpix_ref", "1", "--j", "2"], root)
    assert "Using dose per frame from motion/mic0.star: 1.5" in out
    assert motions[0].coeffs is not None and motions[-1].coeffs is None  # both of RELION's model versions
    assert motions[0].first_frame > 1
    for k, (pos, motion) in enumerate(zip(POSITIONS, motions)):
        tracks = read_star(root / "Polish" / "average" / f"mic{k}_tracks.star")["0"]
        # RELION's track = −(getShiftAt) in Å = our shift × pixel size
        relion = np.stack([tracks["rlnOriginYAngst"], tracks["rlnOriginXAngst"]], axis=1) / PIXEL
        ours = motion.shifts(pos[None])[:, 0]
        np.testing.assert_allclose(relion, ours, atol=2e-5, err_msg=f"micrograph {k}")
        model = global_model if motion.coeffs is None else local_model
        truth = np.asarray(model.shifts(pos[None]))[:, 0]
        assert np.abs(relion - truth).max() < (1e-5 if motion.coeffs is None else 3 * motion.fit_rms + 0.05)


def test_relion_motioncorr_reads_our_motion_star(polish_project):
    """RELION's own accumulated-motion statistics from our file equal ``accumulated_motion``."""
    root, motions, _ = polish_project
    mc = root / "MC" / "frames"
    mc.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "motion" / "mic1.star", mc / "mov.star")  # where motioncorr would have written it
    write_mrc(mc / "mov.mrc", np.zeros(SHAPE, np.float32), PIXEL)
    write_star(root / "movies.star", {
        "optics": _optics(),
        "movies": pd.DataFrame({"rlnMicrographMovieName": ["frames/mov.mrcs"], "rlnOpticsGroup": [1]}),
    })
    _relion(["relion_run_motioncorr", "--i", "movies.star", "--o", "MC/", "--use_own", "--only_do_unfinished",
             "--dose_weighting", "--angpix", "1", "--voltage", "300", "--dose_per_frame", "1.5"], root)
    mics = read_star(root / "MC" / "corrected_micrographs.star")["micrographs"]
    assert mics["rlnMicrographMetadata"].tolist() == ["MC/frames/mov.star"]
    relion = mics[["rlnAccumMotionTotal", "rlnAccumMotionEarly", "rlnAccumMotionLate"]].to_numpy()[0]
    ours = accumulated_motion(motions[1].relion_global, 1.5, 0.5)
    assert ours[1] > 0 and ours[2] > 0
    np.testing.assert_allclose(relion, ours, atol=2e-6)
