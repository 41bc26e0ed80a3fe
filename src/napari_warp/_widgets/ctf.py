"""CTF dock: fit the local-defocus CTF model of a micrograph or movie, inspect the fit, and deconvolve it live."""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
import math

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer

from ._common import ProgressRun, refresh_source, theme_colors

_ROLE = "napari_warp_role"
_OURS = ("defocus", "deconvolved")
DEBOUNCE_MS = 250
DOCK_WIDTH = 420  # px: the inspector's plots are drawn for about this width


def parse_ctf_grid(text: str) -> tuple[int, int]:
    """'5x5' (x×y control points) -> CTFSettings.grid ``(Gy, Gx)``; '1x1' is a global defocus."""
    t = text.strip().lower().replace("×", "x").replace("*", "x")
    try:
        gx, gy = (int(v) for v in t.split("x"))
    except ValueError:
        raise ValueError(f"Defocus grid {text!r}: expected x×y control points, e.g. 5x5 (1x1 = global)") from None
    if not (1 <= gx <= 32 and 1 <= gy <= 32):
        raise ValueError(f"Defocus grid {text!r}: each side must be 1–32 control points")
    return (gy, gx)


class CTFWidget(ProgressRun, Container):
    """Dock: CTF estimation with a local (spatially resolved) defocus model, a fit inspector, a defocus overlay
    (µm) on the micrograph, and Warp's Wiener-like deconvolution with live Strength/Fall-off sliders."""

    cancelled_message = "CTF fit cancelled"

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        self._viewer = viewer
        self._worker = None
        self.last_fit = None
        self._fit_source = None  # the layer the last fit came from
        self._fit_ps = None  # Å/px of that layer's data
        self._deconv_worker = None
        self._deconv_pending = False
        self._sum_cache: tuple = (None, None)  # (id of layer data, frame sum) for movie sources
        self._canvas = None
        self._figure = None

        self.source = ComboBox(label="Micrograph or movie", choices=self._image_layers, nullable=True)
        self.pixel_size = FloatSpinBox(label="Pixel size (Å)", value=1.0, min=0.01, max=100.0, step=0.001)
        self.voltage = FloatSpinBox(label="Voltage (kV)", value=300.0, min=20.0, max=1000.0, step=10.0)
        self.cs = FloatSpinBox(label="Cs (mm)", value=2.7, min=0.0, max=10.0, step=0.1)
        self.amplitude = FloatSpinBox(label="Amplitude contrast (fraction)", value=0.07, min=0.0, max=0.5,
                                      step=0.01)
        self.window = SpinBox(label="Window (px)", value=512, min=64, max=2048, step=64)
        self.range_low = FloatSpinBox(label="Fit range from (Å)", value=20.0, min=1.0, max=1000.0, step=0.5)
        self.range_high = FloatSpinBox(label="Fit range to (Å)", value=10.0 / 3, min=0.2, max=500.0, step=0.1)
        self.defocus_min = FloatSpinBox(label="Defocus search min (µm)", value=0.3, min=0.0, max=20.0, step=0.1)
        self.defocus_max = FloatSpinBox(label="Defocus search max (µm)", value=5.0, min=0.0, max=20.0, step=0.1)
        self.grid = LineEdit(label="Defocus grid (x×y)", value="5x5")
        self.fit_phase = CheckBox(label="Fit phase shift (phase plate)", value=False)
        self.out = FileEdit(label="Save to folder", mode="d", nullable=True)
        self.run_button = PushButton(text="Fit CTF")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1000, visible=False)
        self.status = Label(value="Select a micrograph or movie layer.")
        self.results = Label(value="", visible=False)
        self.strength = FloatSlider(label="Deconvolution strength S", value=1.0, min=0.0, max=2.0, step=0.05)
        self.falloff = FloatSlider(label="Deconvolution fall-off F", value=1.0, min=0.0, max=2.0, step=0.05)
        self.show_deconvolved = CheckBox(label="Show deconvolved", value=False)
        self.inspector = Container(widgets=[self.results], labels=False, visible=False)
        self._body = Container(
            widgets=[
                self.source, self.pixel_size, self.voltage, self.cs, self.amplitude, self.window, self.range_low,
                self.range_high, self.defocus_min, self.defocus_max, self.grid, self.fit_phase, self.out,
                self.run_button, self.cancel_button, self.progress, self.status, self.inspector,
                self.show_deconvolved, self.strength, self.falloff,
            ],
        )
        # napari docks ``self.native`` (a magicgui scrollable Container's inner widget, without its scroll area),
        # so the scroll area is built here: the inspector makes the dock taller than a laptop screen.
        super().__init__(widgets=[], labels=False)
        self._scroll = _scroll_area(self._body.native)
        self.native.layout().addWidget(self._scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)
        self.native.setSizePolicy(_policy("Preferred"), _policy("Expanding"))  # napari adds no stretch below
        for w in (self.status, self.results):
            w.native.setWordWrap(True)
            w.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
        self.status.native.setTextInteractionFlags(_selectable())

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.source.changed.connect(self._from_layer)
        self._init_progress()
        self._debounce = QTimer()
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self.update_deconvolution)
        for w in (self.strength, self.falloff, self.show_deconvolved):
            w.changed.connect(self._schedule_deconvolution)
        for ev in ("inserted", "removed", "renamed"):
            getattr(viewer.layers.events, ev).connect(self._layers_changed)
        self._layers_changed()

    # -- source --------------------------------------------------------------------------------------------------
    def _image_layers(self, *_):
        from napari.layers import Image

        out = []
        for layer in self._viewer.layers:
            if not isinstance(layer, Image) or layer.rgb or layer.ndim not in (2, 3):
                continue
            if (layer.metadata or {}).get(_ROLE) in _OURS:
                continue
            out.append((layer.name, layer))
        return out

    def reset_choices(self, *_):
        """Called by napari on layer changes: refresh the source list (the form lives in ``self._body``)."""
        self._layers_changed()

    def _layers_changed(self, *_):
        if refresh_source(self.source, [lay for _, lay in self._image_layers()], self._viewer):
            self._from_layer()

    def _from_layer(self, *_):
        """Fill pixel size (Å) and voltage (kV) from the chosen layer; the fit range follows the pixel size."""
        from .._layers import layer_pixel_size

        layer = self.source.value
        if layer is None:
            return
        meta = layer.metadata or {}
        ps = layer_pixel_size(layer)
        if ps and abs(ps - self.pixel_size.value) > 1e-6:
            self.pixel_size.value = ps
            # Warp's default fit range, 0.1–0.6 of Nyquist, in Å of this sampling
            self.range_low.value = round(2 * ps / 0.10, 2)
            self.range_high.value = round(2 * ps / 0.60, 2)
        if meta.get("voltage"):
            self.voltage.value = float(meta["voltage"])
        kind = "movie" if layer.ndim == 3 else "micrograph"
        shape = "×".join(str(s) for s in layer.data.shape)
        where = f"{ps:.4g} Å/px" if ps else "pixel size unknown: enter it"
        self.status.value = f"{layer.name}: {kind} {shape} px, {where}."

    # -- settings ------------------------------------------------------------------------------------------------
    def settings(self):
        """CTFSettings from the form; raises ValueError with a message fit for the status line."""
        from ..core.ctf_fit import CTFSettings

        ps = float(self.pixel_size.value)
        try:
            return CTFSettings.from_user_units(
                ps, fit_range=(self.range_low.value, self.range_high.value),
                defocus_range=(self.defocus_min.value, self.defocus_max.value),
                voltage=float(self.voltage.value), cs=float(self.cs.value), amplitude=float(self.amplitude.value),
                window=int(self.window.value), fit_phase=bool(self.fit_phase.value),
                grid=parse_ctf_grid(self.grid.value),
            )
        except ValueError as exc:  # the status line starts a sentence
            msg = str(exc)
            raise ValueError(msg[:1].upper() + msg[1:] + ".") from None

    # -- fit -----------------------------------------------------------------------------------------------------
    def run(self, *_):
        """Start the CTF fit of the chosen layer in a worker thread; returns the worker (None if the form is invalid)."""
        layer = self.source.value
        if layer is None:
            self.status.value = "No micrograph or movie layer to fit: open one first."
            return None
        try:
            settings = self.settings()
        except ValueError as exc:
            self.status.value = str(exc)
            return None
        if min(layer.data.shape[-2:]) < 64:
            self.status.value = f"{layer.name}: {layer.data.shape[-2:]} px is too small for a CTF fit (≥ 64 px)."
            return None
        frames = layer.data[0] if layer.multiscale else layer.data  # (F, Y, X) or (Y, X); may be lazy
        out = self.out.value
        movie_path = (layer.metadata or {}).get("path") or layer.name
        self._start_run(f"Fitting the CTF of {layer.name} …")

        @thread_worker
        def work():
            if out:
                from ..core.item import run_ctf_step

                return run_ctf_step(frames, settings, out, movie_path, progress=self._report)
            from ..core.ctf_fit import fit_ctf

            return {"fit": fit_ctf(frames, settings, progress=self._report)}

        def done(result):
            self.show_result(result["fit"], layer, result.get("xml"))

        def failed(exc):
            from ..core.errors import Cancelled

            if isinstance(exc, Cancelled):
                self.status.value = "CTF fit cancelled."
            else:
                self.status.value = f"CTF fit failed: {type(exc).__name__}: {exc}"

        def finished():
            self._run_finished()

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": finished})
        return self._worker

    def show_result(self, fit, layer, xml=None):
        """Show a CTF fit of ``layer``'s data (fitted here, or loaded from an item): overlay, inspector, status."""
        self.last_fit = fit
        self._fit_source = layer
        from .._layers import layer_pixel_size

        # the Å/px of the layer's data (a display-binned average differs from the fitted sampling)
        self._fit_ps = layer_pixel_size(layer) or fit.settings.pixel_size
        self._sum_cache = (None, None)
        if layer in self._viewer.layers:
            self._add_overlay(fit, layer)
        self._show_fit(fit)
        saved = f" Saved to {xml}." if xml else ""
        self.status.value = (
            f"{layer.name}: defocus {fit.defocus / 1e4:.3f} µm, astigmatism {fit.astigmatism:.0f} Å, "
            f"fit to {fit.fit_resolution:.2f} Å.{saved}"
        )
        if self.show_deconvolved.value:
            self.update_deconvolution()

    # -- results -------------------------------------------------------------------------------------------------
    def _add_overlay(self, fit, layer):
        """Add (or replace in place) the local-defocus overlay (µm) aligned with the source layer in world space."""
        from .._layers import defocus_layer

        name = f"{layer.name} local defocus (µm)"
        data, meta, _ = defocus_layer(
            fit, (float(layer.scale[-2]), float(layer.scale[-1])), layer.data.shape[-2:], name,
            translate=tuple(layer.translate[-2:]), metadata={"source": layer.name, "source_id": str(layer.unique_id)},
        )
        meta["units"] = tuple(layer.units[-2:])
        old = self._ours("defocus", layer)
        if old is not None:
            old.data = data
            for key in ("scale", "translate", "contrast_limits", "name", "metadata"):
                setattr(old, key, meta[key])
            return
        self._viewer.add_image(data, **meta)

    def _ours(self, role: str, source):
        """Our overlay (``"defocus"``) or deconvolved layer of ``source`` (default: the fitted layer), or None."""
        source = self._fit_source if source is None else source
        if source is None:
            return None
        for layer in self._viewer.layers:
            meta = layer.metadata or {}
            if meta.get(_ROLE) == role and meta.get("source_id") == str(source.unique_id):
                return layer
        return None

    def _show_fit(self, fit):
        overlay = self._ours("defocus", None)
        self.results.value = self._results_table(fit, overlay.contrast_limits if overlay is not None else None)
        self.results.visible = True
        self.inspector.visible = True
        try:
            self._draw(fit)
        except (ValueError, RuntimeError, TypeError) as exc:  # a plotting problem must not hide the fit
            self.status.value = f"Could not draw the spectra: {type(exc).__name__}: {exc}"

    @staticmethod
    def _results_table(fit, overlay_limits=None) -> str:
        gy, gx = fit.plane
        tilt = math.degrees(math.atan(math.hypot(gy, gx)))
        dmap = fit.defocus_map((32, 32)) / 1e4
        rows = [
            ("Defocus", f"{fit.defocus / 1e4:.3f} µm"),
            ("Defocus u / v", f"{fit.defocus_u / 1e4:.3f} / {fit.defocus_v / 1e4:.3f} µm"),
            ("Astigmatism", f"{fit.astigmatism:.0f} Å at {fit.angle:.1f}°"),
        ]
        if fit.settings.fit_phase:
            rows.append(("Phase shift", f"{fit.phase_shift:.1f}°"))
        rows += [
            ("Fit resolution", f"{fit.fit_resolution:.2f} Å"),
            ("Local defocus", f"{dmap.min():.3f}–{dmap.max():.3f} µm"),
            ("Specimen tilt", f"{tilt:.2f}° (local model)"),
            ("Score", f"{fit.score:.3f} (correlation)"),
        ]
        if overlay_limits is not None:
            lo, hi = overlay_limits
            rows.append(("Overlay colours", f"blue {lo:.3f} → red {hi:.3f} µm"))
        cells = "".join(f"<tr><td>{k}</td><td style='padding-left:10px'><b>{v}</b></td></tr>" for k, v in rows)
        return f"<table>{cells}</table>"

    def _colors(self) -> dict:
        return theme_colors(self._viewer)

    def _draw(self, fit):
        """Inspector: Warp's 2D spectrum (data | fit), raw spectrum with background, rescaled spectrum with fit."""
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        from ..core.ctf_fit import ctf_display_image

        c = self._colors()
        if self._figure is None:
            self._figure = Figure(figsize=(4.0, 6.4), dpi=100, layout="constrained")
            self._canvas = FigureCanvasQTAgg(self._figure)
            # follows the dock's width (the figure is re-laid out on resize); never wider than the scroll viewport
            self._canvas.setMinimumWidth(280)
            self._canvas.setFixedHeight(640)
            self._canvas.setSizePolicy(_policy("Expanding"), _policy("Fixed"))
            self.inspector.native.layout().insertWidget(0, self._canvas)
        fig = self._figure
        fig.clear()
        fig.set_facecolor(c["bg"])
        gs = fig.add_gridspec(3, 1, height_ratios=[2.5, 1.45, 1.75])
        text = c["text"]

        def style(ax):
            ax.set_facecolor(c["axes"])
            ax.tick_params(colors=text, labelsize=7.5, length=3)
            for s in ax.spines.values():
                s.set_color(text)
            ax.xaxis.label.set_color(text)
            ax.yaxis.label.set_color(text)
            ax.xaxis.label.set_fontsize(8)
            ax.yaxis.label.set_fontsize(8)
            ax.title.set_color(text)
            ax.title.set_fontsize(8.5)

        # (a) 2D spectrum: data | fit
        ax = fig.add_subplot(gs[0])
        if fit.spectrum_2d is not None:
            shown = ctf_display_image(fit)
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
            ax.axvline(shown.shape[1] / 2 - 0.5, color=c["accent"], lw=0.8)
            ax.set_title("2D spectrum:  data  |  fit", pad=3)
        else:
            ax.text(0.5, 0.5, "no 2D spectrum stored", ha="center", va="center", color=text, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        style(ax)

        f = np.asarray(fit.frequencies, dtype=float)
        f0, f1 = fit.fit_range
        nyq = 0.5 / fit.settings.pixel_size
        x_lo = max(f[1] if len(f) > 1 else 0.0, 0.5 * f0)
        show = (f >= x_lo) & (f <= nyq)

        # (b) raw spectrum and background (log)
        ax = ax_raw = fig.add_subplot(gs[1])
        spec = np.clip(np.asarray(fit.spectrum, float), 1e-12, None)
        bg = np.clip(np.asarray(fit.background, float), 1e-12, None)
        ax.semilogy(f[show], spec[show], color="#9ecbff", lw=0.9, label="spectrum")
        ax.semilogy(f[show], bg[show], color="#ffb000", lw=1.1, ls="--", label="background")
        ax.axvspan(f0, f1, color=c["accent"], alpha=0.18, lw=0)
        ax.set_xlim(x_lo, nyq)
        ax.set_ylabel("power (a.u.)")
        ax.set_title("Rotational average", pad=3)
        leg = ax.legend(fontsize=7, loc="upper right", frameon=False, labelcolor=text)
        leg.set_zorder(5)
        style(ax)
        ax.tick_params(axis="x", labelbottom=False)

        # (c) rescaled spectrum with the simulated fit
        ax = fig.add_subplot(gs[2], sharex=ax)
        resc = np.asarray(fit.rescaled, float)
        sim = np.asarray(fit.simulated, float)
        ax.axvspan(f0, f1, color=c["accent"], alpha=0.18, lw=0, label="fit range")
        ax.plot(f[show], resc[show], color="#d8dde3", lw=0.8, label="rescaled data")
        ax.plot(f[show], sim[show], color="#ff7f50", lw=1.0, label="fit |CTF|·env")
        if np.isfinite(fit.fit_resolution) and fit.fit_resolution > 0:
            ax.axvline(1 / fit.fit_resolution, color="#7CFC00", lw=1.0, ls=":",
                       label=f"fit res. {fit.fit_resolution:.2f} Å")
        in_range = (f >= f0) & (f <= f1)
        vals = np.concatenate([resc[in_range], sim[in_range]]) if in_range.any() else resc[show]
        lo, hi = np.percentile(vals, [1, 99.5]) if vals.size else (0.0, 1.0)
        pad = 0.08 * max(hi - lo, 1e-12)
        ax.set_ylim(lo - pad, hi + 2.5 * pad)
        ax.set_xlim(x_lo, nyq)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("rescaled power − bg")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, labelcolor=text,
                  ncol=2, handlelength=1.4, columnspacing=1.0, borderaxespad=0.2)
        style(ax)
        # resolution (Å) ticks along the top of the spectra
        top = ax_raw.secondary_xaxis("top", functions=(_inverse, _inverse))
        ticks = [t for t in (100, 50, 20, 10, 6, 4, 3, 2.5, 2, 1.5, 1.2, 1) if x_lo <= 1 / t <= nyq]
        top.set_xticks(ticks)
        top.set_xticklabels([f"{t:g}" for t in ticks])
        top.set_xlabel("resolution (Å)")
        style(top)
        self._canvas.draw_idle()

    # -- deconvolution -------------------------------------------------------------------------------------------
    def _schedule_deconvolution(self, *_):
        if self.show_deconvolved.value:
            self._debounce.start()  # restarts: only the last change within DEBOUNCE_MS runs
        elif (old := self._ours("deconvolved", None)) is not None:
            old.visible = False

    def _movie_sum(self, layer) -> np.ndarray:
        """Frame sum ``(Y, X)`` of a movie layer, read a few frames at a time (worker thread); cached per data."""
        key = id(layer.data)
        if self._sum_cache[0] == key:
            return self._sum_cache[1]
        data = layer.data
        total = np.zeros(data.shape[-2:], dtype=np.float64)
        for f0 in range(0, data.shape[0], 8):
            total += np.asarray(data[f0 : f0 + 8], dtype=np.float32).sum(0)
        image = total.astype(np.float32)
        self._sum_cache = (key, image)
        return image

    def update_deconvolution(self, *_):
        """Deconvolve the fitted micrograph (a movie: its frame sum) with the current S and F in a worker.

        Returns the worker, or None when there is nothing to do or a deconvolution is already running (then the
        latest request runs as soon as it finishes).
        """
        fit, layer = self.last_fit, self._fit_source
        if not self.show_deconvolved.value:
            return None
        if fit is None or layer is None or layer not in self._viewer.layers:
            self.status.value = "Fit the CTF first: deconvolution uses the fitted (local) defocus."
            return None
        if self._deconv_worker is not None:
            self._deconv_pending = True
            return None
        strength, falloff = float(self.strength.value), float(self.falloff.value)
        ps = float(self._fit_ps)

        @thread_worker
        def work():
            from ..core.deconvolve import deconvolve

            if layer.ndim == 3:
                image = self._movie_sum(layer)
            else:
                image = np.asarray(layer.data[0] if layer.multiscale else layer.data, dtype=np.float32)
            map_shape = tuple(min(int(s), 512) for s in image.shape)  # smooth: resampled to the image in core
            return deconvolve(image, fit.ctf.with_(pixel_size=ps), strength=strength, falloff=falloff,
                              defocus_map=fit.defocus_map(map_shape))

        def done(image):
            self._add_deconvolved(image, layer, strength, falloff)

        def failed(exc):
            self.status.value = f"Deconvolution failed: {type(exc).__name__}: {exc}"

        def finished():
            self._deconv_worker = None
            if self._deconv_pending:
                self._deconv_pending = False
                self.update_deconvolution()

        self._deconv_worker = work(_connect={"returned": done, "errored": failed, "finished": finished})
        return self._deconv_worker

    def _add_deconvolved(self, image, layer, strength, falloff):
        from .._layers import contrast_limits, deconvolved_layer

        name = f"{layer.name} deconvolved (S={strength:.2f}, F={falloff:.2f})"
        data, meta, _ = deconvolved_layer(image, float(self._fit_ps), name, translate=tuple(layer.translate[-2:]),
                                          metadata={"source": layer.name, "source_id": str(layer.unique_id), "strength": strength,
                                                    "falloff": falloff})
        meta["scale"] = tuple(layer.scale[-2:])  # exactly the source's world sampling
        meta["units"] = tuple(layer.units[-2:])
        if layer not in self._viewer.layers:
            return
        old = self._ours("deconvolved", layer)
        if old is not None:
            old.data = data
            old.contrast_limits_range = contrast_limits(data, 0.0, 100.0)
            for key in ("scale", "translate", "contrast_limits", "name", "metadata"):
                setattr(old, key, meta[key])
            old.visible = True
            return
        from napari.layers import Image

        new = Image(data, **meta)
        # just above the source, so the defocus overlay stays on top
        self._viewer.layers.insert(self._viewer.layers.index(layer) + 1, new)


def _inverse(x):
    """1/x for the frequency (1/Å) <-> resolution (Å) axis; finite at 0."""
    x = np.asarray(x, dtype=float)
    return 1.0 / np.where(np.abs(x) < 1e-6, 1e-6, x)


def _selectable():
    from qtpy.QtCore import Qt

    return Qt.TextInteractionFlag.TextSelectableByMouse


def _policy(name: str):
    from qtpy.QtWidgets import QSizePolicy

    return getattr(QSizePolicy.Policy, name)


def _scroll_area(inner):
    """A vertical-only scroll area around ``inner``, as wide as ``inner`` needs and as tall as the dock allows."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    scroll.setWidget(inner)
    bar = scroll.verticalScrollBar().sizeHint().width()
    scroll.setMinimumWidth(max(DOCK_WIDTH, inner.minimumSizeHint().width() + bar + 4))
    scroll.setSizePolicy(_policy("Expanding"), _policy("Expanding"))
    return scroll
