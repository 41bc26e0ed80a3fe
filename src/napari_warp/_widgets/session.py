"""Session dock: online processing of a folder (or attaching to one a headless ``napari-warp process --watch`` fills),
the settings form, progress, and the item list coloured by status; an item opens as layers in the viewer."""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
import contextlib
import dataclasses
import functools
import math
import weakref
from pathlib import Path

from magicgui.widgets import (
    CheckBox,
    ComboBox,
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
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from .ctf import _policy, _scroll_area, _selectable

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
# the settings form, generated from the settings dataclasses
# ---------------------------------------------------------------------------------------------------------------
# (section of ``SessionSettings.sections()``, title), most used first; ``COLLAPSED`` ones start folded
FORM_SECTIONS = (("session", "Folders"), ("movie", "Movies"), ("ctf", "CTF"), ("picking", "Picking (BoxNet)"),
                 ("export", "Particle export"), ("filters", "Quality filters"), ("motion", "Motion"))
COLLAPSED = ("motion", "picking", "export")
_CHOICES = {"session.ctf_from": ("average", "frames")}
_FILES = ("movie.gain", "movie.defects", "picking.model")


def setting_fields(section: str) -> dict:
    """``{name: dataclasses.Field}`` of a section of the settings file."""
    from ..core.ctf_fit import CTFSettings
    from ..core.motion import MotionSettings
    from ..core.particles import ExportSettings
    from ..core.picking import BoxNetSettings
    from ..core.session import MovieOptions, QualityFilters, SessionSettings

    cls = {"session": SessionSettings, "movie": MovieOptions, "motion": MotionSettings, "ctf": CTFSettings,
           "picking": BoxNetSettings, "export": ExportSettings, "filters": QualityFilters}[section]
    return {f.name: f for f in dataclasses.fields(cls)}


def setting_label(key: str) -> str:
    """'Label (unit)' of a setting ``section.key``."""
    from ..core.session import SETTING_LABELS

    label, unit = SETTING_LABELS.get(key, (key.partition(".")[2].replace("_", " ").capitalize(), ""))
    return f"{label} ({unit})" if unit else label


def _field_kind(field) -> tuple[str, bool]:
    from ..core.session import _kind

    return _kind(field.type), "None" in str(field.type)


def format_setting(value, kind: str) -> str:
    """The text a LineEdit shows for a tuple or None-able setting: grids 'XxY', other tuples 'a, b', None 'auto'."""
    if value is None:
        return "auto"
    if isinstance(value, (tuple, list)):
        if kind == "tuple[int]" and len(value) == 2:
            return format_xy_grid(tuple(value))
        return ", ".join(str(v) for v in value)
    return str(value)


_SIGNED = ("ctf.phase_shift", "ctf.pixel_size_delta", "ctf.pixel_size_angle")  # may be negative, default 0


def _float_range(key: str, default: float) -> tuple[float, float, float, int]:
    """(min, max, step, decimals) of a float spin box, by the magnitude of its default (negatives allowed where
    the default is negative, e.g. B-factors; fractions up to 1)."""
    from ..core.session import SETTING_LABELS

    mag = abs(float(default))
    top = 1.0 if SETTING_LABELS.get(key, ("", ""))[1].startswith("fraction") else max(1000.0, 100 * mag)
    if mag >= 100:
        step = 10.0 ** math.floor(math.log10(mag))
    else:
        step = 10.0 ** math.floor(math.log10(mag)) / 10 if mag > 0 else 0.1
    step = min(max(step, 0.01), 1000.0)
    decimals = 1 if mag >= 100 else 4
    return (-top if default < 0 or key in _SIGNED else 0.0), top, step, decimals


def setting_widget(key: str, default, field):
    """The form widget of a setting: bool -> CheckBox, int -> SpinBox, float -> FloatSpinBox, tuple or None-able
    -> LineEdit ('XxY' grids, 'a, b', 'auto'), gain/defect paths -> FileEdit, choices -> ComboBox."""
    kind, optional = _field_kind(field)
    label = setting_label(key)
    if key in _CHOICES:
        w = ComboBox(label=label, choices=_CHOICES[key], value=default)
    elif key in _FILES:
        w = FileEdit(label=label, mode="r", nullable=True, value=default or None)
    elif kind.startswith("tuple") or optional:
        w = LineEdit(label=label, value=format_setting(default, kind))
    elif kind == "bool":
        w = CheckBox(label=label, value=bool(default))
    elif kind == "int":
        top = max(1000, 16 * abs(int(default)))
        w = SpinBox(label=label, value=int(default), min=-top if default < 0 else min(1, int(default)), max=top,
                    step=32 if default >= 256 else 1)
    elif kind == "float":
        lo, hi, step, decimals = _float_range(key, default)
        w = FloatSpinBox(label=label, min=lo, max=hi, step=step)
        w.native.setDecimals(decimals)
        w.value = float(default)
    else:
        w = LineEdit(label=label, value=str(default))
    w.tooltip = f"{label}: {key} in the settings file (`napari-warp process --set {key}=…`)"
    return w


def _widget_value(w):
    """A form widget's value as the settings file takes it (paths as strings, '' for none)."""
    if isinstance(w, FileEdit):
        return str(w.value) if w.value else ""
    return w.value


def _set_widget(w, value, kind: str) -> None:
    if isinstance(w, FileEdit):
        w.value = value or None
    elif isinstance(w, LineEdit):
        w.value = format_setting(value, kind)
    elif isinstance(w, (SpinBox, FloatSpinBox)):
        if value > w.max:
            w.max = value
        if value < w.min:
            w.min = value
        w.value = value
    else:
        w.value = value


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-9
        except (TypeError, ValueError):
            return False
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# opening an item (shared with the overview dock)
# ---------------------------------------------------------------------------------------------------------------
def item_layers(folder, movie, exaggerate: float = 20.0) -> list:
    """LayerData of a processed item (no Qt, safe in a worker): its aligned average binned for display (Å), its
    local-defocus overlay (µm), its motion tracks and its BoxNet picks and artifact mask, as far as they exist."""
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
    layers += _picking_layers(paths, meta, float(ps), tag, layers[0][1]["name"])
    return layers


def _picking_layers(paths, meta, ps: float, tag: dict, source: str) -> list:
    """The item's BoxNet picks (Points, at the average's own sampling so positions are exact) and artifact mask."""
    from .._layers import mask_layer, picks_layer
    from ..core.picking.io import read_picks_star

    out = []
    if paths.picks.exists():
        table = read_picks_star(paths.picks)
        diameter = table.info.get("diameter") or 150.0
        threshold = table.info.get("threshold")
        out.append(picks_layer(table.yx, table.score, ps, float(diameter), f"{paths.name} picks",
                               threshold=float(threshold) if threshold is not None else None,
                               metadata={**tag, "source": source, "model": table.info.get("model")}))
    if paths.mask.exists():
        import tifffile

        mask = tifffile.imread(paths.mask) > 0
        if mask.any():
            out.append(mask_layer(mask, ps, f"{paths.name} artifacts", metadata=dict(tag)))
    return out


def item_picks_layer(viewer):
    """The picks (Points) layer of the session item opened in ``viewer``, or None."""
    for layer in viewer.layers:
        meta = layer.metadata or {}
        if ITEM_KEY in meta and meta.get("napari_warp_role") == "picks":
            return layer
    return None


def save_picks_layer(layer):
    """Write an opened item's picks layer, as edited, back to its ``picks/<name>.star`` (and ``ParticleCount``);
    the new file content makes the item's particle export outdated. Returns the path."""
    import numpy as np

    from ..core.item import save_item_picks

    meta = layer.metadata
    score = np.asarray(layer.features["score"], dtype=float) if "score" in layer.features else None
    return save_item_picks(meta["folder"], meta["movie"], np.asarray(layer.data, dtype=float).reshape(-1, 2), score)


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


def refresh_records(dock, worker_attr: str, show, wait: bool = True):
    """Re-read ``dock.folder``'s settings and records and hand them to ``show(settings, records)``: here when
    ``wait``, else in a worker (kept in ``dock.<worker_attr>``; skipped while one runs, and dropped if the dock has
    moved to another folder meanwhile). Returns the worker or None."""
    folder = dock.folder
    if folder is None or not folder.is_dir():
        return None
    if wait:
        show(*read_records(folder))
        return None
    if getattr(dock, worker_attr) is not None:
        return None

    @thread_worker
    def work():
        return read_records(folder)

    @guarded
    def done(result):
        if folder == dock.folder:
            show(*result)

    def finished():
        setattr(dock, worker_attr, None)

    worker = work(_connect={"returned": done, "finished": finished})
    setattr(dock, worker_attr, worker)
    return worker


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

        # the settings form: every setting of every section, generated from the dataclasses
        from ..core.session import SessionSettings

        defaults = SessionSettings().sections()
        self.fields: dict = {}  # "section.key" -> its widget
        for section, values in defaults.items():
            kinds = setting_fields(section)
            for name, default in values.items():
                key = f"{section}.{name}"
                if key == "session.input":
                    w = FileEdit(label=setting_label(key), mode="d", nullable=True)
                else:
                    w = setting_widget(key, default, kinds[name])
                self.fields[key] = w
        self._kinds = {f"{sec}.{n}": _field_kind(f)[0] for sec in defaults for n, f in setting_fields(sec).items()}
        self.input_folder = self.fields["session.input"]
        self.processing_folder = FileEdit(label="Processing folder (empty = input)", mode="d", nullable=True)
        self.pattern = self.fields["session.pattern"]
        self.recursive = self.fields["session.recursive"]
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
        self.save_picks_button = PushButton(text="Save edited picks", enabled=False)
        self.save_picks_button.tooltip = ("Write the opened item's picks layer, as edited, to picks/<name>.star: "
                                          "that item's particle export becomes outdated")
        self.item_info = Label(value="")

        def section(title):
            lab = Label(value=f"<b>{title}</b>")
            lab.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
            lab.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
            return lab

        buttons = Container(widgets=[self.start_button, self.stop_button, self.refresh_button], layout="horizontal",
                            labels=False)
        item_buttons = Container(widgets=[self.open_button, self.include_button, self.exclude_button,
                                          self.reset_button, self.save_picks_button], layout="horizontal",
                                 labels=False)
        self._list_box = Container(widgets=[], labels=False)
        self._list_box.native.layout().addWidget(self.table)
        self.sections: dict = {}  # section -> its sub-form (a Container)
        self.section_buttons: dict = {}  # section -> the header button that folds it
        form = []
        for sec, title in FORM_SECTIONS:
            widgets = [w for key, w in self.fields.items() if key.partition(".")[0] == sec]
            if sec == "session":
                widgets.insert(1, self.processing_folder)
            box = Container(widgets=widgets, labels=True)
            box.native.layout().setContentsMargins(8, 0, 0, 4)
            head = PushButton(text=title)
            head.native.setFlat(True)
            head.native.setStyleSheet("text-align: left; font-weight: bold; padding: 2px;")
            head.changed.connect(lambda *_, s=sec: self.fold(s, self.sections[s].visible))
            self.sections[sec] = box
            self.section_buttons[sec] = head
            form += [head, box]
        self._body = Container(
            widgets=[
                *form, self.form_note,
                buttons, self.progress, self.status,
                section("Items (Enter or double click opens)"), self._list_box, item_buttons, self.item_info,
            ],
            labels=False,
        )
        for sec, title in FORM_SECTIONS:
            self.fold(sec, sec in COLLAPSED)
        super().__init__(widgets=[], labels=False)
        self._scroll = _scroll_area(self._body.native)
        self.native.layout().addWidget(self._scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)
        self.native.setSizePolicy(_policy("Preferred"), _policy("Expanding"))
        self._aligner = _OnShow(self.align_labels)  # once styled (docked), the labels' real widths are known
        self.native.installEventFilter(self._aligner)
        for w in (self.status, self.form_note, self.item_info):
            w.native.setWordWrap(True)
            w.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
        self.status.native.setTextInteractionFlags(_selectable())
        self.progress.native.setFormat("%v / %m items")

        self.input_folder.changed.connect(self._input_changed)
        self.processing_folder.changed.connect(self._folder_changed)
        for key in ("movie.pixel_size", "ctf.range_min", "ctf.range_max", "ctf.defocus_min", "ctf.defocus_max"):
            self.fields[key].changed.connect(self._update_note)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.refresh_button.changed.connect(lambda *_: self.refresh(wait=True))
        self.open_button.changed.connect(lambda *_: self.open_selected())
        self.include_button.changed.connect(lambda *_: self.set_manual("include"))
        self.exclude_button.changed.connect(lambda *_: self.set_manual("exclude"))
        self.reset_button.changed.connect(lambda *_: self.set_manual(None))
        self.save_picks_button.changed.connect(lambda *_: self.save_picks())
        for ev in ("inserted", "removed"):
            getattr(viewer.layers.events, ev).connect(self._layers_changed)
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
    def fold(self, section: str, folded: bool = True) -> None:
        """Fold (hide) or unfold a section of the settings form."""
        title = dict(FORM_SECTIONS)[section]
        self.sections[section].visible = not folded
        n = len(self.sections[section])
        self.section_buttons[section].text = f"{'▸' if folded else '▾'} {title}" + (
            f"  ({n} settings, click to show)" if folded else "")

    def align_labels(self) -> None:
        """One label column per section: each section's labels as wide as its widest (as styled now)."""
        for box in self.sections.values():
            labels = [lw._label_widget.native for w in box if (lw := w._labeled_widget()) is not None]
            if not labels:
                continue
            for lab in labels:
                lab.setMinimumWidth(0)
                lab.ensurePolished()
            widest = max(lab.sizeHint().width() for lab in labels)
            for lab in labels:
                lab.setMinimumWidth(widest)

    def _ref_pixel_size(self) -> float:
        """Å/px at which the note shows the fit range in Å: the form's pixel size, else that of a processed item or
        the first movie's header, else 1."""
        ps = self.fields["movie.pixel_size"].value
        if ps > 0:
            return float(ps)
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
        f = self.fields
        ps = self._ref_pixel_size()
        lo, hi = f["ctf.range_min"].value, f["ctf.range_max"].value
        res = (f"{2 * ps / lo:.3g}–{2 * ps / hi:.3g} Å at {ps:.4g} Å/px" if lo > 0 and hi > 0 else "invalid")
        self.form_note.value = (
            f"CTF fit range = {res}; defocus search {f['ctf.defocus_min'].value / 1e4:.3g}–"
            f"{f['ctf.defocus_max'].value / 1e4:.3g} µm. Filters also apply to the overview; the form is saved to "
            "the settings file on Start.")

    def load_form(self, settings) -> None:
        """Fill every field of the form from ``settings`` (a SessionSettings); untouched fields keep their exact
        stored values."""
        self._loaded = settings
        self._file_filters = settings.filters
        self._shown = {}
        if settings.input and Path(settings.input).is_dir() and not self.input_folder.value:
            with self.input_folder.changed.blocked():
                self.input_folder.value = settings.input
        for section, values in settings.sections().items():
            if section == "filters":
                continue
            for name, value in values.items():
                key = f"{section}.{name}"
                if key == "session.input":
                    continue
                w = self.fields[key]
                _set_widget(w, value, self._kinds[key])
                self._shown[key] = _widget_value(w)
        self._load_filters(settings.filters)
        self._update_note()

    def _load_filters(self, f) -> None:
        for name, value in dataclasses.asdict(f).items():
            key = f"filters.{name}"
            _set_widget(self.fields[key], value, self._kinds[key])
            self._shown[key] = _widget_value(self.fields[key])

    def form_sections(self) -> dict:
        """The form as the settings file's sections (``{section: {key: value}}``; the exact stored value where a
        field is as it was filled; tuples and 'auto' as typed)."""
        from ..core.session import SessionSettings

        base = self._loaded or SessionSettings()
        stored = base.sections()
        out: dict = {}
        for key, w in self.fields.items():
            section, _, name = key.partition(".")
            value = _widget_value(w)
            if key == "session.input":
                value = value or base.input
            elif key in self._shown and _same(value, self._shown[key]):
                value = stored[section][name]
            out.setdefault(section, {})[name] = value
        return out

    def settings(self, validate: bool = True):
        """SessionSettings from the form. Raises ValueError naming the setting, fit for the status line
        (``validate=False``: falls back to the loaded settings with the form's folder and pattern instead)."""
        from ..core.session import SessionSettings, settings_from_sections

        try:
            return settings_from_sections(self.form_sections())
        except ValueError as exc:
            if not validate:
                base = self._loaded or SessionSettings()
                inp = self.input_folder.value
                return dataclasses.replace(base, input=str(inp) if inp else base.input, pattern=self.pattern.value,
                                           recursive=bool(self.recursive.value))
            msg = str(exc).rstrip(".")
            raise ValueError(f"Invalid setting: {msg}.") from None

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
        self._shown = {key: _widget_value(w) for key, w in self.fields.items() if key != "session.input"}
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
        return refresh_records(self, "_refresh_worker", self._show_records, wait)

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
        elsewhere = ("pick", "picking", "extract", "export")
        if (self._session is None and self._loaded is not None
                and any(getattr(settings, k) != getattr(self._loaded, k) for k in elsewhere)):
            # picking or export changed elsewhere (the BoxNet training dock pointed this session at a retrained
            # model, the export dock saved its form): show it, keeping the other fields as the user left them, so
            # Start does not write the old values back
            try:
                form = self.settings()
            except ValueError:
                form = self._loaded
            self.load_form(dataclasses.replace(form, **{k: getattr(settings, k) for k in elsewhere}))
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

    def _layers_changed(self, *_):
        with contextlib.suppress(RuntimeError):  # the dock's Qt widgets may be gone before the viewer
            self.save_picks_button.enabled = item_picks_layer(self._viewer) is not None

    def save_picks(self):
        """Save the opened item's picks layer (as edited) to its picks file; returns the path (None: nothing to
        save). The item's export step is outdated from then on, so the next run re-exports it."""
        layer = item_picks_layer(self._viewer)
        if layer is None:
            self.item_info.value = "No picks to save: open an item that has picks first."
            return None
        try:
            path = save_picks_layer(layer)
        except (OSError, ValueError) as exc:
            self.item_info.value = f"Could not save the picks of {layer.metadata.get(ITEM_KEY)}: {exc}"
            return None
        self.refresh(wait=True)  # before the message: a refresh shows the selected item's status there
        self.item_info.value = (f"Saved {len(layer.data)} picks of <b>{layer.metadata[ITEM_KEY]}</b> to {path}; "
                                "its particle export is outdated now.")
        return path


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
        stale = [step for step, v in (rec.get("steps") or {}).items() if not v.get("up_to_date")]
        if stale == ["export"]:
            return "outdated: its particle export (export settings or picks changed since)"
        return "outdated: the settings changed since it was processed"
    if status == "unprocessed":
        return "not processed yet"
    if rec.get("metrics", {}).get("exported") is not None and "export" in (rec.get("steps") or {}):
        n = int(rec["metrics"]["exported"])
        done = f"{n} particles exported" if n else "no picks, nothing exported"
    else:
        done = "processed"
    if rec.get("manual") == "include":
        return f"{done}; included manually" + (
            " (overrides: " + "; ".join(rec["filter_reasons"]) + ")" if rec.get("filter_reasons") else "")
    return f"{done}; passes the filters"


class _OnShow(QObject):
    """Event filter calling ``fn`` whenever the watched widget is shown."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def eventFilter(self, obj, event):  # noqa: N802 -- Qt's name
        if event.type() == QEvent.Type.Show:
            self._fn()
        return False


class _blocked:
    """Block a Qt widget's signals in a ``with`` block."""

    def __init__(self, widget):
        self.widget = widget

    def __enter__(self):
        self._old = self.widget.blockSignals(True)

    def __exit__(self, *exc):
        self.widget.blockSignals(self._old)
