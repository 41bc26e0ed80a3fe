"""Session dock: online processing of a folder (or attaching to one a headless ``napari-warp process --watch`` fills),
the settings form, progress, and the item list coloured by status; an item opens as layers in the viewer."""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
import dataclasses
import functools
import weakref
from pathlib import Path

from magicgui.widgets import (
    CheckBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import thread_worker
from psygnal import Signal
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from .ctf import _policy, _scroll_area, _selectable, parse_ctf_grid

REFRESH_MS = 2000  # the item list is re-read from the files this often
TICK_MS = 250  # progress and finished items from the worker are shown this often
ITEM_KEY = "napari_warp_session_item"  # layer metadata key of the layers an opened item adds

# background colours of the item list (white text), by status
STATUS_COLOURS = {
    "processed": "#2e7d32",
    "unprocessed": "#5f6368",
    "outdated": "#7a7f87",
    "processing": "#1565c0",
    "failed": "#c62828",
    "filtered": "#e67e00",
    "deselected": "#26282c",
}
COLUMNS = ("Item", "Status", "Defocus (µm)", "Fit res. (Å)", "Motion (Å)")

# live session and overview docks, so an overview follows the session dock of the same viewer
_DOCKS: "weakref.WeakSet" = weakref.WeakSet()


def guarded(fn):
    """A GUI callback that does nothing once its Qt widgets are deleted (a timer or worker outliving its dock)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if "deleted" in str(exc):
                return None
            raise

    return wrapper


def parse_xy_grid(text: str) -> tuple[int, int] | None:
    """'5x3' (x×y nodes) -> ``(Gy, Gx)`` = (3, 5); '' or 'auto' -> None."""
    t = text.strip().lower().replace("×", "x").replace("*", "x")
    if t in ("", "auto"):
        return None
    try:
        gx, gy = (int(v) for v in t.split("x"))
    except ValueError:
        raise ValueError(f"Local grid {text!r}: expected x×y nodes, e.g. 5x5, or auto") from None
    if gx < 1 or gy < 1:
        raise ValueError(f"Local grid {text!r}: each side needs at least 1 node")
    return (gy, gx)


def format_xy_grid(grid) -> str:
    """Inverse of ``parse_xy_grid``: ``(Gy, Gx)`` -> 'Gx x Gy'; None -> 'auto'."""
    if grid is None:
        return "auto"
    gy, gx = grid
    return f"{gx}x{gy}"


# ---------------------------------------------------------------------------------------------------------------
# opening an item (shared with the overview dock)
# ---------------------------------------------------------------------------------------------------------------
def item_layers(folder, movie, exaggerate: float = 20.0) -> list:
    """LayerData of a processed item (no Qt, safe in a worker): its aligned average binned for display (Å), its
    local-defocus overlay (µm) and its motion tracks, as far as they exist."""
    from .._layers import defocus_layer, image_layer, motion_tracks_layer
    from ..core.demo import binned_for_display
    from ..core.io.movie import read_volume
    from ..core.io.warp_xml import read_warp_xml
    from ..core.item import item_paths, load_ctf

    paths = item_paths(folder, movie)
    if not paths.average.exists():
        raise FileNotFoundError(f"{paths.name}: no aligned average yet ({paths.average})")
    meta = read_warp_xml(paths.xml, kinds=("Movie",)) if paths.xml.exists() else None
    volume, voxel = read_volume(paths.average)
    average = volume[0]
    ps = (meta.get_float("PixelSize", None) if meta is not None else None) or voxel or 1.0
    shown, ps_shown = binned_for_display(average, float(ps))
    tag = {ITEM_KEY: paths.name, "movie": str(movie), "folder": str(folder)}
    layers = [image_layer(shown, ps_shown, f"{paths.name} average, {ps_shown:.3g} Å/px", metadata=dict(tag))]
    fit = load_ctf(folder, movie)
    if fit is not None:
        layers.append(defocus_layer(fit, ps_shown, shown.shape, f"{paths.name} local defocus (µm)",
                                    metadata={**tag, "source": layers[0][1]["name"]}))
    if meta is not None and meta.has("GridMovementX"):
        try:
            from ..core.motion import motion_from_xml

            model = motion_from_xml(meta, average.shape, float(ps))
            data, lmeta, kind = motion_tracks_layer(model, f"{paths.name} motion ×{exaggerate:g}", exaggerate)
            lmeta["metadata"] = {**lmeta.get("metadata", {}), **tag}
            layers.append((data, lmeta, kind))
        except (ValueError, KeyError, RuntimeError):  # tracks are a bonus; the average and defocus still show
            pass
    return layers


def show_item_layers(viewer, layers: list) -> list:
    """Replace the layers of the previously opened item with ``layers`` (LayerData); returns the new layers."""
    first = not any(ITEM_KEY in (lay.metadata or {}) for lay in viewer.layers)
    for old in [lay for lay in viewer.layers if ITEM_KEY in (lay.metadata or {})]:
        viewer.layers.remove(old)
    added = []
    for data, meta, kind in layers:
        added.append(getattr(viewer, f"add_{kind}")(data, **meta))
    if added:
        viewer.layers.selection.active = added[0]
        if first:
            viewer.reset_view()
    return added


_OPENING: dict = {}  # id(viewer) -> [worker in flight, pending (folder, movie) or None]


def open_item(viewer, folder, movie, on_done=None, on_error=None):
    """Open an item in ``viewer`` (average, defocus overlay, motion tracks) from a worker thread. Returns the
    worker; while one runs, only the latest request is kept and opened next."""
    state = _OPENING.setdefault(id(getattr(viewer, "__wrapped__", viewer)), [None, None])
    if state[0] is not None:
        state[1] = (folder, movie, on_done, on_error)
        return state[0]

    @thread_worker
    def work():
        return item_layers(folder, movie)

    def done(layers):
        added = show_item_layers(viewer, layers)
        if on_done is not None:
            on_done(added)

    def failed(exc):
        if on_error is not None:
            on_error(exc)

    def finished():
        state[0] = None
        if state[1] is not None:
            nxt, state[1] = state[1], None
            open_item(viewer, *nxt)

    state[0] = work(_connect={"returned": done, "errored": failed, "finished": finished})
    return state[0]


def read_records(folder) -> tuple:
    """(settings, records) of a processing folder from its files (no Qt, safe in a worker): the settings file (or
    defaults with the folder as input) and ``session_records`` with filters and manual choices applied."""
    from ..core.session import SessionSettings, load_settings, session_records

    folder = Path(folder)
    settings = load_settings(folder) or SessionSettings(input=str(folder))
    if not Path(settings.input).is_dir():
        return settings, []
    return settings, session_records(settings, folder)


def same_viewer(a, b) -> bool:
    """Whether two viewer references are the same viewer (napari hands plugins a proxy per widget)."""
    return getattr(a, "__wrapped__", a) is getattr(b, "__wrapped__", b)


class _ItemTable(QTableWidget):
    """The item list: rows select with the arrow keys; Enter/Return or a double click opens the item."""

    def __init__(self, on_open):
        super().__init__(0, len(COLUMNS))
        self._on_open = on_open
        self.setHorizontalHeaderLabels(COLUMNS)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(22)
        header = self.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in range(1, len(COLUMNS)):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.cellDoubleClicked.connect(lambda row, _col: self._on_open(row))
        self.setMinimumHeight(180)

    def keyPressEvent(self, event):
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and self.currentRow() >= 0:
            self._on_open(self.currentRow())
            return
        super().keyPressEvent(event)


class SessionWidget(Container):
    """Dock: process a folder of movies online (motion, CTF) with the settings form, or attach to a folder that
    another process fills; the item list follows the files and opens items in the viewer."""

    folder_changed = Signal(object)  # the processing folder (Path or None)
    records_changed = Signal(object)  # the list of records shown

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        self._viewer = viewer
        self._worker = None
        self._session = None
        self._refresh_worker = None
        self._pending: list = []  # records finished by the worker thread, shown by the GUI timer
        self._progress = None  # (stats, done, total) from the worker thread
        self._loaded = None  # SessionSettings the form was filled from
        self._shown: dict = {}  # form values as filled, to keep exact stored values when untouched
        self._file_filters = None
        self._header_ps = None
        self.records: list = []
        self.settle = 1.0  # s a file must be unchanged before it is processed
        self.poll = 1.0  # s between folder scans
        self.ticks = 0  # GUI timer ticks (a responsive GUI keeps ticking while the worker computes)

        # folders
        self.input_folder = FileEdit(label="Input folder (movies)", mode="d", nullable=True)
        self.processing_folder = FileEdit(label="Processing folder (empty = input)", mode="d", nullable=True)
        self.pattern = LineEdit(label="File pattern (globs)", value="*.tif *.tiff *.mrc *.mrcs *.eer *.em")
        self.recursive = CheckBox(label="Include sub-folders", value=False)
        # movie
        self.pixel_size = FloatSpinBox(label="Pixel size (Å, 0 = header)", value=0.0, min=0.0, max=100.0,
                                       step=0.001)
        self.exposure = FloatSpinBox(label="Exposure (e/Å² per frame)", value=1.0, min=0.001, max=100.0, step=0.01)
        self.gain = FileEdit(label="Gain reference (file)", mode="r", nullable=True)
        # motion
        self.patch_size = SpinBox(label="Patch size (px)", value=512, min=32, max=4096, step=32)
        self.bfactor = FloatSpinBox(label="Motion B-factor (Å²)", value=-500.0, min=-5000.0, max=0.0, step=50.0)
        self.local_grid = LineEdit(label="Local motion grid (x×y)", value="auto")
        # CTF
        self.window = SpinBox(label="CTF window (px)", value=512, min=64, max=2048, step=64)
        self.range_low = FloatSpinBox(label="Fit range from (Å)", value=20.0, min=1.0, max=1000.0, step=0.5)
        self.range_high = FloatSpinBox(label="Fit range to (Å)", value=10.0 / 3, min=0.2, max=500.0, step=0.1)
        self.defocus_min = FloatSpinBox(label="Defocus search min (µm)", value=0.3, min=0.01, max=20.0, step=0.1)
        self.defocus_max = FloatSpinBox(label="Defocus search max (µm)", value=5.0, min=0.02, max=20.0, step=0.1)
        self.ctf_grid = LineEdit(label="Defocus grid (x×y)", value="5x5")
        self.fit_phase = CheckBox(label="Fit phase shift (phase plate)", value=False)
        # filters
        self.filter_defocus_min = FloatSpinBox(label="Keep defocus from (µm, 0 = off)", value=0.0, min=0.0,
                                               max=20.0, step=0.1)
        self.filter_defocus_max = FloatSpinBox(label="Keep defocus to (µm, 0 = off)", value=0.0, min=0.0,
                                               max=20.0, step=0.1)
        self.filter_astigmatism = FloatSpinBox(label="Max astigmatism (σ over mean, 0 = off)", value=0.0, min=0.0,
                                               max=10.0, step=0.5)
        self.filter_resolution = FloatSpinBox(label="Worst fit resolution (Å, 0 = off)", value=0.0, min=0.0,
                                              max=100.0, step=0.5)
        self.filter_motion = FloatSpinBox(label="Max motion (Å, 0 = off)", value=0.0, min=0.0, max=100.0, step=0.5)
        self.form_note = Label(value="")
        # actions
        self.start_button = PushButton(text="Start processing")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.refresh_button = PushButton(text="Refresh list")
        self.progress = ProgressBar(label="Items processed", value=0, min=0, max=1)
        self.status = Label(value="Choose the input folder: its items are listed and refreshed from the files.")
        self.table = _ItemTable(self._open_row)
        self.open_button = PushButton(text="Open")
        self.include_button = PushButton(text="Include")
        self.exclude_button = PushButton(text="Exclude")
        self.reset_button = PushButton(text="Reset")
        self.item_info = Label(value="")

        def section(title):
            lab = Label(value=f"<b>{title}</b>")
            lab.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
            lab.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
            return lab

        buttons = Container(widgets=[self.start_button, self.stop_button, self.refresh_button], layout="horizontal",
                            labels=False)
        item_buttons = Container(widgets=[self.open_button, self.include_button, self.exclude_button,
                                          self.reset_button], layout="horizontal", labels=False)
        self._list_box = Container(widgets=[], labels=False)
        self._list_box.native.layout().addWidget(self.table)
        self._body = Container(
            widgets=[
                section("Folders"), self.input_folder, self.processing_folder, self.pattern, self.recursive,
                section("Movies"), self.pixel_size, self.exposure, self.gain,
                section("Motion"), self.patch_size, self.bfactor, self.local_grid,
                section("CTF"), self.window, self.range_low, self.range_high, self.defocus_min, self.defocus_max,
                self.ctf_grid, self.fit_phase,
                section("Quality filters"), self.filter_defocus_min, self.filter_defocus_max,
                self.filter_astigmatism, self.filter_resolution, self.filter_motion, self.form_note,
                buttons, self.progress, self.status,
                section("Items (Enter or double click opens)"), self._list_box, item_buttons, self.item_info,
            ],
        )
        super().__init__(widgets=[], labels=False)
        self._scroll = _scroll_area(self._body.native)
        self.native.layout().addWidget(self._scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)
        self.native.setSizePolicy(_policy("Preferred"), _policy("Expanding"))
        for w in (self.status, self.form_note, self.item_info):
            w.native.setWordWrap(True)
            w.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
        self.status.native.setTextInteractionFlags(_selectable())
        self.progress.native.setFormat("%v / %m items")

        self.input_folder.changed.connect(self._input_changed)
        self.processing_folder.changed.connect(self._folder_changed)
        self.pixel_size.changed.connect(self._update_note)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.refresh_button.changed.connect(lambda *_: self.refresh(wait=True))
        self.open_button.changed.connect(lambda *_: self.open_selected())
        self.include_button.changed.connect(lambda *_: self.set_manual("include"))
        self.exclude_button.changed.connect(lambda *_: self.set_manual("exclude"))
        self.reset_button.changed.connect(lambda *_: self.set_manual(None))
        self.table.itemSelectionChanged.connect(self._selection_changed)

        self._tick_timer = QTimer(self.native)
        self._tick_timer.setInterval(TICK_MS)
        self._tick_timer.timeout.connect(self._tick)
        self._refresh_timer = QTimer(self.native)
        self._refresh_timer.setInterval(REFRESH_MS)
        self._refresh_timer.timeout.connect(lambda: self.refresh(wait=False))
        _DOCKS.add(self)
        for dock in list(_DOCKS):
            if dock is not self and same_viewer(getattr(dock, "_viewer", None), viewer) and hasattr(dock, "link"):
                dock.link(self)
        # a closed dock stops its session after the item in flight (no reference to self: it may be half gone)
        running = self._running = {}
        self.native.destroyed.connect(lambda *_: running.get("session") and running["session"].stop())
        self._update_note()

    # -- folders -------------------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path | None:
        """The processing folder (the input folder unless set)."""
        out = self.processing_folder.value or self.input_folder.value
        return Path(out) if out else None

    def _input_changed(self, *_):
        if not self.processing_folder.value:
            self._folder_changed()

    def _folder_changed(self, *_):
        """Attach to the folder: fill the form from its settings file and list its items (refreshed from files)."""
        folder = self.folder
        self._header_ps = None
        if folder is not None and folder.is_dir():
            from ..core.errors import NapariWarpError
            from ..core.session import load_settings

            try:
                settings = load_settings(folder)
            except NapariWarpError as exc:
                settings = None
                self.status.value = str(exc)
            if settings is not None:
                self.load_form(settings)
            self.refresh(wait=True)
            self._refresh_timer.start()
        else:
            self._refresh_timer.stop()
        self.folder_changed.emit(folder)

    # -- the settings form ---------------------------------------------------------------------------------------
    def _ref_pixel_size(self) -> float:
        """Å/px that converts the fit range between Å and fractions of Nyquist: the form's pixel size, else that
        of a processed item or the first movie's header, else 1."""
        if self.pixel_size.value > 0:
            return float(self.pixel_size.value)
        if self._header_ps is None:
            self._header_ps = self._find_pixel_size() or 0.0
        return self._header_ps or 1.0

    def _find_pixel_size(self) -> float | None:
        folder = self.folder
        if folder is None or not folder.is_dir():
            return None
        from ..core.io.warp_xml import read_warp_xml

        for xml in sorted(folder.glob("*.xml"))[:5]:
            try:
                ps = read_warp_xml(xml, kinds=("Movie",)).get_float("PixelSize", None)
            except Exception:  # noqa: BLE001 -- any unreadable XML is just skipped
                continue
            if ps:
                return float(ps)
        try:
            from ..core.io.movie import open_movie
            from ..core.session import discover

            movies = discover(self.settings(validate=False), folder)
            if movies:
                return open_movie(movies[0]).pixel_size
        except Exception:  # noqa: BLE001 -- a header we cannot read: fall back to 1 Å/px
            return None
        return None

    def _update_note(self, *_):
        ps = self._ref_pixel_size()
        self.form_note.value = (f"Fit range converted at {ps:.4g} Å/px. Filters also apply to the overview; the "
                                "form is saved to the settings file on Start.")

    _EXACT = ("pixel_size", "exposure", "bfactor", "range_low", "range_high", "defocus_min", "defocus_max",
              "filter_defocus_min", "filter_defocus_max", "filter_astigmatism", "filter_resolution", "filter_motion")

    def load_form(self, settings) -> None:
        """Fill the form from ``settings`` (a SessionSettings); untouched fields keep their exact stored values."""
        self._loaded = settings
        self._file_filters = settings.filters
        m, mo, c, f = settings.movie, settings.motion, settings.ctf, settings.filters
        if settings.input and Path(settings.input).is_dir() and not self.input_folder.value:
            with self.input_folder.changed.blocked():
                self.input_folder.value = settings.input
        self.pattern.value = settings.pattern
        self.recursive.value = settings.recursive
        self.pixel_size.value = m.pixel_size
        self.exposure.value = m.exposure
        self.gain.value = m.gain or None
        self.patch_size.value = mo.patch_size
        self.bfactor.value = mo.bfactor
        self.local_grid.value = format_xy_grid(mo.local_grid)
        self.window.value = c.window
        ps = self._ref_pixel_size()
        self.range_low.value = round(2 * ps / c.range_min, 2)
        self.range_high.value = round(2 * ps / c.range_max, 2)
        self.defocus_min.value = c.defocus_min / 1e4
        self.defocus_max.value = c.defocus_max / 1e4
        gy, gx = c.grid
        self.ctf_grid.value = f"{gx}x{gy}"
        self.fit_phase.value = c.fit_phase
        self._load_filters(f)
        self._shown = {name: getattr(self, name).value for name in self._EXACT}
        self._shown["_ps"] = ps
        self._update_note()

    def _load_filters(self, f) -> None:
        self.filter_defocus_min.value = f.defocus_min
        self.filter_defocus_max.value = f.defocus_max
        self.filter_astigmatism.value = f.astigmatism_sigma
        self.filter_resolution.value = f.resolution_max
        self.filter_motion.value = f.motion_max
        for name in ("filter_defocus_min", "filter_defocus_max", "filter_astigmatism", "filter_resolution",
                     "filter_motion"):
            self._shown[name] = getattr(self, name).value

    def settings(self, validate: bool = True):
        """SessionSettings from the form (settings it does not show come from the loaded file, else defaults).
        Raises ValueError with a message fit for the status line."""
        from ..core.ctf_fit import CTFSettings
        from ..core.session import QualityFilters, SessionSettings

        base = self._loaded or SessionSettings()

        def value(name, stored, convert=float):
            """The form's value, or the exact stored one when the field is as it was filled."""
            w = getattr(self, name).value
            if name in self._shown and abs(w - self._shown[name]) < 1e-9:
                return stored
            return convert(w)

        inp = self.input_folder.value
        movie = dataclasses.replace(
            base.movie, pixel_size=value("pixel_size", base.movie.pixel_size),
            exposure=value("exposure", base.movie.exposure), gain=str(self.gain.value) if self.gain.value else "")
        if not validate:
            return dataclasses.replace(base, input=str(inp) if inp else base.input, pattern=self.pattern.value,
                                       recursive=bool(self.recursive.value), movie=movie)
        motion = dataclasses.replace(base.motion, patch_size=int(self.patch_size.value),
                                     bfactor=value("bfactor", base.motion.bfactor),
                                     local_grid=parse_xy_grid(self.local_grid.value))
        ps = self._ref_pixel_size()
        same_ps = abs(ps - self._shown.get("_ps", -1.0)) < 1e-9
        try:
            user = CTFSettings.from_user_units(
                ps, fit_range=(self.range_low.value, self.range_high.value),
                defocus_range=(self.defocus_min.value, self.defocus_max.value), window=int(self.window.value),
                grid=parse_ctf_grid(self.ctf_grid.value), fit_phase=bool(self.fit_phase.value))
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg[:1].upper() + msg[1:] + ".") from None
        ctf = dataclasses.replace(
            base.ctf, window=user.window, grid=user.grid, fit_phase=user.fit_phase,
            range_min=value("range_low", base.ctf.range_min, lambda _: user.range_min) if same_ps else user.range_min,
            range_max=value("range_high", base.ctf.range_max, lambda _: user.range_max) if same_ps else user.range_max,
            defocus_min=value("defocus_min", base.ctf.defocus_min, lambda _: user.defocus_min),
            defocus_max=value("defocus_max", base.ctf.defocus_max, lambda _: user.defocus_max),
        )
        bf = base.filters
        filters = QualityFilters(
            defocus_min=value("filter_defocus_min", bf.defocus_min),
            defocus_max=value("filter_defocus_max", bf.defocus_max),
            astigmatism_sigma=value("filter_astigmatism", bf.astigmatism_sigma),
            phase_min=bf.phase_min, phase_max=bf.phase_max,
            resolution_max=value("filter_resolution", bf.resolution_max),
            motion_max=value("filter_motion", bf.motion_max),
        )
        return dataclasses.replace(base, input=str(inp) if inp else base.input, pattern=self.pattern.value,
                                   recursive=bool(self.recursive.value), movie=movie, motion=motion, ctf=ctf,
                                   filters=filters)

    # -- processing ----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, *_, once: bool = False):
        """Save the form to the folder's settings file and process the folder online in a worker thread (until
        Stop; ``once``: until what is ready is done). Returns the worker, or None if the form is invalid."""
        from ..core.session import Session, save_settings

        if self._worker is not None:
            return self._worker
        if not self.input_folder.value or not Path(self.input_folder.value).is_dir():
            self.status.value = "Choose an existing input folder first."
            return None
        try:
            settings = self.settings()
        except ValueError as exc:
            self.status.value = str(exc)
            return None
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        save_settings(folder, settings)
        self._loaded = settings
        self._file_filters = settings.filters
        self._shown = {name: getattr(self, name).value for name in self._EXACT}
        self._shown["_ps"] = self._ref_pixel_size()
        self._pending.clear()
        self._progress = None
        session = Session(settings, folder, settle=self.settle, poll=self.poll,
                          on_item=self._pending.append,  # worker thread: only append, the GUI timer shows it
                          on_progress=self._on_progress)
        self._session = session
        self._running["session"] = session
        self.start_button.enabled = False
        self.stop_button.enabled = True
        self.status.value = f"Processing {settings.input} → {folder} …"

        @thread_worker
        def work():
            return session.run(once=once)

        @guarded
        def done(stats):
            rate = stats.rate_per_hour()
            self.status.value = (f"Stopped: {stats.done} item(s) processed, {stats.failed} failed this run"
                                 + (f", {rate:.0f} items/h." if stats.done else "."))

        @guarded
        def failed(exc):
            self.status.value = f"Processing stopped by an error: {type(exc).__name__}: {exc}"

        @guarded
        def finished():
            self._worker = None
            self._session = None
            self._running.pop("session", None)
            self.start_button.enabled = True
            self.stop_button.enabled = False
            self._tick()
            self.refresh(wait=True)

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": finished})
        self._tick_timer.start()
        self._refresh_timer.start()
        return self._worker

    def stop(self, *_):
        """Stop processing after the item in flight (the folder stays attached)."""
        if self._session is not None:
            self._session.stop()
            self.status.value = "Stopping after the current item …"

    def _on_progress(self, stats, done, total):  # worker thread: store only
        self._progress = (stats, done, total)

    @guarded
    def _tick(self):
        """GUI thread: show progress and the items the worker finished."""
        self.ticks += 1
        if self._progress is not None:
            stats, done, total = self._progress
            self.progress.max = max(total, 1)
            self.progress.value = min(done, max(total, 1))
            if self._worker is not None:
                rate = stats.rate_per_hour()
                lat = stats.latency(50)
                current = self._session.current if self._session is not None else None
                parts = [f"{done} of {total} items done"]
                if stats.done:
                    parts.append(f"{rate:.0f} items/h")
                if lat is not None:
                    parts.append(f"latency {lat:.1f} s (median)")
                if current is not None:
                    parts.append(f"now: {Path(current).name}")
                self.status.value = " · ".join(parts)
        if self._pending:
            finished, self._pending[:] = list(self._pending), []
            if finished:
                self.refresh(wait=True)
        elif self._session is not None:
            self._mark_processing()
        if self._worker is None:
            self._tick_timer.stop()

    def _mark_processing(self):
        current = self._session.current if self._session is not None else None
        for row, rec in enumerate(self.records):
            status = "processing" if current is not None and str(current) == rec["path"] else rec["status"]
            item = self.table.item(row, 1)
            if item is not None and item.text() != status:
                self._style_row(row, rec, status)

    # -- the item list -------------------------------------------------------------------------------------------
    @guarded
    def refresh(self, wait: bool = True):
        """Re-read the items from the files (``wait=False``: in a worker thread, skipped while one runs)."""
        folder = self.folder
        if folder is None or not folder.is_dir():
            return None
        if wait:
            self._show_records(*read_records(folder))
            return None
        if self._refresh_worker is not None:
            return None

        @thread_worker
        def work():
            return read_records(folder)

        @guarded
        def done(result):
            if folder == self.folder:
                self._show_records(*result)

        def finished():
            self._refresh_worker = None

        self._refresh_worker = work(_connect={"returned": done, "finished": finished})
        return self._refresh_worker

    def _show_records(self, settings, records):
        if self._file_filters is not None and settings.filters != self._file_filters:
            # changed elsewhere (the overview dock, an editor): show them; a running loop writes its micrograph
            # list with them from its next batch (the loop reads ``settings`` per batch)
            self._load_filters(settings.filters)
            if self._loaded is not None:
                self._loaded = dataclasses.replace(self._loaded, filters=settings.filters)
            if self._session is not None:
                self._session.settings = dataclasses.replace(self._session.settings, filters=settings.filters)
        self._file_filters = settings.filters
        selected = self.selected_record()
        names = [r["name"] for r in records]
        if names[: len(self.records)] != [r["name"] for r in self.records]:
            self.table.setRowCount(0)
        self.records = records
        self.table.setRowCount(len(records))
        current = self._session.current if self._session is not None else None
        for row, rec in enumerate(records):
            status = "processing" if current is not None and str(current) == rec["path"] else rec["status"]
            self._style_row(row, rec, status)
        if selected is not None and selected["name"] in names:
            with _blocked(self.table):
                self.table.selectRow(names.index(selected["name"]))
        counts = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        if not self.running:
            done = counts.get("processed", 0) + counts.get("filtered", 0) + counts.get("deselected", 0) + \
                counts.get("failed", 0)
            self.progress.max = max(len(records), 1)
            self.progress.value = done
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            self.status.value = f"{len(records)} item(s) in {self.folder}: {summary or 'none yet'}."
        self._selection_changed()
        self.records_changed.emit(records)

    def _style_row(self, row: int, rec: dict, status: str) -> None:
        m = rec.get("metrics") or {}

        def fmt(v, spec):
            return "" if v is None else format(v, spec)

        cells = (rec["name"], status, fmt(m.get("defocus"), ".3f"), fmt(m.get("fit_resolution"), ".2f"),
                 fmt(m.get("motion"), ".2f"))
        tip = status_tooltip(rec, status)
        bg = QBrush(QColor(STATUS_COLOURS.get(status, "#5f6368")))
        fg = QBrush(QColor("#ffffff"))
        for col, text in enumerate(cells):
            item = self.table.item(row, col)
            if item is None:
                item = QTableWidgetItem()
                self.table.setItem(row, col, item)
            item.setText(text)
            item.setBackground(bg)
            item.setForeground(fg)
            item.setToolTip(tip)
            if col > 1:
                item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))

    def selected_record(self) -> dict | None:
        row = self.table.currentRow()
        rows = {i.row() for i in self.table.selectedIndexes()}
        if rows:
            row = min(rows)
        return self.records[row] if 0 <= row < len(self.records) else None

    def select(self, name: str) -> bool:
        """Select the item called ``name`` in the list."""
        for row, rec in enumerate(self.records):
            if rec["name"] == name:
                self.table.selectRow(row)
                return True
        return False

    def _selection_changed(self):
        rec = self.selected_record()
        has = rec is not None
        for b in (self.open_button, self.include_button, self.exclude_button, self.reset_button):
            b.enabled = has
        if not has:
            self.item_info.value = ""
            return
        self.item_info.value = f"<b>{rec['name']}</b>: {status_tooltip(rec, rec['status'])}"

    # -- item actions --------------------------------------------------------------------------------------------
    def _open_row(self, row: int):
        if 0 <= row < len(self.records):
            return self.open(self.records[row])
        return None

    def open_selected(self):
        rec = self.selected_record()
        return self.open(rec) if rec is not None else None

    def open(self, record: dict):
        """Open an item (a record) in the viewer: average (Å), defocus overlay (µm), motion tracks. Returns the
        worker."""
        name = record["name"]
        self.item_info.value = f"Opening {name} …"

        @guarded
        def done(added):
            self.item_info.value = f"<b>{name}</b> opened: " + ", ".join(lay.name for lay in added) + "."

        @guarded
        def failed(exc):
            self.item_info.value = f"Could not open {name}: {exc}"

        return open_item(self._viewer, self.folder, record["path"], done, failed)

    def set_manual(self, choice):
        """Manual include (``"include"``), exclude (``"exclude"``) or reset (None) of the selected item."""
        from ..core.session import set_manual

        rec = self.selected_record()
        if rec is None:
            return
        set_manual(self.folder, rec["path"], choice)
        self.refresh(wait=True)


def status_tooltip(rec: dict, status: str) -> str:
    """What the item list says about an item's status (the failure reason, filter reasons, manual choice)."""
    if status == "failed":
        return f"failed: {rec.get('error') or 'unknown reason'}"
    if status == "filtered":
        return "filtered out: " + "; ".join(rec.get("filter_reasons") or [])
    if status == "deselected":
        return "excluded manually"
    if status == "processing":
        return "being processed now"
    if status == "outdated":
        return "outdated: the settings changed since it was processed"
    if status == "unprocessed":
        return "not processed yet"
    if rec.get("manual") == "include":
        return "processed; included manually" + (
            " (overrides: " + "; ".join(rec["filter_reasons"]) + ")" if rec.get("filter_reasons") else "")
    return "processed; passes the filters"


class _blocked:
    """Block a Qt widget's signals in a ``with`` block."""

    def __init__(self, widget):
        self.widget = widget

    def __enter__(self):
        self._old = self.widget.blockSignals(True)

    def __exit__(self, *exc):
        self.widget.blockSignals(self._old)
