"""BoxNet docks on a ViewerModel (no canvas), Qt offscreen: pick → Points/Labels in Å, live threshold without the
network, import/export of picks, retraining with live metrics, re-pick."""

from __future__ import annotations

import numpy as np
import pytest

from napari_warp.core.picking.infer import THRESHOLDS

pytest.importorskip("qtpy")

PIXEL_SIZE = 4.0  # Å/px: the 512² micrographs below are 256² at BoxNet's 8 Å/px
DIAMETER = 150.0  # Å


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random width-4 BoxNet saved to a file (fast: the network's output is irrelevant where it is used)."""
    import torch

    from napari_warp.core.picking import BoxNet, PickingModel, save_model

    torch.manual_seed(0)
    return save_model(PickingModel(BoxNet(width=4), name="test", version="1"), tmp_path_factory.mktemp("m") / "m.pt")


@pytest.fixture
def viewer_model():
    from napari.components import ViewerModel

    return ViewerModel()


def _add(viewer, data, name="mic_1", pixel_size=PIXEL_SIZE, **kwargs):
    from napari_warp._layers import image_layer

    d, meta, _ = image_layer(np.asarray(data, dtype=np.float32), pixel_size, name, **kwargs)
    return viewer.add_image(d, **meta)


def _wait(qtbot, worker, timeout=60000):
    assert worker is not None
    with qtbot.waitSignal(worker.finished, timeout=timeout):
        pass


def _role(viewer, role):
    return [layer for layer in viewer.layers if (layer.metadata or {}).get("napari_warp_role") == role]


def test_pick_adds_picks_and_artifacts_aligned_with_the_micrograph(qtbot, viewer_model, sim512, tiny_model):
    from napari_warp._widgets.boxnet import BoxNetWidget
    from napari_warp.core.picking import load_model

    mic = _add(viewer_model, sim512.frames[0], translate=(40.0, -80.0))
    widget = BoxNetWidget(viewer_model)
    assert widget.source.value is mic
    assert widget.pixel_size.value == pytest.approx(PIXEL_SIZE)  # from the layer's scale (Å)
    widget.diameter.value = DIAMETER
    widget.model_file.value = tiny_model
    label = load_model(tiny_model).label
    assert widget.model_label.value == f"Model: {label}"

    _wait(qtbot, widget.run())
    qtbot.waitUntil(lambda: len(_role(viewer_model, "picks")) == 1, timeout=5000)
    (points,) = _role(viewer_model, "picks")
    (labels,) = _role(viewer_model, "artifacts")
    assert points.name == "mic_1 picks" and labels.name == "mic_1 artifacts"
    for layer in (points, labels):
        assert tuple(layer.scale) == pytest.approx((PIXEL_SIZE, PIXEL_SIZE))
        assert tuple(layer.translate) == pytest.approx((40.0, -80.0))
        assert tuple(str(u) for u in layer.units) == ("angstrom", "angstrom")
    assert labels.data.shape == mic.data.shape and labels.data.dtype == np.uint8
    assert set(np.unique(labels.data)) <= {0, 2}  # 2 = artifact
    # the circle is one particle diameter across in world units (Å): size (data px) × scale
    assert points.size.size == 0 or float(points.size[0]) * PIXEL_SIZE == pytest.approx(DIAMETER)
    assert points.current_size * PIXEL_SIZE == pytest.approx(DIAMETER)
    assert str(points.current_symbol) in ("disc", "Symbol.DISC") and points.current_border_width == 0.1
    assert points.metadata["model"] == label and points.metadata["source"] == "mic_1"
    assert points.metadata["diameter"] == DIAMETER and points.metadata["pixel_size"] == PIXEL_SIZE
    assert widget.last_picks is not None and widget.last_picks.model == label
    assert f"{len(points.data)} picks" in widget.summary.value and label in widget.summary.value
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_a_retrained_models_threshold_sets_the_slider(viewer_model, tmp_path):
    """A model saved by the training dock carries the threshold its training picks suggested: choosing the model
    file moves the slider there; a model without one leaves the slider alone."""
    import torch

    from napari_warp._widgets.boxnet import BoxNetWidget
    from napari_warp.core.picking import BoxNet, PickingModel, save_model

    torch.manual_seed(0)
    plain = save_model(PickingModel(BoxNet(width=4), name="plain"), tmp_path / "plain.pt")
    tuned = save_model(PickingModel(BoxNet(width=4), name="tuned", trained_on={"threshold": 0.45}),
                       tmp_path / "tuned.pt")
    widget = BoxNetWidget(viewer_model)
    widget.threshold.value = 0.3
    widget.model_file.value = plain
    assert widget.threshold.value == pytest.approx(0.3)
    widget.model_file.value = tuned
    assert widget.threshold.value == pytest.approx(0.45)
    assert "threshold 0.45, the best on its training picks" in widget.model_label.value


def _fake_probabilities(shape, peaks, artifact_box):
    """``(3, Y, X)`` softmax at the model sampling: Gaussian particle blobs of the given peak scores, one artifact
    square (``(y0, y1, x0, x1)``), background the rest."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    particle = np.zeros(shape, np.float32)
    for (y, x), peak in peaks:
        particle = np.maximum(particle, peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 2.0**2)))
    artifact = np.zeros(shape, np.float32)
    y0, y1, x0, x1 = artifact_box
    artifact[y0:y1, x0:x1] = 0.9
    particle[y0:y1, x0:x1] = np.minimum(particle[y0:y1, x0:x1], 0.05)
    return np.stack([1 - particle - artifact, particle, artifact])


PEAKS = [((40, 40), 0.60), ((40, 120), 0.70), ((120, 40), 0.80), ((120, 120), 0.90), ((200, 200), 0.99),
         ((60, 205), 0.97)]  # model px (8 Å/px); the last one is 34 px = 275 Å from the artifact square
ARTIFACT_BOX = (0, 30, 220, 256)


def test_threshold_slider_is_live_without_the_network(qtbot, viewer_model, sim512, tiny_model, monkeypatch):
    import torch

    from napari_warp._widgets.boxnet import BoxNetWidget, stored_picks
    from napari_warp.core.picking import infer

    calls = []

    def fake_segment(image, model, *args, **kwargs):
        calls.append(tuple(image.shape))
        return torch.as_tensor(_fake_probabilities(tuple(image.shape), PEAKS, ARTIFACT_BOX))

    monkeypatch.setattr(infer, "segment", fake_segment)
    _add(viewer_model, sim512.frames[0])
    widget = BoxNetWidget(viewer_model)
    widget.model_file.value = tiny_model
    widget.diameter.value = DIAMETER
    widget.mask_distance.value = 75.0
    widget.threshold.value = 0.95
    _wait(qtbot, widget.run())
    qtbot.waitUntil(lambda: len(_role(viewer_model, "picks")) == 1, timeout=5000)
    (points,) = _role(viewer_model, "picks")
    (labels,) = _role(viewer_model, "artifacts")
    assert calls == [(256, 256)]
    assert len(points.data) == 2  # 0.99 and 0.97
    # model px -> micrograph px: ×2 about the centre (Fourier resampling keeps pixel N//2)
    got = sorted(map(tuple, np.round(points.data).astype(int)))
    assert got == [(120, 410), (400, 400)]
    np.testing.assert_allclose(sorted(points.features["score"]), [0.97, 0.99], atol=0.005)
    # the artifact square, at the micrograph's sampling, labelled 2
    assert labels.data[:56, 444:].mean() == pytest.approx(2.0) and (labels.data[100:, :400] == 0).all()
    mask_before = labels.data.copy()

    def settle():  # live updates are throttled (a few tens of ms)
        qtbot.waitUntil(lambda: not widget._throttle.isActive(), timeout=5000)
        qtbot.wait(5)

    counts = {}
    for t in (0.85, 0.65, 0.55, 0.98, 0.95):
        widget.threshold.value = t
        settle()
        counts[t] = len(points.data)
    assert counts == {0.85: 3, 0.65: 5, 0.55: 6, 0.98: 1, 0.95: 2}
    assert calls == [(256, 256)], "the threshold must not run the network again"
    assert _role(viewer_model, "picks") == [points]  # updated in place
    assert points.metadata["threshold"] == pytest.approx(0.95)
    assert points.border_contrast_limits == pytest.approx((0.95, 1.0))
    np.testing.assert_array_equal(labels.data, mask_before)  # a painted mask survives threshold changes
    assert stored_picks(points).settings.threshold == pytest.approx(0.95)

    # the minimum distance to artifacts is live too: 300 Å drops the pick 275 Å from the square
    widget.mask_distance.value = 300.0
    settle()
    assert len(points.data) == 1
    widget.mask_distance.value = 75.0
    settle()
    assert len(points.data) == 2
    # the artifacts layer as painted rules: painting over a pick drops it (live), erasing the network's mask
    # brings back the pick it had dropped at 300 Å
    labels.brush_size = 9
    labels.paint((400, 400), 2)
    settle()
    assert sorted(map(tuple, np.round(points.data).astype(int))) == [(120, 410)]
    labels.data = np.zeros_like(labels.data)
    widget.mask_distance.value = 300.0
    settle()
    assert len(points.data) == 2
    labels.data = mask_before.copy()
    widget.mask_distance.value = 75.0
    settle()
    assert len(points.data) == 2
    # a drag: many values in a row give one re-derivation with the last one
    derived = []
    original = widget.update_threshold
    widget._throttle.timeout.disconnect()
    widget._throttle.timeout.connect(lambda: derived.append(original()))
    for t in np.linspace(0.5, 0.85, 30):
        widget.threshold.value = float(t)
    settle()
    assert len(derived) == 1 and len(points.data) == 3
    widget._throttle.timeout.disconnect()
    widget._throttle.timeout.connect(original)
    widget.threshold.value = 0.95
    settle()
    assert calls == [(256, 256)]
    assert "2 picks" in widget.summary.value

    # points added by hand score 1 (manual), whatever point was selected before
    points.selected_data = {0}
    points.add([[10.0, 10.0]])
    assert float(points.features["score"].iloc[-1]) == 1.0


def test_import_box_and_save_star(qtbot, viewer_model, tmp_path):
    from napari_warp._widgets.boxnet import BoxNetWidget
    from napari_warp.core.picking.io import read_picks_star

    mic = _add(viewer_model, np.zeros((300, 400), np.float32), name="mic_7", pixel_size=2.0)
    _add(viewer_model, np.zeros((300, 400), np.float32), name="mic_8", pixel_size=2.0)
    widget = BoxNetWidget(viewer_model)
    widget.source.value = mic
    widget.diameter.value = 120.0
    box = tmp_path / "mic_7.box"
    box.write_text("10\t20\t60\t60\n100 150 60 60\n250 30 60 60\n")  # x y w h (corner)
    points = widget.import_picks(box)
    assert points is not None, widget.status.value
    assert points.name == "mic_7 picks" and points.metadata["source"] == "mic_7"
    np.testing.assert_allclose(points.data, [[50, 40], [180, 130], [60, 280]])  # (y, x) = corner + size / 2
    np.testing.assert_allclose(points.features["score"], 1.0)  # no score in .box: shown as manual
    assert tuple(points.scale) == (2.0, 2.0) and points.current_size == pytest.approx(60.0)
    assert "3 picks" in widget.summary.value and "imported" in widget.summary.value
    assert "Imported 3 picks" in widget.status.value

    # the circles follow the diameter (live); the minimum distance to artifacts follows it while it is half of it
    assert widget.mask_distance.value == pytest.approx(60.0)
    widget.diameter.value = 160.0
    qtbot.waitUntil(lambda: float(points.size[0]) == pytest.approx(80.0), timeout=5000)
    assert widget.mask_distance.value == pytest.approx(80.0) and points.metadata["diameter"] == 160.0
    widget.mask_distance.value = 50.0
    widget.diameter.value = 120.0
    assert widget.mask_distance.value == pytest.approx(50.0)  # set by hand: kept
    qtbot.waitUntil(lambda: float(points.size[0]) == pytest.approx(60.0), timeout=5000)

    # the layer is the truth: delete one, then save
    points.selected_data = {1}
    points.remove_selected()
    out = widget.save_picks(tmp_path / "mic_7_picks.star")
    table = read_picks_star(out)
    np.testing.assert_allclose(table.yx, [[50, 40], [60, 280]])
    assert table.diameter == pytest.approx(120.0) and table.info["micrograph_name"] == "mic_7"

    # a file for another micrograph, with several in it, is refused with the names
    (tmp_path / "other.star").write_text(
        "data_\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        "a.mrc 1 2\nb.mrc 3 4\n")
    assert widget.import_picks(tmp_path / "other.star") is None
    assert "Import failed" in widget.status.value and "mic_7" in widget.status.value


def test_training_runs_with_live_metrics_saves_and_repicks(qtbot, viewer_model, sim512, tiny_model, tmp_path):
    from napari_warp._layers import points_layer
    from napari_warp._widgets.boxnet import BoxNetTrainingWidget, stored_picks
    from napari_warp.core.picking import load_model

    mic = _add(viewer_model, sim512.frames[0], name="sim")
    d, meta, _ = points_layer(sim512.truth.particles, PIXEL_SIZE, "true particles", diameter=DIAMETER)
    truth = viewer_model.add_points(d, **meta)  # not made by the picking dock: paired through the fallback
    painted = np.zeros(mic.data.shape, np.uint8)
    painted[:64, :64] = 2
    painted[-64:, -64:] = 3
    labels = viewer_model.add_labels(painted, name="painted", scale=(PIXEL_SIZE, PIXEL_SIZE))

    widget = BoxNetTrainingWidget(viewer_model)
    assert widget.points.value == [truth]  # all Points layers chosen by default
    widget.masks.value = [labels]
    assert widget.fallback.value is mic
    assert widget.pairs() == [(mic, [truth], labels)]
    assert f"sim: {len(truth.data)} picks + painted" in widget.pairing.value
    assert widget.pixel_size.value == pytest.approx(PIXEL_SIZE)
    assert widget.epochs.value == 100 and widget.patience.value == 20 and widget.dilute.value
    assert widget.training_settings().holdout == pytest.approx(0.2)

    widget.start_model.value = tiny_model
    widget.epochs.value = 2
    widget.window.value = 32
    widget.dilute.value = False
    out = tmp_path / "retrained.pt"
    widget.out.value = out
    updates = []
    widget.metrics_updated.connect(lambda h: updates.append(list(h["epoch"])))

    _wait(qtbot, widget.run(), timeout=120000)
    assert widget.history is not None, widget.status.value
    assert widget.history["epoch"] == [1, 2]
    for key in ("old_on_old", "old_on_new", "new_on_old", "new_on_new"):
        assert len(widget.history[key]) == 2
    assert np.isnan(widget.history["new_on_old"]).all()  # no old (generic) data without dilution
    assert np.isfinite(widget.history["old_on_new"]).all() and np.isfinite(widget.history["new_on_new"]).all()
    assert updates and updates[-1] == [1, 2]
    lines = widget._figure.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines[:4]] == [2, 2, 2, 2]

    assert out.is_file() and widget.model_path == out
    saved = load_model(out)
    assert saved.name == "boxnet-retrained" and saved.label == widget.model.label
    assert saved.trained_on["base_model"] == load_model(tiny_model).label
    assert saved.trained_on["micrographs"] == ["sim"] and saved.trained_on["picks"] == len(truth.data)
    threshold = saved.trained_on["threshold"]
    assert threshold in THRESHOLDS and 0 <= saved.trained_on["threshold_f1"] <= 1
    assert f"Threshold {threshold:.2f} matches your picks best" in widget.status.value
    assert "Saved" in widget.status.value and str(out) in widget.status.value
    assert widget.out.value != out  # the next training gets a new file
    assert widget.repick_button.enabled

    _wait(qtbot, widget.repick())
    qtbot.waitUntil(lambda: len(_role(viewer_model, "picks")) == 1, timeout=5000)
    (points,) = _role(viewer_model, "picks")
    assert points.name == "sim picks" and points.metadata["model"] == saved.label
    assert points.metadata["threshold"] == pytest.approx(threshold)  # re-picked at the calibrated threshold
    assert stored_picks(points).model == saved.label
    assert "Re-picked" in widget.status.value


def test_training_without_picks_says_why(qtbot, viewer_model):
    from napari_warp._widgets.boxnet import BoxNetTrainingWidget

    _add(viewer_model, np.zeros((64, 64), np.float32))
    widget = BoxNetTrainingWidget(viewer_model)
    assert widget.run() is None
    assert "No picks" in widget.status.value
    assert widget.repick() is None and "Train a model first" in widget.status.value


def test_training_cancel_keeps_the_best_so_far(qtbot, viewer_model, sim512, tiny_model, tmp_path):
    from napari_warp._widgets.boxnet import BoxNetTrainingWidget
    from napari_warp.core.picking import load_model

    crop = sim512.frames[0][:256, :256]
    inside = np.all(sim512.truth.particles < 256, axis=1)
    _add(viewer_model, crop, name="crop")
    viewer_model.add_points(sim512.truth.particles[inside], name="crop picks", scale=(PIXEL_SIZE, PIXEL_SIZE))
    widget = BoxNetTrainingWidget(viewer_model)
    widget.start_model.value = tiny_model
    widget.epochs.value = 50
    widget.window.value = 32
    widget.dilute.value = False
    widget.out.value = tmp_path / "cancelled.pt"
    widget.metrics_updated.connect(lambda h: widget.cancel())  # stop after the first epoch shown
    _wait(qtbot, widget.run())
    assert widget.history is not None and 1 <= len(widget.history["epoch"]) < 50
    assert "cancelled at" in widget.status.value and "Saved" in widget.status.value
    assert load_model(tmp_path / "cancelled.pt").trained_on["cancelled"] is True
    assert widget.run_button.enabled and not widget.cancel_button.enabled and widget.repick_button.enabled


def test_retrained_model_is_used_by_the_session_its_micrographs_came_from(tmp_path):
    """Re-pick points the session of session-item micrographs at the new model: its picking becomes outdated."""
    from types import SimpleNamespace

    from napari_warp._widgets.boxnet import use_in_sessions
    from napari_warp.core.session import SessionSettings, load_settings, save_settings

    folder = tmp_path / "session"
    folder.mkdir()
    save_settings(folder, SessionSettings(input=str(folder)))
    item = SimpleNamespace(metadata={"folder": str(folder)})
    loose = SimpleNamespace(metadata={})
    model = tmp_path / "retrained.pt"
    assert use_in_sessions([item, loose, item], model, 180.0) == [folder]
    s = load_settings(folder)
    assert s.pick is True and s.picking.model == str(model) and s.picking.diameter == 180.0
    before = s.picking.threshold
    assert use_in_sessions([item], model, 180.0, threshold=0.35) == [folder]
    assert load_settings(folder).picking.threshold == pytest.approx(0.35) != before
