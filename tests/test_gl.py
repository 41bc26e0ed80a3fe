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
