"""The BoxNet docks in a real napari viewer under Xvfb: the retraining story. Picks (the simulation's truth) on a
micrograph → retrain the shipped model with generic data mixed in, watching the four metrics → a model file →
re-pick: the micrograph's picks layer shows the new model's picks, and they find the particles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gl

PIXEL_SIZE = 4.0  # Å/px
DIAMETER = 150.0  # Å


def _wait(qtbot, worker, timeout=180000):
    assert worker is not None
    with qtbot.waitSignal(worker.finished, timeout=timeout):
        pass


def test_retrain_on_picks_then_repick_in_the_viewer(make_napari_viewer, qtbot, tmp_path, sim512):
    from napari_warp._layers import image_layer, points_layer
    from napari_warp._widgets.boxnet import stored_picks
    from napari_warp.core.picking import load_model
    from napari_warp.core.picking.metrics import score_picks

    start = load_model().path  # the shipped generic model, as a user starts
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    data, meta, _ = image_layer(sim512.frames[0], PIXEL_SIZE, "sim")
    mic = viewer.add_image(data, **meta)
    data, meta, _ = points_layer(sim512.truth.particles, PIXEL_SIZE, "true particles", diameter=DIAMETER)
    truth = viewer.add_points(data, **meta)

    # first picks with the start model: a picks layer with the network's output stored
    _dock, picker = viewer.window.add_plugin_dock_widget("napari-warp", "BoxNet picking")
    picker.model_file.value = start
    picker.diameter.value = DIAMETER
    _wait(qtbot, picker.run())
    points = next(layer for layer in viewer.layers if layer.name == "sim picks")
    before = stored_picks(points).probabilities.copy()
    assert points.metadata["model"] == load_model(start).label

    # retrain on the true particles, one generic micrograph mixed in
    _dock, trainer = viewer.window.add_plugin_dock_widget("napari-warp", "BoxNet training", tabify=True)
    trainer.points.value = [truth]
    assert trainer.pairs() == [(mic, [truth], None)]  # not made by the picking dock: the fallback micrograph
    trainer.start_model.value = start
    trainer.epochs.value = 2
    trainer.window.value = 32
    trainer.n_generic.value = 1
    assert trainer.dilute.value
    out = tmp_path / "models" / "retrained.pt"
    trainer.out.value = out
    epochs_seen = []
    trainer.metrics_updated.connect(lambda h: epochs_seen.append(len(h["epoch"])))
    _wait(qtbot, trainer.run())
    history = trainer.history
    assert history is not None, trainer.status.value
    assert history["epoch"] == [1, 2] and epochs_seen[-1] == 2
    for key in ("old_on_old", "old_on_new", "new_on_old", "new_on_new"):  # all four: old data was mixed in
        assert len(history[key]) == 2 and np.isfinite(history[key]).all(), key
    assert history["old_on_old"][0] == history["old_on_old"][1]  # the old network does not change
    assert out.is_file()
    model = load_model(out)
    assert model.name == "boxnet-retrained" and model.trained_on["generic_micrographs"] == 1
    assert model.label != load_model(start).label

    # re-pick: the same picks layer now shows the retrained model's output
    _wait(qtbot, trainer.repick())
    assert [layer for layer in viewer.layers if layer.name == "sim picks"] == [points]  # updated in place
    assert points.metadata["model"] == model.label and points.metadata["model_path"] == str(out)
    # at the threshold that matched the training picks best, which the picking dock shows for this micrograph
    assert points.metadata["threshold"] == pytest.approx(model.trained_on["threshold"])
    picker.source.value = None
    picker.source.value = mic
    assert picker.threshold.value == pytest.approx(model.trained_on["threshold"])
    after = stored_picks(points)
    assert after.model == model.label
    assert not np.allclose(after.probabilities, before), "re-picking did not use the new network"
    assert after.yx.shape == (len(points.data), 2)
    np.testing.assert_allclose(points.data, after.yx)
    radius = 0.5 * DIAMETER / PIXEL_SIZE
    found = score_picks(points.data, sim512.truth.particles, radius, exclude_border=radius, shape=mic.data.shape)
    assert found.f1 > 0.8, f"the retrained model's picks miss the particles: {found}"

    viewer.reset_view()
    qtbot.wait(200)
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert canvas[..., :3].std() > 10, "canvas is blank"
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.shape[1] > canvas.shape[1] + 300  # the dock is in the picture
    from PIL import Image

    Image.fromarray(shot).save(tmp_path / "boxnet_docks.png")
    folder = os.environ.get("NAPARI_WARP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot).save(Path(folder) / "boxnet_training.png")
