"""A real napari viewer under Xvfb: open a movie through the plugin and check the canvas shows it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_warp.core.io.movie import write_mrc

pytestmark = pytest.mark.gl


def test_movie_renders_in_viewer(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    frames = np.stack(
        [np.sin(xx / (4 + f)) * 50 + rng.normal(0, 5, (128, 128)) + 100 for f in range(4)]
    ).astype(np.float32)
    path = tmp_path / "movie.mrcs"
    write_mrc(path, frames, pixel_size=1.1)

    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(path), plugin="napari-warp")
    assert layers[0].data.shape == (4, 128, 128)
    assert tuple(layers[0].scale[-2:]) == pytest.approx((1.1, 1.1))
    viewer.dims.set_current_step(0, 2)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    gray = shot[..., :3].astype(float).mean(axis=-1)
    assert gray.std() > 10, "canvas is blank"
    # the stripes of frame 2 are visible: many distinct grey levels across the image
    assert len(np.unique(gray.round())) > 50


def test_docks_open_from_plugin_menu(make_napari_viewer):
    """Every widget in the manifest can be docked by napari itself (viewer injected from the annotation)."""
    from npe2 import PluginManager

    viewer = make_napari_viewer(show=True)
    manifest = PluginManager.instance().get_manifest("napari-warp")
    for contribution in manifest.contributions.widgets:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-warp", contribution.display_name)
        assert widget is not None and dock.widget() is not None


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-warp", "simulated_movie")
    names = [layer.name for layer in layers]
    assert any("movie" in n for n in names) and any("particles" in n for n in names)
    movie = next(layer for layer in layers if "movie" in layer.name)
    assert movie.data.ndim == 3 and tuple(movie.scale[-2:]) == pytest.approx((1.0, 1.0))


def test_motion_layers_render(make_napari_viewer, tmp_path):
    """The motion dock's result: aligned average (Å) and exaggerated tracks, drawn on a real canvas."""
    from napari_warp._layers import image_layer, motion_tracks_layer
    from napari_warp.core.motion import MotionSettings, aligned_average, fit_motion
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    sim = simulate_movie(MovieSimulation(shape=(256, 256), n_frames=8, drift=10.0))
    settings = MotionSettings(pixel_size=sim.pixel_size, exposure_per_frame=2.0)
    model = fit_motion(sim.frames, settings)
    average = aligned_average(sim.frames, model, settings, halves=False).average
    viewer = make_napari_viewer(show=True)
    data, meta, _ = image_layer(average, model.pixel_size, "aligned average")
    viewer.add_image(data, **meta)
    paths, meta, _ = motion_tracks_layer(model, "motion ×20", 20.0)
    tracks = viewer.add_shapes(paths, **meta)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    cyan = (shot[..., 0] < 80) & (shot[..., 1] > 180) & (shot[..., 2] > 180)
    assert tracks.nshapes >= 4 and cyan.sum() > 50, "motion tracks not drawn"
    assert shot[..., :3].std() > 10
    from PIL import Image

    Image.fromarray(shot).save(tmp_path / "motion.png")


def test_demo_viewer_shows_the_session(make_napari_viewer, tmp_path):
    """The README's main command, with its window: session and overview docks on the demo's session folder, the
    latest item's average and defocus overlay, the truth layers; the screenshot is not blank."""
    import os

    from napari_warp.cli import demo_viewer, run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, size=512, frames=16)
    viewer = make_napari_viewer(show=True)
    demo_viewer(out, viewer=viewer)
    names = [layer.name for layer in viewer.layers]
    assert "movie_002 average, 4 Å/px" in names and "movie_002 local defocus (µm)" in names
    assert "true particles" in names and "fitted motion ×20" in names
    docks = viewer.window.dock_widgets
    assert "Session (online processing)" in docks and "Session overview" in docks
    session = docks["Session (online processing)"]
    # the dock lists the three items the demo processed online
    from qtpy.QtWidgets import QApplication

    for _ in range(20):
        QApplication.processEvents()
    assert [i["status"] for i in summary["items"]] == ["processed"] * 3
    assert session.table.rowCount() == 3
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.std() > 10
    if os.environ.get("NAPARI_WARP_SCREENSHOTS"):
        import imageio.v3 as iio

        iio.imwrite(os.path.join(os.environ["NAPARI_WARP_SCREENSHOTS"], "demo.png"), shot)
