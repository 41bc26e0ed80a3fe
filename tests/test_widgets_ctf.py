"""CTF dock on a ViewerModel (no canvas), Qt offscreen: fit, defocus overlay, inspector, live deconvolution."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qtpy")

DEFOCUS = 15000.0  # Å
ASTIGMATISM = 400.0  # Å


@pytest.fixture(scope="module")
def frames():
    """Two frames (2, 1024, 1024) at 1 Å/px with known defocus and astigmatism (a few seconds; cached)."""
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    sim = MovieSimulation(shape=(1024, 1024), n_frames=2, pixel_size=1.0, defocus=DEFOCUS, astigmatism=ASTIGMATISM,
                          astigmatism_angle=30.0, drift=0.0, local_amplitude=0.0, dose_per_frame=20.0)
    return simulate_movie(sim).frames.astype(np.float32)


@pytest.fixture
def viewer_model():
    from napari.components import ViewerModel

    return ViewerModel()


def _add(viewer, data, name="sim", pixel_size=1.0, **kwargs):
    from napari_warp._layers import image_layer

    d, meta, _ = image_layer(data, pixel_size, name, **kwargs)
    return viewer.add_image(d, **meta)


def _fit(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget.status.value
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    qtbot.waitUntil(lambda: widget.last_fit is not None, timeout=5000)
    return widget.last_fit


def _role(viewer, role):
    return [layer for layer in viewer.layers if (layer.metadata or {}).get("napari_warp_role") == role]


def _yx_extent(layer):
    """World (Å) edges of the (y, x) pixels: first pixel's low edge, last pixel's high edge (napari's
    ``extent.world`` gives pixel centres)."""
    centres = np.asarray(layer.extent.world)[:, -2:]
    half = np.asarray(layer.scale[-2:]) / 2
    return centres + np.stack([-half, half])


def test_ctf_widget_fits_micrograph_overlays_and_deconvolves(qtbot, viewer_model, frames):
    from napari_warp._widgets.ctf import CTFWidget

    micrograph = _add(viewer_model, frames.sum(0), translate=(100.0, -50.0))
    widget = CTFWidget(viewer_model)
    assert widget.source.value is micrograph  # picked up from the layer list
    assert widget.pixel_size.value == pytest.approx(1.0)
    assert widget.range_low.value == pytest.approx(20.0) and widget.range_high.value == pytest.approx(3.33)

    fit = _fit(qtbot, widget)
    assert fit.defocus == pytest.approx(DEFOCUS, rel=0.01)
    assert abs(fit.astigmatism - ASTIGMATISM) < 100
    assert widget.run_button.enabled and not widget.cancel_button.enabled

    # the local-defocus overlay: µm, aligned with the micrograph in world space (Å), on top
    (overlay,) = _role(viewer_model, "defocus")
    assert "(µm)" in overlay.name and overlay.metadata["units"] == "µm"
    np.testing.assert_allclose(_yx_extent(overlay), _yx_extent(micrograph), atol=1e-6)
    assert float(np.mean(overlay.data)) == pytest.approx(DEFOCUS / 1e4, rel=0.01)
    lo, hi = overlay.contrast_limits
    assert hi - lo >= 0.02 and lo < float(np.min(overlay.data)) and hi > float(np.max(overlay.data))
    assert overlay.colormap.name == "turbo" and 0 < overlay.opacity < 1

    # inspector: numbers with units, and the spectra plotted
    assert not widget.inspector.native.isHidden()  # shown (the dock itself is not, offscreen)
    for text in ("µm", "Å", "°", "Defocus", "Astigmatism", "Fit resolution", "tilt"):
        assert text in widget.results.value
    assert f"{fit.defocus / 1e4:.3f} µm" in widget.results.value
    assert "µm" in widget.status.value and "Å" in widget.status.value
    assert len(widget._figure.axes) >= 3

    # deconvolution: toggled on -> debounced worker -> a layer just above the micrograph, same sampling
    widget.show_deconvolved.value = True
    qtbot.waitUntil(lambda: len(_role(viewer_model, "deconvolved")) == 1, timeout=60000)
    (decon,) = _role(viewer_model, "deconvolved")
    assert decon.data.shape == micrograph.data.shape
    np.testing.assert_allclose(_yx_extent(decon), _yx_extent(micrograph), atol=1e-6)
    assert "S=1.00, F=1.00" in decon.name
    layers = list(viewer_model.layers)
    assert layers.index(micrograph) < layers.index(decon) < layers.index(overlay)  # overlay stays visible
    a = micrograph.data - micrograph.data.mean()
    b = decon.data - decon.data.mean()
    corr = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    assert corr < 0.9, "deconvolution did not change the image"
    first = decon.data.copy()

    # slider changes in quick succession: one debounced request (at most one more queued), latest values win
    runs = []
    original = widget._add_deconvolved
    widget._add_deconvolved = lambda *args: (runs.append(args[2:]), original(*args))
    for s in (0.5, 0.6, 0.7):
        widget.strength.value = s
    widget.falloff.value = 1.5
    qtbot.waitUntil(lambda: "S=0.70, F=1.50" in decon.name, timeout=60000)
    assert len(runs) == 1 and runs[0] == pytest.approx((0.7, 1.5))
    assert _role(viewer_model, "deconvolved") == [decon]  # replaced in place, not piled up
    assert not np.allclose(decon.data, first)

    # unchecking hides it
    widget.show_deconvolved.value = False
    assert not decon.visible


def test_ctf_widget_fits_a_movie_layer(qtbot, viewer_model, frames):
    """A (frames, y, x) movie: fitted from its frames; overlay and deconvolved frame sum match its y/x extent."""
    from napari_warp._widgets.ctf import CTFWidget

    movie = _add(viewer_model, frames, name="movie", metadata={"voltage": 300.0})
    assert movie.ndim == 3
    widget = CTFWidget(viewer_model)
    widget.source.value = movie
    widget.grid.value = "3x3"
    fit = _fit(qtbot, widget)
    assert fit.defocus == pytest.approx(DEFOCUS, rel=0.01)
    assert fit.settings.grid == (3, 3)
    (overlay,) = _role(viewer_model, "defocus")
    assert overlay.ndim == 2
    np.testing.assert_allclose(_yx_extent(overlay), _yx_extent(movie), atol=1e-6)

    widget.show_deconvolved.value = True
    widget._debounce.stop()
    worker = widget.update_deconvolution()
    assert worker is not None
    # a request while one runs is queued, not started beside it; the latest values run when it finishes
    widget.strength.value = 0.4
    widget._debounce.stop()
    assert widget.update_deconvolution() is None and widget._deconv_pending
    with qtbot.waitSignal(worker.finished, timeout=60000):
        pass
    qtbot.waitUntil(lambda: any("S=0.40" in layer.name for layer in _role(viewer_model, "deconvolved")),
                    timeout=60000)
    qtbot.waitUntil(lambda: widget._deconv_worker is None, timeout=60000)
    (decon,) = _role(viewer_model, "deconvolved")
    assert decon.data.shape == frames.shape[1:]
    np.testing.assert_allclose(_yx_extent(decon), _yx_extent(movie), atol=1e-6)


def test_ctf_widget_saves_to_the_processing_folder(qtbot, viewer_model, frames, tmp_path):
    """With 'Save to folder' the fit is stored in the item's XML (Warp's layout) and reads back the same."""
    from napari_warp._widgets.ctf import CTFWidget
    from napari_warp.core.item import load_ctf

    movie_path = tmp_path / "sim.mrcs"
    _add(viewer_model, frames.sum(0), metadata={"path": str(movie_path)})
    widget = CTFWidget(viewer_model)
    widget.out.value = tmp_path / "processing"
    widget.grid.value = "1x1"  # a global defocus: the overlay is flat, its contrast range padded to 0.02 µm
    fit = _fit(qtbot, widget)
    assert "Saved to" in widget.status.value and "sim.xml" in widget.status.value
    loaded = load_ctf(tmp_path / "processing", movie_path)
    assert loaded is not None and loaded.defocus == pytest.approx(fit.defocus, abs=1.0)
    (overlay,) = _role(viewer_model, "defocus")
    lo, hi = overlay.contrast_limits
    assert hi - lo == pytest.approx(0.02, abs=1e-4)


def test_ctf_widget_cancel(qtbot, viewer_model, frames):
    from napari_warp._widgets.ctf import CTFWidget

    _add(viewer_model, frames.sum(0))
    widget = CTFWidget(viewer_model)
    worker = widget.run()
    widget.cancel()  # pressed at once: the fit stops at its next progress report
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    qtbot.waitUntil(lambda: "cancelled" in widget.status.value, timeout=5000)
    assert widget.last_fit is None and not _role(viewer_model, "defocus")
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_ctf_widget_reports_bad_settings(qtbot, viewer_model):
    """Invalid forms give a readable status line, never an exception or a worker."""
    from napari_warp._widgets.ctf import CTFWidget

    widget = CTFWidget(viewer_model)
    assert widget.run() is None and "No micrograph" in widget.status.value

    _add(viewer_model, np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
    widget.range_low.value, widget.range_high.value = 4.0, 10.0
    assert widget.run() is None
    assert "Fit range" in widget.status.value and "4 Å" in widget.status.value and "10 Å" in widget.status.value

    widget.range_low.value, widget.range_high.value = 20.0, 1.5  # beyond Nyquist at 1 Å/px
    assert widget.run() is None and "Nyquist (2 Å" in widget.status.value

    widget.range_high.value = 4.0
    widget.defocus_min.value, widget.defocus_max.value = 3.0, 1.0
    assert widget.run() is None and "µm" in widget.status.value

    widget.defocus_min.value = 0.5
    widget.grid.value = "five"
    assert widget.run() is None and "Defocus grid" in widget.status.value
    assert widget._worker is None and widget.run_button.enabled


def test_parse_ctf_grid():
    from napari_warp._widgets.ctf import parse_ctf_grid

    assert parse_ctf_grid("5x5") == (5, 5)
    assert parse_ctf_grid(" 4×2 ") == (2, 4)  # x×y -> (Gy, Gx)
    with pytest.raises(ValueError, match="x×y"):
        parse_ctf_grid("5")
    with pytest.raises(ValueError, match="1–32"):
        parse_ctf_grid("0x5")


class _Tilted:
    """A stand-in CTF fit: defocus rising along x over a (Y, X) = (800, 1200) px image."""

    shape = (800, 1200)
    defocus = 20000.0

    def defocus_map(self, shape):
        ys, xs = shape
        x = (np.arange(xs) + 0.5) * self.shape[1] / xs - 0.5
        return np.broadcast_to(19000.0 + 2000.0 * x / self.shape[1], (ys, xs)).astype(np.float32)


def test_defocus_layer_spans_the_displayed_image():
    """Coarser than the image (max_size), the overlay still covers exactly the micrograph's extent, in µm."""
    from napari.layers import Image

    from napari_warp._layers import defocus_layer, layer_pixel_size

    shown = Image(np.zeros((400, 600), np.float32), scale=(2.0, 2.0), translate=(10.0, -20.0))
    data, meta, kind = defocus_layer(_Tilted(), 2.0, (3, 400, 600), "m local defocus (µm)", translate=(10.0, -20.0),
                                     max_size=256)
    assert kind == "image" and data.shape == (256, 256)
    overlay = Image(data, **meta)
    np.testing.assert_allclose(_yx_extent(overlay), _yx_extent(shown), atol=1e-9)
    assert 1.9 < data.min() < data.max() < 2.1  # µm
    assert meta["contrast_limits"] == pytest.approx((data.min() - 0.01, data.max() + 0.01), abs=1e-6)
    assert meta["metadata"]["units"] == "µm" and meta["colormap"] == "turbo"
    assert layer_pixel_size(overlay) == pytest.approx(2.0 * 600 / 256)

    flat = _Tilted()
    flat.defocus_map = lambda shape: np.full(shape, 15000.0, np.float32)
    _, meta, _ = defocus_layer(flat, 1.0, (64, 64), "flat")
    lo, hi = meta["contrast_limits"]
    assert hi - lo == pytest.approx(0.02)  # never a zero-width range
