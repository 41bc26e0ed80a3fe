"""Session overview dock: per-item CTF and motion metrics over acquisition order with histograms, quality-filter
sliders that write the session's settings file, and a click on a point opens that item in the viewer."""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
import dataclasses
import math
from pathlib import Path

import numpy as np
from magicgui.widgets import Container, FileEdit, Label, PushButton
from qtpy.QtCore import QTimer

from ._common import theme_colors
from .ctf import _policy, _scroll_area, _selectable
from .session import _DOCKS, guarded, open_item, refresh_records, same_viewer

REFRESH_MS = 2000
SAVE_DEBOUNCE_MS = 400
ROW_PX = 150  # height of one metric's plot row

# (record metric key, axis label with unit)
METRICS = (
    ("defocus", "Defocus (µm)"),
    ("astigmatism", "Astigmatism (Å)"),
    ("phase_shift", "Phase shift (°)"),
    ("fit_resolution", "Fit resolution (Å)"),
    ("motion", "Motion (Å)"),
    ("particles", "Particles (BoxNet)"),
)
POINT_COLOURS = {"pass": "#43a047", "filtered": "#fb8c00", "deselected": "#9e9e9e"}


def _nice_ceil(x: float) -> float:
    """A round number ≥ x (1, 2, 2.5, 5 × 10^n) for slider ranges."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    p = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= x - 1e-12:
            return float(m * p)
    return float(10 * p)


def point_class(rec: dict) -> str | None:
    """'pass', 'filtered' or 'deselected' for a plotted item; None for items without metrics to plot."""
    return {"processed": "pass", "filtered": "filtered", "deselected": "deselected"}.get(rec["status"])


class OverviewWidget(Container):
    """Dock: the session's defocus, astigmatism, phase shift, fit resolution and motion per item over acquisition
    order with histograms; sliders set the quality filters (saved to the settings file, so the session, the
    micrograph list and ``napari-warp status`` see them); clicking a point opens that item."""

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        self._viewer = viewer
        self._figure = None
        self._canvas = None
        self._worker = None
        self._signature = None
        self._session_dock = None
        self.settings = None
        self.records: list = []
        self.plotted: dict = {}  # metric -> {"order", "values", "index", "classes"} as drawn
        self.scatters: dict = {}  # metric -> the matplotlib PathCollection of its points

        self.folder_edit = FileEdit(label="Processing folder", mode="d", nullable=True)
        self.refresh_button = PushButton(text="Refresh")
        self.counts = Label(value="No session: choose its processing folder (or open the session dock).")
        self.filters_label = Label(value="")
        self._plots = Container(widgets=[], labels=False)
        self._sliders = Container(widgets=[], labels=False)
        self._body = Container(widgets=[
            self.folder_edit, self.refresh_button, self.counts, self._plots,
            Label(value="<b>Quality filters</b> (saved to the session's settings file)"), self._sliders,
            self.filters_label,
        ], labels=False)
        super().__init__(widgets=[], labels=False)
        self._scroll = _scroll_area(self._body.native)
        self.native.layout().addWidget(self._scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)
        self.native.setSizePolicy(_policy("Preferred"), _policy("Expanding"))
        for w in (self.counts, self.filters_label):
            w.native.setWordWrap(True)
            w.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
        self.counts.native.setTextInteractionFlags(_selectable())
        self._build_sliders()

        self.folder_edit.changed.connect(lambda *_: self.refresh(wait=True, force=True))
        self.refresh_button.changed.connect(lambda *_: self.refresh(wait=True, force=True))
        self._timer = QTimer(self.native)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(lambda: self.refresh(wait=False))
        self._timer.start()
        self._save_timer = QTimer(self.native)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(SAVE_DEBOUNCE_MS)
        self._save_timer.timeout.connect(self.apply_filters)
        _DOCKS.add(self)
        from .session import SessionWidget

        for dock in list(_DOCKS):
            if isinstance(dock, SessionWidget) and same_viewer(dock._viewer, viewer):
                self.link(dock)

    # -- the folder ----------------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path | None:
        v = self.folder_edit.value
        return Path(v) if v else None

    def link(self, session_dock) -> None:
        """Follow a session dock: its folder, and a refresh whenever its list changes."""
        if self._session_dock is session_dock:
            return
        self._session_dock = session_dock
        session_dock.folder_changed.connect(self._follow)
        session_dock.records_changed.connect(lambda *_: self.refresh(wait=False))
        if session_dock.folder is not None and not self.folder_edit.value:
            self._follow(session_dock.folder)

    @guarded
    def _follow(self, folder):
        if folder is not None and Path(folder).is_dir():
            self.folder_edit.value = folder

    # -- data ----------------------------------------------------------------------------------------------------
    @guarded
    def refresh(self, wait: bool = True, force: bool = False):
        """Re-read the records from the files and redraw if anything changed (``wait=False``: in a worker)."""
        return refresh_records(self, "_worker", lambda s, r: self._show(s, r, force=force), wait)

    def _show(self, settings, records, force: bool = False):
        sig = (settings.filters, self._is_wide(), tuple((r["name"], r["status"],
                                                          tuple(sorted((r["metrics"] or {}).items())))
                                                         for r in records))
        self.settings = settings
        self.records = records
        if sig == self._signature and not force:
            return
        self._signature = sig
        self._update_sliders()
        self._update_counts()
        try:
            self._draw()
        except (ValueError, RuntimeError, TypeError) as exc:  # a plotting problem must not hide the counts
            self.counts.value += f"<br>Could not draw the plots: {type(exc).__name__}: {exc}"

    def _update_counts(self):
        n = {}
        for r in self.records:
            n[r["status"]] = n.get(r["status"], 0) + 1
        text = (f"<b>{n.get('processed', 0)} pass</b> / {n.get('filtered', 0)} filtered / "
                f"{n.get('failed', 0)} failed")
        extra = [f"{n[s]} {s}" for s in ("deselected", "unprocessed", "outdated", "processing") if n.get(s)]
        self.counts.value = text + (" · " + ", ".join(extra) if extra else "") + f" · {len(self.records)} items"
        self.count_numbers = {s: n.get(s, 0) for s in ("processed", "filtered", "failed", "deselected")}

    def metric_values(self, key: str):
        """(order (1-based acquisition index), values, record index, class) of the items that have ``key``."""
        order, values, index, classes = [], [], [], []
        for i, r in enumerate(self.records):
            cls = point_class(r)
            v = (r.get("metrics") or {}).get(key)
            if cls is None or v is None or not math.isfinite(v):
                continue
            order.append(i + 1)
            values.append(float(v))
            index.append(i)
            classes.append(cls)
        return np.array(order, int), np.array(values, float), np.array(index, int), classes

    def shown_metrics(self) -> list:
        """The metrics plotted: phase shift only when some item has a non-zero one, particles when picked."""
        out = []
        for key, label in METRICS:
            if key in ("phase_shift", "particles"):
                _, v, _, _ = self.metric_values(key)
                if not (np.any(np.abs(v) > 1e-6) if key == "phase_shift" else len(v)):
                    continue
            out.append((key, label))
        return out

    # -- plots ---------------------------------------------------------------------------------------------------
    def _colors(self) -> dict:
        return theme_colors(self._viewer)

    def _is_wide(self) -> bool:
        """Docked wide (e.g. at the bottom of the window): one row of plots along the acquisition order."""
        return self.native.width() > 1100

    def _draw(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        c = self._colors()
        metrics = self.shown_metrics()
        wide = self._is_wide() and len(metrics) > 1
        rows = 1 if wide else max(len(metrics), 1)
        cols = len(metrics) if wide else 1
        if self._figure is None:
            self._figure = Figure(figsize=(4.0, rows * ROW_PX / 100), dpi=100, layout="constrained")
            self._canvas = FigureCanvasQTAgg(self._figure)
            self._canvas.setMinimumWidth(280)
            self._canvas.setSizePolicy(_policy("Expanding"), _policy("Fixed"))
            self._canvas.mpl_connect("pick_event", self._on_pick)
            self._plots.native.layout().addWidget(self._canvas)
        self._canvas.setFixedHeight(rows * ROW_PX + 20)
        fig = self._figure
        fig.clear()
        fig.set_facecolor(c["bg"])
        text = c["text"]
        self.plotted, self.scatters = {}, {}
        if not metrics or not self.records:
            ax = fig.add_subplot(111)
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no processed items yet", ha="center", va="center", color=text)
            self._canvas.draw_idle()
            return
        gs = fig.add_gridspec(rows, 2 * cols, width_ratios=[3.2, 1.0] * cols)
        f = self.settings.filters if self.settings is not None else None
        n_items = len(self.records)
        for i, (key, label) in enumerate(metrics):
            row, col = (0, i) if wide else (i, 0)
            order, values, index, classes = self.metric_values(key)
            ax = fig.add_subplot(gs[row, 2 * col])
            hx = fig.add_subplot(gs[row, 2 * col + 1], sharey=ax)
            for a in (ax, hx):
                a.set_facecolor(c["axes"])
                a.tick_params(colors=text, labelsize=7, length=3)
                for s in a.spines.values():
                    s.set_color(text)
            ax.set_ylabel(label, color=text, fontsize=7.5)
            hx.tick_params(labelleft=False)
            colours = [POINT_COLOURS[k] for k in classes]
            sc = ax.scatter(order, values, c=colours if colours else None, s=16, picker=True, pickradius=5,
                            edgecolors="none", zorder=3)
            sc.set_gid(key)
            self.scatters[key] = sc
            self.plotted[key] = {"order": order, "values": values, "index": index, "classes": classes}
            if len(values) > 1:
                ax.plot(order, values, color=text, lw=0.4, alpha=0.4, zorder=2)
            failed = [i + 1 for i, r in enumerate(self.records) if r["status"] == "failed"]
            if failed:  # failed items have no metrics: a red × at the bottom of their place in the order
                ax.scatter(failed, [0.04] * len(failed), marker="x", s=18, color="#e53935",
                           transform=ax.get_xaxis_transform(), zorder=3, clip_on=False)
            ax.set_xlim(0.5, max(n_items, 2) + 0.5)
            if len(values):
                lo, hi = float(values.min()), float(values.max())
                pad = max((hi - lo) * 0.15, abs(hi) * 0.02, 1e-3)
                bins = np.linspace(lo - pad, hi + pad, min(20, max(5, len(values))) + 1)
                groups = [values[[k == cls for k in classes]] for cls in ("pass", "filtered", "deselected")]
                hx.hist(groups, bins=bins, orientation="horizontal", stacked=True,
                        color=[POINT_COLOURS["pass"], POINT_COLOURS["filtered"], POINT_COLOURS["deselected"]])
                ax.set_ylim(lo - pad, hi + pad)
            for y in self._thresholds(key, f):
                ax.axhline(y, color=c["accent"], lw=1.0, ls="--", zorder=1)
                hx.axhline(y, color=c["accent"], lw=1.0, ls="--", zorder=1)
            if wide or row == rows - 1:
                ax.set_xlabel("Acquisition order (item #; red × = failed)" if failed else "Acquisition order (item #)",
                              color=text, fontsize=7.5)
                hx.set_xlabel("Items", color=text, fontsize=7.5)
            else:
                ax.tick_params(labelbottom=False)
            ax.xaxis.get_major_locator().set_params(integer=True)
            hx.xaxis.get_major_locator().set_params(integer=True)
        self._canvas.draw_idle()

    def _thresholds(self, key: str, f) -> list:
        """Filter bounds drawn as dashed lines on a metric's plot (value units)."""
        if f is None:
            return []
        if key == "defocus" and f.defocus_min < f.defocus_max:
            return [v for v in (f.defocus_min, f.defocus_max) if v > 0]
        if key == "phase_shift" and f.phase_min < f.phase_max:
            return [f.phase_min, f.phase_max]
        if key == "fit_resolution" and f.resolution_max > 0:
            return [f.resolution_max]
        if key == "motion" and f.motion_max > 0:
            return [f.motion_max]
        if key == "particles" and f.particles_min > 0:
            return [float(f.particles_min)]
        if key == "astigmatism" and f.astigmatism_sigma > 0:
            _, v, _, classes = self.metric_values(key)
            if len(v) >= 3:
                return [float(np.mean(v) + f.astigmatism_sigma * np.std(v))]
        return []

    def _on_pick(self, event):
        key = event.artist.get_gid()
        if key not in self.plotted or not len(event.ind):
            return None
        i = int(self.plotted[key]["index"][int(event.ind[0])])
        return self.open_record(self.records[i])

    def open_record(self, record: dict):
        """Open an item in the viewer (as the session dock does) and select it in a linked session dock."""
        if self._session_dock is not None:
            try:
                self._session_dock.select(record["name"])
            except RuntimeError:  # the session dock was closed
                self._session_dock = None
        name = record["name"]

        @guarded
        def done(added):
            self.filters_label.value = f"Opened {name}."

        @guarded
        def failed(exc):
            self.filters_label.value = f"Could not open {name}: {exc}"

        return open_item(self._viewer, self.folder, record["path"], done, failed)

    # -- filters -------------------------------------------------------------------------------------------------
    def _build_sliders(self):
        from qtpy.QtCore import Qt
        from superqt import QLabeledDoubleRangeSlider, QLabeledDoubleSlider

        def make(kind, label, decimals):
            s = kind(Qt.Orientation.Horizontal)
            s.setDecimals(decimals)
            s.valueChanged.connect(self._filters_edited)
            row = Container(widgets=[Label(value=label)], labels=False)
            row.native.layout().addWidget(s)
            row.native.layout().setSpacing(0)
            self._sliders.append(row)
            return s, row

        self.defocus_slider, _ = make(QLabeledDoubleRangeSlider, "Keep defocus (µm)", 2)
        self.phase_slider, self._phase_row = make(QLabeledDoubleRangeSlider, "Keep phase shift (°)", 0)
        self.astigmatism_slider, _ = make(QLabeledDoubleSlider, "Max astigmatism (σ above mean; 0 = off)", 1)
        self.resolution_slider, _ = make(QLabeledDoubleSlider, "Worst fit resolution (Å; at the right end = off)", 1)
        self.motion_slider, _ = make(QLabeledDoubleSlider, "Max motion (Å; at the right end = off)", 1)
        self._updating = False
        self._set_slider(self.defocus_slider, (0.0, 10.0), (0.0, 10.0))
        self._set_slider(self.phase_slider, (0.0, 180.0), (0.0, 180.0))
        self._set_slider(self.astigmatism_slider, (0.0, 5.0), 0.0)
        self._set_slider(self.resolution_slider, (0.0, 20.0), 20.0)
        self._set_slider(self.motion_slider, (0.0, 10.0), 10.0)

    def _set_slider(self, slider, rng, value):
        self._updating = True
        try:
            slider.setRange(*rng)
            slider.setValue(value)
        finally:
            self._updating = False

    def _update_sliders(self):
        """Slider ranges from the data (and the current filters); handles at the filters (or at 'off')."""
        f = self.settings.filters
        top = {}
        for key in ("defocus", "phase_shift", "fit_resolution", "motion"):
            _, v, _, _ = self.metric_values(key)
            top[key] = float(v.max()) if len(v) else 0.0
        d_hi = _nice_ceil(max(top["defocus"] * 1.25, f.defocus_max, 1.0))
        self._set_slider(self.defocus_slider, (0.0, d_hi),
                         (f.defocus_min, min(f.defocus_max, d_hi)) if f.defocus_min < f.defocus_max else (0.0, d_hi))
        p_hi = _nice_ceil(max(top["phase_shift"] * 1.25, f.phase_max, 180.0))
        self._set_slider(self.phase_slider, (0.0, p_hi),
                         (f.phase_min, f.phase_max) if f.phase_min < f.phase_max else (0.0, p_hi))
        self._phase_row.visible = any(k == "phase_shift" for k, _ in self.shown_metrics())
        self._set_slider(self.astigmatism_slider, (0.0, 5.0), min(f.astigmatism_sigma, 5.0))
        r_hi = _nice_ceil(max(top["fit_resolution"] * 1.5, f.resolution_max, 5.0))
        self._set_slider(self.resolution_slider, (0.0, r_hi), f.resolution_max if f.resolution_max > 0 else r_hi)
        m_hi = _nice_ceil(max(top["motion"] * 1.5, f.motion_max, 2.0))
        self._set_slider(self.motion_slider, (0.0, m_hi), f.motion_max if f.motion_max > 0 else m_hi)
        self.filters_label.value = self.describe_filters(f)

    def _filters_edited(self, *_):
        if not self._updating:
            self._save_timer.start()

    def filters_from_sliders(self):
        """QualityFilters from the sliders (a handle at the end of its range switches that bound off)."""
        from ..core.session import QualityFilters

        def at_end(slider, v, end):
            return abs(v - end) <= 1e-6 * max(1.0, abs(end))

        lo, hi = self.defocus_slider.value()
        d_top = self.defocus_slider.maximum()
        dmin, dmax = (0.0, 0.0) if (lo <= 1e-9 and at_end(None, hi, d_top)) else (lo, hi)
        plo, phi = self.phase_slider.value()
        p_top = self.phase_slider.maximum()
        pmin, pmax = (0.0, 0.0) if (plo <= 1e-9 and at_end(None, phi, p_top)) else (plo, phi)
        r = self.resolution_slider.value()
        m = self.motion_slider.value()
        base = self.settings.filters if self.settings is not None else QualityFilters()
        return dataclasses.replace(
            base, defocus_min=float(dmin), defocus_max=float(dmax), phase_min=float(pmin), phase_max=float(pmax),
            astigmatism_sigma=float(self.astigmatism_slider.value()),
            resolution_max=0.0 if at_end(None, r, self.resolution_slider.maximum()) else float(r),
            motion_max=0.0 if at_end(None, m, self.motion_slider.maximum()) else float(m),
        )

    @guarded
    def apply_filters(self, *_):
        """Write the sliders' filters into the folder's settings file and redraw (statuses follow)."""
        from ..core.session import SessionSettings, load_settings, save_settings

        self._save_timer.stop()
        folder = self.folder
        if folder is None or not folder.is_dir():
            return None
        filters = self.filters_from_sliders()
        settings = load_settings(folder) or self.settings or SessionSettings(input=str(folder))
        if settings.filters != filters:
            save_settings(folder, dataclasses.replace(settings, filters=filters))
        self.refresh(wait=True, force=True)
        if self._session_dock is not None:
            try:
                self._session_dock.refresh(wait=True)
            except RuntimeError:
                self._session_dock = None
        return filters

    @staticmethod
    def describe_filters(f) -> str:
        parts = []
        parts.append(f"defocus {f.defocus_min:g}–{f.defocus_max:g} µm" if f.defocus_min < f.defocus_max
                     else "defocus: any")
        if f.phase_min < f.phase_max:
            parts.append(f"phase shift {f.phase_min:g}–{f.phase_max:g}°")
        parts.append(f"astigmatism ≤ mean + {f.astigmatism_sigma:g} σ" if f.astigmatism_sigma > 0
                     else "astigmatism: any")
        parts.append(f"fit resolution ≤ {f.resolution_max:g} Å" if f.resolution_max > 0 else "fit resolution: any")
        parts.append(f"motion ≤ {f.motion_max:g} Å" if f.motion_max > 0 else "motion: any")
        if f.particles_min > 0:
            parts.append(f"particles ≥ {f.particles_min}")
        return "Filters: " + " · ".join(parts) + "."
