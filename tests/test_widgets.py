"""Dock widgets on a ViewerModel (no canvas), Qt offscreen."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from napari_warp.core.io.movie import write_mrc

pytest.importorskip("qtpy")


@pytest.fixture
def viewer_model():
    from napari.components import ViewerModel

    return ViewerModel()


def test_movie_widget_opens_with_gain(qtbot, viewer_model, tmp_path):
    from napari_warp._widgets.movie import MovieWidget

    rng = np.random.default_rng(0)
    frames = rng.poisson(3.0, size=(3, 40, 60)).astype(np.float32)
    gain = rng.uniform(0.8, 1.2, size=(40, 60)).astype(np.float32)
    write_mrc(tmp_path / "m.mrcs", frames, pixel_size=0.9, voltage=300.0)
    write_mrc(tmp_path / "gain.mrc", gain, pixel_size=0.9)

    widget = MovieWidget(viewer_model)
    widget.movie.value = tmp_path / "m.mrcs"
    widget.gain.value = tmp_path / "gain.mrc"
    worker = widget._open()
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    qtbot.waitUntil(lambda: len(viewer_model.layers) == 1, timeout=5000)
    layer = viewer_model.layers[0]
    # gain references are normalised to mean 1, as Warp does
    np.testing.assert_allclose(np.asarray(layer.data[1]), frames[1] * gain / gain.mean(), rtol=1e-5)
    assert tuple(layer.scale[-2:]) == pytest.approx((0.9, 0.9))
    assert "0.9 Å/px" in widget.status.value and "3 frames" in widget.status.value


def test_movie_widget_reports_gain_mismatch(qtbot, viewer_model, tmp_path):
    from napari_warp._widgets.movie import MovieWidget

    write_mrc(tmp_path / "m.mrcs", np.ones((2, 40, 60), np.float32), pixel_size=1.0)
    write_mrc(tmp_path / "gain.mrc", np.ones((60, 40), np.float32), pixel_size=1.0)
    widget = MovieWidget(viewer_model)
    widget.movie.value = tmp_path / "m.mrcs"
    widget.gain.value = tmp_path / "gain.mrc"
    widget._open()
    # wait on the outcome, not on the worker's signal: a fast worker can finish before a waitSignal is armed
    qtbot.waitUntil(lambda: "Could not open" in widget.status.value, timeout=30000)
    assert "gain.mrc" in widget.status.value and "transpose" in widget.status.value.lower()
    assert len(viewer_model.layers) == 0


def _simulated_movie_file(tmp_path, size=256, frames=8):
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    sim = simulate_movie(MovieSimulation(shape=(size, size), n_frames=frames, drift=8.0, local_amplitude=0.0))
    path = tmp_path / "sim.mrcs"
    write_mrc(path, sim.frames, pixel_size=sim.pixel_size, voltage=300.0)
    return path, sim


def test_motion_widget_fits_and_adds_layers(qtbot, viewer_model, tmp_path):
    from napari_warp._reader import read_image
    from napari_warp._widgets.motion import MotionWidget

    path, sim = _simulated_movie_file(tmp_path)
    data, meta, _ = read_image(path)[0]
    viewer_model.add_image(data, **meta)
    widget = MotionWidget(viewer_model)
    assert Path(widget.movie.value) == path  # filled in from the selected movie layer
    assert widget.pixel_size.value == pytest.approx(sim.pixel_size)
    widget.exposure.value = 2.0
    widget.out.value = tmp_path / "processing"
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    qtbot.waitUntil(lambda: len(viewer_model.layers) == 3, timeout=5000)
    average, tracks = viewer_model.layers[1], viewer_model.layers[2]
    # shown binned to 4 Å/px (the saved average keeps the full 1 Å/px sampling)
    assert average.data.shape == (64, 64) and tuple(average.scale) == pytest.approx((4.0, 4.0))
    with mrcfile.open(tmp_path / "processing" / "average" / "sim.mrc") as m:
        assert m.data.shape == (256, 256) and float(m.voxel_size.x) == pytest.approx(1.0)
    assert tracks.nshapes == 25
    assert (tmp_path / "processing" / "sim.xml").is_file()
    assert (tmp_path / "processing" / "average" / "odd" / "sim.mrc").is_file()
    assert "Å" in widget.status.value and widget.run_button.enabled


def test_motion_widget_cancel(qtbot, viewer_model, tmp_path):
    from napari_warp._widgets.motion import MotionWidget

    path, _ = _simulated_movie_file(tmp_path)
    widget = MotionWidget(viewer_model)
    widget.movie.value = path
    worker = widget.run()
    widget.cancel()  # pressed at once: the fit stops at its next progress report
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    qtbot.waitUntil(lambda: "cancelled" in widget.status.value, timeout=5000)
    assert len(viewer_model.layers) == 0 and widget.run_button.enabled


def test_motion_widget_reuses_the_movie_docks_gain(qtbot, viewer_model, tmp_path):
    """A movie opened with a gain reference in the Open-movie dock is motion-corrected with that gain."""
    from napari_warp._widgets.motion import MotionWidget
    from napari_warp._widgets.movie import MovieWidget

    rng = np.random.default_rng(3)
    write_mrc(tmp_path / "m.mrcs", rng.poisson(3.0, size=(4, 64, 64)).astype(np.float32), pixel_size=1.0)
    write_mrc(tmp_path / "gain.mrc", rng.uniform(0.9, 1.1, (64, 64)).astype(np.float32), pixel_size=1.0)
    opener = MovieWidget(viewer_model)
    opener.movie.value = tmp_path / "m.mrcs"
    opener.gain.value = tmp_path / "gain.mrc"
    opener.transpose.value = True
    worker = opener._open()
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    qtbot.waitUntil(lambda: len(viewer_model.layers) == 1, timeout=5000)
    motion = MotionWidget(viewer_model)
    assert Path(motion._open_options["gain"]) == tmp_path / "gain.mrc"
    assert motion._open_options["gain_transpose"] is True
