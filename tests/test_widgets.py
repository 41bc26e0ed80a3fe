"""Dock widgets on a ViewerModel (no canvas), Qt offscreen."""

from __future__ import annotations

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
    worker = widget._open()
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    qtbot.waitUntil(lambda: "Could not open" in widget.status.value, timeout=5000)
    assert "gain.mrc" in widget.status.value and "transpose" in widget.status.value.lower()
    assert len(viewer_model.layers) == 0
