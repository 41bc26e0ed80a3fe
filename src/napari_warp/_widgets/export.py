"""Particle export dock: extract the picks of a processed session from its movies (``core.session.export_session``)
into ``particles/<name>.mrcs`` and the session-wide RELION STAR files, with progress, cancel and a per-item summary."""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
from pathlib import Path

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import thread_worker
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from ._common import ProgressRun
from .ctf import _policy, _scroll_area, _selectable
from .session import _DOCKS, guarded, same_viewer

COLUMNS = ("Item", "Particles", "State")
ITEMS = {"all": "all processed items", "good": "good items (pass the filters, not excluded)"}


def _tip(widget, text: str):
    widget.tooltip = text
    return widget


class ExportWidget(ProgressRun, Container):
    """Dock: export a processed session's particles (box, output pixel size, normalisation, halves, phase flip) from
    the movies; only items whose export is outdated are extracted again. Follows the session dock's folder."""

    cancelled_message = "Export cancelled"

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        from ..core.particles import ExportSettings

        d = ExportSettings()
        self._viewer = viewer
        self._worker = None
        self._session_dock = None
        self.summary = None  # the last export_session / export_summary result shown

        self.folder_edit = _tip(FileEdit(label="Session folder", mode="d", nullable=True),
                                "The processing folder of a processed session (its napari-warp.settings.toml)")
        self.box_size = _tip(SpinBox(label="Box size (px)", value=d.box_size, min=4, max=4096, step=2),
                             "Box of the exported particles in output pixels (even, RELION's convention)")
        self.pixel_size = _tip(FloatSpinBox(label="Output pixel size (Å/px, 0 = micrograph's)", value=0.0, min=0.0,
                                            max=100.0, step=0.1),
                               "Particles are rescaled in Fourier space to this pixel size")
        self.pixel_size.native.setDecimals(4)
        self.diameter = _tip(FloatSpinBox(label="Particle diameter (Å, 0 = 75 % of the box)", value=0.0, min=0.0,
                                          max=10000.0, step=10.0),
                             "The background for normalisation lies outside this circle")
        self.invert = CheckBox(label="Invert contrast (protein white)", value=d.invert)
        self.normalize = CheckBox(label="Normalize (background mean 0, std 1)", value=d.normalize)
        self.halves = CheckBox(label="Odd/even halves (particles/odd, particles/even)", value=d.halves)
        self.phase_flip = CheckBox(label="Phase flip (each particle's local CTF)", value=d.phase_flip)
        self.which = _tip(ComboBox(label="Items", choices=[(t, k) for k, t in ITEMS.items()], value="all"),
                          "Which processed items to export; particles_good.star lists only good items either way")
        self.run_button = _tip(PushButton(text="Export"), "Save these settings to the session and export the items "
                               "whose export is outdated (in the background)")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1000, visible=False)
        self.status = Label(value="Choose a processed session folder (or open the session dock).")
        self.total = Label(value="")
        self.table = QTableWidget(0, len(COLUMNS))
        self._setup_table()

        box = Container(widgets=[], labels=False)
        box.native.layout().addWidget(self.table)
        self._body = Container(widgets=[
            self.folder_edit, self.box_size, self.pixel_size, self.diameter, self.invert, self.normalize,
            self.halves, self.phase_flip, self.which,
            Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False),
            self.progress, self.status, self.total, box,
        ])
        super().__init__(widgets=[], labels=False)
        for w in (self.status, self.total):
            w.native.setWordWrap(True)
            w.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
            w.native.setTextInteractionFlags(_selectable())
        self._scroll = _scroll_area(self._body.native)
        self.native.layout().addWidget(self._scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)
        self.native.setSizePolicy(_policy("Preferred"), _policy("Expanding"))

        self.folder_edit.changed.connect(self._folder_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self._init_progress()
        _DOCKS.add(self)
        from .session import SessionWidget

        for dock in list(_DOCKS):
            if isinstance(dock, SessionWidget) and same_viewer(dock._viewer, viewer):
                self.link(dock)

    def _setup_table(self) -> None:
        t = self.table
        t.setHorizontalHeaderLabels(COLUMNS)
        t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        t.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        t.verticalHeader().setVisible(False)
        t.verticalHeader().setDefaultSectionSize(22)
        header = t.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        t.setMinimumHeight(140)

    # -- the folder ----------------------------------------------------------------------------------------------
    @property
    def folder(self) -> "Path | None":
        v = self.folder_edit.value
        return Path(v) if v else None

    def link(self, session_dock) -> None:
        """Follow a session dock's processing folder."""
        if self._session_dock is session_dock:
            return
        self._session_dock = session_dock
        session_dock.folder_changed.connect(self._follow)
        if session_dock.folder is not None and not self.folder_edit.value:
            self._follow(session_dock.folder)

    @guarded
    def _follow(self, folder):
        if folder is not None and Path(folder).is_dir() and self._worker is None:
            self.folder_edit.value = folder

    def _session(self):
        """The folder's SessionSettings (input following the folder when it has no settings' input)."""
        from ..core.errors import NapariWarpError
        from ..core.session import load_settings

        folder = self.folder
        if folder is None or not folder.is_dir():
            raise NapariWarpError("Choose an existing session folder first.")
        settings = load_settings(folder)
        if settings is None:
            raise NapariWarpError(f"{folder}: no napari-warp.settings.toml here: not a processed session folder.")
        return settings

    def _folder_changed(self, *_):
        """Fill the form from the session's [export] settings and show its export as it stands."""
        from ..core.errors import NapariWarpError

        try:
            settings = self._session()
        except NapariWarpError as exc:
            self.status.value = str(exc)
            return
        self.load_form(settings.export)
        summary = self._current(settings)
        self.show_summary(summary)
        todo = sum(r["state"] in ("not exported", "outdated") for r in summary["items"])
        self.status.value = (f"{len(summary['items'])} processed item(s), {todo} to export: set the form and press "
                             "Export." if todo else f"{len(summary['items'])} processed item(s), all exported.")

    def _current(self, settings):
        from ..core.session import export_summary

        return export_summary(settings, self.folder, items=self.which.value, movies=self._movies(settings))

    def _movies(self, settings):
        from ..core.session import discover

        return discover(settings, self.folder) if Path(settings.input).is_dir() else []

    # -- the form ------------------------------------------------------------------------------------------------
    def load_form(self, e) -> None:
        """Fill the form from ``ExportSettings``."""
        self.box_size.value = e.box_size
        self.pixel_size.value = e.pixel_size or 0.0
        self.diameter.value = e.diameter or 0.0
        for name in ("invert", "normalize", "halves", "phase_flip"):
            getattr(self, name).value = getattr(e, name)

    def export_settings(self, base=None):
        """``ExportSettings`` from the form (the other fields from ``base``). Raises ValueError naming the field."""
        import dataclasses

        from ..core.particles import ExportSettings

        return dataclasses.replace(
            base or ExportSettings(), box_size=int(self.box_size.value),
            pixel_size=float(self.pixel_size.value) or None, diameter=float(self.diameter.value) or None,
            invert=bool(self.invert.value), normalize=bool(self.normalize.value), halves=bool(self.halves.value),
            phase_flip=bool(self.phase_flip.value))

    # -- export --------------------------------------------------------------------------------------------------
    def run(self, *_):
        """Save the form to the session's settings (export on) and export in a worker; returns the worker (None
        when the folder or form is not usable)."""
        import dataclasses

        from ..core.errors import NapariWarpError
        from ..core.session import export_session, save_settings

        if self._worker is not None:
            return self._worker
        try:
            session = self._session()
            settings = dataclasses.replace(session, extract=True, export=self.export_settings(session.export))
        except (ValueError, NapariWarpError) as exc:
            self.status.value = f"Cannot export: {exc}"
            return None
        folder, items = self.folder, self.which.value
        save_settings(folder, settings)  # the session dock and later processing runs export the same way
        movies = self._movies(settings)
        self._start_run(f"Exporting the particles of {ITEMS[items]} in {folder.name} …")

        @thread_worker
        def work():
            return export_session(settings, folder, items=items, movies=movies, progress=self._report)

        @guarded
        def done(summary):
            self.show_summary(summary)
            self.status.value = f"Exported {summary['exported']} item(s) in this run."

        @guarded
        def failed(exc):
            from ..core.errors import Cancelled

            if isinstance(exc, Cancelled):
                self.show_summary(self._current(settings))
                self.status.value = "Export cancelled; the particle lists show the items exported so far."
            else:
                self.status.value = f"Export failed: {type(exc).__name__}: {exc}"

        @guarded
        def finished():
            self._worker = None
            self._run_finished()
            if self._session_dock is not None:
                self._session_dock.refresh(wait=False)

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": finished})
        return self._worker

    def show_summary(self, summary: dict) -> None:
        """Per-item particle counts and states in the table; the total and the STAR files below the status."""
        self.summary = summary
        rows = summary["items"] + [{"name": s["name"], "particles": None, "state": f"skipped: {s['reason']}"}
                                   for s in summary["skipped"]]
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = (row["name"], "" if row["particles"] is None else str(row["particles"]), row["state"])
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                if c == 1:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                self.table.setItem(r, c, item)
        n_items = sum(1 for r in summary["items"] if r["particles"])
        lists = [f"{k}: {p}" if p is not None else f"{k}: none" for k, p in summary["lists"].items()]
        self.total.value = (f"<b>Total: {summary['total']} particles</b> in {n_items} item(s). "
                            f"STAR files (RELION 3.1) — {'; '.join(lists)}.")
