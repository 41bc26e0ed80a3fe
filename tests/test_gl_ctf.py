"""The CTF dock in a real napari viewer under Xvfb: fit a tilted micrograph, see the defocus overlay and inspector."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gl

GRADIENT = (0.1, 0.3)  # Å of defocus per Å along (y, x): a specimen tilted by ~17.5°


@pytest.fixture(scope="module")
def tilted_micrograph():
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    sim = MovieSimulation(shape=(1024, 1024), n_frames=2, pixel_size=1.0, defocus=15000.0, astigmatism=400.0,
                          astigmatism_angle=30.0, drift=0.0, local_amplitude=0.0, dose_per_frame=20.0,
                          defocus_gradient=GRADIENT)
    return simulate_movie(sim).frames.sum(0).astype(np.float32)


def _colourful(shot: np.ndarray) -> np.ndarray:
    """Pixels with a clear hue (the turbo overlay over a grey micrograph)."""
    rgb = shot[..., :3].astype(float)
    return (rgb.max(-1) - rgb.min(-1)) > 40


def test_ctf_dock_fit_overlay_and_screenshot(make_napari_viewer, qtbot, tmp_path, tilted_micrograph):
    from napari_warp._layers import image_layer

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    data, meta, _ = image_layer(tilted_micrograph, 1.0, "tilted micrograph")
    micrograph = viewer.add_image(data, **meta)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-warp", "CTF estimation and deconvolution")
    assert widget.source.value is micrograph

    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    qtbot.waitUntil(lambda: widget.last_fit is not None, timeout=5000)
    fit = widget.last_fit
    assert fit.defocus == pytest.approx(15000.0, rel=0.01)
    tilt = np.degrees(np.arctan(np.hypot(*fit.plane)))
    assert tilt == pytest.approx(np.degrees(np.arctan(np.hypot(*GRADIENT))), abs=2.0)
    assert f"{tilt:.2f}°" in widget.results.value

    overlay = next(layer for layer in viewer.layers if layer.metadata.get("napari_warp_role") == "defocus")
    # defocus rises to the right (x) three times faster than downwards (y): not transposed, not flipped
    dx = float(overlay.data[:, -16:].mean() - overlay.data[:, :16].mean())
    dy = float(overlay.data[-16:].mean() - overlay.data[:16].mean())
    assert dx > 2 * dy > 0

    widget.show_deconvolved.value = True
    qtbot.waitUntil(lambda: any(layer.metadata.get("napari_warp_role") == "deconvolved" for layer in viewer.layers),
                    timeout=60000)
    qtbot.waitUntil(lambda: widget._deconv_worker is None, timeout=60000)
    viewer.reset_view()
    qtbot.wait(200)

    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert canvas[..., :3].std() > 10, "canvas is blank"
    coloured = _colourful(canvas)
    assert coloured.mean() > 0.2, "the defocus overlay is not visible"
    # right half redder, left half bluer (turbo: low defocus blue, high red)
    w = coloured.shape[1]
    rgb = canvas[..., :3].astype(float)
    redness = rgb[..., 0] - rgb[..., 2]
    assert redness[:, w // 2 :][coloured[:, w // 2 :]].mean() > redness[:, : w // 2][coloured[:, : w // 2]].mean()
    overlay.visible = False
    assert _colourful(viewer.screenshot(canvas_only=True, flash=False)).mean() < 0.02  # grey without it
    overlay.visible = True

    # the whole window with the dock scrolled to the inspector
    widget._scroll.verticalScrollBar().setValue(widget._scroll.verticalScrollBar().maximum())
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.shape[1] > canvas.shape[1] + 300  # the dock is in the picture
    assert shot[..., :3].std() > 10
    from PIL import Image

    Image.fromarray(shot).save(tmp_path / "ctf_dock.png")
    folder = os.environ.get("NAPARI_WARP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot).save(Path(folder) / "ctf_dock.png")
