"""RELION 3.1 motion STAR export (core.export): conventions, polynomial fit, round trips, paths, atomic writes.

No RELION binaries needed here; tests/test_interop_relion.py has RELION itself read these files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_warp.core import export
from napari_warp.core.errors import MetadataError
from napari_warp.core.export import (
    CorrectedMicrograph,
    RelionMotion,
    accumulated_motion,
    fit_relion_polynomial,
    read_relion_motion,
    read_relion_motion_star,
    relion_motion_from_model,
    relion_polynomial_basis,
    write_corrected_micrographs_star,
    write_motion_star,
)
from napari_warp.core.io.star import read_star
from napari_warp.core.motion import MotionModel, MotionSettings, fit_motion
from napari_warp.core.simulate import MovieSimulation, simulate_movie

SHAPE = (300, 420)  # (Y, X), deliberately not square: catches x/y and width/height swaps


grid_model = MotionModel.from_nodes


def _global(n_frames: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.cumsum(rng.normal(scale=1.5, size=(n_frames, 2)), axis=0) + np.array([3.0, -7.0]) * np.linspace(0, 1, n_frames)[:, None]
    return g - g[0]


def _local(scale: float = 1.5, dims=(3, 3, 3), seed: int = 1) -> np.ndarray:
    """Smooth local nodes (2, T, Gy, Gx) px, 0 at t = 0 and zero-mean over space (as core.simulate makes them)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(scale=scale, size=(2, 1, *dims[1:]))
    v -= v.mean(axis=(-2, -1), keepdims=True)
    return v * np.linspace(0, 1, dims[0])[None, :, None, None] ** 0.7


def _write(tmp_path: Path, model, name: str = "mov.star", **kw) -> Path:
    path = tmp_path / name
    args = dict(original_pixel_size=model.pixel_size, dose_per_frame=1.5, voltage=300.0)
    args.update(kw)
    write_motion_star(path, model, "movies/mov.tif", **args)
    return path


# ---------------------------------------------------------------------------------------------------------------
# RELION's conventions
# ---------------------------------------------------------------------------------------------------------------
def test_basis_is_relion_get_shift_at():
    """Column order = ThirdOrderPolynomialModel::getShiftAt, written out term by term from micrograph_model.cpp."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=18)
    x, y, z = 0.31, -0.17, 7.0
    x2, y2, xy, z2, z3 = x * x, y * y, x * y, z * z, z**3
    relion = ((c[0] * z + c[1] * z2 + c[2] * z3) + (c[3] * z + c[4] * z2 + c[5] * z3) * x
              + (c[6] * z + c[7] * z2 + c[8] * z3) * x2 + (c[9] * z + c[10] * z2 + c[11] * z3) * y
              + (c[12] * z + c[13] * z2 + c[14] * z3) * y2 + (c[15] * z + c[16] * z2 + c[17] * z3) * xy)
    assert relion_polynomial_basis(x, y, z) @ c == pytest.approx(relion, rel=1e-12)


def test_relion_sign_and_axes():
    """Ours (dy, dx) = −(ShiftY, ShiftX); polynomial x from columns / width, y from rows / height, z from the start
    frame (see tests/test_interop_relion.py for RELION's own evidence)."""
    coeffs = np.zeros((2, 18))
    coeffs[0, 3] = 2.0  # ShiftX += 2 · x · z
    coeffs[1, 9] = -4.0  # ShiftY += −4 · y · z
    m = RelionMotion(shape=(100, 400), relion_global=np.array([[0.0, 0.0], [1.0, -3.0], [2.0, -5.0]]), coeffs=coeffs,
                     first_frame=2)
    np.testing.assert_array_equal(m.global_shifts, [[0, 0], [3.0, -1.0], [5.0, -2.0]])
    yx = np.array([[75.0, 300.0]])  # x = 300/400 − 0.5 = 0.25, y = 75/100 − 0.5 = 0.25
    s = m.shifts(yx)[:, 0]
    z = np.array([-1.0, 0.0, 1.0])  # frames 1, 2, 3 with rlnMicrographStartFrame 2
    np.testing.assert_allclose(s[:, 1], -(m.relion_global[:, 0] + 2.0 * 0.25 * z))
    np.testing.assert_allclose(s[:, 0], -(m.relion_global[:, 1] - 4.0 * 0.25 * z))


# RELION 3.1.3's own output (relion_run_motioncorr --use_own on a simulated 512² movie), verbatim.
RELION_OWN_STAR = """
# version 30001

data_general

_rlnImageSizeX                                      512
_rlnImageSizeY                                      512
_rlnImageSizeZ                                       16
_rlnMicrographMovieName                    mov.mrcs
_rlnMicrographBinning                          1.000000
_rlnMicrographOriginalPixelSize                1.000000
_rlnMicrographDoseRate                         4.000000
_rlnMicrographPreExposure                      0.000000
_rlnVoltage                                  300.000000
_rlnMicrographStartFrame                              1
_rlnMotionModelVersion                                0
 

# version 30001

data_global_shift

loop_ 
_rlnMicrographFrameNumber #1 
_rlnMicrographShiftX #2 
_rlnMicrographShiftY #3 
           1     0.000000     0.000000 
           2     -3.71956     0.376359 
           3     -6.57665     1.634581 
           4     -9.05143     3.052249 
           5    -10.84188     4.251728 
           6    -11.92064     5.264758 
           7    -12.97801     5.992332 
           8    -13.58896     7.061726 
           9    -15.12217     7.627029 
          10    -15.05594     8.523016 
          11    -15.48257     8.912482 
          12    -15.35099     9.226430 
          13    -16.13192     9.816714 
          14    -16.02103     9.412208 
          15    -16.91349    10.261487 
          16    -16.75252    10.526995 
 
"""


def test_reads_relion_own_output(tmp_path):
    path = tmp_path / "relion.star"
    path.write_text(RELION_OWN_STAR)
    shifts, general = read_relion_motion_star(path)
    assert shifts.shape == (16, 2)
    np.testing.assert_allclose(shifts[-1], [-10.526995, 16.75252])  # (dy, dx) = −(ShiftY, ShiftX)
    assert general["rlnMicrographMovieName"] == "mov.mrcs"
    assert general["rlnImageSizeZ"] == 16 and general["rlnMicrographDoseRate"] == 4.0
    # the same run's corrected_micrographs.star says rlnAccumMotionTotal 22.253993, Early 0, Late 22.253993
    motion = read_relion_motion(path)
    total, early, late = accumulated_motion(motion.relion_global, 4.0, 0.0)
    assert (total, early, late) == pytest.approx((22.253993, 0.0, 22.253993), abs=2e-6)


def test_accumulated_motion_early_late_split():
    g = np.array([[0, 0], [3, 4], [3, 4], [6, 8], [6, 9]], dtype=float)  # steps 5, 0, 5, 1
    # dose 2, pre-exposure 0 -> cutoff frame 2: the step into frame 2 is early
    assert accumulated_motion(g, 2.0, 0.0) == pytest.approx((11.0, 5.0, 6.0))
    assert accumulated_motion(g, 1.0, 0.0) == pytest.approx((11.0, 10.0, 1.0))  # cutoff frame 4
    g[2] = np.nan  # unobserved frame: the next step starts from the last observed one
    assert accumulated_motion(g, 1.0, 0.0) == pytest.approx((11.0, 10.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# polynomial fit
# ---------------------------------------------------------------------------------------------------------------
def test_fit_recovers_an_exact_relion_field():
    rng = np.random.default_rng(3)
    truth = RelionMotion(shape=SHAPE, relion_global=rng.normal(size=(10, 2)), coeffs=np.zeros((2, 18)))
    truth.coeffs[:, 3:] = rng.normal(scale=[1e-1, 1e-2, 1e-3] * 5, size=(2, 15))
    yx = export._sample_lattice(SHAPE, 9)
    g, c, rms = fit_relion_polynomial(truth.relion_shifts(yx), yx, SHAPE)
    assert rms < 1e-9
    np.testing.assert_allclose(c, truth.coeffs, atol=1e-9)
    np.testing.assert_allclose(g, truth.relion_global, atol=1e-9)


def _fit_errors(model, tmp_path):
    written = write_motion_star(tmp_path / "m.star", model, "mov.tif", original_pixel_size=model.pixel_size,
                                dose_per_frame=1.0, voltage=300.0)
    back = read_relion_motion(tmp_path / "m.star")
    assert back.coeffs is not None and written.fit_rms is not None
    yx = np.random.default_rng(5).uniform([0, 0], [SHAPE[0] - 1, SHAPE[1] - 1], size=(300, 2))
    ours = np.asarray(model.shifts(yx))
    err = np.sqrt(np.mean(np.sum((back.shifts(yx) - ours) ** 2, axis=-1)))
    local = np.sqrt(np.mean(np.sum((ours - ours.mean(axis=1, keepdims=True)) ** 2, axis=-1)))
    return err, local, written.fit_rms


def test_polynomial_reproduces_a_smooth_local_field(tmp_path):
    """A field bilinear in space (2 × 2 nodes: 1, x, y, xy are all in RELION's basis) and smooth in time is
    reproduced almost exactly; a 3 × 3 field only in part, because RELION's quadratic has no x²y, xy², x²y² terms."""
    err, local, rms = _fit_errors(grid_model(_global(), _local(scale=4.0, dims=(4, 2, 2)), SHAPE, 1.2), tmp_path)
    assert local > 1.0  # the field really is local
    assert err < 0.02 * local and rms < 0.02 * local
    err, local, rms = _fit_errors(grid_model(_global(), _local(scale=3.0, dims=(3, 3, 3)), SHAPE, 1.2), tmp_path)
    assert local > 1.0
    assert err < 0.4 * local  # a global-only export would leave all of it
    assert err == pytest.approx(rms, rel=0.3)  # fit_rms tells the caller how good the export is


def test_pixel_size_rescaling(tmp_path):
    """A model fitted on a 2× binned movie is written in the original movie's pixels and size."""
    model = grid_model(_global(), _local(scale=1.0, dims=(4, 2, 2)), (150, 210), pixel_size=2.0)
    write_motion_star(tmp_path / "m.star", model, "mov.tif", original_pixel_size=1.0, dose_per_frame=1.0,
                      voltage=300.0, binning=2.0)
    back = read_relion_motion(tmp_path / "m.star")
    assert back.shape == (300, 420)
    assert back.general["rlnMicrographBinning"] == 2.0
    yx = np.array([[10.0, 20.0], [149.0, 209.0], [75.0, 100.0]])
    np.testing.assert_allclose(back.shifts(yx * 2), 2 * np.asarray(model.shifts(yx)), atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# round trips and file contents
# ---------------------------------------------------------------------------------------------------------------
def test_global_only_round_trip_is_exact(tmp_path):
    g = _global(17)
    model = grid_model(g, None, SHAPE, pixel_size=0.8)
    path = _write(tmp_path, model, dose_per_frame=1.25, pre_exposure=0.5, voltage=200.0, gain_path="gain.mrc")
    shifts, general = read_relion_motion_star(path)
    expected = np.asarray(model.shifts(np.array([[0.0, 0.0]])))[:, 0]
    assert np.array_equal(shifts, expected)  # bit for bit
    np.testing.assert_allclose(shifts, g, atol=1e-6)
    assert general == {
        "rlnImageSizeX": 420, "rlnImageSizeY": 300, "rlnImageSizeZ": 17,
        "rlnMicrographMovieName": "movies/mov.tif", "rlnMicrographGainName": "gain.mrc",
        "rlnMicrographBinning": 1.0, "rlnMicrographOriginalPixelSize": 0.8, "rlnMicrographDoseRate": 1.25,
        "rlnMicrographPreExposure": 0.5, "rlnVoltage": 200.0, "rlnMicrographStartFrame": 1,
        "rlnMotionModelVersion": 0,
    }
    blocks = read_star(path)
    assert list(blocks) == ["general", "global_shift"]  # no polynomial for a rigid model
    np.testing.assert_array_equal(blocks["global_shift"]["rlnMicrographFrameNumber"], np.arange(1, 18))
    # RELION's sign and axis order in the file itself
    np.testing.assert_array_equal(blocks["global_shift"]["rlnMicrographShiftX"], -expected[:, 1])
    np.testing.assert_array_equal(blocks["global_shift"]["rlnMicrographShiftY"], -expected[:, 0])


def test_local_round_trip_file_layout(tmp_path):
    model = grid_model(_global(), _local(), SHAPE, pixel_size=1.0)
    written = write_motion_star(tmp_path / "m.star", model, "mov.tif", original_pixel_size=1.0, dose_per_frame=1.0,
                                voltage=300.0, hot_pixels=[[5, 7], [299, 0]])
    text = (tmp_path / "m.star").read_text()
    blocks = read_star(tmp_path / "m.star")
    assert list(blocks) == ["general", "global_shift", "local_motion_model", "hot_pixels"]
    assert blocks["general"]["rlnMotionModelVersion"].item() == 1
    coef = blocks["local_motion_model"]
    np.testing.assert_array_equal(coef["rlnMotionModelCoeffsIdx"], np.arange(36))
    assert coef["rlnMotionModelCoeffsIdx"].dtype.kind == "i"  # RELION reads these as integers
    np.testing.assert_array_equal(blocks["hot_pixels"]["rlnCoordinateX"], [7.0, 0.0])
    # RELION ends a loop at the first empty line: every loop must be followed by one before the next data_
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("data_") and i > 0:
            assert lines[i - 1].strip() == ""
    back = read_relion_motion(tmp_path / "m.star")
    np.testing.assert_array_equal(back.relion_global, written.relion_global)
    np.testing.assert_array_equal(back.coeffs, written.coeffs)
    np.testing.assert_array_equal(back.hot_pixels, [[5, 7], [299, 0]])
    yx = export._sample_lattice(SHAPE, 5)
    np.testing.assert_array_equal(back.shifts(yx), written.shifts(yx))


def _mean_referenced_local(dims, scale=3.0, n_frames=16, seed=4) -> np.ndarray:
    """Local nodes whose trajectories have zero mean over the frames, as ``fit_motion`` references them (the
    average sits at the mean position), so the field is not zero at frame 1."""
    v = np.random.default_rng(seed).normal(scale=scale, size=(2, 1, *dims))
    v -= v.mean(axis=(-2, -1), keepdims=True)
    t = np.linspace(0, 1, 3)
    profile = (1 - np.exp(-t / 0.3)) / (1 - np.exp(-1 / 0.3))
    frames = np.arange(n_frames) / (n_frames - 1)
    mean = np.mean((1 - np.exp(-frames / 0.3)) / (1 - np.exp(-1 / 0.3)))
    return v * (profile - mean)[None, :, None, None]


def test_auto_start_frame_for_mean_referenced_models(tmp_path):
    """Our averages sit at the mean position, so the local field is not 0 at frame 1; RELION's polynomial is 0 at
    its start frame. "auto" moves the start frame to where our local field (nearly) vanishes."""
    model = grid_model(_global(16), _mean_referenced_local((2, 2)), SHAPE, 1.0)
    yx = np.random.default_rng(6).uniform([0, 0], [SHAPE[0] - 1, SHAPE[1] - 1], size=(200, 2))
    ours = model.shifts(yx)
    local = np.sqrt(np.mean(np.sum(model.local_shifts(yx) ** 2, -1)))
    assert np.sqrt(np.mean(np.sum(model.local_shifts(yx)[0] ** 2, -1))) > 1.0  # far from 0 at frame 1

    def error(m):
        return np.sqrt(np.mean(np.sum((m.shifts(yx) - ours) ** 2, -1)))

    first = relion_motion_from_model(model, first_frame=1)
    auto = relion_motion_from_model(model)
    assert 1 < auto.first_frame < 16
    assert error(auto) < 0.25 * error(first) and error(auto) < 0.05 * local
    lattice = export._sample_lattice(SHAPE, 17)  # the samples relion_motion_from_model fits
    relion = -model.shifts(lattice)[..., ::-1]
    for f in range(1, 17):  # it is the best start frame
        assert auto.fit_rms <= fit_relion_polynomial(relion, lattice, SHAPE, f)[2] + 1e-12
    path = tmp_path / "m.star"
    write_motion_star(path, model, "mov.tif", original_pixel_size=1.0, dose_per_frame=1.0, voltage=300.0)
    back = read_relion_motion(path)
    assert back.general["rlnMicrographStartFrame"] == auto.first_frame
    np.testing.assert_allclose(back.shifts(yx), auto.shifts(yx), atol=1e-12)
    # rigid models keep start frame 1
    assert relion_motion_from_model(grid_model(_global(16), None, SHAPE, 1.0)).first_frame == 1


def test_fit_motion_output_round_trip(tmp_path):
    """A real ``fit_motion`` result: its global shifts come back exactly, in RELION's convention in the file."""
    sim = simulate_movie(MovieSimulation(shape=(256, 256), n_frames=8, dose_per_frame=3.0, drift=8.0,
                                         local_amplitude=0.0, seed=7))
    model = fit_motion(sim.frames, MotionSettings(pixel_size=1.0, exposure_per_frame=3.0, local_grid=(1, 1)))
    path = _write(tmp_path, model, dose_per_frame=3.0)
    shifts, general = read_relion_motion_star(path)
    assert np.array_equal(shifts, model.global_shifts())
    assert general["rlnImageSizeZ"] == 8 and general["rlnMotionModelVersion"] == 0
    table = read_star(path)["global_shift"]
    np.testing.assert_array_equal(table["rlnMicrographShiftX"], -model.global_shifts()[:, 1])
    # the export describes the same motion as the truth (centred: our reference is the mean position)
    truth = sim.truth.global_shifts - sim.truth.global_shifts.mean(0)
    assert np.abs((shifts - shifts.mean(0)) - truth).max() < 1.0


def test_start_frame(tmp_path):
    """The polynomial is zero at rlnMicrographStartFrame."""
    model = grid_model(_global(), _local(), SHAPE, pixel_size=1.0)
    m = relion_motion_from_model(model, first_frame=3)
    assert m.first_frame == 3
    yx = export._sample_lattice(SHAPE, 4)
    rel = m.relion_shifts(yx)
    np.testing.assert_allclose(rel[2], np.repeat(m.relion_global[2][None], len(yx), 0), atol=1e-12)


def test_malformed_files_are_rejected(tmp_path):
    model = grid_model(_global(), _local(), SHAPE, pixel_size=1.0)
    path = _write(tmp_path, model)
    good = path.read_text()
    bad = tmp_path / "bad.star"
    bad.write_text(good.replace("35\t", "#35\t"))  # one coefficient missing: RELION says "incomplete values"
    with pytest.raises(MetadataError, match="indices"):
        read_relion_motion(bad)
    bad.write_text(good.replace("_rlnImageSizeZ", "_rlnImageSizeQ"))
    with pytest.raises(MetadataError, match="rlnImageSizeZ"):
        read_relion_motion(bad)
    bad.write_text(good.replace("data_global_shift", "data_global_shifts"))
    with pytest.raises(MetadataError, match="global_shift"):
        read_relion_motion(bad)


# ---------------------------------------------------------------------------------------------------------------
# paths and atomic writes
# ---------------------------------------------------------------------------------------------------------------
def test_paths_relative_to_project_dir(tmp_path):
    project = tmp_path / "project"
    (project / "motion").mkdir(parents=True)
    model = grid_model(_global(), None, SHAPE, pixel_size=1.0)
    star = project / "motion" / "mov.star"
    write_motion_star(star, model, project / "frames" / "mov.tif", gain_path=tmp_path / "gain.mrc",
                      original_pixel_size=1.0, dose_per_frame=1.0, voltage=300.0, project_dir=project)
    general = read_relion_motion(star).general
    assert general["rlnMicrographMovieName"] == "frames/mov.tif"
    assert general["rlnMicrographGainName"] == "../gain.mrc"
    # relative paths are already relative to the project directory: written unchanged
    write_motion_star(star, model, "frames/mov.tif", original_pixel_size=1.0, dose_per_frame=1.0, voltage=300.0,
                      project_dir=project)
    assert read_relion_motion(star).general["rlnMicrographMovieName"] == "frames/mov.tif"
    # without a project directory, absolute paths stay absolute (valid from anywhere)
    write_motion_star(star, model, project / "frames" / "mov.tif", original_pixel_size=1.0, dose_per_frame=1.0,
                      voltage=300.0)
    assert read_relion_motion(star).general["rlnMicrographMovieName"] == (project / "frames" / "mov.tif").as_posix()

    table = write_corrected_micrographs_star(
        project / "corrected_micrographs.star",
        [CorrectedMicrograph(project / "average" / "mov.mrc", star, pixel_size=1.0, original_pixel_size=1.0)],
        project_dir=project,
    )
    assert table["rlnMicrographName"].tolist() == ["average/mov.mrc"]
    assert table["rlnMicrographMetadata"].tolist() == ["motion/mov.star"]


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = grid_model(_global(), _local(), SHAPE, pixel_size=1.0)
    path = _write(tmp_path, model)
    before = path.read_bytes()

    class Broken:
        shape, pixel_size, n_frames = SHAPE, 1.0, 12

        def shifts(self, yx, frames=None):
            raise RuntimeError("fit exploded")

    with pytest.raises(RuntimeError):
        _write(tmp_path, Broken())
    # a failure while the file is being written (after some blocks are out) leaves the old file and no temp file
    from napari_warp.core.io import star as star_module

    real = star_module._block_text

    def fail_on_coefficients(name, block, fmt):
        if name == "local_motion_model":
            raise OSError("disk full")
        return real(name, block, fmt)

    monkeypatch.setattr(star_module, "_block_text", fail_on_coefficients)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, grid_model(_global(seed=9), _local(seed=9), SHAPE, pixel_size=1.0))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mov.star"]


# ---------------------------------------------------------------------------------------------------------------
# corrected_micrographs.star
# ---------------------------------------------------------------------------------------------------------------
def test_corrected_micrographs_star(tmp_path):
    model = grid_model(_global(), _local(), SHAPE, pixel_size=1.0)
    rows = []
    for k in range(3):
        star = tmp_path / "motion" / f"m{k}.star"
        write_motion_star(star, model, f"frames/m{k}.tif", original_pixel_size=0.5, dose_per_frame=1.0,
                          pre_exposure=0.5, voltage=300.0)
        rows.append(dict(micrograph=f"average/m{k}.mrc", metadata=f"motion/m{k}.star", pixel_size=1.0,
                         original_pixel_size=0.5, voltage=300.0 if k < 2 else 200.0, cs=2.7,
                         amplitude_contrast=0.07))
    rows[0]["accum_motion"] = (1.0, 2.0, 3.0)
    write_corrected_micrographs_star(tmp_path / "corrected_micrographs.star", rows, project_dir=tmp_path)
    blocks = read_star(tmp_path / "corrected_micrographs.star")
    assert list(blocks) == ["optics", "micrographs"]
    optics, mics = blocks["optics"], blocks["micrographs"]
    assert list(optics.columns) == ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize",
                                    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                                    "rlnMicrographPixelSize"]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert list(mics.columns) == ["rlnMicrographName", "rlnMicrographMetadata", "rlnOpticsGroup",
                                  "rlnAccumMotionTotal", "rlnAccumMotionEarly", "rlnAccumMotionLate"]
    assert mics["rlnOpticsGroup"].tolist() == [1, 1, 2]
    assert mics["rlnMicrographMetadata"].tolist() == ["motion/m0.star", "motion/m1.star", "motion/m2.star"]
    assert mics.iloc[0][["rlnAccumMotionTotal", "rlnAccumMotionEarly", "rlnAccumMotionLate"]].tolist() == [1, 2, 3]
    # computed from the motion file as RELION does (cutoff 4 e/Å², pre-exposure 0.5 -> frames <= 3.5 are early)
    g = read_relion_motion(tmp_path / "motion" / "m1.star").relion_global
    steps = np.linalg.norm(np.diff(g, axis=0), axis=1)
    assert mics.iloc[1]["rlnAccumMotionTotal"] == pytest.approx(steps.sum())
    assert mics.iloc[1]["rlnAccumMotionEarly"] == pytest.approx(steps[:2].sum())
